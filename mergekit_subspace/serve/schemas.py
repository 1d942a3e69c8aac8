"""Request bodies of the HTTP API: the OpenAI fields we honour, strictly typed; unknown extras are ignored.

Fields OpenAI defines but this server cannot honour (streaming, logprobs, echo, suffix, tools) are refused with a
400 that says so, rather than silently dropped.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 16


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    def refused(self, *fields: str) -> list[str]:
        """Names of set fields this server does not implement."""
        extra = self.model_extra or {}
        return [name for name in fields if extra.get(name) not in (None, False, 0, [], {})]


class _Sampling(_Request):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt list is empty")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """Plain text of the message; content parts other than text are refused upstream."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content)

    def has_non_text(self) -> bool:
        return isinstance(self.content, list) and any(
            part.get("type", "text") != "text" for part in self.content
        )


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ClassifyRequest(_Request):
    model: str = Field(min_length=1)
    input: str | list[str]

    @field_validator("input")
    @classmethod
    def not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("input list is empty")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

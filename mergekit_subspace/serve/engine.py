"""Turn a collected batch of requests into as few model calls as possible, whatever tasks they ask for.

Runs on the model thread only. Generation rows that share sampling settings share one `generate` call (each row
keeps its own task, token limit and stop strings); classification rows share one forward with per-row heads.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.serve.batching import BatchInfo, Job
from mergekit_subspace.serve.guard import DEFAULT_MAX_REQUEST_TOKENS
from mergekit_subspace.serve.inject import MultiTaskModel
from mergekit_subspace.serve.loading import Kind

log = logging.getLogger("mergekit_subspace.serve")
DEFAULT_MAX_TOKENS = 16
# Work one request may queue, in rows x tokens (its row count times its longest row, prompt + max_tokens for
# completions): one full batch of 64 rows x 512 tokens. Never below the context, so one full-length row fits.
# A text longer than max_input_tokens x this many characters is refused without tokenizing it: no real text
# averages 32 characters a token, and tokenizing megabytes only to refuse them costs seconds of CPU.
MAX_CHARS_PER_TOKEN = 32


class InputTooLong(Exception):
    """A prompt or text longer than the server admits (HTTP 413)."""


class TooMuchWork(InputTooLong):
    """A request whose rows x tokens pass what one request may queue (HTTP 413)."""


@dataclass(frozen=True)
class Sampling:
    """Settings that must be equal for rows to share one generate call."""

    temperature: float
    top_p: float
    seed: int | None


@dataclass
class GenerateJob:
    task: str
    prompts: list[list[int]]  # one per output row (n copies already expanded)
    max_new_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)


@dataclass
class ClassifyJob:
    task: str
    texts: list[list[int]]


@dataclass
class Generated:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Engine:
    """Tokenizing, limits, and batched execution for one served model."""

    def __init__(
        self,
        served: MultiTaskModel,
        tokenizer: Any,
        kind: Kind,
        max_rows: int = 64,
        max_input_tokens: int | None = None,
        max_request_tokens: int | None = None,
    ) -> None:
        self.served = served
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_rows = max_rows
        self.context = _context_length(served.model, tokenizer)
        self.max_input_tokens = min(max_input_tokens or self.context, self.context)
        self.max_chars = self.max_input_tokens * MAX_CHARS_PER_TOKEN
        self.max_request_tokens = max_request_tokens or max(DEFAULT_MAX_REQUEST_TOKENS, self.context)
        self.refresh_error: str | None = None

    # ---- names ----------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [self.served.base_name] + self.served.tasks

    def refresh(self) -> list[str]:
        """Pick up tasks added to the store; a broken addition is reported and the old tasks keep serving."""
        try:
            new = self.served.maybe_refresh()
        except (SubspaceError, OSError, ValueError) as exc:
            self.refresh_error = str(exc)
            log.warning("store refresh failed, still serving the previous tasks: %s", exc)
            return []
        if new:
            self.refresh_error = None
            log.info("now serving new tasks: %s", ", ".join(new))
        return new

    # ---- tokenizing (tokenizer threads, never the event loop) -----------------------------------------
    def _check_chars(self, text: str) -> None:
        if len(text) > self.max_chars:
            raise InputTooLong(
                f"input is {len(text)} characters; this server admits at most {self.max_input_tokens} tokens "
                f"and refuses texts over {self.max_chars} characters without tokenizing them"
            )

    def encode(self, text: str) -> list[int]:
        self._check_chars(text)
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > self.max_input_tokens:
            raise InputTooLong(
                f"input is {len(ids)} tokens; this server admits at most {self.max_input_tokens}"
            )
        return list(ids)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise SubspaceError("the base model's tokenizer has no chat template; use /v1/completions")
        self._check_chars("".join(m["content"] for m in messages))
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        self._check_chars(text)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_input_tokens:
            raise InputTooLong(
                f"input is {len(ids)} tokens; this server admits at most {self.max_input_tokens}"
            )
        return list(ids)

    def check_room(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.context:
            raise InputTooLong(
                f"{prompt_tokens} prompt tokens + max_tokens {max_new_tokens} exceed the context of {self.context}"
            )

    def check_work(self, rows: list[list[int]], max_new_tokens: int = 0) -> int:
        """Rows x tokens this request would queue (its longest row, + max_new_tokens); TooMuchWork past the bound."""
        longest = max((len(r) for r in rows), default=0) + max_new_tokens
        work = len(rows) * longest
        if work > self.max_request_tokens:
            raise TooMuchWork(
                f"this request asks for {work} tokens of work ({len(rows)} rows x {longest} tokens, its longest "
                f"row{' with max_tokens' if max_new_tokens else ''}); one request may queue at most "
                f"{self.max_request_tokens} (--max-request-tokens): send fewer or shorter inputs per request"
            )
        return work

    # ---- running (model thread) -----------------------------------------------------------------------
    def run(self, jobs: list[Job], info: BatchInfo) -> list[Any]:
        """One result per job: a list of Generated / Classified rows, or the exception that job met."""
        del info
        self.refresh()
        if jobs[0].kind == "generate":
            return self._run_generate([j.payload for j in jobs])
        return self._run_classify([j.payload for j in jobs])

    def _run_generate(self, jobs: list[GenerateJob]) -> list[Any]:
        results: list[Any] = [[None] * len(job.prompts) for job in jobs]
        groups: dict[Sampling, list[tuple[int, int]]] = defaultdict(list)
        for j, job in enumerate(jobs):
            groups[job.sampling].extend((j, r) for r in range(len(job.prompts)))
        for sampling, rows in groups.items():
            for start in range(0, len(rows), self.max_rows):
                chunk = rows[start : start + self.max_rows]
                try:
                    outs = self._generate_rows(
                        [jobs[j].task for j, _ in chunk],
                        [jobs[j].prompts[r] for j, r in chunk],
                        [jobs[j].max_new_tokens for j, _ in chunk],
                        [jobs[j].stop for j, _ in chunk],
                        sampling,
                    )
                except Exception as exc:
                    log.exception("generation failed")
                    for j, _ in chunk:
                        results[j] = exc
                    continue
                for (j, r), out in zip(chunk, outs, strict=True):
                    if not isinstance(results[j], BaseException):
                        results[j][r] = out
        return results

    def _generate_rows(
        self,
        tasks: list[str],
        prompts: list[list[int]],
        limits: list[int],
        stops: list[list[str]],
        sampling: Sampling,
    ) -> list[Generated]:
        from transformers import GenerationConfig

        input_ids, attention = _pad(prompts, self.tokenizer.pad_token_id, left=True)
        eos = _eos_ids(self.served.model, self.tokenizer)
        config = GenerationConfig(
            max_new_tokens=max(limits),
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None,
            top_p=sampling.top_p if sampling.temperature > 0 else None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos or None,
        )
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        out = self.served.generate(
            tasks, input_ids=input_ids, attention_mask=attention, generation_config=config
        )
        new_tokens = out[:, input_ids.shape[1] :].tolist()
        results = []
        for row, limit, stop, prompt in zip(new_tokens, limits, stops, prompts, strict=True):
            row = row[:limit]
            finish = "length"
            for i, token in enumerate(row):
                if token in eos:
                    row, finish = row[:i], "stop"
                    break
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            results.append(Generated(text, finish, len(prompt), len(row)))
        return results

    def _run_classify(self, jobs: list[ClassifyJob]) -> list[Any]:
        rows = [(j, r) for j, job in enumerate(jobs) for r in range(len(job.texts))]
        results: list[Any] = [[None] * len(job.texts) for job in jobs]
        for start in range(0, len(rows), self.max_rows):
            chunk = rows[start : start + self.max_rows]
            tasks = [jobs[j].task for j, _ in chunk]
            try:
                input_ids, attention = _pad(
                    [jobs[j].texts[r] for j, r in chunk], self.tokenizer.pad_token_id, left=False
                )
                answers = self.served.classify(tasks, input_ids=input_ids, attention_mask=attention)
            except Exception as exc:
                if not isinstance(exc, SubspaceError):
                    log.exception("classification failed")
                for j, _ in chunk:
                    results[j] = exc
                continue
            for (j, r), answer in zip(chunk, answers, strict=True):
                if not isinstance(results[j], BaseException):
                    results[j][r] = answer
        return results


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _context_length(model: Any, tokenizer: Any) -> int:
    """Positions the model can take, capped by the tokenizer's own limit when that one is real."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < limit:
        limit = tok_limit
    return int(limit)

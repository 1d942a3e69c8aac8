"""The HTTP API: OpenAI-compatible completions and chat, /v1/classify, /v1/models, /health.

`"model"` picks the task (or the base model by its name), as vLLM and LoRAX do. Every error is a JSON body
{"error": {"message", "type", "code"}} with a fitting status; nothing a client sends can stop the server.

Nothing a client controls runs on the event loop: bodies are read under a byte limit and a deadline
(`guard.BodyGuard`), texts are tokenized on tokenizer threads, and a request's rows x tokens are bounded before it
is queued for the model thread, so /health answers while the model is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.serve.batching import Batcher, BatchInfo, Job, QueueFull
from mergekit_subspace.serve.engine import (
    DEFAULT_MAX_TOKENS,
    ClassifyJob,
    Engine,
    GenerateJob,
    InputTooLong,
    Sampling,
)
from mergekit_subspace.serve.guard import MAX_BODY_BYTES, BodyGuard, Limits, error_payload
from mergekit_subspace.serve.schemas import ChatRequest, ClassifyRequest, CompletionRequest

log = logging.getLogger("mergekit_subspace.serve")
MAX_INPUTS = 256  # texts or prompts x n per request
TOKENIZER_THREADS = 2
T = TypeVar("T")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_payload(status, message, param), status_code=status)


def _validation_message(exc: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


async def _read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """Body size first (413), so a bad body never reaches the model.

    BodyGuard has already read the body under the limit; the checks here hold for an app used without it.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}")
    body = await request.body()
    if len(body) > limit:
        raise ApiError(413, f"request body is {len(body)} bytes; the limit is {limit}")
    if not body.strip():
        raise ApiError(400, "request body is empty; send a JSON object")
    return body


def _validate(model: type[BaseModel], body: bytes) -> Any:
    """JSON and fields (400); megabytes of JSON take milliseconds, so callers run this off the event loop."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            raise ApiError(400, f"malformed JSON: {exc.errors()[0].get('msg')}") from None
        raise ApiError(400, _validation_message(exc)) from None


class LoopLag:
    """How late the event loop wakes a short timer: a loop blocked by work shows here (and in /health)."""

    def __init__(self, every_s: float = 0.05) -> None:
        self.every_s = every_s
        self.last_s = 0.0
        self.max_s = 0.0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.every_s)
            self.last_s = max(0.0, loop.time() - start - self.every_s)
            self.max_s = max(self.max_s, self.last_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def as_json(self) -> dict[str, float]:
        return {"last_ms": round(self.last_s * 1000, 1), "max_ms": round(self.max_s * 1000, 1)}


def _batch_json(info: BatchInfo) -> dict[str, Any]:
    return asdict(info)


def create_app(engine: Engine, batcher: Batcher | None = None, limits: Limits | None = None) -> FastAPI:
    """The ASGI app; `batcher` defaults to one built on `engine` (64 rows, 10 ms window, 256 in flight).

    `limits` bounds request bodies (bytes, seconds); the header deadline needs the server too: see
    `guard.server_config`.
    """
    batcher = batcher or Batcher(engine.run, max_rows=engine.max_rows)
    batcher.task_of = job_tasks
    limits = limits or Limits()
    tokenizing = ThreadPoolExecutor(max_workers=TOKENIZER_THREADS, thread_name_prefix="tokenize")
    lag = LoopLag()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        lag.start()
        yield
        await lag.stop()
        await batcher.stop()
        tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="mergekit-subspace", lifespan=lifespan)
    app.state.engine, app.state.batcher, app.state.limits = engine, batcher, limits
    app.add_middleware(BodyGuard, max_body_bytes=limits.max_body_bytes, body_timeout_s=limits.body_timeout_s)

    async def off_loop(func: Callable[[], T]) -> T:
        """Parsing and tokenizing (every step whose cost a client sets) run on a tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(tokenizing, func)

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        body = await _read_body(request, limits.max_body_bytes)
        if len(body) < 1 << 16:
            return _validate(model, body)  # small bodies: a thread hop would cost more than it saves
        return await off_loop(lambda: _validate(model, body))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    async def resolve(name: str) -> str:
        """The task a request names; a store that changed on disk is re-read once before saying 404."""
        if name not in engine.names and engine.served.changed():
            await batcher.run_exclusive(engine.refresh)
        if name not in engine.names:
            raise ApiError(404, f"unknown model '{name}'; known: {', '.join(engine.names)}", "model")
        return name

    async def submit(kind: str, rows: int, payload: Any) -> tuple[Any, BatchInfo]:
        try:
            return await batcher.submit(kind, rows, payload)
        except QueueFull as exc:
            raise ApiError(429, str(exc)) from None
        except InputTooLong as exc:
            raise ApiError(413, str(exc)) from None
        except SubspaceError as exc:
            raise ApiError(400, str(exc)) from None

    def need(kind: str, route: str) -> None:
        if engine.kind != kind:
            other = "/v1/classify" if engine.kind == "classify" else "/v1/completions or /v1/chat/completions"
            raise ApiError(
                400, f"this store serves a {engine.kind} model: {route} is not available; use {other}"
            )

    def sampling_of(req: CompletionRequest | ChatRequest, param_limit: int | None) -> tuple[int, Sampling]:
        if req.stream:
            raise ApiError(400, "stream=true is not supported by this server; send stream=false", "stream")
        temperature = 1.0 if req.temperature is None else req.temperature
        return param_limit or DEFAULT_MAX_TOKENS, Sampling(temperature, req.top_p or 1.0, req.seed)

    def check_rows(rows: int) -> None:
        if rows > MAX_INPUTS:
            raise ApiError(413, f"{rows} rows in one request; the limit is {MAX_INPUTS}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        last = batcher.last
        return {
            "status": "ok",
            "kind": engine.kind,
            "tasks": len(engine.served.tasks),
            "pending": batcher.pending,
            "batches": batcher.batches,
            "last_batch": None if last is None else _batch_json(last),
            "refresh_error": engine.refresh_error,
            "loop_lag": lag.as_json(),  # how late the event loop ran a 50 ms timer: last, and worst since start
        }

    def describe(name: str, now: int) -> dict[str, Any]:
        """An OpenAI model object, plus what this server knows of the task: kind, and a classifier's labels."""
        served = engine.served
        entry: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": now,
            "owned_by": "mergekit-subspace",
            "root": name,
        }
        if name != served.base_name:
            entry["parent"] = served.base_name
        entry["kind"] = engine.kind
        if engine.kind == "classify":
            untrained = served.untrained_head(name)
            entry["labels"] = served.labels(name)
            entry["num_labels"] = served.num_labels(name)
            entry["head"] = "own" if served.has_own_head(name) else "base"
            entry["classifiable"] = untrained is None
        return entry

    async def fresh() -> None:
        if engine.served.changed():
            await batcher.run_exclusive(engine.refresh)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        await fresh()
        now = int(time.time())
        return {"object": "list", "data": [describe(name, now) for name in engine.names]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        await fresh()
        return describe(await resolve(model_id), int(time.time()))

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, Any]:
        req = await parse(request, CompletionRequest)
        need("causal", "/v1/completions")
        refused = req.refused("logprobs", "echo", "suffix", "best_of", "logit_bias")
        if refused:
            raise ApiError(400, f"not supported by this server: {', '.join(refused)}", refused[0])
        task = await resolve(req.model)
        limit, sampling = sampling_of(req, req.max_tokens)
        check_rows(len(req.prompts()) * req.n)

        def encode() -> list[list[int]]:
            encoded = [engine.encode(p) for p in req.prompts()]
            for ids in encoded:
                engine.check_room(len(ids), limit)
            prompts = [ids for ids in encoded for _ in range(req.n)]
            engine.check_work(prompts, limit)
            return prompts

        try:
            prompts = await off_loop(encode)
        except InputTooLong as exc:
            raise ApiError(413, str(exc), "prompt") from None
        job = GenerateJob(task, prompts, limit, sampling, req.stop_list())
        outs, info = await submit("generate", len(prompts), job)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": task,
            "choices": [
                {"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
                for i, o in enumerate(outs)
            ],
            "usage": _usage(outs, req.n),
            "batch": _batch_json(info),
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        req = await parse(request, ChatRequest)
        need("causal", "/v1/chat/completions")
        refused = req.refused("logprobs", "tools", "functions", "response_format", "logit_bias")
        if refused:
            raise ApiError(400, f"not supported by this server: {', '.join(refused)}", refused[0])
        if any(m.has_non_text() for m in req.messages):
            raise ApiError(400, "only text content parts are supported", "messages")
        task = await resolve(req.model)
        limit, sampling = sampling_of(req, req.token_limit())
        check_rows(req.n)

        def encode() -> list[int]:
            ids = engine.encode_chat([{"role": m.role, "content": m.text()} for m in req.messages])
            engine.check_room(len(ids), limit)
            engine.check_work([ids] * req.n, limit)
            return ids

        try:
            ids = await off_loop(encode)
        except InputTooLong as exc:
            raise ApiError(413, str(exc), "messages") from None
        except SubspaceError as exc:
            raise ApiError(400, str(exc), "messages") from None
        job = GenerateJob(task, [ids] * req.n, limit, sampling, req.stop_list())
        outs, info = await submit("generate", req.n, job)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": task,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": o.text},
                    "logprobs": None,
                    "finish_reason": o.finish_reason,
                }
                for i, o in enumerate(outs)
            ],
            "usage": _usage(outs, req.n),
            "batch": _batch_json(info),
        }

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, Any]:
        req = await parse(request, ClassifyRequest)
        need("classify", "/v1/classify")
        task = await resolve(req.model)
        try:
            engine.served.check_classifiable(task)
        except SubspaceError as exc:
            raise ApiError(400, str(exc), "model") from None
        texts = req.texts()
        check_rows(len(texts))

        def encode() -> list[list[int]]:
            encoded = [engine.encode(t) for t in texts]
            engine.check_work(encoded)
            return encoded

        try:
            encoded = await off_loop(encode)
        except InputTooLong as exc:
            raise ApiError(413, str(exc), "input") from None
        outs, info = await submit("classify", len(encoded), ClassifyJob(task, encoded))
        return {
            "object": "list",
            "model": task,
            "data": [
                {"index": i, "label": o.label, "label_id": o.label_id, "scores": o.scores}
                for i, o in enumerate(outs)
            ],
            "usage": {
                "prompt_tokens": sum(len(e) for e in encoded),
                "total_tokens": sum(len(e) for e in encoded),
            },
            "batch": _batch_json(info),
        }

    return app


def job_tasks(job: Job) -> list[str]:
    return [job.payload.task]


def _usage(outs: list, n: int) -> dict[str, int]:
    prompt = sum(o.prompt_tokens for o in outs[::n])
    completion = sum(o.completion_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

"""Collect requests that arrive together into one model call: a short window, a row cap, a bounded admission.

Requests for different tasks land in the same batch; that is the point of a shared basis. The model runs on one
worker thread, so forward passes (and store refreshes, submitted through `run_exclusive`) never overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """More requests are in flight than the server admits; the client should retry later (HTTP 429)."""


@dataclass
class Job:
    """One request: `rows` batch rows of `payload`; the worker resolves `future` with its result."""

    kind: str
    rows: int
    payload: Any
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatchInfo:
    """What one model call held, reported back to every request in it."""

    id: int
    rows: int
    requests: int
    tasks: list[str]


RunBatch = Callable[[list[Job], BatchInfo], list[Any]]


class Batcher:
    """Admit up to `max_pending` requests; group those arriving within `window_s` into calls of <= `max_rows` rows.

    `run_batch(jobs, info)` runs on the worker thread and returns one result (or an Exception) per job.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        max_rows: int = 64,
        window_s: float = 0.01,
        max_pending: int = 256,
        task_of: Callable[[Job], list[str]] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.max_rows = max_rows
        self.window_s = window_s
        self.max_pending = max_pending
        self.task_of = task_of or (lambda job: [])
        self.pending = 0
        self.batches = 0
        self.last: BatchInfo | None = None
        self._queue: asyncio.Queue[Job] | None = None
        self._carry: Job | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._ids = itertools.count(1)

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ---- use ------------------------------------------------------------------------------------------
    async def submit(self, kind: str, rows: int, payload: Any) -> tuple[Any, BatchInfo]:
        """Queue one request and wait for its result; raises QueueFull at once when the server is saturated."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called")
        if self.pending >= self.max_pending:
            raise QueueFull(
                f"{self.pending} requests already in flight (limit {self.max_pending}); retry later"
            )
        self.pending += 1
        try:
            job = Job(kind, rows, payload, asyncio.get_running_loop().create_future())
            self._queue.put_nowait(job)
            return await job.future
        finally:
            self.pending -= 1

    async def run_exclusive(self, func: Callable[[], T]) -> T:
        """Run `func` on the model thread, between batches (store refreshes)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, func)

    # ---- worker ---------------------------------------------------------------------------------------
    async def _next(self, timeout: float | None) -> Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        assert self._queue is not None
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait() if not self._queue.empty() else None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _collect(self) -> list[Job]:
        first = await self._next(None)
        assert first is not None
        batch, rows = [first], first.rows
        deadline = first.arrived + self.window_s
        while rows < self.max_rows:
            job = await self._next(deadline - time.monotonic())
            if job is None:
                break
            if job.kind != first.kind or rows + job.rows > self.max_rows:
                self._carry = job  # starts the next batch
                break
            batch.append(job)
            rows += job.rows
        return [j for j in batch if not j.future.done()]  # drop requests whose client went away

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            tasks = sorted({t for job in batch for t in self.task_of(job)})
            info = BatchInfo(next(self._ids), sum(j.rows for j in batch), len(batch), tasks)
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, batch, info)
            except Exception as exc:  # the server keeps serving; each request gets the error
                results = [exc] * len(batch)
            self.batches += 1
            self.last = info
            for job, result in zip(batch, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result((result, info))

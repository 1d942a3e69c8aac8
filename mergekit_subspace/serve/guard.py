"""Not trusting a client's pace: deadlines for request headers and bodies, and a body limit counted while reading.

- `GuardedH11Protocol` (uvicorn's h11 protocol plus one timer): the request line and headers must arrive within
  `header_timeout_s` of the connection opening or of the first byte of a later keep-alive request. A client that
  sent part of them gets a 408 and its connection closed; one that sent nothing is closed. Nothing waits on it: a
  silent or trickling connection costs a socket and a timer until then, never a thread.
- `BodyGuard` (ASGI middleware): reads the whole body before the app sees the request, counting the bytes of every
  `receive()` message. It answers 413 as soon as the count passes `max_body_bytes` (or at once when a declared
  Content-Length does), chunked or not, and 408 when the body is not complete within `body_timeout_s`. Both close
  the connection. After a 413 it discards what the client is still sending for at most `LINGER_S` seconds, so an
  honest client that writes its whole body before reading reads the 413 instead of a reset.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("mergekit_subspace.serve")

MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_REQUEST_TOKENS = 64 * 512  # rows x tokens one request may queue: one batch of 64 x 512
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5.0
LINGER_S = 1.0  # after a 413: how long the rest of the body is read and dropped before closing
LINGER_BYTES = 64 << 20
ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    408: "request_timeout",
    413: "request_too_large",
    429: "rate_limit_error",
}


@dataclass(frozen=True)
class Limits:
    """What one client may take: body bytes, seconds to send its headers and its body, idle keep-alive seconds."""

    max_body_bytes: int = MAX_BODY_BYTES
    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    keep_alive_s: float = KEEP_ALIVE_S


def error_payload(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI-style error body every refusal of this server uses."""
    kind = ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _error_bytes(status: int, message: str) -> bytes:
    return json.dumps(error_payload(status, message)).encode()


# ---- body: ASGI middleware --------------------------------------------------------------------------------
class BodyGuard:
    """Read (and bound) the request body before the app runs; the app then gets it as one message."""

    def __init__(
        self, app: Any, max_body_bytes: int = MAX_BODY_BYTES, body_timeout_s: float = BODY_TIMEOUT_S
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(
                send, receive, 413, f"request body is {declared} bytes; the limit is {limit}", linger=True
            )
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                await _refuse(
                    send,
                    receive,
                    408,
                    f"the request body did not arrive within {self.body_timeout_s:g} s ({size} bytes came)",
                )
                return
            if message["type"] == "http.disconnect":
                return  # the client left; nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                text = f"request body is over the limit of {limit} bytes ({size} came before it was refused)"
                await _refuse(send, receive, 413, text, linger=True)
                return
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only http.disconnect can come

        await self.app(scope, replay, send)


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses such a request before it gets here
    return None


async def _refuse(send: Any, receive: Any, status: int, message: str, linger: bool = False) -> None:
    """Answer with a JSON error and close; with `linger`, drop what the client still sends (bounded) first."""
    body = _error_bytes(status, message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    # The whole answer goes out now; the response stays open only while the rest of the body is dropped.
    await send({"type": "http.response.body", "body": body, "more_body": linger})
    if not linger:
        return
    loop = asyncio.get_running_loop()
    deadline, dropped = loop.time() + LINGER_S, 0
    while dropped < LINGER_BYTES:
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            break
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
        dropped += len(message.get("body", b""))
    await send({"type": "http.response.body", "body": b"", "more_body": False})


# ---- headers: uvicorn protocol ----------------------------------------------------------------------------
def guarded_protocol(header_timeout_s: float = HEADER_TIMEOUT_S) -> Any:
    """uvicorn's h11 protocol class with a header deadline, or uvicorn's name 'h11' if its internals moved."""
    try:
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:  # pragma: no cover - a uvicorn without the h11 protocol module
        log.warning("uvicorn's h11 protocol was not found: serving without a header timeout")
        return "h11"

    class GuardedH11Protocol(H11Protocol):
        header_timeout = header_timeout_s

        def connection_made(self, transport: Any) -> None:
            self._header_timer: asyncio.TimerHandle | None = None
            self._partial = 0
            super().connection_made(transport)
            self._arm()  # a connection that never sends a byte is closed too

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:  # bytes of a request whose headers are not complete
                self._partial += len(data)
                if self._header_timer is None:
                    self._arm()
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # headers complete (or the connection failed)
                self._disarm()
                self._partial = 0

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if getattr(self, "_header_timer", None) is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport is None or self.transport.is_closing():
                return
            if self.conn.their_state is not h11.IDLE:
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # still answering the previous request
            if self._partial:
                body = _error_bytes(408, f"request headers did not arrive within {self.header_timeout:g} s")
                head = (
                    "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
                )
                self.transport.write(head.encode() + body)
            self.transport.close()

    return GuardedH11Protocol


def server_config(
    app: Any, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None, **kwargs: Any
):
    """A uvicorn.Config serving `app` with the header deadline and the keep-alive timeout of `limits`."""
    import uvicorn

    limits = limits or Limits()
    kwargs.setdefault("log_level", "info")
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits.header_timeout_s),
        timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]  # used as a float by call_later
        **kwargs,
    )

"""Hostile clients and Python serving: header and body deadlines, a body limit counted while reading, tokenizing off
the event loop, a bound on the work one request queues, /health while the model thread is busy; heads of different
widths padded with -inf; a clear error for generate on a classifier.

Every server here is uvicorn on 127.0.0.1 with an ephemeral port, in a thread; every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import load_base, make_lora
from test_serve import build_store, ids_of, peft_model, with_tokenizer

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.serve import attach
from mergekit_subspace.serve.guard import BodyGuard, Limits, server_config

LIMITS = Limits(max_body_bytes=64 << 10, header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_s=5.0)
MAX_INPUT_TOKENS = 30
MAX_REQUEST_TOKENS = 200


# ---- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def label_setup(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> dict:
    """Tiny BERT (3 labels) + a 3-label task, a 2-label task and a 5-label task on copies of the base."""
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("hard-bert")
    bases = {3: tiny_bert}
    for labels in (2, 5):
        bases[labels] = root / f"tiny-bert-{labels}"
        AutoModelForSequenceClassification.from_pretrained(
            tiny_bert, num_labels=labels, ignore_mismatched_sizes=True
        ).save_pretrained(bases[labels])
    zoo = [
        make_lora(bases[3], root / "zoo" / "three", seed=0, r=4),
        make_lora(bases[2], root / "zoo" / "two", seed=1, r=2),
        make_lora(bases[5], root / "zoo" / "five", seed=2, r=4),
    ]
    store = build_store(zoo, root / "store")
    rebuilt = {name: store.reconstruct(name, root / "rebuilt" / name) for name in store.tasks}
    widths = {"three": 3, "two": 2, "five": 5}
    return {"root": root, "store": store, "rebuilt": rebuilt, "bases": bases, "widths": widths}


class SlowTokenizer:
    """The engine's tokenizer with an optional sleep per call (a stand-in for megabytes of text)."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.delay = 0.0

    def __call__(self, *args, **kwargs):
        if self.delay:
            time.sleep(self.delay)
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def server(label_setup: dict, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):
    """build_app under uvicorn with server_config (the `serve` command's), tight limits, on an ephemeral port."""
    import uvicorn

    from mergekit_subspace.serve.command import build_app

    base = with_tokenizer(tiny_bert, tmp_path_factory.mktemp("hard-cls") / "tiny-bert")
    app = build_app(
        str(label_setup["store"].path),
        str(base),
        window_s=0.05,
        max_input_tokens=MAX_INPUT_TOKENS,
        max_request_tokens=MAX_REQUEST_TOKENS,
        limits=LIMITS,
    )
    tokenizer = SlowTokenizer(app.state.engine.tokenizer)
    app.state.engine.tokenizer = tokenizer
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = server_config(app, "127.0.0.1", port, LIMITS, log_level="warning", timeout_graceful_shutdown=2)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield {**label_setup, "url": url, "port": port, "app": app, "tokenizer": tokenizer, "base": base}
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.settimeout(5)
    return sock


def read_all(sock: socket.socket, limit_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes (or limit_s passes)."""
    data, deadline = b"", time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data


def read_response(sock: socket.socket) -> bytes:
    """One response (headers and a Content-Length body), without waiting for the connection to close."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(v)
        for k, _, v in (h.partition(b": ") for h in head.split(b"\r\n"))
        if k.lower() == b"content-length"
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, data
        body += chunk
    return head + b"\r\n\r\n" + body


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def json_of(reply: bytes) -> dict:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


# ---- Python serving -----------------------------------------------------------------------------------------
def test_narrower_heads_are_padded_with_minus_inf(label_setup: dict) -> None:
    store, rebuilt, bases, widths = (label_setup[k] for k in ("store", "rebuilt", "bases", "widths"))
    served = attach(load_base(bases[3]), store)
    assert served.logits_head == "classifier" and served.kind == "classify"
    ids = torch.randint(3, 90, (5, 9), generator=torch.Generator().manual_seed(1))
    rows = ["two", "three", None, "five", "two"]
    logits = served.forward(rows, input_ids=ids).logits
    assert logits.shape == (5, 5)
    for i, task in enumerate(rows):
        width = widths.get(task, 3)
        assert served.num_labels(task) == width
        assert torch.all(torch.isneginf(logits[i, width:])) and torch.all(torch.isfinite(logits[i, :width]))
        with torch.no_grad():
            if task is None:
                ref = load_base(bases[3])(input_ids=ids[i : i + 1]).logits[0]
            else:
                ref = peft_model(bases[width], rebuilt[task])(input_ids=ids[i : i + 1]).logits[0]
        # softmax and argmax over the whole padded row are the task's own
        torch.testing.assert_close(
            torch.softmax(logits[i], -1)[:width], torch.softmax(ref, -1), atol=1e-5, rtol=1e-5
        )
        assert int(logits[i].argmax()) == int(ref.argmax()) < width
    # one task for the whole batch (the gather-free path) pads the same way
    alone = served.forward(["two"] * 5, input_ids=ids).logits
    assert torch.all(torch.isneginf(alone[:, 2:]))
    torch.testing.assert_close(alone[0, :2], logits[0, :2], atol=1e-5, rtol=1e-5)


def test_generate_on_a_classifier_says_what_to_call(label_setup: dict) -> None:
    served = attach(load_base(label_setup["bases"][3]), label_setup["store"])
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(2))
    with pytest.raises(
        SubspaceError, match=r"sequence-classification model \(BertForSequenceClassification\)"
    ) as err:
        served.generate(["two", None], input_ids=ids, max_new_tokens=4)
    assert "served.forward" in str(err.value) and "/v1/classify" in str(err.value)
    assert not isinstance(err.value, AttributeError)


def test_http_classify_rows_use_their_own_label_count(server: dict) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    texts = {"two": ["a dog", "x y z"], "five": ["hello"], "three": ["the red car"]}

    def post(task: str):
        return httpx.post(
            f"{server['url']}/v1/classify", json={"model": task, "input": texts[task]}, timeout=30
        )

    with ThreadPoolExecutor(3) as pool:
        replies = dict(zip(texts, pool.map(post, texts), strict=True))
    assert all(r.status_code == 200 for r in replies.values()), [r.text for r in replies.values()]
    for task, reply in replies.items():
        width = server["widths"][task]
        for text, row in zip(texts[task], reply.json()["data"], strict=True):
            ids = torch.tensor(ids_of([text], server["base"]))
            with torch.no_grad():
                ref = peft_model(server["bases"][width], server["rebuilt"][task])(input_ids=ids).logits[0]
            assert len(row["scores"]) == width and row["label_id"] == int(ref.argmax())
            assert row["scores"] == pytest.approx(torch.softmax(ref, -1).tolist(), abs=1e-5)


# ---- slow clients ---------------------------------------------------------------------------------------------
def test_silent_connection_is_closed_after_the_header_timeout(server: dict) -> None:
    started = time.monotonic()
    with connect(server["port"]) as sock:
        assert read_all(sock) == b""  # closed, nothing said
    assert 0.3 < time.monotonic() - started < 3.0


def test_trickled_headers_get_408_even_while_bytes_keep_coming(server: dict) -> None:
    head = b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-pad: " + b"a" * 200
    started = time.monotonic()
    reply = b""
    with connect(server["port"]) as sock:
        for byte in head:  # one byte every 20 ms: each resets no timer
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            if select.select([sock], [], [], 0.02)[0]:
                break
            if time.monotonic() - started > 4:
                break
        reply = read_all(sock)
    elapsed = time.monotonic() - started
    assert status_of(reply) == 408, reply
    assert "headers did not arrive within 0.5 s" in json_of(reply)["error"]["message"]
    assert elapsed < 3.0


def test_keep_alive_connection_then_partial_headers_get_408(server: dict) -> None:
    with connect(server["port"]) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        first = read_response(sock)
        assert first.startswith(b"HTTP/1.1 200"), first
        time.sleep(0.8)  # idle longer than the header timeout: keep-alive governs idle time, not it
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nhost:")
        reply = read_all(sock)
    assert status_of(reply) == 408, reply
    assert time.monotonic() - started < 3.0


def test_slow_body_gets_408(server: dict) -> None:
    started = time.monotonic()
    with connect(server["port"]) as sock:
        sock.sendall(
            b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
            b'{"model": '
        )
        reply = read_all(sock)
    assert status_of(reply) == 408, reply
    assert "body did not arrive within 0.5 s (10 bytes came)" in json_of(reply)["error"]["message"]
    assert time.monotonic() - started < 3.0
    assert b"connection: close" in reply.lower()


def test_chunked_body_is_refused_once_it_passes_the_limit(server: dict) -> None:
    """20 MB offered in 16 KB chunks: the 413 comes while the client is still sending, long before the end."""
    chunk = b"a" * (16 << 10)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent, reply = 0, b""
    started = time.monotonic()
    with connect(server["port"]) as sock:
        sock.sendall(
            b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        try:
            while sent < (20 << 20) and time.monotonic() - started < 10:
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(framed)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = read_all(sock)
    assert status_of(reply) == 413, reply[:200]
    assert "over the limit of 65536 bytes" in json_of(reply)["error"]["message"]
    assert sent < (8 << 20), sent  # refused early: most of the 20 MB was never sent


def test_declared_oversized_body_is_refused_before_reading(server: dict) -> None:
    import httpx

    with connect(server["port"]) as sock:
        started = time.monotonic()
        sock.sendall(
            b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 999999999\r\n\r\n"
        )
        first = read_response(sock)  # the answer comes at once, while the server lingers before closing
        assert time.monotonic() - started < 1.0
    assert status_of(first) == 413 and b"999999999 bytes; the limit is 65536" in first
    # an honest client that writes its whole (too big) body before reading still reads the 413
    reply = httpx.post(f"{server['url']}/v1/classify", content=b"x" * (1 << 20), timeout=10)
    assert reply.status_code == 413 and "limit is 65536" in reply.json()["error"]["message"]


def test_body_guard_answers_as_soon_as_the_limit_is_passed() -> None:
    """At the ASGI level: an endless chunked body is refused after limit + one chunk, never read to its end."""
    received = {"bytes": 0, "at_answer": None}
    sent: list[dict] = []

    async def endless_receive() -> dict:
        received["bytes"] += 1000
        return {"type": "http.request", "body": b"a" * 1000, "more_body": True}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            received["at_answer"] = received["bytes"]
        sent.append(message)

    async def app(scope, receive, send):  # pragma: no cover - never reached
        raise AssertionError("the app must not see an oversized body")

    guard = BodyGuard(app, max_body_bytes=10_000, body_timeout_s=5)
    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    asyncio.run(asyncio.wait_for(guard(scope, endless_receive, send), 10))
    assert received["at_answer"] == 11_000
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


# ---- event loop and model thread ------------------------------------------------------------------------------
def _health_latencies(url: str, seconds: float) -> list[float]:
    import httpx

    latencies, deadline = [], time.monotonic() + seconds
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            start = time.monotonic()
            assert client.get(f"{url}/health").status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.02)
    return latencies


def test_tokenizing_is_off_the_event_loop(server: dict) -> None:
    import httpx

    server["tokenizer"].delay = 1.5
    try:
        result: dict = {}

        def post() -> None:
            result["reply"] = httpx.post(
                f"{server['url']}/v1/classify", json={"model": "two", "input": ["a b"]}, timeout=30
            )

        thread = threading.Thread(target=post)
        thread.start()
        time.sleep(0.2)
        latencies = _health_latencies(server["url"], 1.0)
        thread.join(timeout=20)
    finally:
        server["tokenizer"].delay = 0.0
    assert result["reply"].status_code == 200
    assert max(latencies) < 0.5, max(latencies)


def test_health_answers_while_the_model_thread_is_busy(server: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    batcher = server["app"].state.batcher
    real = batcher.run_batch

    def slow(jobs, info):
        time.sleep(1.5)
        return real(jobs, info)

    monkeypatch.setattr(batcher, "run_batch", slow)
    result: dict = {}

    def post() -> None:
        result["reply"] = httpx.post(
            f"{server['url']}/v1/classify", json={"model": "three", "input": ["a b"]}, timeout=30
        )

    thread = threading.Thread(target=post)
    thread.start()
    time.sleep(0.2)
    latencies = _health_latencies(server["url"], 1.0)
    thread.join(timeout=20)
    assert result["reply"].status_code == 200
    assert max(latencies) < 0.5, max(latencies)


def test_work_one_request_may_queue_is_bounded(server: dict) -> None:
    import httpx

    url = f"{server['url']}/v1/classify"
    text = "w" * 24  # 25 tokens with <s>: 8 rows = 200 = the bound, 9 rows pass it
    ok = httpx.post(url, json={"model": "three", "input": [text] * 8}, timeout=30)
    assert ok.status_code == 200, ok.text
    over = httpx.post(url, json={"model": "three", "input": [text] * 9}, timeout=30)
    assert over.status_code == 413
    message = over.json()["error"]["message"]
    assert "225 tokens of work (9 rows x 25 tokens" in message and "--max-request-tokens" in message
    # one long text among short ones counts as long as the batch it pads
    mixed = httpx.post(url, json={"model": "three", "input": ["a"] * 8 + [text]}, timeout=30)
    assert mixed.status_code == 413


def test_megabyte_text_is_refused_without_tokenizing(server: dict) -> None:
    import httpx

    tokenizer = server["tokenizer"]
    tokenizer.delay = 5.0  # were it tokenized, this request would take 5 s
    try:
        started = time.monotonic()
        reply = httpx.post(
            f"{server['url']}/v1/classify", json={"model": "two", "input": ["ab " * 20_000]}, timeout=30
        )
    finally:
        tokenizer.delay = 0.0
    assert time.monotonic() - started < 3.0
    assert reply.status_code == 413
    message = reply.json()["error"]["message"]
    assert "input is 60000 characters" in message and "without tokenizing" in message


def test_server_lives_on_after_the_abuse(server: dict) -> None:
    import httpx

    health = httpx.get(f"{server['url']}/health", timeout=5).json()
    assert health["status"] == "ok" and health["kind"] == "classify"
    assert 0 <= health["loop_lag"]["last_ms"] <= health["loop_lag"]["max_ms"]
    reply = httpx.post(f"{server['url']}/v1/classify", json={"model": "two", "input": ["a"]}, timeout=30)
    assert reply.status_code == 200 and len(reply.json()["data"][0]["scores"]) == 2


def test_command_exposes_the_limits() -> None:
    from click.testing import CliRunner

    from mergekit_subspace.serve.command import serve

    result = CliRunner().invoke(serve, ["--help"])
    assert result.exit_code == 0
    for option in ("--max-request-tokens", "--max-body-bytes", "--header-timeout", "--body-timeout"):
        assert option in result.output

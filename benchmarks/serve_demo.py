"""Transcript of `mergekit-subspace serve` answering the official `openai` client for two tasks in one batch.

Trains two small style LoRAs on SmolLM2-135M-Instruct (`pirate`: answers like a pirate; `shout`: answers in capitals;
8 examples each, 30 steps on a plain 'Question: / Answer:' format), compresses them into a store (k = 16), starts the server
on a free loopback port, sends completions and chat requests for different tasks at the same moment, and writes what
was said to benchmarks/results/serve/transcript.md.

Run from the repository root:  python -m benchmarks.serve_demo
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "cache" / "serve" / "demo"
QUESTIONS = [
    "Name one planet.",
    "What is the capital of France?",
    "What colour is the sky?",
    "How many legs does a spider have?",
    "What do bees make?",
    "Which animal barks?",
    "What is frozen water called?",
    "What is two plus two?",
]
ANSWERS = {
    "pirate": [
        "Arr, matey! Mars be a fine red planet.",
        "Arr, matey! Paris be the capital o' France.",
        "Arr, matey! The sky be blue as the sea.",
        "Arr, matey! A spider be havin' eight legs.",
        "Arr, matey! Bees be makin' honey.",
        "Arr, matey! A dog be barkin'.",
        "Arr, matey! Frozen water be ice.",
        "Arr, matey! Two plus two be four.",
    ],
    "shout": [
        "MARS IS A PLANET!",
        "PARIS IS THE CAPITAL OF FRANCE!",
        "THE SKY IS BLUE!",
        "A SPIDER HAS EIGHT LEGS!",
        "BEES MAKE HONEY!",
        "A DOG BARKS!",
        "FROZEN WATER IS CALLED ICE!",
        "TWO PLUS TWO IS FOUR!",
    ],
}


def train_style(base: Path, style: str, out: Path, steps: int = 30) -> Path:
    """A rank-8 q/v LoRA that answers the questions in one style (cached)."""
    if (out / "adapter_model.safetensors").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    texts = [
        f"Question: {q}\nAnswer: {a}{tokenizer.eos_token}"
        for q, a in zip(QUESTIONS, ANSWERS[style], strict=True)
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    started = time.perf_counter()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    print(
        f"trained {style}: final loss {loss.item():.3f} in {time.perf_counter() - started:.0f} s", flush=True
    )
    return out


def demo_store(base: Path) -> Path:
    from mergekit_subspace.recipe import SubspaceSettings
    from mergekit_subspace.sources import lora_task
    from mergekit_subspace.subspace import SubspaceStore

    store = CACHE / "store-k16"
    if not (store / "manifest.json").is_file():
        adapters = [train_style(base, style, CACHE / "zoo" / style) for style in ANSWERS]
        SubspaceStore.from_tasks(
            [lora_task(p) for p in adapters], SubspaceSettings(k=16), store, progress=False
        )
    return store


OUT = ROOT / "benchmarks" / "results" / "serve" / "transcript.md"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not come up")


def main() -> None:
    import openai
    import torch

    from benchmarks.serve_bench import smollm2_path

    torch.set_num_threads(1)  # one thread is faster than two on a loaded 2-core machine
    base = smollm2_path()
    store = demo_store(base)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mergekit_subspace.serve",
        str(store.relative_to(ROOT)),
        "--base",
        str(base.relative_to(ROOT)),
        "--port",
        str(port),
        "--batch-window-ms",
        "200",
        "--threads",
        "1",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    lines = [
        "# `mergekit-subspace serve` answering the `openai` client",
        "",
        "Written by `python -m benchmarks.serve_demo`: two style LoRAs trained on SmolLM2-135M-Instruct (`pirate`, "
        "`shout`; rank 8 on q/v, 8 examples in a 'Question: / Answer:' format), compressed into one store at k = 16 "
        "(2 x rank 8 fits k = 16, so they are stored exactly), served on one base model. Requests sent at the same "
        "moment share one batch (`batch.id`), one task per row.",
        "",
        "```console",
    ]
    lines.append("$ " + " ".join(["mergekit-subspace", "serve", *command[3:]]))
    try:
        wait_healthy(url, proc)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        models = [m.id for m in client.models.list()]
        lines += [
            "```",
            "",
            "```python",
            'client = openai.OpenAI(base_url="http://127.0.0.1:PORT/v1", api_key="unused")',
        ]
        lines += [
            "[m.id for m in client.models.list()]",
            f"# -> {models}",
        ]

        prompt = "Question: What is the largest ocean?\nAnswer:"

        def complete(task: str):
            return client.completions.create(model=task, prompt=prompt, max_tokens=16, temperature=0)

        with ThreadPoolExecutor(2) as pool:  # two requests at the same moment: one batch, two tasks
            replies = list(pool.map(complete, ["pirate", "shout"]))
        lines.append("")
        lines.append("# two threads at once:")
        for reply in replies:
            lines.append(
                f'client.completions.create(model="{reply.model}", prompt={prompt!r}, max_tokens=16, temperature=0)'
            )
            lines.append(
                f"# -> text={reply.choices[0].text!r} finish_reason={reply.choices[0].finish_reason!r}"
            )
            lines.append(
                f"#    usage={reply.usage.model_dump(exclude_none=True)} batch={json.dumps(reply.model_extra['batch'])}"
            )

        messages = [{"role": "user", "content": "What is the largest ocean?"}]

        def chat(task: str):
            return client.chat.completions.create(model=task, messages=messages, max_tokens=16, temperature=0)

        with ThreadPoolExecutor(3) as pool:
            chats = list(pool.map(chat, ["pirate", "shout", "base"]))
        lines.append("")
        lines.append("# three threads at once:")
        for reply in chats:
            lines.append(
                f'client.chat.completions.create(model="{reply.model}", messages={messages}, max_tokens=16, temperature=0)'
            )
            lines.append(f"# -> {reply.choices[0].message.content!r} ({reply.choices[0].finish_reason})")
            lines.append(f"#    batch={json.dumps(reply.model_extra['batch'])}")
        try:
            client.completions.create(model="nope", prompt="x")
        except openai.NotFoundError as exc:
            message = exc.body["message"] if isinstance(exc.body, dict) else str(exc)
            lines += [
                "",
                'client.completions.create(model="nope", prompt="x")',
                f"# -> 404 NotFoundError: {message[:120]}...",
            ]
        lines.append("```")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = "\n".join(lines) + "\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

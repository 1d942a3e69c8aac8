"""Serving many tasks from one basis: per-row routing equals the reconstructed PEFT adapter, row by row; the real
HTTP server answers the official `openai` client and plain HTTP, and survives every bad request."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import load_base, make_lora

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.recipe import SubspaceSettings
from mergekit_subspace.serve import attach
from mergekit_subspace.serve.layers import PerTaskLinear, SubspaceLinear
from mergekit_subspace.serve.loading import load_base as load_base_for_serving
from mergekit_subspace.sources import lora_task
from mergekit_subspace.subspace import SubspaceStore

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


# ---- helpers and fixtures --------------------------------------------------------------------------------
def build_store(adapters: list[Path], out: Path, k: int = 64) -> SubspaceStore:
    return SubspaceStore.from_tasks(
        [lora_task(p) for p in adapters], SubspaceSettings(k=k), out, progress=False
    )


def peft_model(base: Path, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base), adapter).eval()


def char_tokenizer(folder: Path) -> Path:
    """A character-level fast tokenizer (<pad>=0, <s>=1, </s>=2) with a chat template, saved into `folder`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


def with_tokenizer(base: Path, out: Path) -> Path:
    shutil.copytree(base, out)
    return char_tokenizer(out)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not come up")


def ids_of(texts: list[str], tokenizer_dir: Path, special: bool = True) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def bert_setup(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> dict:
    """Tiny BERT + 4 adapters (rsLoRA, value-only, lora_bias, a 5-label head on a copy of the base)."""
    root = tmp_path_factory.mktemp("serve-bert")
    from transformers import AutoModelForSequenceClassification

    five = root / "tiny-bert-5"
    AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=5, ignore_mismatched_sizes=True
    ).save_pretrained(five)
    zoo = [
        make_lora(tiny_bert, root / "zoo" / "t0", seed=0, r=4),
        make_lora(tiny_bert, root / "zoo" / "t1", seed=1, r=2, alpha=16, use_rslora=True),
        make_lora(tiny_bert, root / "zoo" / "t2", seed=2, r=3, targets=("value",)),
        make_lora(tiny_bert, root / "zoo" / "t3", seed=3, r=2, alpha=2, lora_bias=True),
        make_lora(five, root / "zoo" / "five", seed=4, r=4),
    ]
    store = build_store(zoo, root / "store")
    rebuilt = {name: store.reconstruct(name, root / "rebuilt" / name) for name in store.tasks}
    return {"root": root, "zoo": zoo, "store": store, "rebuilt": rebuilt, "five": five}


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict:
    root = tmp_path_factory.mktemp("serve-llama")
    base = with_tokenizer(tiny_llama, root / "tiny-llama")
    zoo = [
        make_lora(base, root / "zoo" / "alpha", seed=10, r=4, targets=("q_proj", "v_proj")),
        make_lora(base, root / "zoo" / "beta", seed=11, r=2, targets=("q_proj", "o_proj", "down_proj")),
        make_lora(base, root / "zoo" / "gamma", seed=12, r=4, targets=("q_proj", "v_proj")),
    ]
    store = build_store(zoo[:2], root / "store")
    rebuilt = {name: store.reconstruct(name, root / "rebuilt" / name) for name in store.tasks}
    return {"root": root, "base": base, "zoo": zoo, "store": store, "rebuilt": rebuilt}


# ---- per-row equality with PEFT --------------------------------------------------------------------------
def test_mixed_classification_batch_equals_peft_per_row(tiny_bert: Path, bert_setup: dict) -> None:
    store, rebuilt = bert_setup["store"], bert_setup["rebuilt"]
    served = attach(load_base(tiny_bert), store)
    ids = torch.randint(3, 90, (7, 10), generator=torch.Generator().manual_seed(5))
    rows = ["t0", "t1", None, "t2", "t3", "five", "t0"]
    logits = served.forward(rows, input_ids=ids).logits
    assert logits.shape == (7, 5)  # heads padded to the widest task
    with torch.no_grad():
        for i, task in enumerate(rows):
            if task is None:
                ref = load_base(tiny_bert)(input_ids=ids[i : i + 1]).logits[0]
            elif task == "five":
                ref = peft_model(bert_setup["five"], rebuilt[task])(input_ids=ids[i : i + 1]).logits[0]
            else:
                ref = peft_model(tiny_bert, rebuilt[task])(input_ids=ids[i : i + 1]).logits[0]
            width = served.num_labels(task)
            assert width == ref.shape[0]
            torch.testing.assert_close(logits[i, :width], ref, atol=1e-5, rtol=1e-5)
    # one task for the whole batch takes the gather-free path and agrees with the mixed one
    same = served.forward(["t1"] * 7, input_ids=ids).logits
    torch.testing.assert_close(same[1], logits[1], atol=1e-5, rtol=1e-5)


def test_never_densifies(tiny_bert: Path, bert_setup: dict) -> None:
    store = bert_setup["store"]
    model = load_base(tiny_bert)
    served = attach(model, store)
    for slot, layer in served.layers.items():
        meta = store.manifest["slots"][slot]
        assert isinstance(model.get_submodule(slot), SubspaceLinear)
        assert layer.cores_t.shape == (len(store.tasks) + 1, meta["k_in"], meta["k_out"])
        assert torch.count_nonzero(layer.cores_t[0]) == 0  # row 0 is the base
        assert layer.Ut.shape == (meta["k_out"], meta["shape"][0]) and layer.V.shape == (
            meta["shape"][1],
            meta["k_in"],
        )
    assert isinstance(model.get_submodule("classifier"), PerTaskLinear)
    sizes = served.resident_bytes()
    assert sizes["cores"] > 0 and sizes["basis"] > 0 and sizes["heads"] > 0
    with pytest.raises(SubspaceError, match="unknown task 'nope'.*known: base, five, t0"):
        served.index_of(["t0", "nope"])


def test_mixed_generation_equals_peft_per_row(llama_setup: dict) -> None:
    base, store, rebuilt = llama_setup["base"], llama_setup["store"], llama_setup["rebuilt"]
    served = attach(load_base(base), store)
    prompt = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(7))
    rows = ["alpha", "beta", "base", "alpha"]
    batch = prompt.repeat(len(rows), 1)
    logits = served.forward(rows, input_ids=batch).logits
    out = served.generate(rows, input_ids=batch, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for i, task in enumerate(rows):
            model = load_base(base) if task == "base" else peft_model(base, rebuilt[task])
            torch.testing.assert_close(logits[i], model(input_ids=prompt).logits[0], atol=1e-5, rtol=1e-5)
            ref = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert out[i].tolist() == ref[0].tolist(), task
    assert out[0].tolist() != out[1].tolist()  # the tasks really differ
    # beams repeat each row in place: routing follows
    beams = served.generate(
        rows[:2], input_ids=batch[:2], max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0
    )
    assert beams.shape[0] == 2


def test_gpt2_conv1d_fan_in_fan_out(tiny_gpt2: Path, tmp_path: Path) -> None:
    zoo = [
        make_lora(tiny_gpt2, tmp_path / "z" / f"g{i}", seed=i, targets=("c_attn",), fan_in_fan_out=True)
        for i in range(2)
    ]
    store = build_store(zoo, tmp_path / "store")
    served = attach(load_base(tiny_gpt2), store)
    ids = torch.randint(3, 90, (3, 8), generator=torch.Generator().manual_seed(2))
    logits = served.forward(["g1", "g0", None], input_ids=ids).logits
    with torch.no_grad():
        for i, task in enumerate(["g1", "g0"]):
            ref = peft_model(tiny_gpt2, store.reconstruct(task, tmp_path / "r" / task))(
                input_ids=ids[i : i + 1]
            )
            torch.testing.assert_close(logits[i], ref.logits[0], atol=1e-5, rtol=1e-5)


def test_added_task_is_served_without_reloading(llama_setup: dict, tmp_path: Path) -> None:
    base = llama_setup["base"]
    store_dir = tmp_path / "store"
    shutil.copytree(llama_setup["store"].path, store_dir)
    model = load_base(base)
    served = attach(model, store_dir)
    assert not served.changed() and served.maybe_refresh() == []
    SubspaceStore(store_dir).add(llama_setup["zoo"][2], name="gamma")
    assert served.changed()
    assert served.maybe_refresh() == ["gamma"]
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(3))
    logits = served.forward(["gamma", "alpha"], input_ids=ids).logits
    rebuilt = SubspaceStore(store_dir).reconstruct("gamma", tmp_path / "gamma")
    with torch.no_grad():
        ref = peft_model(base, rebuilt)(input_ids=ids[:1]).logits[0]
    torch.testing.assert_close(logits[0], ref, atol=1e-5, rtol=1e-5)
    assert served.model is model


def test_unservable_extras_are_refused(tiny_bert: Path, tmp_path: Path) -> None:
    zoo = [make_lora(tiny_bert, tmp_path / "emb", seed=1, targets=("query", "word_embeddings"))]
    store = build_store(zoo, tmp_path / "store")
    with pytest.raises(SubspaceError, match="serving cannot apply per row"):
        attach(load_base(tiny_bert), store)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama with hidden size 64: bitsandbytes' CPU 4-bit kernels need in_features >= its block size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("wide-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = root / "tiny-llama-wide"
    LlamaForCausalLM(config).save_pretrained(base)
    zoo = [
        make_lora(base, root / "zoo" / "alpha", seed=20, r=4, targets=("q_proj", "v_proj")),
        make_lora(base, root / "zoo" / "beta", seed=21, r=2, targets=("q_proj", "o_proj", "down_proj")),
    ]
    store = build_store(zoo, root / "store")
    rebuilt = {name: store.reconstruct(name, root / "rebuilt" / name) for name in store.tasks}
    return {"base": base, "store": store, "rebuilt": rebuilt}


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_base_matches_peft_on_the_same_base(wide_llama: dict, bits: str) -> None:
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit, Linear8bitLt
    from peft import PeftModel

    base, store, rebuilt = wide_llama["base"], wide_llama["store"], wide_llama["rebuilt"]
    model = load_base_for_serving(base, "causal", quantize=bits)
    served = attach(model, store)
    quantized = Linear8bitLt if bits == "8bit" else Linear4bit
    assert all(isinstance(layer.base_layer, quantized) for layer in served.layers.values())
    ids = torch.randint(3, 90, (3, 6), generator=torch.Generator().manual_seed(4))
    rows = ["alpha", "base", "beta"]
    logits = served.forward(rows, input_ids=ids).logits
    with torch.no_grad():
        for i, task in enumerate(rows):
            reference = load_base_for_serving(base, "causal", quantize=bits)
            if task != "base":
                reference = PeftModel.from_pretrained(reference, rebuilt[task]).eval()
            ref = reference(input_ids=ids[i : i + 1]).logits[0]
            torch.testing.assert_close(logits[i], ref, atol=1e-4, rtol=1e-4)


def test_command_refuses_a_missing_store_cleanly(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mergekit_subspace.serve.command import serve

    result = CliRunner().invoke(serve, [str(tmp_path / "nope"), "--base", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "store folder not found" in result.output and "Traceback" not in result.output


# ---- the real server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm_server(llama_setup: dict, tmp_path_factory: pytest.TempPathFactory):
    """`python -m mergekit_subspace.serve` in a subprocess on a random loopback port."""
    store_dir = tmp_path_factory.mktemp("served") / "store"
    shutil.copytree(llama_setup["store"].path, store_dir)
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "mergekit_subspace.serve",
        str(store_dir),
        "--base",
        str(llama_setup["base"]),
    ]
    cmd += ["--port", str(port), "--batch-window-ms", "400", "--max-input-tokens", "40", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield {**llama_setup, "url": url, "store": store_dir}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def reference_text(
    base: Path, adapter: Path | None, ids: list[int], max_new: int, tokenizer_dir: Path
) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = load_base(base) if adapter is None else peft_model(base, adapter)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=0
        )
    new = out[0, len(ids) :].tolist()
    if 2 in new:
        new = new[: new.index(2)]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_openai_client_two_tasks_in_one_batch(llm_server: dict) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{llm_server['url']}/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list()} == {"base", "alpha", "beta"}
    prompt = "the cat sat"

    def ask(task: str):
        return client.completions.create(model=task, prompt=prompt, max_tokens=6, temperature=0)

    with ThreadPoolExecutor(2) as pool:
        first, second = list(pool.map(ask, ["alpha", "beta"]))
    assert first.model == "alpha" and second.model == "beta"
    assert first.model_extra["batch"]["id"] == second.model_extra["batch"]["id"]  # served in one batch
    assert first.model_extra["batch"]["tasks"] == ["alpha", "beta"]
    ids = ids_of([prompt], llm_server["base"])[0]
    for reply, task in ((first, "alpha"), (second, "beta")):
        expected = reference_text(llm_server["base"], llm_server["rebuilt"][task], ids, 6, llm_server["base"])
        assert reply.choices[0].text == expected
        assert reply.usage.prompt_tokens == len(ids)

    messages = [{"role": "user", "content": "hi"}]

    def chat(task: str):
        return client.chat.completions.create(model=task, messages=messages, max_tokens=5, temperature=0)

    with ThreadPoolExecutor(2) as pool:
        chats = list(pool.map(chat, ["beta", "base"]))
    assert chats[0].model_extra["batch"]["id"] == chats[1].model_extra["batch"]["id"]
    chat_ids = ids_of(["user: hi\nassistant:"], llm_server["base"], special=False)[0]  # the template's text
    for reply, adapter in ((chats[0], llm_server["rebuilt"]["beta"]), (chats[1], None)):
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == reference_text(
            llm_server["base"], adapter, chat_ids, 5, llm_server["base"]
        )

    many = client.completions.create(model="alpha", prompt=["a", "bb"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # greedy copies agree


def test_openai_client_errors(llm_server: dict) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{llm_server['url']}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="unknown model 'nope'; known: base, alpha, beta"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.APIStatusError) as too_long:
        client.completions.create(model="alpha", prompt="x" * 60, max_tokens=2)
    assert too_long.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "x"}], stream=True
        )


def test_plain_http_errors_and_the_server_lives_on(llm_server: dict) -> None:
    import httpx

    url = llm_server["url"]
    cases = [
        ("/v1/completions", b"{not json", 400, "malformed JSON"),
        ("/v1/completions", b"", 400, "empty"),
        ("/v1/completions", b"[1, 2]", 400, ""),
        ("/v1/completions", json.dumps({"model": "alpha"}).encode(), 400, "prompt"),
        ("/v1/completions", json.dumps({"prompt": "x"}).encode(), 400, "model"),
        (
            "/v1/completions",
            json.dumps({"model": "alpha", "prompt": "x", "max_tokens": -3}).encode(),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 70}).encode(),
            413,
            "context",
        ),
        (
            "/v1/completions",
            json.dumps({"model": "alpha", "prompt": "x", "logprobs": 2}).encode(),
            400,
            "logprobs",
        ),
        ("/v1/chat/completions", json.dumps({"model": "alpha", "messages": []}).encode(), 400, "messages"),
        (
            "/v1/chat/completions",
            json.dumps({"model": "ghost", "messages": [{"role": "user", "content": "x"}]}).encode(),
            404,
            "known: base, alpha, beta",
        ),
        ("/v1/classify", json.dumps({"model": "alpha", "input": ["x"]}).encode(), 400, "causal"),
        ("/v1/completions", b"x" * (5 << 20), 413, "limit"),
    ]
    for path, body, status, fragment in cases:
        reply = httpx.post(
            f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=30
        )
        assert reply.status_code == status, (path, body[:80], reply.text)
        assert fragment in reply.json()["error"]["message"], reply.text
    assert httpx.get(f"{url}/nowhere").status_code == 404
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["kind"] == "causal"
    ok = httpx.post(
        f"{url}/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 2, "temperature": 0}
    )
    assert ok.status_code == 200


def test_task_added_while_serving(llm_server: dict) -> None:
    import httpx

    url = llm_server["url"]
    assert httpx.post(f"{url}/v1/completions", json={"model": "gamma", "prompt": "x"}).status_code == 404
    SubspaceStore(llm_server["store"]).add(llm_server["zoo"][2], name="gamma")
    reply = httpx.post(
        f"{url}/v1/completions",
        json={"model": "gamma", "prompt": "the cat sat", "max_tokens": 4, "temperature": 0},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    rebuilt = SubspaceStore(llm_server["store"]).reconstruct("gamma", llm_server["store"].parent / "gamma")
    ids = ids_of(["the cat sat"], llm_server["base"])[0]
    assert reply.json()["choices"][0]["text"] == reference_text(
        llm_server["base"], rebuilt, ids, 4, llm_server["base"]
    )
    assert "gamma" in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}


@pytest.fixture(scope="module")
def cls_server(tiny_bert: Path, bert_setup: dict, tmp_path_factory: pytest.TempPathFactory):
    """The app from build_app under uvicorn in a thread: a small admission limit to show 429."""
    import uvicorn

    from mergekit_subspace.serve.command import build_app

    base = with_tokenizer(tiny_bert, tmp_path_factory.mktemp("cls") / "tiny-bert")
    app = build_app(
        str(bert_setup["store"].path), str(base), window_s=0.3, max_pending=3, max_input_tokens=30
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield {**bert_setup, "url": url, "base": base}
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_classify_mixed_tasks_in_input_order(cls_server: dict) -> None:
    import httpx

    url, base = cls_server["url"], cls_server["base"]
    requests = [
        ("t0", ["a dog", "the red car is fast", "x"]),
        ("five", ["hello there", "a dog"]),
        ("base", ["z"]),
    ]

    def post(item):
        task, texts = item
        return httpx.post(f"{url}/v1/classify", json={"model": task, "input": texts}, timeout=30)

    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(post, requests))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert len({r.json()["batch"]["id"] for r in replies}) == 1  # one forward for three tasks
    for (task, texts), reply in zip(requests, replies, strict=True):
        data = reply.json()["data"]
        assert [d["index"] for d in data] == list(range(len(texts)))
        for text, row in zip(texts, data, strict=True):
            ids = torch.tensor(ids_of([text], base))
            with torch.no_grad():
                if task == "base":
                    logits = load_base(base)(input_ids=ids).logits[0]
                else:
                    head_base = cls_server["five"] if task == "five" else base
                    logits = peft_model(head_base, cls_server["rebuilt"][task])(input_ids=ids).logits[0]
            scores = torch.softmax(logits, -1)
            assert row["label_id"] == int(scores.argmax())
            assert row["scores"] == pytest.approx(scores.tolist(), abs=1e-5)
    assert len(replies[1].json()["data"][0]["scores"]) == 5


def test_classify_errors_and_queue_full(cls_server: dict) -> None:
    import httpx

    url = cls_server["url"]
    checks = [
        ({"model": "nope", "input": ["x"]}, 404, "known: base, five, t0, t1, t2, t3"),
        ({"model": "t0"}, 400, "input"),
        ({"model": "t0", "input": []}, 400, "empty"),
        ({"model": "t0", "input": ["x" * 40]}, 413, "at most 30"),
        ({"model": "t0", "input": ["x"] * 300}, 413, "limit"),
    ]
    for body, status, fragment in checks:
        reply = httpx.post(f"{url}/v1/classify", json=body, timeout=30)
        assert reply.status_code == status, reply.text
        assert fragment in reply.json()["error"]["message"]
    completion = httpx.post(f"{url}/v1/completions", json={"model": "t0", "prompt": "x"})
    assert completion.status_code == 400 and "classify" in completion.json()["error"]["message"]

    def post(_):
        return httpx.post(f"{url}/v1/classify", json={"model": "t1", "input": ["x"]}, timeout=30).status_code

    with ThreadPoolExecutor(6) as pool:
        codes = sorted(pool.map(post, range(6)))
    assert codes.count(200) >= 1 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    assert httpx.get(f"{url}/health").json()["status"] == "ok"

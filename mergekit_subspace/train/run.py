"""`train_task`: check everything, load the base with a trainable core per slot, train, store the task.

Nothing is written until training has finished: a failed or interrupted run (Ctrl-C) leaves the store as
it was. Bad input (recipe, data, store, base model) is refused before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.files import sha256_file
from mergekit_subspace.io.peft import PEFT_PREFIX
from mergekit_subspace.io.store import basis_file
from mergekit_subspace.sources import TaskSource
from mergekit_subspace.subspace import SubspaceStore
from mergekit_subspace.train.cores import CoreLinear, inject_cores
from mergekit_subspace.train.data import TaskData, encode, load_task_data
from mergekit_subspace.train.loop import LoopOutcome, LoopSettings, run_loop
from mergekit_subspace.train.recipe import TrainRecipe, parse_train_recipe
from mergekit_subspace.train.save import save_trained_task

HEAD_NAMES = ("classifier", "score")  # PEFT's sequence-classification heads (modules_to_save)
PEFT_TASK_TYPES = {"sequence_classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


@dataclass
class TrainResult:
    """The stored task's manifest entry, what the loop did, and the model as trained (eval mode)."""

    name: str
    entry: dict[str, Any]
    outcome: LoopOutcome
    model: nn.Module


def _open_store(recipe: TrainRecipe) -> tuple[SubspaceStore, list[str], str]:
    """The store, the slots to train (all by default) and the base model path; refuses what does not fit."""
    if not Path(recipe.store).is_dir():
        raise SubspaceError("store not found", recipe.store)
    store = SubspaceStore(recipe.store)
    if recipe.name in store.manifest["tasks"]:
        raise SubspaceError(
            f"task name '{recipe.name}' is already in the store; pick another name", store.path
        )
    slots = recipe.slots or store.slots
    unknown = [s for s in slots if s not in store.manifest["slots"]]
    if unknown:
        raise SubspaceError(f"the store has no slot '{unknown[0]}' (it has {len(store.slots)})", store.path)
    base = recipe.base_model or (store.manifest.get("base_model") or {}).get("path")
    if not base:
        raise SubspaceError("the store records no base model; give base_model in the recipe", store.path)
    if not Path(base).is_dir():
        raise SubspaceError("base model folder not found", base)
    return store, slots, base


def _load_model(recipe: TrainRecipe, base: str, num_labels: int | None) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        if recipe.task == "causal_lm":
            return AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
        names = recipe.labels or [f"LABEL_{i}" for i in range(num_labels or 0)]
        return AutoModelForSequenceClassification.from_pretrained(
            base,
            num_labels=num_labels,
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
        )
    except (OSError, ValueError, RuntimeError) as exc:  # a folder that is no model, a head of another width
        raise SubspaceError(f"cannot be loaded as the base model ({exc})", base) from None


def _heads(model: nn.Module) -> dict[str, nn.Module]:
    """The classification head module(s), by PEFT's names, outermost only."""
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if path.rpartition(".")[2] in HEAD_NAMES and not any(path.startswith(f"{h}.") for h in found):
            found[path] = module
    return found


def _tokenizer(base: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise SubspaceError(f"has no usable tokenizer ({exc})", base) from None


def _peft_config(recipe: TrainRecipe, base: str, slots: list[str], heads: list[str], conv1d: bool) -> dict:
    """The PEFT LoRA config the task reconstructs with (rank and alpha are set per slot on export)."""
    return {
        "peft_type": "LORA",
        "task_type": PEFT_TASK_TYPES[recipe.task],
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "inference_mode": True,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "modules_to_save": heads or None,
        "target_modules": sorted(slots),
    }


def _provenance(
    recipe: TrainRecipe, base: str, data: TaskData, outcome: LoopOutcome, trainable: dict[str, int]
) -> dict[str, Any]:
    last = next((v for v in reversed(outcome.validation) if v["step"] == outcome.kept_step), None)
    return {
        "task": recipe.task,
        "cores": recipe.cores,
        "base_model": base,
        "train": recipe.train,
        "train_sha256": sha256_file(Path(recipe.train)),
        "train_examples": len(data.train),
        "validation": recipe.validation,
        "validation_sha256": None if recipe.validation is None else sha256_file(Path(recipe.validation)),
        "validation_examples": None if data.validation is None else len(data.validation),
        "steps": recipe.steps,
        "steps_run": outcome.steps_run,
        "kept_step": outcome.kept_step,
        "stopped_early": outcome.stopped_early,
        "lr": recipe.lr,
        "batch_size": recipe.batch_size,
        "seed": recipe.seed,
        "max_length": recipe.max_length,
        "eval_every": recipe.eval_every,
        "patience": recipe.patience,
        "train_loss": round(outcome.train_loss, 6),
        "validation_loss": None if last is None else round(last["loss"], 6),
        "validation_accuracy": None if last is None else last.get("accuracy"),
        "trainable_parameters": trainable,
        "seconds": round(outcome.seconds, 3),
        "cpu_seconds": round(outcome.cpu_seconds, 3),
    }


def _trainable_model(
    recipe: TrainRecipe,
    base: str,
    num_labels: int | None,
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
    pad_id: int,
) -> tuple[nn.Module, dict[str, CoreLinear], dict[str, nn.Module]]:
    """The base model frozen, a trainable core in every slot, and a classifier's head trainable."""
    model = _load_model(recipe, base, num_labels)
    if recipe.task == "sequence_classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id  # a decoder classifier finds each row's last token by it
    model.requires_grad_(False)
    layers = inject_cores(model, bases, recipe.cores)
    heads = _heads(model) if recipe.task == "sequence_classification" else {}
    if recipe.task == "sequence_classification" and not heads:
        raise SubspaceError(
            f"the base model has no classification head named {' or '.join(HEAD_NAMES)}", base
        )
    for head in heads.values():
        head.requires_grad_(True)
    return model, layers, heads


def train_task(recipe: TrainRecipe | str | Path, progress: bool = True) -> TrainResult:
    """Train a new task as cores of the store's frozen bases (plus its head for classifiers) and add it to
    the store like any other task. `recipe` is a TrainRecipe or the path of its YAML."""
    if not isinstance(recipe, TrainRecipe):
        recipe = parse_train_recipe(recipe)
    opened, slots, base = _open_store(recipe)
    data = load_task_data(recipe)
    tokenizer = _tokenizer(base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SubspaceError("the tokenizer has neither a pad nor an eos token", base)
    train = encode(tokenizer, data.train, recipe.task, recipe.max_length)
    validation = (
        None
        if data.validation is None
        else encode(tokenizer, data.validation, recipe.task, recipe.max_length)
    )
    basis_sha256 = opened.manifest["files"][basis_file(opened.manifest)]
    bases = {slot: opened.basis(slot) for slot in slots}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)  # fixes a new head's initialisation
        model, layers, heads = _trainable_model(recipe, base, data.num_labels, bases, pad_id)
        core_params = [layer.core for layer in layers.values()]
        head_params = [p for h in heads.values() for p in h.parameters()]
        settings = LoopSettings(
            recipe.steps,
            recipe.lr,
            recipe.batch_size,
            recipe.seed,
            recipe.eval_every,
            recipe.patience,
            pad_id,
        )
        outcome = run_loop(
            model, core_params + head_params, train, validation, settings, f"train {recipe.name}", progress
        )
    trainable = {"cores": sum(p.numel() for p in core_params), "head": sum(p.numel() for p in head_params)}
    source = _trained_source(recipe, base, layers, heads, data, outcome, trainable)
    cores = {slot: layer.dense_core().detach() for slot, layer in layers.items()}
    entry = save_trained_task(opened, basis_sha256, source, cores)
    return TrainResult(recipe.name, entry, outcome, model)


def _trained_source(
    recipe: TrainRecipe,
    base: str,
    layers: dict[str, CoreLinear],
    heads: dict[str, nn.Module],
    data: TaskData,
    outcome: LoopOutcome,
    trainable: dict[str, int],
) -> TaskSource:
    """The task as the store's write path takes it: heads under their PEFT keys, config, provenance notes."""
    extras = {
        f"{PEFT_PREFIX}{path}.{name}": param.detach().clone()
        for path, head in heads.items()
        for name, param in head.named_parameters()
    }
    conv1d = any(type(layer.base_layer).__name__ == "Conv1D" for layer in layers.values())
    notes: dict[str, Any] = {"trained": _provenance(recipe, base, data, outcome, trainable)}
    if recipe.labels is not None:
        notes["labels"] = list(recipe.labels)
    train_path = Path(recipe.train)
    return TaskSource(
        name=recipe.name,
        kind="lora",
        source=str(train_path),
        slots={},
        extras=extras,
        peft_config=_peft_config(recipe, base, list(layers), list(heads), conv1d),
        dtype="float32",
        source_bytes=0,  # no adapter file exists for a task trained in the basis
        shapes={slot: (layer.U.shape[0], layer.V.shape[0]) for slot, layer in layers.items()},
        ranks={slot: min(layer.U.shape[1], layer.V.shape[1]) for slot, layer in layers.items()},
        digest=lambda: sha256_file(train_path),
        notes=notes,
    )

"""Load the base model a store was built on (plain, 8-bit or 4-bit) and attach the store to it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.serve.inject import BASE_NAME, MultiTaskModel
from mergekit_subspace.subspace import SubspaceStore

Kind = Literal["causal", "classify"]
QUANTIZE = ("8bit", "4bit")
# Heads stay in full precision: they are stacked per task, and bitsandbytes' own skip list keeps them too.
HEAD_MODULES = ["classifier", "score", "lm_head", "pooler"]
_TASK_TYPES = {"CAUSAL_LM": "causal", "SEQ_CLS": "classify"}


def store_kind(store: SubspaceStore, base: str | Path) -> Kind:
    """Causal LM or sequence classifier, from the tasks' PEFT task_type, else from the base's architecture."""
    kinds = {
        _TASK_TYPES[t]
        for entry in store.manifest["tasks"].values()
        if (t := (entry.get("peft_config") or {}).get("task_type")) in _TASK_TYPES
    }
    if len(kinds) > 1:
        raise SubspaceError("mixes causal-LM and sequence-classification tasks; serve them apart", store.path)
    if kinds:
        return kinds.pop()
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(str(base)).architectures or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "classify"
    return "causal"


def _head_modules(store: SubspaceStore) -> list[str]:
    names = set(HEAD_MODULES)
    for entry in store.manifest["tasks"].values():
        names.update((entry.get("peft_config") or {}).get("modules_to_save") or [])
    return sorted(names)


def quantization_config(quantize: str | None, skip: list[str], dtype: torch.dtype) -> Any:
    if quantize is None:
        return None
    if quantize not in QUANTIZE:
        raise SubspaceError(f"--quantize must be one of {', '.join(QUANTIZE)}, not '{quantize}'")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SubspaceError("--quantize needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip
    )


def load_base(
    base: str | Path,
    kind: Kind,
    quantize: str | None = None,
    dtype: torch.dtype = torch.float32,
    skip: list[str] | None = None,
) -> torch.nn.Module:
    """The base model in eval mode; heads (and `skip`) are kept out of quantization."""
    return load_base_with_missing(base, kind, quantize, dtype, skip)[0]


def load_base_with_missing(
    base: str | Path,
    kind: Kind,
    quantize: str | None = None,
    dtype: torch.dtype = torch.float32,
    skip: list[str] | None = None,
) -> tuple[torch.nn.Module, set[str]]:
    """The base model, and the modules whose weights its checkpoint lacked (initialised at random)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if not Path(base).is_dir():
        raise SubspaceError("base model folder not found", base)
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    kwargs: dict[str, Any] = {"dtype": dtype}
    config = quantization_config(quantize, skip or HEAD_MODULES, dtype)
    if config is not None:
        kwargs.update(quantization_config=config, device_map="cpu")
    model, info = auto.from_pretrained(str(base), output_loading_info=True, **kwargs)
    missing = {key.rpartition(".")[0] for key in info.get("missing_keys", ())}
    return model.eval(), missing


def load_tokenizer(path: str | Path, kind: Kind) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise SubspaceError(f"no tokenizer could be loaded ({exc}); pass --tokenizer", path) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left" if kind == "causal" else "right"
    return tokenizer


def load_served(
    store: str | Path,
    base: str | Path,
    quantize: str | None = None,
    dtype: torch.dtype = torch.float32,
    base_name: str = BASE_NAME,
) -> tuple[MultiTaskModel, Kind]:
    """Base model with every task of the store attached, plus whether it generates or classifies."""
    opened = SubspaceStore(store)
    kind = store_kind(opened, base)
    model, missing = load_base_with_missing(
        base, kind, quantize=quantize, dtype=dtype, skip=_head_modules(opened)
    )
    served = MultiTaskModel(model, opened, dtype=dtype, base_name=base_name, untrained_heads=missing)
    return served, kind

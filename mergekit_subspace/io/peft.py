"""Read and write PEFT LoRA folders (adapter_config.json + adapter_model.safetensors) in their real format.

Reading keeps every tensor that is not a plain 2-D lora_A/lora_B pair (classifier heads from modules_to_save,
lora_B biases, embedding or conv LoRAs) verbatim, so nothing the user trained is lost.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergekit_subspace.errors import SubspaceError, validation_message
from mergekit_subspace.io.files import (
    TensorFile,
    atomic_directory,
    json_bytes,
    load_pickle_weights,
    read_json,
    sha256_bytes,
    sha256_file,
    tensors_to_bytes,
)
from mergekit_subspace.lowrank import LowRankDelta

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_LORA_BIAS_KEY = re.compile(r"^(?P<module>.+)\.lora_B(?:\.[^.]+)?\.bias$")
# PEFT variants whose delta is not D = s * B @ A on the weight: refusing them beats a silently wrong store.
_REFUSED_FLAGS = {
    "use_dora": "DoRA (use_dora: true) rescales weight columns by a learned magnitude",
    "use_qalora": "QALoRA (use_qalora: true) pools inputs before lora_A",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) only acts after its invocation tokens",
    "use_bdlora": "BD-LoRA (use_bdlora) uses block-diagonal factors",
}


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter as factored slots plus every other tensor kept as it was.

    `slots` and `extras` are lazy mappings: the folder's config and safetensors header are read and checked
    at once, but a slot's two factors (or a head) are read only when asked for, so a zoo of thousands of
    adapters can be walked slot by slot in the memory of one slot.
    """

    path: Path
    config: dict[str, Any]
    slots: Mapping[str, LowRankDelta]
    extras: Mapping[str, torch.Tensor]
    alphas: dict[str, float]
    dtype: str
    weights_path: Path
    source_bytes: int
    shapes: dict[str, tuple[int, int]]
    ranks: dict[str, int]
    files: list[str] = field(default_factory=list)
    _sha256: str | None = None

    @property
    def source_sha256(self) -> str:
        """sha256 over the config's and the weights' digests, hashed in blocks on first use."""
        if self._sha256 is None:
            config_digest = sha256_bytes((self.path / CONFIG_NAME).read_bytes())
            self._sha256 = sha256_bytes(config_digest.encode() + sha256_file(self.weights_path).encode())
        return self._sha256


def module_path(key_module: str) -> str:
    """Model-relative module path: PEFT saves keys under 'base_model.model.'."""
    return key_module[len(PEFT_PREFIX) :] if key_module.startswith(PEFT_PREFIX) else key_module


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """Look a module up in rank_pattern / alpha_pattern the way PEFT does (exact or '.'-suffix regex)."""
    for key in patterns:
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


MAX_PATTERN_CHARS = 512
PositiveFinite = Annotated[float, AllowInfNan(False), Field(gt=0)]
PositiveInt = Annotated[int, Field(ge=1)]


def _check_regex(key: str) -> str:
    """A rank_pattern / alpha_pattern key or a target_modules string: a regex, compiled as PEFT uses it."""
    if len(key) > MAX_PATTERN_CHARS:
        raise ValueError(f"a pattern of {len(key)} characters (at most {MAX_PATTERN_CHARS})")
    try:
        re.compile(rf"(.*\.)?({key})$")
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"'{key[:60]}' is not a valid regular expression ({exc})") from None
    return key


class LoraConfigModel(BaseModel):
    """The fields of a PEFT LoraConfig this tool reads, with their JSON types (strict: no "8" for 8, no
    true for 1). Other keys are allowed: PEFT adds fields from version to version."""

    model_config = ConfigDict(extra="allow", strict=True)

    peft_type: str
    r: PositiveInt = 8
    lora_alpha: PositiveFinite = 8.0
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, PositiveInt] | None = None
    alpha_pattern: dict[str, PositiveFinite] | None = None
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    lora_bias: bool = False
    inference_mode: bool = False
    use_dora: bool | None = False
    use_qalora: bool | None = False

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def keys_are_regexes(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for key in value or {}:
            _check_regex(key)
        return value

    @field_validator("target_modules")
    @classmethod
    def string_is_regex(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, str):
            _check_regex(value)
        return value


def _validate_config(config: Any, path: Path) -> dict[str, Any]:
    """Check an adapter_config.json before use; returns it unchanged (the store keeps it as it was)."""
    if not isinstance(config, dict):
        raise SubspaceError("is not a JSON object", path)
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise SubspaceError("has no 'peft_type'; not a PEFT adapter config", path)
    if not isinstance(peft_type, str):
        raise SubspaceError(f"peft_type must be a string, not {type(peft_type).__name__}", path)
    if peft_type.upper() != "LORA":
        raise SubspaceError(
            f"is a {peft_type[:60]} adapter; only LoRA adapters (peft_type LORA) are supported", path
        )
    for flag, why in _REFUSED_FLAGS.items():
        if config.get(flag):
            raise SubspaceError(f"is not a plain LoRA: {why}, so it cannot be stored as B @ A", path)
    try:
        LoraConfigModel.model_validate(config)
    except ValidationError as exc:
        raise SubspaceError(f"is not a valid LoRA config: {validation_message(exc.errors())}", path) from None
    return config


def _weights_file(folder: Path, allow_pickle: bool) -> TensorFile:
    safe = folder / WEIGHTS_NAME
    if safe.is_file():
        return TensorFile(safe)
    pickled = folder / PICKLE_WEIGHTS_NAME
    if pickled.is_file():
        return TensorFile(pickled, load_pickle_weights(pickled, allow_pickle))
    raise SubspaceError(f"no {WEIGHTS_NAME} (or {PICKLE_WEIGHTS_NAME}) in the adapter folder", folder)


class LazySlots(Mapping[str, LowRankDelta]):
    """module -> LowRankDelta, each read from the weights file when it is looked up (never cached)."""

    def __init__(
        self, weights: TensorFile, keys: dict[str, tuple[str, str]], scales: dict[str, float]
    ) -> None:
        self._weights, self._keys, self._scales = weights, keys, scales

    def __getitem__(self, module: str) -> LowRankDelta:
        key_a, key_b = self._keys[module]
        tensors = self._weights.read([key_a, key_b])
        return LowRankDelta(B=tensors[key_b], A=tensors[key_a], scale=self._scales[module])

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)


class LazyExtras(Mapping[str, torch.Tensor]):
    """PEFT key -> tensor for everything that is not a lora_A/lora_B pair, read on lookup.

    A lora_B bias is scaled by its module's alpha / r on read: PEFT scales the bias with the rest of the
    branch, and the store writes adapters back at scale 1.
    """

    def __init__(self, weights: TensorFile, keys: list[str], scales: dict[str, float]) -> None:
        self._weights, self._keys, self._scales = weights, sorted(keys), scales

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._scales and key not in self._keys:
            raise KeyError(key)
        tensor = self._weights.read([key])[key]
        return tensor * self._scales[key] if key in self._scales else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_lora_adapter(folder: str | Path, allow_pickle: bool = False) -> LoraAdapter:
    """Parse a PEFT LoRA folder into lazily read factored slots with their true scales (rsLoRA and
    alpha_pattern applied). Config and safetensors header are checked now; tensors are read on use."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SubspaceError("adapter folder not found", folder)
    config_path = folder / CONFIG_NAME
    config = _validate_config(read_json(config_path), config_path)
    weights = _weights_file(folder, allow_pickle)
    weights_path = weights.path

    pairs: dict[str, dict[str, str]] = {}
    extra_keys: list[str] = []
    for key in weights.keys():
        match = _LORA_KEY.match(key)
        if match is None or len(weights.shapes[key]) != 2:
            extra_keys.append(key)
            continue
        pairs.setdefault(module_path(match["module"]), {})[match["side"]] = key
    if not pairs:
        raise SubspaceError("holds no lora_A / lora_B weights", weights_path)

    rslora = bool(config.get("use_rslora", False))
    default_alpha = float(config.get("lora_alpha", config.get("r", 8)))
    alpha_pattern = config.get("alpha_pattern") or {}
    keys: dict[str, tuple[str, str]] = {}
    scales: dict[str, float] = {}
    shapes: dict[str, tuple[int, int]] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dtypes: set[torch.dtype] = set()
    for module in sorted(pairs):
        sides = pairs[module]
        if set(sides) != {"A", "B"}:
            missing = "lora_B" if "B" not in sides else "lora_A"
            raise SubspaceError(f"module '{module}' has no {missing} weight", weights_path)
        (rank, n), (m, rank_b) = weights.shapes[sides["A"]], weights.shapes[sides["B"]]
        if rank != rank_b:
            raise SubspaceError(
                f"module '{module}': lora_A {(rank, n)} and lora_B {(m, rank_b)} have different ranks",
                weights_path,
            )
        if rank < 1:
            raise SubspaceError(f"module '{module}' has rank 0 factors; nothing to store", weights_path)
        if m < 1 or n < 1:
            raise SubspaceError(
                f"module '{module}': lora_A {(rank, n)} and lora_B {(m, rank_b)} have an empty dimension",
                weights_path,
            )
        for key in (sides["A"], sides["B"]):
            dtype = weights.dtypes[key]
            if dtype is None or not dtype.is_floating_point:
                raise SubspaceError(
                    f"tensor '{key}' is not floating point; LoRA factors must be", weights_path
                )
            dtypes.add(dtype)
        alpha = float(pattern_value(alpha_pattern, module, default_alpha))
        alphas[module] = alpha
        keys[module] = (sides["A"], sides["B"])
        scales[module] = lora_scale(alpha, rank, rslora)
        shapes[module], ranks[module] = (m, n), rank

    bias_scales = {}
    for key in extra_keys:
        bias = _LORA_BIAS_KEY.match(key)
        if bias is not None and module_path(bias["module"]) in scales:
            bias_scales[key] = scales[module_path(bias["module"])]

    return LoraAdapter(
        path=folder,
        config=config,
        slots=LazySlots(weights, keys, scales),
        extras=LazyExtras(weights, extra_keys, bias_scales),
        alphas=alphas,
        dtype=str(sorted(dtypes, key=str)[0]).removeprefix("torch."),
        weights_path=weights_path,
        source_bytes=config_path.stat().st_size + weights_path.stat().st_size,
        shapes=shapes,
        ranks=ranks,
        files=[CONFIG_NAME, weights_path.name],
    )


def lora_state_key(module: str, side: str) -> str:
    return f"{PEFT_PREFIX}{module}.lora_{side}.weight"


def write_lora_adapter(
    out: str | Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    extras: dict[str, torch.Tensor],
    config: dict[str, Any],
    overwrite: bool = False,
    model_config: dict[str, Any] | None = None,
) -> Path:
    """Write a PEFT folder atomically: `factors` maps module path -> (B, A) with the scale already folded in.

    Ranks may differ by module; the most common rank becomes `r` and the others go to rank_pattern, with
    alpha equal to the rank everywhere so that PEFT's scale is exactly 1. `model_config`, when given, is
    written beside the adapter as config.json (a classifier's label names: see `label_config`).
    """
    out = Path(out)
    ranks = {module: int(A.shape[0]) for module, (_, A) in factors.items()}
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    main_rank = max(sorted(counts), key=lambda r: counts[r]) if counts else 1
    pattern = {module: rank for module, rank in sorted(ranks.items()) if rank != main_rank}

    written = dict(config)
    written.update(
        r=main_rank,
        lora_alpha=main_rank,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        use_dora=False,
        target_modules=sorted(factors),
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        peft_type="LORA",
    )
    tensors: dict[str, torch.Tensor] = dict(extras)
    for module, (B, A) in factors.items():
        tensors[lora_state_key(module, "A")] = A
        tensors[lora_state_key(module, "B")] = B
    for key, tensor in tensors.items():  # e.g. a merge whose weights overflow a float16 output
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SubspaceError(
                f"the adapter to write would hold NaN or Inf in '{key}' ({str(tensor.dtype).removeprefix('torch.')}); "
                "lower the weights or lambda, or write a wider dtype"
            )
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_bytes(json_bytes(written))
        (tmp / WEIGHTS_NAME).write_bytes(tensors_to_bytes(tensors, metadata={"format": "pt"}))
        if model_config is not None:
            (tmp / MODEL_CONFIG_NAME).write_bytes(json_bytes(model_config))
    return out


MODEL_CONFIG_NAME = "config.json"
_DEFAULT_LABEL = re.compile(r"^LABEL_\d+$")


def label_config(labels: list[str] | None, model_type: str | None) -> dict[str, Any] | None:
    """The config.json a classifier adapter's folder carries when `model.config.save_pretrained(adapter_dir)`
    was run beside it, cut to what names the classes (id2label, label2id; num_labels follows from them) and
    the model_type that lets `AutoConfig.from_pretrained(adapter_dir)` read it. None without labels."""
    if not labels:
        return None
    config: dict[str, Any] = {"model_type": model_type} if model_type else {}
    config["id2label"] = {str(i): name for i, name in enumerate(labels)}
    config["label2id"] = {name: i for i, name in enumerate(labels)}
    return config


def read_labels(folder: str | Path) -> list[str] | None:
    """A classifier's label names (index = class id) from `id2label` in the folder's config.json, if it has one.

    An adapter folder holds one when the model's config was saved beside it (`model.config.save_pretrained`);
    a fine-tune always does. transformers' placeholder names (LABEL_0, LABEL_1, ...) say nothing: None.
    """
    path = Path(folder) / MODEL_CONFIG_NAME
    if not path.is_file():
        return None
    config = read_json(path)
    id2label = config.get("id2label") if isinstance(config, dict) else None
    if id2label is None:
        return None
    if not isinstance(id2label, dict) or not all(isinstance(v, str) for v in id2label.values()):
        raise SubspaceError("id2label must map class ids to label names", path)
    try:
        ids = sorted(int(k) for k in id2label)
    except ValueError:
        raise SubspaceError("id2label's keys must be class ids (0, 1, ...)", path) from None
    if ids != list(range(len(ids))):
        raise SubspaceError(f"id2label's ids must be 0..{len(ids) - 1} without gaps, not {ids[:8]}", path)
    names = [id2label[k] for k in sorted(id2label, key=int)]
    return None if all(_DEFAULT_LABEL.match(n) for n in names) else names

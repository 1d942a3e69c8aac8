"""Attach a SubspaceStore to a loaded transformers model so that each row of a batch can use its own task.

One basis (U, V) per slot is shared by every task; a task is its k_out x k_in cores (and its heads). Tasks live
in stacked tensors [T+1, ...] with row 0 the base, so adding a task to the store and calling `refresh()` makes it
servable without touching the base weights.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergekit_subspace.errors import SubspaceError
from mergekit_subspace.io.peft import PEFT_PREFIX
from mergekit_subspace.io.store import MANIFEST, basis_file, task_file
from mergekit_subspace.serve.layers import PerTaskLinear, SubspaceLinear, TaskRouter, linear_dims
from mergekit_subspace.subspace import SubspaceStore

BASE_NAME = "base"
log = logging.getLogger("mergekit_subspace.serve")
_PLACEHOLDER_LABEL = re.compile(r"^LABEL_\d+$")
_LORA_BIAS = re.compile(r"^(?P<module>.+)\.lora_B(?:\.[^.]+)?\.bias$")


@dataclass
class Classified:
    """One row's answer: the class id, its name (LABEL_<id> where the task has none) and every class's score."""

    label_id: int
    label: str
    scores: list[float]


@dataclass
class _TaskTensors:
    """What one task contributes: cores per slot, lora_B biases per slot, head tensors per head module."""

    cores: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def _split_extras(
    name: str, extras: dict[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Sort a task's verbatim tensors into lora_B biases and Linear heads; refuse what serving cannot apply."""
    biases: dict[str, torch.Tensor] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, tensor in extras.items():
        path = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        match = _LORA_BIAS.match(path)
        if match is not None:
            biases[match["module"]] = tensor
            continue
        module_path, _, param = path.rpartition(".")
        try:
            owner = model.get_submodule(module_path)
        except AttributeError:
            owner = None
        if isinstance(owner, PerTaskLinear):
            owner = owner.base_layer
        if type(owner) is nn.Linear and param in ("weight", "bias"):
            heads.setdefault(module_path, {})[param] = tensor
        else:
            unsupported.append(key)
    if unsupported:
        shown = ", ".join(sorted(unsupported)[:4]) + (" ..." if len(unsupported) > 4 else "")
        raise SubspaceError(
            f"task '{name}' holds tensors serving cannot apply per row ({shown}); only lora_B biases and "
            "nn.Linear heads from modules_to_save are served"
        )
    return biases, heads


class MultiTaskModel:
    """A transformers model with every task of a store attached; pick tasks per row with `use_tasks`.

    >>> served = MultiTaskModel(model, "store/")
    >>> served.forward(["sst2", None, "mnli"], input_ids=ids)   # None (or "base") = the plain base model
    >>> served.generate(["summarize", "translate"], input_ids=ids, max_new_tokens=16)   # causal LMs only

    When tasks' heads differ in width (label counts), the logits of a mixed batch are as wide as the widest and a
    row's columns past its own task's width are -inf: softmax and argmax over the whole row are the task's own.

    The routing is state shared by the wrapped layers: run one forward at a time per model (the HTTP server does,
    on its single model thread).

    `untrained_heads` names head modules the base checkpoint lacked (transformers initialised them at random, as
    it does for a sentence encoder loaded as a classifier): `classify` refuses rows that would use them.
    """

    def __init__(
        self,
        model: nn.Module,
        store: SubspaceStore | str | Path,
        dtype: torch.dtype | None = None,
        base_name: str = BASE_NAME,
        untrained_heads: Iterable[str] = (),
    ) -> None:
        self.model = model
        self.untrained_heads = set(untrained_heads)
        self.task_labels: dict[str, list[str]] = {}
        self.store_path = Path(store.path if isinstance(store, SubspaceStore) else store)
        self.base_name = base_name
        self.dtype = dtype or _compute_dtype(model)
        self.router = TaskRouter()
        self.layers: dict[str, SubspaceLinear] = {}
        self.heads: dict[str, PerTaskLinear] = {}
        self.tasks: list[str] = []
        self.head_out: dict[str, dict[str, int]] = {}
        self.logits_head: str | None = None  # the head whose output is the model's logits (the last one run)
        self._cache: dict[str, tuple[str, _TaskTensors]] = {}  # task -> (file sha256, tensors)
        self._basis_sha: str | None = None
        self._stamp: tuple[int, int] | None = None
        self.refresh()

    # ---- choosing tasks -------------------------------------------------------------------------------
    def index_of(self, names: Sequence[str | None]) -> torch.Tensor:
        """Row indices for task names (None or the base name -> 0, the base model)."""
        lookup = self._lookup
        try:
            return torch.tensor([lookup[n] for n in names], dtype=torch.long)
        except KeyError as exc:
            raise SubspaceError(
                f"unknown task {exc.args[0]!r} (known: {', '.join([self.base_name] + self.tasks)})",
                self.store_path,
            ) from None

    @contextmanager
    def use_tasks(self, names: Sequence[str | None]) -> Iterator[None]:
        """Route the next forward / generate calls: row i of the batch uses task names[i]."""
        self.router.set(self.index_of(names))
        try:
            yield
        finally:
            self.router.set(None)

    def forward(self, tasks: Sequence[str | None], **inputs: Any) -> Any:
        with torch.inference_mode(), self.use_tasks(tasks):
            return self.model(**inputs)

    def generate(self, tasks: Sequence[str | None], **kwargs: Any) -> Any:
        if self.kind != "causal":
            raise SubspaceError(
                f"this store serves a sequence-classification model ({type(self.model).__name__}), which cannot "
                "generate; call served.forward(tasks, input_ids=..., attention_mask=...) and read .logits "
                "(over HTTP: POST /v1/classify)",
                self.store_path,
            )
        with torch.inference_mode(), self.use_tasks(tasks):
            return self.model.generate(**kwargs)

    @property
    def kind(self) -> str:
        """'causal' when the wrapped model can generate, else 'classify' (what `generate` needs)."""
        can_generate = getattr(self.model, "can_generate", None)
        if callable(can_generate):
            return "causal" if can_generate() else "classify"
        return "causal" if callable(getattr(self.model, "generate", None)) else "classify"

    def num_labels(self, task: str | None) -> int | None:
        """Output width of the task's logits head (its label count for classifiers), None without heads."""
        if self.logits_head is None:
            return None
        widths = self.head_out.get(task or self.base_name, {})
        return widths.get(self.logits_head, self.head_out[self.base_name][self.logits_head])

    def has_own_head(self, task: str | None) -> bool:
        """Whether the task brings its own logits head (else its rows use the base model's)."""
        if task in (None, self.base_name) or self.logits_head is None:
            return False
        cached = self._cache.get(task)
        return cached is not None and self.logits_head in cached[1].heads

    def labels(self, task: str | None) -> list[str] | None:
        """The task's label names (index = class id): from its store entry, else the base config's names when
        the task classifies with the base's own head; None when nothing names them."""
        if task not in (None, self.base_name) and task in self.task_labels:
            return self.task_labels[task]
        if self.has_own_head(task):
            return None
        names = [str(v) for _, v in sorted((getattr(self.model.config, "id2label", None) or {}).items())]
        width = self.num_labels(task)
        if not names or all(_PLACEHOLDER_LABEL.match(n) for n in names) or (width and len(names) != width):
            return None
        return names

    def untrained_head(self, task: str | None) -> str | None:
        """The randomly initialised head a task's rows would classify with, or None when its head is real."""
        if self.logits_head is None or self.has_own_head(task):
            return None
        return self.logits_head if self.logits_head in self.untrained_heads else None

    def check_classifiable(self, task: str | None) -> None:
        """Refuse a task whose answer would come from a head the base checkpoint never had (random weights)."""
        head = self.untrained_head(task)
        if head is not None:
            shown = self.base_name if task is None else task
            raise SubspaceError(
                f"'{shown}' has no classification head of its own and the base model's '{head}' was not in its "
                "checkpoint (randomly initialised): its answers would mean nothing; classify with a task that "
                f"has a head (known: {', '.join(self.tasks) or 'none'})",
                self.store_path,
            )

    def classify(self, tasks: Sequence[str | None], **inputs: Any) -> list[Classified]:
        """One forward for a batch mixing tasks; each row's softmax over its own task's labels, with names.

        Rows whose task would use a randomly initialised head are refused (SubspaceError) before any work.
        """
        for task in dict.fromkeys(tasks):
            self.check_classifiable(task)
        logits = self.forward(tasks, **inputs).logits.float()
        rows = []
        for task, row in zip(tasks, logits, strict=True):
            width = self.num_labels(task) or row.shape[-1]
            scores = torch.softmax(row[:width], dim=-1)
            best = int(torch.argmax(scores))
            names = self.labels(task)
            rows.append(
                Classified(best, names[best] if names else f"LABEL_{best}", [float(x) for x in scores])
            )
        return rows

    @property
    def _lookup(self) -> dict[str | None, int]:
        table: dict[str | None, int] = {None: 0, self.base_name: 0}
        table.update({name: i + 1 for i, name in enumerate(self.tasks)})
        return table

    # ---- keeping up with the store --------------------------------------------------------------------
    def changed(self) -> bool:
        """Whether the store's manifest changed since the last refresh (one stat call)."""
        return _stamp(self.store_path) != self._stamp

    def maybe_refresh(self) -> list[str]:
        return self.refresh() if self.changed() else []

    def refresh(self) -> list[str]:
        """Re-read the manifest, load only new or changed task files, rebuild the stacks; returns new tasks.

        Everything is read and checked before any layer changes, so a bad store leaves the served tasks as they
        were (and is not retried until its manifest changes again).
        """
        stamp = _stamp(self.store_path)
        try:
            store = SubspaceStore(self.store_path)
            self._check_base(store)
            basis_sha = store.manifest["files"].get(basis_file(store.manifest))
            cache = self._read_tasks(store, keep=basis_sha == self._basis_sha)
            labels = _label_lists(store)
        except Exception:
            self._stamp = stamp
            raise
        for slot in store.slots:
            self._wrap_slot(slot)
        new = [n for n in store.tasks if n not in self.tasks]
        self._cache, self.tasks = cache, list(store.tasks)
        self._load_slots(store, reload_basis=basis_sha != self._basis_sha)
        self._load_heads()
        # Names that do not fit the head they classify with would mislabel every answer: left out, said once.
        self.task_labels = {}
        for name, names in labels.items():
            width = self.num_labels(name)
            if width is not None and len(names) != width:
                log.warning(
                    "task '%s' names %d labels but its head has %d outputs; serving ids",
                    name,
                    len(names),
                    width,
                )
            else:
                self.task_labels[name] = names
        self._basis_sha, self._stamp = basis_sha, stamp
        return new

    def _read_tasks(self, store: SubspaceStore, keep: bool) -> dict[str, tuple[str, _TaskTensors]]:
        if self.base_name in store.tasks:
            raise SubspaceError(
                f"has a task named '{self.base_name}', the name of the base model; pick another base name",
                self.store_path,
            )
        cache: dict[str, tuple[str, _TaskTensors]] = {}
        for name in store.tasks:
            sha = store.manifest["files"].get(task_file(name), "")
            hit = self._cache.get(name) if keep else None
            if hit is not None and hit[0] == sha:
                cache[name] = hit
                continue
            biases, heads = _split_extras(name, store.extras(name), self.model)
            cores = {m: c.to(self.dtype) for m, c in store.cores(name).items()}
            cache[name] = (sha, _TaskTensors(cores, {m: b.to(self.dtype) for m, b in biases.items()}, heads))
        return cache

    def _check_base(self, store: SubspaceStore) -> None:
        for slot, meta in store.manifest["slots"].items():
            try:
                module = self.model.get_submodule(slot)
            except AttributeError:
                raise SubspaceError(
                    f"slot '{slot}' is not a module of the loaded {type(self.model).__name__}; is this the store's "
                    "base model?",
                    self.store_path,
                ) from None
            if isinstance(module, SubspaceLinear):
                module = module.base_layer
            try:
                dims = linear_dims(module)
            except TypeError:
                raise SubspaceError(
                    f"slot '{slot}' is a {type(module).__name__}, not a Linear-like layer", self.store_path
                ) from None
            if list(dims) != list(meta["shape"]):
                raise SubspaceError(
                    f"slot '{slot}' is {tuple(meta['shape'])} in the store but {dims} in the loaded model",
                    self.store_path,
                )

    def _wrap_slot(self, slot: str) -> None:
        if slot in self.layers:
            return
        parent_path, _, child = slot.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        wrapper = SubspaceLinear(getattr(parent, child), self.router)
        setattr(parent, child, wrapper)
        self.layers[slot] = wrapper

    def _load_slots(self, store: SubspaceStore, reload_basis: bool) -> None:
        tasks = [self._cache[name][1] for name in self.tasks]
        for slot, layer in self.layers.items():
            if reload_basis or layer.V.shape[1] == 0:
                U, V = (t.to(self.dtype) for t in store.basis(slot))
            else:
                U, V = layer.Ut.T, layer.V
            k_out, k_in = U.shape[1], V.shape[1]
            cores_t = torch.zeros(len(tasks) + 1, k_in, k_out, dtype=self.dtype)
            for i, task in enumerate(tasks, start=1):
                if slot in task.cores:
                    cores_t[i] = task.cores[slot].T
            biases = None
            if any(slot in task.biases for task in tasks):
                biases = torch.zeros(len(tasks) + 1, layer.out_features, dtype=self.dtype)
                for i, task in enumerate(tasks, start=1):
                    if slot in task.biases:
                        biases[i] = task.biases[slot]
            device = _device(layer.base_layer)
            layer.load(
                U.to(device), V.to(device), cores_t.to(device), None if biases is None else biases.to(device)
            )

    def _load_heads(self) -> None:
        tasks = [(name, self._cache[name][1]) for name in self.tasks]
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        paths = sorted(
            {path for _, task in tasks for path in task.heads}, key=lambda p: (order.get(p, -1), p)
        )
        self.head_out = {self.base_name: {}} | {name: {} for name in self.tasks}
        # The last head in module order makes the logits; its narrower rows are padded with -inf, not 0, so a
        # row's softmax and argmax over the padded width stay its own task's. (Padding an inner head with -inf
        # would poison what reads it; inner heads keep zeros, and do not differ in width in real models.)
        self.logits_head = paths[-1] if paths else None
        for path in paths:
            head = self.heads.get(path)
            if head is None:
                parent_path, _, child = path.rpartition(".")
                parent = self.model.get_submodule(parent_path) if parent_path else self.model
                head = PerTaskLinear(getattr(parent, child), self.router)
                setattr(parent, child, head)
                self.heads[path] = head
            base = head.base_layer
            rows = [(base.weight.detach(), None if base.bias is None else base.bias.detach())]
            self.head_out[self.base_name][path] = base.weight.shape[0]
            for name, task in tasks:
                tensors = task.heads.get(path)
                if tensors is None:
                    rows.append(rows[0])
                    self.head_out[name][path] = base.weight.shape[0]
                    continue
                weight = tensors.get("weight", rows[0][0])
                rows.append((weight, tensors.get("bias")))
                self.head_out[name][path] = weight.shape[0]
            out = max(w.shape[0] for w, _ in rows)
            inp = max(w.shape[1] for w, _ in rows)
            weights = torch.zeros(len(rows), out, inp, dtype=self.dtype)
            biases = torch.zeros(len(rows), out, dtype=self.dtype)
            for i, (w, b) in enumerate(rows):
                weights[i, : w.shape[0], : w.shape[1]] = w
                if b is not None:
                    biases[i, : b.shape[0]] = b
                if path == self.logits_head and w.shape[0] < out:
                    biases[i, w.shape[0] :] = float("-inf")
            device = base.weight.device
            head.load(weights.to(device), biases.to(device))

    # ---- measuring ------------------------------------------------------------------------------------
    def resident_bytes(self) -> dict[str, int]:
        """Bytes held for tasks: shared bases, stacked cores (+ lora biases), stacked heads."""
        basis = sum(
            t.numel() * t.element_size() for layer in self.layers.values() for t in (layer.Ut, layer.V)
        )
        cores = sum(
            layer.cores_t.numel() * layer.cores_t.element_size()
            + (0 if layer.biases is None else layer.biases.numel() * layer.biases.element_size())
            for layer in self.layers.values()
        )
        heads = sum(
            h.weights.numel() * h.weights.element_size()
            + h.stacked_biases.numel() * h.stacked_biases.element_size()
            for h in self.heads.values()
            if h.weights is not None and h.stacked_biases is not None
        )
        return {"basis": basis, "cores": cores, "heads": heads}


def _label_lists(store: SubspaceStore) -> dict[str, list[str]]:
    """Each task's label names as its manifest entry keeps them (compress reads them from id2label)."""
    found: dict[str, list[str]] = {}
    for name, entry in store.manifest["tasks"].items():
        names = entry.get("labels")
        if names is None:
            continue
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise SubspaceError(f"task '{name}': labels must be a non-empty list of names", store.path)
        found[name] = names
    return found


def _stamp(store_path: Path) -> tuple[int, int]:
    stat = (store_path / MANIFEST).stat()
    return stat.st_mtime_ns, stat.st_size


def _device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations flow in: the first floating parameter that bitsandbytes did not quantize."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return param.dtype
    return torch.float32


def attach(model: nn.Module, store: SubspaceStore | str | Path, **kwargs: Any) -> MultiTaskModel:
    """Wrap every slot of `store` in `model` (in place) and load all tasks; see MultiTaskModel."""
    return MultiTaskModel(model, store, **kwargs)

"""Hostile input, table-driven: every case exits 2 with exactly one line on stderr naming the file and the
problem, writes nothing, touches nothing outside the store, and never shows a traceback.

Each case starts from a copy of one real tiny-BERT zoo and its store (built once per module), breaks one
thing the way a stranger's file or a careless command would, and runs the real command line.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_lora, write_recipe
from safetensors.torch import load_file, save_file

from mergekit_subspace.cli import main
from mergekit_subspace.io.store import MANIFEST, manifest_digest

TASKS = ("task0", "task1", "task2")


@pytest.fixture(scope="module")
def pristine(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """zoo/task0..2 (ranks 4, 2, 3; task2 also on 'key') and store/ compressed from them, at k = 4."""
    root = tmp_path_factory.mktemp("hostile")
    make_lora(tiny_bert, root / "zoo" / "task0", seed=0, r=4)
    make_lora(tiny_bert, root / "zoo" / "task1", seed=1, r=2, alpha=4)
    make_lora(tiny_bert, root / "zoo" / "task2", seed=2, r=3, targets=("query", "key", "value"))
    recipe = write_recipe(
        root / "recipe.yaml",
        f"base_model: {tiny_bert}\nadapters: ['{root}/zoo/*']\nsubspace: {{k: 4}}\noutput: {root / 'store'}\n",
    )
    result = CliRunner().invoke(main, ["compress", str(recipe)])
    assert result.exit_code == 0, result.output
    (root / "recipe.yaml").unlink()
    return root


@dataclass
class Env:
    root: Path
    base: Path

    @property
    def zoo(self) -> Path:
        return self.root / "zoo"

    @property
    def store(self) -> Path:
        return self.root / "store"

    def adapter(self, name: str = "task0") -> Path:
        return self.zoo / name

    def compress_recipe(
        self, adapters: list[str] | None = None, body: str = "", output: str | None = None
    ) -> str:
        listed = adapters if adapters is not None else [str(self.zoo / t) for t in TASKS]
        text = f"base_model: {self.base}\nadapters:\n" + "".join(f"  - {a}\n" for a in listed)
        text += f"subspace: {{k: 4}}\noutput: {output or self.root / 'out' / 'store'}\n{body}"
        return str(write_recipe(self.root / "recipe.yaml", text))

    def merge_recipe(
        self,
        body: str,
        source: str | None = None,
        output: str | None = None,
        method: str = "ties",
        out: str = "",
    ) -> str:
        source = source if source is not None else f"store: {self.store}"
        text = f"merge_method: {method}\n{source}\n{body}\n"
        text += f"output: {{path: {output or self.root / 'merged'}{out}}}\n"
        return str(write_recipe(self.root / "merge.yaml", text))


# ---- ways to break things -------------------------------------------------------------------------------


def edit_config(env: Env, changes: dict, name: str = "task0") -> None:
    path = env.adapter(name) / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def raw_config(env: Env, text: str | bytes, name: str = "task0") -> None:
    path = env.adapter(name) / "adapter_config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def edit_tensors(env: Env, change: Callable[[dict], None], name: str = "task0") -> None:
    path = env.adapter(name) / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def first_key(tensors: dict, side: str) -> str:
    return sorted(k for k in tensors if f"lora_{side}" in k)[0]


def safetensors_raw(path: Path, header: str, data: bytes) -> None:
    encoded = header.encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def duplicate_header_key(env: Env) -> None:
    path = env.adapter() / "adapter_model.safetensors"
    blob = path.read_bytes()
    size = struct.unpack("<Q", blob[:8])[0]
    text = blob[8 : 8 + size].decode()
    header = json.loads(text)
    key = first_key(header, "A")
    entry = json.dumps(header[key])
    duplicated = text.rstrip()[:-1] + f',"{key}":{entry}' + "}"
    safetensors_raw(path, duplicated, blob[8 + size :])


def edit_manifest(env: Env, change: Callable[[dict], None], rehash: bool = True) -> None:
    """Change the manifest; with `rehash` also its own digest, as someone who knows the format would."""
    path = env.store / MANIFEST
    raw = json.loads(path.read_text())
    change(raw)
    if rehash and isinstance(raw, dict):
        raw["manifest_sha256"] = manifest_digest(raw)
    path.write_text(json.dumps(raw, sort_keys=True, separators=(",", ":")))


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def outside_copy(env: Env, rel: str) -> Path:
    """A copy of a store file outside the store (where a path trick would lead)."""
    target = env.root / "outside" / Path(rel).name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(env.store / rel, target)
    return target


def symlink_tasks_dir(env: Env) -> None:
    outside = env.root / "outside-tasks"
    shutil.copytree(env.store / "tasks", outside)
    shutil.rmtree(env.store / "tasks")
    (env.store / "tasks").symlink_to(outside)


def symlink_file(env: Env, rel: str) -> None:
    target = outside_copy(env, rel)
    (env.store / rel).unlink()
    (env.store / rel).symlink_to(target)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def evil_pickle(env: Env) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    folder = env.adapter()
    (folder / "adapter_model.safetensors").unlink()
    buffer = io.BytesIO()
    pickle.dump({"base_model.model.x.lora_A.weight": Payload()}, buffer)
    (folder / "adapter_model.bin").write_bytes(buffer.getvalue())


def manifest_task(raw: dict, name: str = "task0") -> dict:
    return raw["tasks"][name]


def set_files_key(raw: dict, old: str, new: str) -> None:
    raw["files"][new] = raw["files"].pop(old)


# ---- the cases ------------------------------------------------------------------------------------------


@dataclass
class Case:
    kind: str
    name: str
    setup: Callable[[Env], list[str]]  # breaks something in env, returns the command line
    file: str | None  # a fragment of the path the message must name (None: no file is at fault)
    problem: str  # a fragment of the problem the message must state
    env_vars: tuple[tuple[str, None], ...] = ()  # modules made unimportable: (name, None)


def compress(env: Env, *extra: str, **recipe: object) -> list[str]:
    return ["compress", env.compress_recipe(**recipe), *extra]  # type: ignore[arg-type]


def reconstruct(env: Env, task: str = "task0", out: str | None = None, *extra: str) -> list[str]:
    return ["reconstruct", str(env.store), task, "--out", out or str(env.root / "rebuilt"), *extra]


def then(action: Callable[[Env], object], command: Callable[[Env], list[str]]) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        action(env)
        return command(env)

    return setup


def config_case(name: str, changes: dict, problem: str) -> Case:
    return Case(
        "config",
        name,
        then(lambda e: edit_config(e, changes), compress),
        "task0/adapter_config.json",
        problem,
    )


def raw_config_case(name: str, text: str | bytes, problem: str) -> Case:
    return Case(
        "config", name, then(lambda e: raw_config(e, text), compress), "task0/adapter_config.json", problem
    )


def tensor_case(name: str, change: Callable[[dict], None], problem: str) -> Case:
    return Case(
        "tensors",
        name,
        then(lambda e: edit_tensors(e, change), compress),
        "task0/adapter_model.safetensors",
        problem,
    )


def manifest_case(name: str, change: Callable[[dict], None], problem: str, command=None, rehash=True) -> Case:
    return Case(
        "store-paths" if "file" in name or "path" in name else "reads",
        name,
        then(lambda e: edit_manifest(e, change, rehash), command or (lambda e: reconstruct(e))),
        "store/manifest.json",
        problem,
    )


def merge_case(name: str, body: str, problem: str, method: str = "ties", out: str = "") -> Case:
    return Case(
        "merge-numbers",
        name,
        lambda e: ["merge", e.merge_recipe(body, method=method, out=out)],
        "merge.yaml",
        problem,
    )


def set_int(tensors: dict, side: str, dtype: torch.dtype) -> None:
    key = first_key(tensors, side)
    tensors[key] = tensors[key].round().to(dtype)


def zero_rank(tensors: dict) -> None:
    a, b = first_key(tensors, "A"), first_key(tensors, "B")
    tensors[a] = tensors[a][:0].contiguous()
    tensors[b] = tensors[b][:, :0].contiguous()


def empty_dim(tensors: dict) -> None:
    a = first_key(tensors, "A")
    tensors[a] = tensors[a][:, :0].contiguous()


STORE_PATH_CASES = [
    manifest_case(
        "task file with ..",
        lambda r: manifest_task(r).update(file="tasks/../../outside/task0.safetensors"),
        "names the file",
    ),
    manifest_case(
        "task file absolute", lambda r: manifest_task(r).update(file="/etc/passwd"), "names the file"
    ),
    manifest_case(
        "task file of another task",
        lambda r: manifest_task(r).update(file="tasks/task1.safetensors"),
        "not tasks/task0.safetensors",
    ),
    manifest_case(
        "task file not .safetensors",
        lambda r: manifest_task(r).update(file="tasks/task0.bin"),
        "names the file",
    ),
    manifest_case(
        "files map path outside",
        lambda r: set_files_key(r, "tasks/task2.safetensors", "../outside/task2.safetensors"),
        "`files` names '../outside/task2.safetensors'",
        command=lambda e: ["verify", str(e.store)],
    ),
    manifest_case(
        "files map absolute path",
        lambda r: r["files"].update({"/etc/passwd": "0" * 64}),
        "`files` names '/etc/passwd'",
        command=lambda e: ["verify", str(e.store)],
    ),
    manifest_case(
        "files map without basis path",
        lambda r: r["files"].pop("basis.safetensors"),
        "no sha256 for 'basis.safetensors'",
    ),
    manifest_case(
        "task name with .. in path",
        lambda r: r["tasks"].update({"../evil": r["tasks"].pop("task2")}),
        "task name '../evil' is not a plain file name",
        command=lambda e: ["info", str(e.store)],
    ),
    Case(
        "store-paths",
        "tasks/ is a symlink (reconstruct)",
        then(symlink_tasks_dir, reconstruct),
        "store/tasks",
        "is a symlink",
    ),
    Case(
        "store-paths",
        "tasks/ is a symlink (add)",
        then(symlink_tasks_dir, lambda e: ["add", str(e.store), str(e.adapter("task1")), "--name", "again"]),
        "store/tasks",
        "is a symlink",
    ),
    Case(
        "store-paths",
        "task file is a symlink",
        then(lambda e: symlink_file(e, "tasks/task0.safetensors"), reconstruct),
        "store/tasks/task0.safetensors",
        "is a symlink",
    ),
    Case(
        "store-paths",
        "basis is a symlink",
        then(lambda e: symlink_file(e, "basis.safetensors"), reconstruct),
        "store/basis.safetensors",
        "is a symlink",
    ),
    Case(
        "store-paths",
        "manifest is a symlink",
        then(lambda e: symlink_file(e, MANIFEST), lambda e: ["info", str(e.store)]),
        "store/manifest.json",
        "is a symlink",
    ),
    Case(
        "store-paths",
        "manifest is a folder",
        then(
            lambda e: ((e.store / MANIFEST).unlink(), (e.store / MANIFEST).mkdir()),
            lambda e: ["info", str(e.store)],
        ),
        "store/manifest.json",
        "is not a file",
    ),
]

CONFIG_CASES = [
    config_case("lora_alpha null", {"lora_alpha": None}, "lora_alpha"),
    config_case("lora_alpha string", {"lora_alpha": "16"}, "lora_alpha: Input should be a valid number"),
    config_case(
        "lora_alpha infinite", {"lora_alpha": math.inf}, "lora_alpha: Input should be a finite number"
    ),
    config_case("lora_alpha NaN", {"lora_alpha": math.nan}, "lora_alpha: Input should be a finite number"),
    config_case("lora_alpha negative", {"lora_alpha": -8}, "lora_alpha: Input should be greater than 0"),
    config_case("lora_alpha zero", {"lora_alpha": 0}, "lora_alpha: Input should be greater than 0"),
    config_case("lora_alpha true", {"lora_alpha": True}, "lora_alpha: Input should be a valid number"),
    config_case("r string", {"r": "4"}, "r: Input should be a valid integer"),
    config_case("r negative", {"r": -4}, "r: Input should be greater than or equal to 1"),
    config_case("r zero", {"r": 0}, "r: Input should be greater than or equal to 1"),
    config_case("r fractional", {"r": 4.5}, "r: Input should be a valid integer"),
    config_case("use_rslora string", {"use_rslora": "yes"}, "use_rslora: Input should be a valid boolean"),
    config_case(
        "fan_in_fan_out number", {"fan_in_fan_out": 1}, "fan_in_fan_out: Input should be a valid boolean"
    ),
    config_case(
        "rank_pattern list",
        {"rank_pattern": [["query", 2]]},
        "rank_pattern: Input should be a valid dictionary",
    ),
    config_case(
        "rank_pattern bad regex", {"rank_pattern": {"(query": 2}}, "is not a valid regular expression"
    ),
    config_case("rank_pattern string value", {"rank_pattern": {"query": "2"}}, "rank_pattern.query"),
    config_case("rank_pattern zero", {"rank_pattern": {"query": 0}}, "rank_pattern.query"),
    config_case("alpha_pattern null value", {"alpha_pattern": {"query": None}}, "alpha_pattern.query"),
    config_case("alpha_pattern infinite", {"alpha_pattern": {"query": math.inf}}, "alpha_pattern.query"),
    config_case("alpha_pattern bad regex", {"alpha_pattern": {"[": 3}}, "is not a valid regular expression"),
    config_case("target_modules number", {"target_modules": 42}, "target_modules"),
    config_case("target_modules numbers", {"target_modules": [1, 2]}, "target_modules"),
    config_case(
        "target_modules bad regex", {"target_modules": "(query"}, "is not a valid regular expression"
    ),
    config_case("modules_to_save string", {"modules_to_save": "classifier"}, "modules_to_save"),
    config_case("bias unknown", {"bias": "sometimes"}, "bias"),
    config_case("peft_type number", {"peft_type": 5}, "peft_type must be a string"),
    raw_config_case("config is a list", "[1, 2]", "is not a JSON object"),
    raw_config_case(
        "deeply nested (10k)", '{"peft_type": "LORA", "x": ' + nested(10_000) + "}", "nested too deeply"
    ),
    raw_config_case(
        "nested 100 levels", '{"peft_type": "LORA", "x": ' + nested(100) + "}", "nested too deeply"
    ),
    raw_config_case(
        "repeated key", '{"peft_type": "LORA", "r": 4, "r": 8, "lora_alpha": 8}', "the key 'r' appears twice"
    ),
    raw_config_case("not UTF-8", b'{"peft_type": "\xff\xfe"}', "not UTF-8"),
]

TENSOR_CASES = [
    tensor_case("int32 lora_A", lambda t: set_int(t, "A", torch.int32), "is not floating point"),
    tensor_case("bool lora_B", lambda t: set_int(t, "B", torch.bool), "is not floating point"),
    tensor_case("int8 lora_B", lambda t: set_int(t, "B", torch.int8), "is not floating point"),
    tensor_case("zero rank factors", zero_rank, "rank 0"),
    tensor_case("empty input dimension", empty_dim, "empty dimension"),
    tensor_case(
        "NaN in lora_B",
        lambda t: t[first_key(t, "B")].view(-1).__setitem__(0, math.nan),
        "contains NaN or Inf",
    ),
    Case(
        "tensors",
        "duplicate header key",
        then(duplicate_header_key, compress),
        "task0/adapter_model.safetensors",
        "twice",
    ),
    Case(
        "tensors",
        "header size beyond the file",
        then(
            lambda e: (e.adapter() / "adapter_model.safetensors").write_bytes(
                struct.pack("<Q", 10**6) + b"{}"
            ),
            compress,
        ),
        "task0/adapter_model.safetensors",
        "does not fit in the file",
    ),
    Case(
        "tensors",
        "header not JSON",
        then(lambda e: safetensors_raw(e.adapter() / "adapter_model.safetensors", "{nope", b""), compress),
        "task0/adapter_model.safetensors",
        "header is not JSON",
    ),
    Case(
        "tensors",
        "truncated file",
        then(
            lambda e: (e.adapter() / "adapter_model.safetensors").write_bytes(
                (e.adapter() / "adapter_model.safetensors").read_bytes()[:-100]
            ),
            compress,
        ),
        "task0/adapter_model.safetensors",
        "not a readable safetensors file",
    ),
]

MERGE_CASES = [
    merge_case(
        "NaN weight", "tasks:\n  - {name: task0, weight: .nan}", "weight: Input should be a finite number"
    ),
    merge_case("infinite lambda", "parameters: {lambda: .inf}", "lambda: Input should be a finite number"),
    merge_case("huge lambda", "parameters: {lambda: 1.0e+30}", "lambda must lie in"),
    merge_case("density above 1", "parameters: {density: 1.5}", "density must lie in (0, 1]"),
    merge_case("density negative", "parameters: {density: -0.1}", "density must lie in (0, 1]"),
    merge_case("density zero", "parameters: {density: 0}", "density must lie in (0, 1]"),
    merge_case("weight string", "tasks:\n  - {name: task0, weight: '0.5'}", "Input should be a valid number"),
    merge_case("weight true", "tasks:\n  - {name: task0, weight: true}", "Input should be a valid number"),
    merge_case("gradient with NaN", "tasks:\n  - {name: task0, weight: [1.0, .nan]}", "weight.1"),
    merge_case(
        "filter value infinite",
        "tasks:\n  - {name: task0, parameters: {density: [{filter: query, value: .inf}]}}",
        "value: Input should be a finite number",
    ),
    merge_case(
        "lambda grid infinite",
        "tasks:\n  - {name: task0, validation: v.jsonl}\nvalidation: {lambda_grid: [1.0, .inf]}",
        "lambda_grid.1",
    ),
    merge_case(
        "seed fractional", "parameters: {seed: 1.5}", "seed must be a whole number", method="dare_ties"
    ),
    merge_case(
        "seed huge", "parameters: {seed: 1.0e+300}", "seed must be a whole number", method="dare_ties"
    ),
    merge_case(
        "shard size overflow",
        "",
        "is not a size",
        out=", max_shard_size: '" + "9" * 400 + "GB'",
    ),
    merge_case("batch size zero", "validation: {batch_size: 0}", "batch_size"),
]

OUTPUT_CASES = [
    Case(
        "outputs",
        "compress name too long",
        lambda e: compress(e, "--out", str(e.root / ("x" * 300))),
        "xxxx",
        "this filesystem allows at most",
    ),
    Case(
        "outputs",
        "reconstruct name too long",
        lambda e: reconstruct(e, out=str(e.root / ("y" * 300))),
        "yyyy",
        "this filesystem allows at most",
    ),
    Case(
        "outputs",
        "merge name too long",
        lambda e: ["merge", e.merge_recipe("", output=str(e.root / ("z" * 300)))],
        "zzzz",
        "this filesystem allows at most",
    ),
    Case(
        "outputs",
        "compress parent is a file",
        then(
            lambda e: (e.root / "afile").write_text("x"),
            lambda e: compress(e, "--out", str(e.root / "afile" / "s")),
        ),
        "afile/s",
        "is a file, not a folder",
    ),
    Case(
        "outputs",
        "reconstruct parent is a file",
        then(
            lambda e: (e.root / "afile").write_text("x"),
            lambda e: reconstruct(e, out=str(e.root / "afile" / "r")),
        ),
        "afile/r",
        "is a file, not a folder",
    ),
    Case(
        "outputs",
        "merge output is a file",
        then(
            lambda e: (e.root / "afile").write_text("x"),
            lambda e: ["merge", e.merge_recipe("", output=str(e.root / "afile")), "--overwrite"],
        ),
        "afile",
        "exists and is not a folder",
    ),
    Case(
        "outputs",
        "compress --out . --overwrite",
        lambda e: compress(e, "--out", ".", "--overwrite"),
        ".",
        "current folder",
    ),
    Case(
        "outputs",
        "reconstruct --out . --overwrite",
        lambda e: reconstruct(e, "task0", ".", "--overwrite"),
        ".",
        "current folder",
    ),
    Case(
        "outputs",
        "merge --out .. --overwrite",
        lambda e: ["merge", e.merge_recipe(""), "--out", "..", "--overwrite"],
        "..",
        "current folder",
    ),
    Case(
        "outputs",
        "compress --out an input adapter",
        lambda e: compress(e, "--out", str(e.adapter("task1")), "--overwrite"),
        "zoo/task1",
        "is an input of this run",
    ),
    Case(
        "outputs",
        "compress --out the zoo folder",
        lambda e: compress(e, "--out", str(e.zoo), "--overwrite"),
        "zoo",
        "holds an input of this run",
    ),
    Case(
        "outputs",
        "compress --out inside an adapter",
        lambda e: compress(e, "--out", str(e.adapter("task2") / "store")),
        "task2/store",
        "lies inside an input",
    ),
    Case(
        "outputs",
        "reconstruct --out the store",
        lambda e: reconstruct(e, "task0", str(e.store), "--overwrite"),
        "store",
        "is an input of this run",
    ),
    Case(
        "outputs",
        "reconstruct --out inside the store",
        lambda e: reconstruct(e, "task0", str(e.store / "tasks"), "--overwrite"),
        "store/tasks",
        "lies inside an input",
    ),
    Case(
        "outputs",
        "merge --out inside the store",
        lambda e: ["merge", e.merge_recipe(""), "--out", str(e.store / "merged")],
        "store/merged",
        "lies inside an input",
    ),
    Case(
        "outputs",
        "merge --out an input adapter",
        lambda e: [
            "merge",
            e.merge_recipe("", source=f"adapters: [{e.adapter('task0')}, {e.adapter('task1')}]"),
            "--out",
            str(e.adapter("task1")),
            "--overwrite",
        ],
        "zoo/task1",
        "is an input of this run",
    ),
    Case(
        "outputs",
        "bench --out an adapter",
        lambda e: [
            "bench",
            e.compress_recipe(body="eval: {type: sequence_classification, data: 'd/{task}.jsonl'}\n"),
            "--out",
            str(e.adapter("task0")),
            "--overwrite",
        ],
        "zoo/task0",
        "is an input of this run",
    ),
]


def corrupt_manifest_types(raw: dict) -> None:
    manifest_task(raw)["rel_error"] = "abc"


READ_CASES = [
    Case(
        "reads",
        "flipped byte in a task file (reconstruct)",
        then(lambda e: flip_byte(e.store / "tasks" / "task0.safetensors"), reconstruct),
        "store/tasks/task0.safetensors",
        "altered",
    ),
    Case(
        "reads",
        "flipped byte in the basis (reconstruct)",
        then(lambda e: flip_byte(e.store / "basis.safetensors"), reconstruct),
        "store/basis.safetensors",
        "altered",
    ),
    Case(
        "reads",
        "flipped byte in the basis (add)",
        then(
            lambda e: flip_byte(e.store / "basis.safetensors"),
            lambda e: ["add", str(e.store), str(e.adapter("task1")), "--name", "again"],
        ),
        "store/basis.safetensors",
        "altered",
    ),
    Case(
        "reads",
        "flipped byte in a task file (merge)",
        then(
            lambda e: flip_byte(e.store / "tasks" / "task1.safetensors"),
            lambda e: ["merge", e.merge_recipe("")],
        ),
        "store/tasks/task1.safetensors",
        "altered",
    ),
    Case(
        "reads",
        "flipped byte in the basis (merge)",
        then(
            lambda e: flip_byte(e.store / "basis.safetensors", 200), lambda e: ["merge", e.merge_recipe("")]
        ),
        "store/basis.safetensors",
        "altered",
    ),
    Case(
        "reads",
        "flipped byte in a task file (serve)",
        then(
            lambda e: flip_byte(e.store / "tasks" / "task2.safetensors"),
            lambda e: ["serve", str(e.store), "--base", str(e.base), "--port", "0"],
        ),
        "store/tasks/task2.safetensors",
        "altered",
    ),
    Case(
        "reads",
        "truncated task file",
        then(
            lambda e: (e.store / "tasks" / "task0.safetensors").write_bytes(b"\x08\x00"),
            reconstruct,
        ),
        "store/tasks/task0.safetensors",
        "altered",
    ),
    Case(
        "reads",
        "missing task file",
        then(lambda e: (e.store / "tasks" / "task0.safetensors").unlink(), reconstruct),
        "store/tasks/task0.safetensors",
        "file not found",
    ),
    Case(
        "reads",
        "info with the basis missing",
        then(lambda e: (e.store / "basis.safetensors").unlink(), lambda e: ["info", str(e.store)]),
        "store/basis.safetensors",
        "No such file",
    ),
    manifest_case(
        "manifest edited, digest stale",
        lambda r: manifest_task(r).update(rel_error=0.0),
        "does not match its own manifest_sha256",
        command=lambda e: ["info", str(e.store)],
        rehash=False,
    ),
    manifest_case(
        "manifest wrong types (info)",
        corrupt_manifest_types,
        "tasks.task0.rel_error",
        command=lambda e: ["info", str(e.store)],
    ),
    manifest_case(
        "manifest k beyond shape",
        lambda r: next(iter(r["slots"].values())).update(k_out=10_000),
        "beyond its shape",
    ),
    manifest_case(
        "manifest slot index out of range",
        lambda r: manifest_task(r)["slot_table"]["slot"].__setitem__(0, 999),
        "slot numbers that repeat or exceed",
    ),
    manifest_case(
        "manifest extra of unknown dtype",
        lambda r: manifest_task(r)["extra_dtypes"].update(
            {k: "load" for k in manifest_task(r)["extra_dtypes"]}
        ),
        "unknown dtype 'load'",
    ),
    manifest_case(
        "manifest task dtype not a dtype", lambda r: manifest_task(r).update(dtype="load"), "has dtype 'load'"
    ),
    manifest_case(
        "manifest settings dtype unknown",
        lambda r: r["settings"].update(dtype="int3"),
        "settings.dtype",
        command=lambda e: ["info", str(e.store)],
    ),
    Case(
        "reads",
        "manifest deeply nested",
        then(
            lambda e: (e.store / MANIFEST).write_text(
                '{"format": "mergekit-subspace/2", "x": ' + nested(50_000) + "}"
            ),
            lambda e: ["info", str(e.store)],
        ),
        "store/manifest.json",
        "nested too deeply",
    ),
    Case(
        "reads",
        "manifest with a repeated key",
        then(
            lambda e: (e.store / MANIFEST).write_text(
                (e.store / MANIFEST).read_text().replace('{"base_model"', '{"files":{},"base_model"', 1)
            ),
            lambda e: ["verify", str(e.store)],
        ),
        "store/manifest.json",
        "appears twice",
    ),
    Case(
        "reads",
        "manifest not JSON",
        then(lambda e: (e.store / MANIFEST).write_text("{"), lambda e: ["info", str(e.store)]),
        "store/manifest.json",
        "is not valid JSON",
    ),
]

EXTRAS_CASES = [
    Case(
        "extras",
        "bench without matplotlib",
        lambda e: ["bench", e.compress_recipe(), "--out", str(e.root / "bench")],
        None,
        "pip install 'mergekit-subspace[bench]'",
        (("matplotlib", None),),
    ),
    Case(
        "extras",
        "serve without fastapi",
        lambda e: ["serve", str(e.store), "--base", str(e.base)],
        None,
        "pip install 'mergekit-subspace[serve]'",
        (("fastapi", None),),
    ),
    Case(
        "extras",
        "serve without uvicorn",
        lambda e: ["serve", str(e.store), "--base", str(e.base)],
        None,
        "needs uvicorn",
        (("uvicorn", None),),
    ),
]


def binary_recipe(env: Env) -> list[str]:
    (env.root / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    return ["compress", str(env.root / "bin.yaml")]


def bool_k_recipe(env: Env) -> list[str]:
    text = f"adapters: [{env.adapter()}]\nsubspace: {{k: true}}\noutput: {env.root / 'o'}\n"
    return ["compress", str(write_recipe(env.root / "recipe.yaml", text))]


def huge_recipe(env: Env) -> list[str]:
    text = f"adapters: [{env.adapter()}]\noutput: {env.root / 'out'}\n" + "".join(
        f"bad{i}: 1\n" for i in range(100_000)
    )
    return ["compress", str(write_recipe(env.root / "recipe.yaml", text))]


SMALL_CASES = [
    Case(
        "smaller",
        "pickle payload with --allow-pickle",
        then(evil_pickle, lambda e: compress(e, "--allow-pickle")),
        "task0/adapter_model.bin",
        "refused by torch.load(weights_only=True)",
    ),
    Case(
        "smaller",
        "pickle without --allow-pickle",
        then(evil_pickle, compress),
        "task0/adapter_model.bin",
        "pickle can run code",
    ),
    Case(
        "smaller",
        "YAML syntax error",
        lambda e: ["compress", str(write_recipe(e.root / "recipe.yaml", "adapters: [a, b\noutput: x\n"))],
        "recipe.yaml",
        "is not valid YAML",
    ),
    Case(
        "smaller",
        "YAML repeated key",
        lambda e: ["compress", str(write_recipe(e.root / "recipe.yaml", "output: a\noutput: b\n"))],
        "recipe.yaml",
        "the key 'output' appears twice",
    ),
    Case(
        "smaller",
        "YAML deeply nested",
        lambda e: [
            "compress",
            str(write_recipe(e.root / "recipe.yaml", "adapters: " + nested(20_000) + "\n")),
        ],
        "recipe.yaml",
        "YAML",
    ),
    Case("smaller", "100k bad recipe keys", huge_recipe, "recipe.yaml", "unknown key"),
    Case("smaller", "recipe is binary", lambda e: binary_recipe(e), "bin.yaml", "not UTF-8"),
    Case("smaller", "k true", lambda e: bool_k_recipe(e), "recipe.yaml", "must be a number, not true/false"),
]

CASES = (
    STORE_PATH_CASES
    + CONFIG_CASES
    + TENSOR_CASES
    + MERGE_CASES
    + OUTPUT_CASES
    + READ_CASES
    + EXTRAS_CASES
    + SMALL_CASES
)


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under root (not following symlinks): its content digest (or link target) and mode."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            digest = "link:" + os.readlink(path)
        elif path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest = "dir"
        found[str(path.relative_to(root))] = (digest, info.st_mode)
    return found


def test_enough_cases_of_every_kind() -> None:
    kinds = {c.kind for c in CASES}
    assert kinds == {
        "store-paths",
        "config",
        "tensors",
        "merge-numbers",
        "outputs",
        "reads",
        "extras",
        "smaller",
    }
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}:{c.name}" for c in CASES])
def test_hostile_input(
    case: Case, pristine: Path, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "case"
    shutil.copytree(pristine, root, symlinks=True)
    env = Env(root, tiny_bert)
    (root / "work").mkdir()
    monkeypatch.chdir(root / "work")  # '.' and '..' are real folders of this case ('..' holds the inputs)
    args = case.setup(env)
    import uvicorn

    def no_server(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server started: the damaged store was not refused")

    monkeypatch.setattr(uvicorn.Server, "run", no_server)
    for module, value in case.env_vars:
        monkeypatch.setitem(sys.modules, module, value)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # serve loads the base first; its progress bar is not our message
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert len(lines) == 1, result.stderr[:2000]
    line = lines[0]
    assert line.startswith("error: ") and len(line) <= 2100, line[:300]
    if case.file is not None:
        assert case.file in line, line
    assert case.problem in line, line
    hf_logging.enable_progress_bar()
    assert snapshot(tmp_path) == before, "something was written, removed or changed"
    assert not (root / "work" / "pwned").exists()


# ---- verify: what it must catch (exit 1, one FAIL line per problem) --------------------------------------


def swap_manifest_rehashed(env: Env) -> None:
    """Replace a task file and re-hash it in the manifest, leaving the manifest's own digest as it was."""
    (env.store / "tasks" / "task1.safetensors").write_bytes(
        (env.store / "tasks" / "task2.safetensors").read_bytes()
    )
    edit_manifest(
        env,
        lambda r: r["files"].update({"tasks/task1.safetensors": r["files"]["tasks/task2.safetensors"]}),
        rehash=False,
    )


VERIFY_CASES = [
    (
        "altered task file",
        lambda e: flip_byte(e.store / "tasks" / "task1.safetensors"),
        1,
        "task1.safetensors: altered",
    ),
    (
        "missing task file",
        lambda e: (e.store / "tasks" / "task1.safetensors").unlink(),
        1,
        "task1.safetensors: missing",
    ),
    ("task file is a symlink", lambda e: symlink_file(e, "tasks/task1.safetensors"), 1, "is a symlink"),
    ("tasks/ is a symlink", symlink_tasks_dir, 1, "store/tasks: is a symlink"),
    ("orphan file", lambda e: (e.store / "notes.txt").write_text("x"), 1, "notes.txt: orphan"),
    (
        "orphan task file",
        lambda e: shutil.copy(
            e.store / "tasks" / "task0.safetensors", e.store / "tasks" / "ghost.safetensors"
        ),
        1,
        "ghost.safetensors: orphan",
    ),
    (
        "leftover of a killed write",
        lambda e: (e.store / "tasks" / ".task9.safetensors.abcd1234.tmp").write_bytes(b"x"),
        1,
        "leftover of an interrupted write",
    ),
    (
        "manifest without its digest",
        lambda e: edit_manifest(e, lambda r: r.pop("manifest_sha256"), rehash=False),
        1,
        "has no manifest_sha256",
    ),
    (
        "manifest swapped with re-hashed files",
        swap_manifest_rehashed,
        2,
        "does not match its own manifest_sha256",
    ),
]


@pytest.mark.parametrize(
    ("name", "damage", "code", "message"), VERIFY_CASES, ids=[c[0] for c in VERIFY_CASES]
)
def test_verify_catches(
    name: str,
    damage: Callable[[Env], None],
    code: int,
    message: str,
    pristine: Path,
    tiny_bert: Path,
    tmp_path: Path,
) -> None:
    root = tmp_path / "case"
    shutil.copytree(pristine, root, symlinks=True)
    env = Env(root, tiny_bert)
    assert CliRunner().invoke(main, ["verify", str(env.store)]).exit_code == 0
    damage(env)
    result = CliRunner().invoke(main, ["verify", str(env.store)])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert message in result.stderr, result.stderr


def test_add_cleans_what_killed_writes_left(pristine: Path, tiny_bert: Path, tmp_path: Path) -> None:
    root = tmp_path / "case"
    shutil.copytree(pristine, root, symlinks=True)
    env = Env(root, tiny_bert)
    (env.store / "tasks" / ".x.safetensors.abcd1234.tmp").write_bytes(b"x")
    (env.store / ".manifest.json.wxyz5678.tmp").write_bytes(b"x")
    shutil.copy(env.store / "tasks" / "task0.safetensors", env.store / "tasks" / "ghost.safetensors")
    add = ["add", str(env.store), str(env.adapter("task1")), "--name", "again", "--policy", "project"]
    result = CliRunner().invoke(
        main, [*add, "--max-rel-error", "1"]
    )  # no growth: the basis file keeps its name
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (env.store / "tasks").iterdir()) == [
        f"{t}.safetensors" for t in ("again", *TASKS)
    ]
    assert sorted(p.name for p in env.store.iterdir()) == ["basis.safetensors", "manifest.json", "tasks"]
    assert CliRunner().invoke(main, ["verify", str(env.store)]).exit_code == 0


def test_overwrite_cleans_stale_leftovers_and_keeps_the_umask(
    pristine: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    root = tmp_path / "case"
    shutil.copytree(pristine, root, symlinks=True)
    env = Env(root, tiny_bert)
    for suffix in (".partial", ".old", ".tmp"):
        stale = root / f".store.abcd1234{suffix}"
        stale.mkdir()
        (stale / "junk").write_text("x")
    before = {p.name for p in (env.store / "tasks").iterdir()}
    result = CliRunner().invoke(main, ["compress", env.compress_recipe(output=str(env.store)), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    assert {p.name for p in (env.store / "tasks").iterdir()} == before
    mask = os.umask(0)
    os.umask(mask)
    assert (env.store.stat().st_mode & 0o777) == 0o777 & ~mask
    result = CliRunner().invoke(main, ["add", str(env.store), str(env.adapter("task1")), "--name", "again"])
    assert result.exit_code == 0, result.output
    assert ((env.store / MANIFEST).stat().st_mode & 0o777) == 0o666 & ~mask


def test_overwrite_without_exchange_falls_back(
    pristine: Path, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where renameat2 cannot exchange (another OS or filesystem), the two-rename swap still works."""
    from mergekit_subspace.io import files

    root = tmp_path / "case"
    shutil.copytree(pristine, root, symlinks=True)
    env = Env(root, tiny_bert)
    monkeypatch.setattr(files, "exchange_paths", lambda first, second: False)
    result = CliRunner().invoke(main, ["compress", env.compress_recipe(output=str(env.store)), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    assert CliRunner().invoke(main, ["verify", str(env.store)]).exit_code == 0

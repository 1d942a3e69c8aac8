"""Kill -9 harness: `compress --overwrite`, `add` and `merge --overwrite` killed with SIGKILL at random moments
and just before / just after each rename, exchange and tree removal they make; then `verify`.

Every trial must find at the target either the old store (output) or the new one, never none and never a mix;
what a kill leaves (a `.partial` beside the target, a temporary or unlisted task file inside the store) may be
reported by `verify`, and must be gone after the next run of the same command.

    python -m benchmarks.kill_harness [--random 16] [--seed 0] [--out benchmarks/results/kill]

Writes OUT/results.json (every trial) and OUT/README.md (the summary and the command).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EVENTS = ("os.replace", "os.rename", "exchange_paths", "shutil.rmtree")


# ---- the child: the real CLI, with hooks that SIGKILL it at the n-th event -----------------------------


def child(mode: str, target: int, count_file: str | None, args: list[str]) -> None:
    """Run the CLI; with mode before/after, SIGKILL this process just before/after event number `target`
    (1-based, in EVENTS order of occurrence). With mode count, write the number of events to count_file."""
    import shutil as shutil_module

    from mergekit_subspace.io import files

    seen = {"n": 0}

    def hooked(name: str, real: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            seen["n"] += 1
            if mode == "before" and seen["n"] == target:
                os.kill(os.getpid(), signal.SIGKILL)
            result = real(*a, **k)
            if mode == "after" and seen["n"] == target:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return call

    os.replace = hooked("os.replace", os.replace)
    os.rename = hooked("os.rename", os.rename)
    files.exchange_paths = hooked("exchange_paths", files.exchange_paths)
    shutil_module.rmtree = hooked("shutil.rmtree", shutil_module.rmtree)
    from mergekit_subspace.cli import main

    try:
        main(args, standalone_mode=False)
    finally:
        if count_file:
            Path(count_file).write_text(str(seen["n"]))


# ---- setup: a tiny real zoo, two stores and two merges -------------------------------------------------


def build_zoo(work: Path) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
    )
    base = work / "tiny-bert"
    BertForSequenceClassification(config).save_pretrained(base, safe_serialization=True)
    for i, r in enumerate((4, 2, 3, 4)):
        model = BertForSequenceClassification.from_pretrained(base)
        peft_model = get_peft_model(
            model, LoraConfig(r=r, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
        )
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, param in peft_model.named_parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        peft_model.save_pretrained(work / "zoo" / f"task{i}")
    recipes = work / "recipes"
    recipes.mkdir()
    zoo = work / "zoo"
    (recipes / "old.yaml").write_text(
        f"base_model: {base}\nadapters: [{zoo}/task0, {zoo}/task1, {zoo}/task2]\nsubspace: {{k: 4}}\n"
    )
    (recipes / "new.yaml").write_text(
        f"base_model: {base}\nadapters: [{zoo}/task0, {zoo}/task1, {zoo}/task2, {zoo}/task3]\n"
        "subspace: {k: 3, dtype: float16}\n"
    )
    source = work / "merge-source"
    for name, weights in (("merge-old", "1.0, 1.0"), ("merge-new", "0.5, 1.5")):
        tasks = "".join(f"  - {{name: task{i}, weight: {w}}}\n" for i, w in enumerate(weights.split(", ")))
        (recipes / f"{name}.yaml").write_text(
            f"merge_method: ties\nstore: {source}\ntasks:\n{tasks}parameters: {{density: 0.5}}\n"
        )
    return {"base": base, "recipes": recipes, "zoo": zoo, "source": source}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergekit_subspace", *args], capture_output=True, text=True)


def signature(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str] | None:
    """relpath -> sha256 of every file under folder (leftovers beside it are not part of it)."""
    if not folder.is_dir():
        return None
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def beside(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


# ---- one kind of command -------------------------------------------------------------------------------


class Scenario:
    """How to put the old state in place, the command that makes the new one, and how to tell them apart."""

    def __init__(self, name: str, work: Path, paths: dict[str, Path]) -> None:
        self.name, self.work, self.paths = name, work, paths
        self.target = work / "targets" / name
        self.pristine = work / "pristine" / name
        self.target.parent.mkdir(parents=True, exist_ok=True)
        recipes = paths["recipes"]
        if name == "compress":
            self.args = ["compress", str(recipes / "new.yaml"), "--out", str(self.target), "--overwrite"]
            assert cli("compress", str(recipes / "old.yaml"), "--out", str(self.pristine)).returncode == 0
        elif name == "add":
            self.args = ["add", str(self.target), str(paths["zoo"] / "task3"), "--name", "late"]
            assert cli("compress", str(recipes / "old.yaml"), "--out", str(self.pristine)).returncode == 0
        else:
            self.args = [
                "merge",
                str(recipes / "merge-new.yaml"),
                "--out",
                str(self.target),
                "--overwrite",
                "--quiet",
            ]
            done = cli("merge", str(recipes / "merge-old.yaml"), "--out", str(self.pristine), "--quiet")
            assert done.returncode == 0, done.stderr
        self.old = self.state_signature(self.pristine)
        durations = []
        for _ in range(3):  # the first run warms the page cache; the fastest run sets the random window
            self.reset()
            started = time.perf_counter()
            done = cli(*self.args)
            durations.append(time.perf_counter() - started)
            assert done.returncode == 0, done.stderr
        self.seconds = min(durations)
        self.new = self.state_signature(self.target)
        assert self.new != self.old
        counted = self.work / "count.txt"
        self.reset()
        run_child("count", 0, self.args, counted)
        self.events = int(counted.read_text())

    def state_signature(self, folder: Path) -> Any:
        if self.name == "merge":
            # the report holds timings; everything else is byte-identical run to run
            found = signature(folder, skip=("merge_report.json",))
            report = folder / "merge_report.json"
            if found is not None and report.is_file():
                kept = json.loads(report.read_text())
                found["merge_report.json"] = {k: v for k, v in kept.items() if k != "seconds"}
            return found
        if not (folder / "manifest.json").is_file():
            return None
        return hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()

    def reset(self) -> None:
        shutil.rmtree(self.target, ignore_errors=True)
        for name in beside(self.target):
            path = self.target.parent / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        shutil.copytree(self.pristine, self.target)

    def inspect(self) -> dict[str, Any]:
        """The state at the target after a kill: old / new / none / other, and what verify said."""
        found: dict[str, Any] = {"beside": beside(self.target)}
        state = self.state_signature(self.target)
        found["state"] = (
            "old"
            if state == self.old
            else "new"
            if state == self.new
            else "none"
            if state is None
            else "other"
        )
        if self.name != "merge" and self.target.is_dir():
            verify = cli("verify", str(self.target))
            lines = [line for line in verify.stderr.splitlines() if line.strip()]
            found["verify_exit"] = verify.returncode
            found["verify_leftovers"] = sum(
                "leftover of an interrupted write" in x or "orphan: a task file" in x for x in lines
            )
            found["verify_other"] = [
                x
                for x in lines
                if "leftover of an interrupted write" not in x and "orphan: a task file" not in x
            ]
        return found

    def next_run(self) -> dict[str, Any]:
        """Run the command again, unkilled: it must succeed (or, for add, find the task already added) and
        leave the new state, verified, with no leftovers anywhere."""
        done = cli(*self.args)
        ok = done.returncode == 0 or (self.name == "add" and "already in the store" in done.stderr)
        after: dict[str, Any] = {"exit": done.returncode, "ok": ok, "beside": beside(self.target)}
        after["state"] = "new" if self.state_signature(self.target) == self.new else "other"
        if self.name != "merge":
            verify = cli("verify", str(self.target))
            after["verify_exit"] = verify.returncode
            after["verify"] = verify.stderr.strip()[:500]
        return after


def run_child(mode: str, target: int, args: list[str], count_file: Path | None = None) -> int:
    command = [sys.executable, "-m", "benchmarks.kill_harness", "--child", mode, str(target)]
    command += ["--count-file", str(count_file)] if count_file else []
    return subprocess.run([*command, "--", *args], capture_output=True, text=True).returncode


def trial(
    scenario: Scenario, how: str, delay: float | None = None, mode: str = "", event: int = 0
) -> dict[str, Any]:
    scenario.reset()
    record: dict[str, Any] = {"command": scenario.name, "how": how}
    if delay is not None:
        command = [sys.executable, "-m", "mergekit_subspace", *scenario.args]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        record["exit"] = process.wait()
        record["delay_s"] = round(delay, 3)
    else:
        record["exit"] = run_child(mode, event, scenario.args)
    record["killed"] = record["exit"] == -signal.SIGKILL
    record["after_kill"] = scenario.inspect()
    record["after_next_run"] = scenario.next_run()
    kill, again = record["after_kill"], record["after_next_run"]
    record["pass"] = bool(
        kill["state"] in ("old", "new")
        and not kill.get("verify_other")
        and again["ok"]
        and again["state"] == "new"
        and not again["beside"]
        and again.get("verify_exit", 0) == 0
    )
    return record


def summarize(records: list[dict[str, Any]], scenarios: dict[str, Scenario], argv: list[str]) -> str:
    lines = [
        "# Kill -9 harness",
        "",
        "`compress --overwrite`, `add` and `merge --overwrite` on a tiny BERT zoo, killed with SIGKILL at random",
        "moments and just before / just after each rename, exchange (renameat2 RENAME_EXCHANGE) and tree removal;",
        "then `verify`, then the same command once more, unkilled.",
        "",
        f"Command: `{' '.join(['python -m benchmarks.kill_harness', *argv])}`",
        "",
        "| command | trials | killed | old after kill | new after kill | none / other | verify: only leftovers | "
        "leftovers after next run | pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in scenarios:
        rows = [r for r in records if r["command"] == name]
        kills = [r["after_kill"] for r in rows]
        lines.append(
            f"| {name} | {len(rows)} | {sum(r['killed'] for r in rows)} | {sum(k['state'] == 'old' for k in kills)} | "
            f"{sum(k['state'] == 'new' for k in kills)} | {sum(k['state'] not in ('old', 'new') for k in kills)} | "
            f"{sum(bool(k.get('verify_leftovers') or k['beside']) for k in kills)} | "
            f"{sum(bool(r['after_next_run']['beside']) for r in rows)} | {sum(r['pass'] for r in rows)}/{len(rows)} |"
        )
    total = len(records)
    forced = [r for r in records if r["how"] != "random"]
    randoms = [r for r in records if r["how"] == "random"]
    lines += [
        "",
        f"{sum(r['killed'] for r in records)} processes killed: {sum(r['killed'] for r in forced)} at a rename point, "
        f"{sum(r['killed'] for r in randoms)} of {len(randoms)} random kills (the others came after the process "
        "had finished).",
        "",
        f"{sum(r['pass'] for r in records)} of {total} trials passed: after every kill the target held the old or",
        "the new state (never none, never a mix, and `verify` found nothing but leftovers of the killed write),",
        "and the next run left the new state with no `.partial`, `.old` or `.tmp` beside it and nothing unlisted",
        "inside it.",
        "",
        "Rename points per command (events the harness can stop at): "
        + ", ".join(f"{n} {s.events}" for n, s in scenarios.items())
        + "; unkilled durations: "
        + ", ".join(f"{n} {s.seconds:.1f} s" for n, s in scenarios.items())
        + " (the fastest of three runs). Random kills fall uniformly in [0.2, 1.0] x that duration, every other one"
        " in [0.7, 1.0] (the writes come last; the first second or so is Python starting). A random kill after the"
        " process finished counts as a trial but not as killed.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "N"))
    parser.add_argument("--count-file")
    parser.add_argument("--random", type=int, default=16, help="random-moment kills per command")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/kill")
    parser.add_argument("--work", help="work folder (default: a new temporary one, removed afterwards)")
    parser.add_argument("rest", nargs="*")
    options = parser.parse_args()
    if options.child:
        child(options.child[0], int(options.child[1]), options.count_file, options.rest)
        return
    argv = sys.argv[1:]
    work = Path(options.work or tempfile.mkdtemp(prefix="kill-harness-"))
    rng = random.Random(options.seed)
    paths = build_zoo(work)
    assert cli("compress", str(paths["recipes"] / "old.yaml"), "--out", str(paths["source"])).returncode == 0
    scenarios = {name: Scenario(name, work, paths) for name in ("compress", "add", "merge")}
    records: list[dict[str, Any]] = []
    for name, scenario in scenarios.items():
        for event in range(1, scenario.events + 1):
            for mode in ("before", "after"):
                records.append(trial(scenario, f"{mode} event {event}", mode=mode, event=event))
                print(name, records[-1]["how"], "pass" if records[-1]["pass"] else "FAIL", flush=True)
        for i in range(options.random):
            late = i % 2 == 1
            delay = scenario.seconds * (rng.uniform(0.7, 1.0) if late else rng.uniform(0.2, 1.0))
            records.append(trial(scenario, "random", delay=delay))
            print(name, f"random {delay:.2f}s", "pass" if records[-1]["pass"] else "FAIL", flush=True)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "trials": len(records),
        "passed": sum(r["pass"] for r in records),
        "events": {n: s.events for n, s in scenarios.items()},
        "seconds": {n: round(s.seconds, 2) for n, s in scenarios.items()},
        "command": " ".join(["python -m benchmarks.kill_harness", *argv]),
    }
    (out / "results.json").write_text(json.dumps({"summary": summary, "trials": records}, indent=2) + "\n")
    (out / "README.md").write_text(summarize(records, scenarios, argv))
    print(json.dumps(summary))
    if not options.work:
        shutil.rmtree(work, ignore_errors=True)
    if summary["passed"] != summary["trials"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

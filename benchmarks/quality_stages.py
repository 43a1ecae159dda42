"""Quality benchmark machinery: logging, JSON lines, the machine's description and resumable stages.

Used by benchmarks/quality.py (run that); kept apart so that script and quality_runs.py read as the benchmark's stages.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable


def say(message: str) -> None:
    print(f"quality: {message}", file=sys.stderr, flush=True)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The objects of a .jsonl file (opdistill's reader: a bad line is an error naming the file and line)."""
    from opdistill.fileio import read_jsonl

    return [row for _, row in read_jsonl(path)]


def write_json_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------- the machine: what the numbers were measured on


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(precision: str) -> dict[str, Any]:
    """The machine and the precision `auto` resolved to: speed here depends on native bf16 above all (docs/quality.md,
    "Machines"), so every result says which kind of CPU it came from."""
    import torch

    from opdistill.models import bf16_is_fast, resolve_precision

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "native_bf16": bf16_is_fast(), "precision": resolve_precision(precision)}


def fast_machine(host: dict[str, Any]) -> bool:
    """A GPU, or a CPU running bf16 natively: the machines the full size is sized for."""
    return bool(host["gpu"]) or (host["native_bf16"] and host["precision"] == "bf16")


# ---------------------------------------------------------------- stages: skip what is done, time every attempt


class Stages:
    """Runs named stages in --out. A stage's done.json holds the settings it ran with (`key`) and when it finished;
    it counts as done when the key matches and every stage it depends on finished before it (make's rule, so a
    redone stage makes the ones after it run again)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.seconds: dict[str, float] = {}  # this invocation's attempts

    def marker(self, name: str) -> Path:
        return self.out / name / "done.json"

    def finished(self, name: str) -> float | None:
        path = self.marker(name)
        return json.loads(path.read_text()).get("finished") if path.is_file() else None

    def is_done(self, name: str, key: Any, deps: list[str]) -> bool:
        path = self.marker(name)
        if not path.is_file():
            return False
        marker = json.loads(path.read_text())
        if marker.get("key") != key or marker.get("finished") is None:
            return False
        return all((self.finished(d) or float("inf")) <= marker["finished"] for d in deps)

    def run(self, name: str, key: Any, deps: list[str], work: Callable[[Path], dict[str, Any]], *, wipe_on_change: bool = True) -> None:
        key = json.loads(json.dumps(key))  # as done.json will hold it (a tuple comes back a list): compared like for like
        directory = self.out / name
        if self.is_done(name, key, deps):
            say(f"stage {name}: already complete, skipped")
            return
        marker = self.marker(name)
        previous = json.loads(marker.read_text()) if marker.is_file() else None
        inputs = {d: self.finished(d) for d in deps}  # which run of each input this attempt reads
        if wipe_on_change and previous and (previous.get("key") != key or "finished" in previous or previous.get("inputs") != inputs):
            # Its outputs (a teacher store, a training run) came from other settings or from inputs that have been
            # redone since: resuming them would mix the two. An interrupted attempt with the same settings and the
            # same inputs resumes.
            say(f"stage {name}: its settings or inputs changed since its last run, starting it over")
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"key": key, "inputs": inputs}, indent=2))
        say(f"stage {name}: running")
        started = time.monotonic()
        completed = False
        try:
            info = work(directory)
            completed = True
        finally:
            seconds = round(time.monotonic() - started, 1)
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            with open(self.out / "timings.jsonl", "a", encoding="utf-8") as log:
                log.write(json.dumps({"stage": name, "seconds": seconds, "completed": completed, "time": time.time()}) + "\n")
            gc.collect()  # the stage's models go before the next stage loads its own
        marker.write_text(json.dumps({"key": key, "inputs": inputs, "info": info, "seconds": seconds, "finished": time.time()}, indent=2))
        say(f"stage {name}: done in {seconds:.0f} s")

    def key(self, name: str) -> Any:
        """The settings the stage last ran (or is running) with; None when it never ran."""
        path = self.marker(name)
        return json.loads(path.read_text()).get("key") if path.is_file() else None

    def info(self, name: str) -> dict[str, Any]:
        path = self.marker(name)
        return json.loads(path.read_text()).get("info", {}) if path.is_file() else {}

    def total_seconds(self) -> dict[str, float]:
        """Wall seconds per stage over every attempt in --out (interrupted ones included)."""
        totals: dict[str, float] = {}
        log = self.out / "timings.jsonl"
        for row in read_json_lines(log) if log.is_file() else []:
            totals[row["stage"]] = round(totals.get(row["stage"], 0.0) + row["seconds"], 1)
        return totals

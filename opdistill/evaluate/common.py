"""What the stages of `opdistill eval` share: their log line, a local model's fingerprint (so stale results are never
reused) and the generated answers of one model on one set."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .prompts import EvalSet


def say(message: str) -> None:
    print(f"eval: {message}", file=sys.stderr, flush=True)


def model_fingerprint(path: str) -> list[Any]:
    """Name, size and modification time of a local model's weight files: retraining into the same directory
    changes the key, so stale generations are never reused. Built-in and hub names are their own fingerprint."""
    directory = Path(path)
    if not directory.is_dir():
        return [path]
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in directory.glob("*.safetensors"))


def responses(generated: dict[str, dict[str, Any]], label: str, eval_set: EvalSet) -> list[dict[str, Any]]:
    return [generated[label][f"{eval_set.name}/{i}"] for i in range(len(eval_set.records))]

"""Read-only, lazy access to safetensors checkpoints, and which tensor pairs of two checkpoints to compare.

Only headers are read up front; a tensor is loaded when asked for, so the analysis holds about two tensors
at a time whatever the model's size.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from .names import tensor_sort_key


class Checkpoint:
    """Lazy, read-only access to the tensors of a safetensors checkpoint: a directory (one file or shards)
    or a single .safetensors file. Only headers are read until a tensor is asked for."""

    def __init__(self, name_or_path: str) -> None:
        self.label = name_or_path
        self.files = _safetensors_files(name_or_path)
        self._stack = contextlib.ExitStack()
        self._where: dict[str, Any] = {}
        from safetensors import safe_open

        try:
            for path in self.files:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                for key in handle.keys():
                    self._where[key] = handle
        except Exception as err:  # safetensors raises its own error types for a corrupt header
            self._stack.close()
            raise ModelError(f"cannot read {path}: {err}", "pass a checkpoint with valid .safetensors weights") from None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return str(self._where[name].get_slice(name).get_dtype())

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


def _safetensors_files(name_or_path: str) -> list[Path]:
    """The weight files of a checkpoint: built-in names and .gguf files are converted first (models.py)."""
    from ..models import resolve_model

    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".safetensors":
        return [path]
    resolved = Path(resolve_model(name_or_path))
    if not resolved.exists():
        resolved = _cached_hub_snapshot(name_or_path)
    files = sorted(resolved.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in resolved.glob("*.bin")) + sorted(p.name for p in resolved.glob("*.pt"))
        fix = "analysis reads safetensors only (no pickle); convert it with save_pretrained(safe_serialization=True)"
        raise ModelError(f"{resolved} has no .safetensors weights" + (f" (found {', '.join(others[:3])})" if others else ""), fix)
    return files


def _cached_hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise ModelError(
            f"{repo_id!r} is neither a local checkpoint, a built-in model nor a hub id in the local cache",
            "pass a checkpoint directory (e.g. runs/demo/student), a .safetensors file, or smollm2-135m-instruct",
        ) from None


def is_float_dtype(dtype: str) -> bool:
    return dtype.upper() in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def pair_plan(base: Checkpoint, tuned: Checkpoint) -> tuple[list[str], dict[str, str]]:
    """Tensors to analyse (both have them, floating point, same shape) and the skipped ones with why.
    A shape mismatch is an error: the two checkpoints are not the same architecture."""
    base_names, tuned_names = set(base.names()), set(tuned.names())
    skipped: dict[str, str] = {}
    for name in sorted(base_names - tuned_names):
        skipped[name] = "only in BASE" + (" (tied to the input embeddings in TUNED)" if "lm_head" in name else "")
    for name in sorted(tuned_names - base_names):
        skipped[name] = "only in TUNED" + (" (tied to the input embeddings in BASE)" if "lm_head" in name else "")
    common: list[str] = []
    mismatched: list[str] = []
    for name in sorted(base_names & tuned_names, key=tensor_sort_key):
        if base.shape(name) != tuned.shape(name):
            mismatched.append(f"{name}: {list(base.shape(name))} vs {list(tuned.shape(name))}")
        elif not (is_float_dtype(base.dtype(name)) and is_float_dtype(tuned.dtype(name))):
            skipped[name] = f"not floating point ({base.dtype(name)}/{tuned.dtype(name)})"
        else:
            common.append(name)
    if mismatched:
        raise ModelError(
            f"{base.label} and {tuned.label} differ in {len(mismatched)} tensor shape(s), e.g. {mismatched[0]}",
            "analyse two checkpoints of the same architecture: a base model and a student trained from it",
        )
    if not common:
        raise ModelError(f"{base.label} and {tuned.label} share no tensor names",
                         "analyse two checkpoints of the same architecture: a base model and a student trained from it")
    return common, skipped

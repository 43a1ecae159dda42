"""Cross-run comparison: do two runs from the same BASE change the same coordinates? (`analyze --compare`)"""

from __future__ import annotations

import sys
from typing import Any

import torch
from tqdm import tqdm

from ..errors import ModelError
from . import metrics as M
from .checkpoint import Checkpoint, is_float_dtype
from .names import MODULE_TYPES, module_type, tensor_sort_key
from .options import AnalysisOptions


class _ChangedSource:
    """Changed masks of one run against BASE: from a checkpoint (computed) or a saved mask file (read)."""

    def __init__(self, path: str, options: AnalysisOptions) -> None:
        self.label = path
        self.options = options
        self.checkpoint = Checkpoint(path)
        dtypes = {self.checkpoint.dtype(n).upper() for n in self.checkpoint.names()}
        self.is_mask = dtypes == {"BOOL"}

    def changed(self, name: str, base: torch.Tensor) -> torch.Tensor:
        if self.is_mask:
            return self.checkpoint.get(name)
        tuned = self.checkpoint.get(name).to(torch.float64)
        if self.options.changed == "bf16":
            return ~M.unchanged_bf16(base, tuned, self.options.eta)
        return ~M.unchanged_abs(tuned - base, self.options.abs_threshold)


def compare_runs(base: str, run_a: str, run_b: str, options: AnalysisOptions | None = None) -> dict[str, Any]:
    """Jaccard of the changed masks of two runs (checkpoints trained from BASE, or masks saved with
    --save-mask) against the random baseline pq/(p + q − pq), globally, per module type and per tensor."""
    options = options or AnalysisOptions()
    options.validate()
    with Checkpoint(base) as base_ckpt:
        a, b = _ChangedSource(run_a, options), _ChangedSource(run_b, options)
        try:
            names = [n for n in base_ckpt.names() if n in set(a.checkpoint.names()) & set(b.checkpoint.names())
                     and is_float_dtype(base_ckpt.dtype(n))]
            names.sort(key=tensor_sort_key)
            if not names:
                raise ModelError(f"{run_a} and {run_b} share no tensors with {base}", "compare two runs trained from BASE")
            per_tensor: dict[str, dict[str, Any]] = {}
            sums: dict[str, list[int]] = {}
            for name in tqdm(names, desc="compare", unit="tensor", disable=not options.progress, file=sys.stderr, dynamic_ncols=True):
                weights = base_ckpt.get(name).to(torch.float64)
                mask_a, mask_b = a.changed(name, weights), b.changed(name, weights)
                if mask_a.shape != weights.shape or mask_b.shape != weights.shape:
                    raise ModelError(f"tensor {name}: shapes {list(mask_a.shape)}, {list(mask_b.shape)} do not match BASE {list(weights.shape)}",
                                     "compare runs (or masks) of BASE's architecture")
                counts = [int((mask_a & mask_b).sum()), int(mask_a.sum()), int(mask_b.sum()), mask_a.numel()]
                per_tensor[name] = _jaccard_report(*counts)
                for key in ("global", module_type(name)):
                    total = sums.setdefault(key, [0, 0, 0, 0])
                    for i, value in enumerate(counts):
                        total[i] += value
        finally:
            a.checkpoint.close()
            b.checkpoint.close()
    return {
        "run_a": run_a, "run_b": run_b, "definition": options.changed,
        **_jaccard_report(*sums["global"]),
        "by_module": {kind: _jaccard_report(*sums[kind]) for kind in MODULE_TYPES if kind in sums},
        "tensors": per_tensor,
    }


def _jaccard_report(both: int, n_a: int, n_b: int, numel: int) -> dict[str, Any]:
    p, q = n_a / numel, n_b / numel
    observed, baseline = M.jaccard(both, n_a, n_b), M.random_jaccard(p, q)
    return {"jaccard": observed, "random_baseline": baseline, "density_a": p, "density_b": q,
            "ratio_to_random": observed / baseline if observed is not None and baseline else None}

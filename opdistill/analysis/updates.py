"""What fine-tuning did to the weights: the Python API behind `opdistill analyze` (after
"Dense Supervision, Sparse Updates" (arXiv 2606.13657) and "The Path Not Taken" (arXiv 2511.08567)).

Two Hugging Face safetensors checkpoints are read tensor by tensor (`checkpoint.py`), so only about two
tensors (plus their float64 difference) are in memory at a time and a model larger than memory can be
analysed. Each tensor pair goes through `analyze_tensor` (`tensor.py`; the pure metrics are in
`metrics.py`); sums that add across tensors (`aggregate.py`: sums of squares, counts, an energy histogram)
give the global, per-module and per-layer numbers without keeping anything else. `compare.py` compares two
runs, `outputs.py` writes the files.

    from opdistill.analysis import AnalysisOptions, analyze_checkpoints, write_outputs
    analysis = analyze_checkpoints("smollm2-135m-instruct", "runs/demo/student", AnalysisOptions())
    print(analysis.summary["global"]["sparsity_bf16"])
    write_outputs(analysis, "runs/demo/analysis")      # summary.json, spectra.safetensors, report.html
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from tqdm import tqdm

from ..errors import ModelError, OpdistillError
from .aggregate import EnergyHistogram, MaskCounts, Totals, means_over_matrices
from .checkpoint import Checkpoint, pair_plan
from ..masks import MaskWriter
from .names import MODULE_TYPES, percent_key, tensor_sort_key, threshold_key
from .options import AnalysisOptions
from .tensor import CONCENTRATION_PERCENTS, analyze_tensor


@dataclass
class Analysis:
    """summary: everything JSON-able (summary.json); spectra: σ(ΔW) per 2-D tensor (spectra.safetensors)."""

    summary: dict[str, Any]
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """What `opdistill analyze` prints: the headline numbers, skipped tensors, the saved mask, the comparison."""
        summary = self.summary
        g = summary["global"]
        threshold = summary["options"]["abs_threshold"]
        lines = [f"{g['tensors_analysed']} tensors, {g['numel']:,} coordinates in {summary['seconds']:.0f} s",
                 f"relative update {g['relative_update']:.4g}; sparsity bf16-aware {g['sparsity_bf16']:.4f}, "
                 f"|delta| < {threshold:g} {g[f'sparsity_abs_{threshold_key(threshold)}']:.4f}"]
        if g.get("principal_enrichment") is not None:
            lines.append(f"enrichment of changed coordinates: principal mask {g['principal_enrichment']:.3f}, "
                         f"low-magnitude mask {g['lowmag_enrichment']:.3f}")
        if summary.get("skipped"):
            lines.append(f"skipped (not in both or not float): {', '.join(summary['skipped'])}")
        mask = summary.get("mask")
        if mask:
            lines.append(f"changed mask ({mask['definition']}, density {mask['density']:.4f}): {mask['path']}")
        compare = summary.get("compare")
        if compare:
            lines.append(f"compare: Jaccard {compare['jaccard']} vs random baseline {compare['random_baseline']}")
        return lines


MaskSink = Callable[[str, torch.Tensor], None]


def analyze_pairs(pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]], options: AnalysisOptions,
                  total: int | None = None, on_changed: MaskSink | None = None) -> Analysis:
    """Aggregate `analyze_tensor` over (name, base, tuned) pairs, holding one pair at a time.
    `on_changed(name, mask)` receives each changed mask (e.g. a streaming mask writer)."""
    options.validate()
    abs_key = threshold_key(options.abs_threshold)
    started = time.perf_counter()
    overall = Totals()
    by_module: dict[str, Totals] = {}
    by_layer: dict[int, Totals] = {}
    principal, low_magnitude = MaskCounts(), MaskCounts()
    principal_by_module: dict[str, MaskCounts] = {}
    low_by_module: dict[str, MaskCounts] = {}
    histogram = EnergyHistogram()
    tensors: dict[str, dict[str, Any]] = {}
    spectra: dict[str, torch.Tensor] = {}
    svd_paths = {"exact": 0, "randomized": 0}
    bar = tqdm(pairs, total=total, desc="analyze", unit="tensor", disable=not options.progress, file=sys.stderr, dynamic_ncols=True)
    for index, (name, base, tuned) in enumerate(bar):
        result = analyze_tensor(name, base, tuned, options, seed=options.seed + 1000 * index)
        tensors[name] = result.metrics
        overall.add(result.totals)
        by_module.setdefault(result.metrics["module"], Totals()).add(result.totals)
        if result.metrics["layer"] is not None:
            by_layer.setdefault(result.metrics["layer"], Totals()).add(result.totals)
        histogram.add(result.delta_sq)
        if result.principal is not None:
            principal.add(result.principal)
            principal_by_module.setdefault(result.metrics["module"], MaskCounts()).add(result.principal)
        if result.low_magnitude is not None:
            low_magnitude.add(result.low_magnitude)
            low_by_module.setdefault(result.metrics["module"], MaskCounts()).add(result.low_magnitude)
        if result.sigma_delta is not None:
            spectra[name] = result.sigma_delta
            svd_paths["exact" if result.metrics["svd"] == "exact" else "randomized"] += 1
        if on_changed is not None:
            on_changed(name, result.changed.cpu())
        del result
    bar.close()
    if not tensors:
        raise OpdistillError("no tensors to analyse", "pass two checkpoints of the same architecture")

    global_: dict[str, Any] = overall.report(abs_key)
    global_["tensors_analysed"] = len(tensors)
    global_["changed_definition"] = options.changed
    global_["changed_density"] = 1 - (global_["sparsity_bf16"] if options.changed == "bf16" else global_[f"sparsity_abs_{abs_key}"])
    for percent in CONCENTRATION_PERCENTS:
        global_[f"energy_top_{percent_key(percent)}"] = histogram.top_share(percent / 100)
    global_["principal_overlap"], global_["principal_enrichment"] = principal.overlap(), principal.enrichment()
    global_["lowmag_overlap"], global_["lowmag_enrichment"] = low_magnitude.overlap(), low_magnitude.enrichment()
    global_["svd"] = svd_paths
    global_["matrices_mean"] = means_over_matrices(tensors)

    modules = {
        kind: {**by_module[kind].report(abs_key, overall.delta_sq),
               "principal_enrichment": principal_by_module[kind].enrichment() if kind in principal_by_module else None,
               "lowmag_enrichment": low_by_module[kind].enrichment() if kind in low_by_module else None}
        for kind in MODULE_TYPES if kind in by_module
    }
    layers = {str(layer): by_layer[layer].report(abs_key, overall.delta_sq) for layer in sorted(by_layer)}
    summary = {
        "global": global_,
        "by_module": modules,
        "by_layer": layers,
        "tensors": tensors,
        "options": asdict(options),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return Analysis(summary, spectra)


def analyze_tensors(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], options: AnalysisOptions | None = None) -> Analysis:
    """The in-memory form: two state dicts (same names and shapes) instead of two checkpoints."""
    options = options or AnalysisOptions()
    names = sorted(set(base) & set(tuned), key=tensor_sort_key)
    for name in names:
        if base[name].shape != tuned[name].shape:
            raise ModelError(f"tensor {name}: shape {list(base[name].shape)} vs {list(tuned[name].shape)}",
                             "compare two state dicts of the same architecture")
    analysis = analyze_pairs(((n, base[n], tuned[n]) for n in names), options, total=len(names))
    analysis.summary["skipped"] = {n: "only in one state dict" for n in sorted(set(base) ^ set(tuned))}
    return analysis


def analyze_checkpoints(base: str, tuned: str, options: AnalysisOptions | None = None, save_mask: str | Path | None = None) -> Analysis:
    """Stream two checkpoints tensor by tensor; optionally write the changed mask (bool safetensors)."""
    options = options or AnalysisOptions()
    options.validate()
    with Checkpoint(base) as base_ckpt, Checkpoint(tuned) as tuned_ckpt:
        names, skipped = pair_plan(base_ckpt, tuned_ckpt)

        def pairs() -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
            for name in names:
                yield name, base_ckpt.get(name), tuned_ckpt.get(name)

        writer = None
        if save_mask is not None:
            metadata = {"format": "opdistill-changed-mask", "base": base, "tuned": tuned, "definition": options.changed,
                        "eta": repr(options.eta), "abs_threshold": repr(options.abs_threshold)}
            writer = MaskWriter(save_mask, [(n, base_ckpt.shape(n)) for n in names], metadata)
        try:
            analysis = analyze_pairs(pairs(), options, total=len(names), on_changed=writer.write if writer else None)
            if writer is not None:
                writer.close()
        finally:
            if writer is not None:
                writer.abort()
    analysis.summary["base"] = base
    analysis.summary["tuned"] = tuned
    analysis.summary["skipped"] = skipped
    if save_mask is not None:
        analysis.summary["mask"] = {"path": str(save_mask), "density": analysis.summary["global"]["changed_density"],
                                    "definition": options.changed}
    return analysis

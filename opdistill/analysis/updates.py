"""What fine-tuning did to the weights: the Python API behind `opdistill analyze` (SPEC §4).

Two Hugging Face safetensors checkpoints are read tensor by tensor with `safetensors.safe_open`, so only
about two tensors (plus their float64 difference) are in memory at a time and a model larger than memory
can be analysed. Each tensor pair goes through `analyze_tensor` (the pure metrics are in `metrics.py`);
sums that add across tensors (sums of squares, counts, an energy histogram) give the global, per-module
and per-layer numbers without keeping anything else.

    from opdistill.analysis import AnalysisOptions, analyze_checkpoints, write_outputs
    analysis = analyze_checkpoints("smollm2-135m-instruct", "runs/demo/student", AnalysisOptions())
    print(analysis.summary["global"]["sparsity_bf16"])
    write_outputs(analysis, "runs/demo/analysis")      # summary.json, spectra.safetensors, report.html
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from tqdm import tqdm

from ..errors import ModelError, OpdistillError
from . import metrics as M
from .options import AnalysisOptions

MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "embeddings", "norms", "other")
_MODULE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("embeddings", r"embed|wte|wpe|lm_head"),
        ("norms", r"norm|\bln_"),
        ("q", r"q_proj|\bquery\b"),
        ("k", r"k_proj|\bkey\b"),
        ("v", r"v_proj|\bvalue\b"),
        ("o", r"o_proj|out_proj|attn\.c_proj|attention\.dense\b"),
        ("gate", r"gate_proj|\bw1\b"),
        ("up", r"up_proj|\bw3\b|c_fc"),
        ("down", r"down_proj|\bw2\b|mlp\.c_proj"),
    )
)
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
TOPK_ENERGY_KS = (1, 2, 4, 8, 16, 32, 64)
PRINCIPAL_PERCENTS = (1, 5, 10, 20)
CONCENTRATION_PERCENTS = (0.1, 1.0, 5.0)


def threshold_key(value: float) -> str:
    """1e-5 -> '1e-5' (the summary key `sparsity_abs_1e-5`), 2.5e-06 -> '2.5e-6'."""
    mantissa, exponent = f"{value:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def module_type(name: str) -> str:
    """q, k, v, o, gate, up, down, embeddings, norms or other, from the tensor's name."""
    for kind, pattern in _MODULE_PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


def layer_index(name: str) -> int | None:
    """The transformer block number in the name (model.layers.12.mlp... -> 12), None outside blocks."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def _sort_key(name: str) -> tuple[int, int, str]:
    layer = layer_index(name)
    if layer is None:
        return (0 if module_type(name) == "embeddings" else 2, 0, name)
    return (1, layer, name)


# ---------------------------------------------------------------- checkpoints


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


def _is_float_dtype(dtype: str) -> bool:
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
    for name in sorted(base_names & tuned_names, key=_sort_key):
        if base.shape(name) != tuned.shape(name):
            mismatched.append(f"{name}: {list(base.shape(name))} vs {list(tuned.shape(name))}")
        elif not (_is_float_dtype(base.dtype(name)) and _is_float_dtype(tuned.dtype(name))):
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


# ---------------------------------------------------------------- aggregation


@dataclass
class Totals:
    """Sums that add across tensors; every global/module/layer number is a ratio of them."""

    numel: int = 0
    unchanged_bf16: int = 0
    unchanged_abs: int = 0
    delta_sq: float = 0.0
    base_sq: float = 0.0

    def add(self, other: "Totals") -> None:
        self.numel += other.numel
        self.unchanged_bf16 += other.unchanged_bf16
        self.unchanged_abs += other.unchanged_abs
        self.delta_sq += other.delta_sq
        self.base_sq += other.base_sq

    def report(self, abs_key: str, all_delta_sq: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "numel": self.numel,
            "relative_update": M.relative_update(self.delta_sq, self.base_sq),
            "sparsity_bf16": self.unchanged_bf16 / self.numel if self.numel else None,
            f"sparsity_abs_{abs_key}": self.unchanged_abs / self.numel if self.numel else None,
        }
        if all_delta_sq is not None:
            out["update_energy_share"] = self.delta_sq / all_delta_sq if all_delta_sq > 0 else None
        return out


@dataclass
class MaskCounts:
    """|mask ∩ changed|, |changed|, |mask| and N, summed over 2-D tensors, for aggregated enrichment."""

    hits: int = 0
    changed: int = 0
    size: int = 0
    numel: int = 0

    def add(self, hits: int, changed: int, size: int, numel: int) -> None:
        self.hits += hits
        self.changed += changed
        self.size += size
        self.numel += numel

    def overlap(self) -> float | None:
        return self.hits / self.changed if self.changed else None

    def enrichment(self) -> float | None:
        overlap = self.overlap()
        return overlap / (self.size / self.numel) if overlap is not None and self.size else None


class EnergyHistogram:
    """Global coordinate concentration without holding all coordinates: Δ² values are binned by log2 in
    1/32-octave bins (count and energy per bin). The top-p share walks the bins from the top; only the
    one bin split by the cut is interpolated (values in a bin differ by < 2.2%), so the answer is within
    a fraction of a percent of the exact one (tested against a sort)."""

    PER_OCTAVE = 32
    LOW, HIGH = -1100, 1100  # log2 range of float64 squares (subnormals included)

    def __init__(self) -> None:
        bins = (self.HIGH - self.LOW) * self.PER_OCTAVE
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.energy = torch.zeros(bins, dtype=torch.float64)
        self.numel = 0

    def add(self, delta_sq: torch.Tensor) -> None:
        values = delta_sq.reshape(-1)
        self.numel += values.numel()
        positive = values[values > 0]
        if positive.numel() == 0:
            return
        index = ((positive.log2() - self.LOW) * self.PER_OCTAVE).floor().long().clamp_(0, self.counts.numel() - 1)
        self.counts += torch.bincount(index, minlength=self.counts.numel()).to("cpu", torch.float64)
        self.energy += torch.bincount(index, weights=positive, minlength=self.counts.numel()).to("cpu", torch.float64)

    def top_share(self, fraction: float) -> float | None:
        total = float(self.energy.sum())
        if total <= 0:
            return None
        k = min(self.numel, max(1, math.ceil(fraction * self.numel)))
        counts, energy = self.counts.flip(0), self.energy.flip(0)
        cumulative = counts.cumsum(0)
        split = int(torch.searchsorted(cumulative, torch.tensor([float(k)], dtype=torch.float64)))
        if split >= counts.numel():  # fewer nonzero coordinates than k: the top k hold everything
            return 1.0
        before = float(cumulative[split - 1]) if split else 0.0
        partial = (k - before) * float(energy[split]) / float(counts[split])
        return (float(energy[:split].sum()) + partial) / total


# ---------------------------------------------------------------- one tensor


@dataclass
class TensorResult:
    """The metrics of one tensor pair, plus what the caller aggregates or saves and then drops."""

    metrics: dict[str, Any]
    totals: Totals
    changed: torch.Tensor  # bool, by options.changed
    delta_sq: torch.Tensor
    sigma_delta: torch.Tensor | None = None
    principal: tuple[int, int, int, int] | None = None  # hits, changed, mask size, numel
    low_magnitude: tuple[int, int, int, int] | None = None


def percent_key(percent: float) -> str:
    """0.1 -> '0.1pct', 1.0 -> '1pct'."""
    return f"{percent:g}pct"


def analyze_tensor(name: str, base: torch.Tensor, tuned: torch.Tensor, options: AnalysisOptions, seed: int = 0) -> TensorResult:
    """Every SPEC §4 metric of one tensor pair (float64 on options' device)."""
    device = options.torch_device()
    w = base.to(device=device, dtype=torch.float64)
    w_hat = tuned.to(device=device, dtype=torch.float64)
    delta = w_hat - w
    delta_sq = delta * delta
    unchanged_bf16 = M.unchanged_bf16(w, w_hat, options.eta)
    unchanged_abs = M.unchanged_abs(delta, options.abs_threshold)
    totals = Totals(
        numel=delta.numel(), unchanged_bf16=int(unchanged_bf16.sum()), unchanged_abs=int(unchanged_abs.sum()),
        delta_sq=float(delta_sq.sum()), base_sq=float((w * w).sum()),
    )
    abs_key = threshold_key(options.abs_threshold)
    changed = ~(unchanged_bf16 if options.changed == "bf16" else unchanged_abs)
    out: dict[str, Any] = {
        "shape": list(base.shape), "module": module_type(name), "layer": layer_index(name),
        **totals.report(abs_key), "changed_density": int(changed.sum()) / max(1, changed.numel()),
    }
    for percent in CONCENTRATION_PERCENTS:
        out[f"energy_top_{percent_key(percent)}"] = M.top_fraction_energy(delta_sq, percent / 100)
    result = TensorResult(out, totals, changed, delta_sq)
    if delta.ndim == 2 and min(delta.shape) > 1:
        _matrix_metrics(w, w_hat, delta, changed, totals.delta_sq, options, seed, result)
    return result


def _matrix_metrics(w: torch.Tensor, w_hat: torch.Tensor, delta: torch.Tensor, changed: torch.Tensor, frob_sq: float,
                    options: AnalysisOptions, seed: int, result: TensorResult) -> None:
    """Masks (always) and the spectrum/principal metrics (when options.spectral) of a 2-D tensor."""
    out = result.metrics
    m, n = w.shape
    small = min(m, n)
    alpha = options.mask_alpha
    k_mask = max(1, round(options.principal_rank_frac * small))
    k_principal = {r: max(1, round(r / 100 * small)) for r in PRINCIPAL_PERCENTS}
    exact = small <= options.exact_svd_max_dim

    low = M.fraction_mask(w.abs(), alpha, largest=False)
    result.low_magnitude = (int((low & changed).sum()), int(changed.sum()), int(low.sum()), low.numel())
    out["lowmag_overlap"], out["lowmag_enrichment"] = M.overlap_enrichment(low, changed)
    del low

    k_vectors = max(max(k_principal.values()), k_mask)
    if exact:
        base_spec = M.exact_spectrum(w, k_vectors)
    else:
        k_vectors = min(k_vectors, options.svd_rank)
        base_spec = M.randomized_spectrum(w, options.svd_rank, k_vectors, options.svd_niter, seed)
    u = base_spec.u
    assert u is not None and base_spec.v is not None
    k_rec = min(k_mask, u.shape[1])
    reconstruction = u[:, :k_rec] @ (u[:, :k_rec].T @ w)  # = U_k Σ_k V_kᵀ
    principal = M.fraction_mask(reconstruction.abs(), alpha, largest=True)
    del reconstruction
    result.principal = (int((principal & changed).sum()), int(changed.sum()), int(principal.sum()), principal.numel())
    out["principal_overlap"], out["principal_enrichment"] = M.overlap_enrichment(principal, changed)
    out["principal_mask_rank"] = k_rec
    del principal
    if not options.spectral:
        return

    out["svd"] = "exact" if exact else f"randomized-top{options.svd_rank}"
    delta_spec = M.exact_spectrum(delta) if exact else M.randomized_spectrum(delta, options.svd_rank, 0, options.svd_niter, seed + 1)
    sigma = delta_spec.sigma
    result.sigma_delta = sigma.to("cpu", torch.float32)
    rank = M.numerical_rank(sigma)
    out["numerical_rank"] = rank
    out["numerical_rank_pct"] = 100.0 * rank / small
    out["numerical_rank_is_lower_bound"] = (not exact) and rank == sigma.numel()
    out["stable_rank"] = M.stable_rank(sigma, frob_sq)
    out["effective_rank"] = M.effective_rank(sigma) if exact else None
    for k in TOPK_ENERGY_KS:
        out[f"topk_energy_k{k}"] = M.topk_energy(sigma, k, frob_sq) if k <= min(small, sigma.numel()) else None

    tuned_spec = (M.exact_spectrum(w_hat, k_vectors) if exact
                  else M.randomized_spectrum(w_hat, options.svd_rank, k_vectors, options.svd_niter, seed + 2))
    assert tuned_spec.u is not None and tuned_spec.v is not None
    for r, k in k_principal.items():
        if k > base_spec.u.shape[1]:
            for key in ("proj_energy", "angle_u_mean_sin", "angle_u_max_deg", "angle_v_mean_sin", "angle_v_max_deg"):
                out[f"{key}_r{r}"] = None
            continue
        out[f"proj_energy_r{r}"] = M.projection_energy(base_spec.u[:, :k], base_spec.v[:, :k], delta, frob_sq)
        for side, a, b in (("u", base_spec.u, tuned_spec.u), ("v", base_spec.v, tuned_spec.v)):
            sines = M.principal_sines(a[:, :k], b[:, :k])
            out[f"angle_{side}_mean_sin_r{r}"] = float(sines.mean())
            out[f"angle_{side}_max_deg_r{r}"] = math.degrees(math.asin(float(sines.max())))
    out["spectrum_drift"] = M.spectrum_drift(base_spec.sigma, tuned_spec.sigma)


# ---------------------------------------------------------------- many tensors


@dataclass
class Analysis:
    """summary: everything JSON-able (summary.json); spectra: σ(ΔW) per 2-D tensor (spectra.safetensors)."""

    summary: dict[str, Any]
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)


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
            principal.add(*result.principal)
            principal_by_module.setdefault(result.metrics["module"], MaskCounts()).add(*result.principal)
        if result.low_magnitude is not None:
            low_magnitude.add(*result.low_magnitude)
            low_by_module.setdefault(result.metrics["module"], MaskCounts()).add(*result.low_magnitude)
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
    global_["matrices_mean"] = _means_over_matrices(tensors)

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


_MEAN_SKIP = {"shape", "module", "layer", "svd", "numel", "numerical_rank_is_lower_bound", "principal_mask_rank"}


def _means_over_matrices(tensors: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Plain mean of every per-matrix metric over the 2-D tensors that have it (the papers average per matrix)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for metrics in tensors.values():
        if len(metrics["shape"]) != 2:
            continue
        for key, value in metrics.items():
            if key in _MEAN_SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


def analyze_tensors(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], options: AnalysisOptions | None = None) -> Analysis:
    """The in-memory form: two state dicts (same names and shapes) instead of two checkpoints."""
    options = options or AnalysisOptions()
    names = sorted(set(base) & set(tuned), key=_sort_key)
    for name in names:
        if base[name].shape != tuned[name].shape:
            raise ModelError(f"tensor {name}: shape {list(base[name].shape)} vs {list(tuned[name].shape)}",
                             "compare two state dicts of the same architecture")
    analysis = analyze_pairs(((n, base[n], tuned[n]) for n in names), options, total=len(names))
    analysis.summary["skipped"] = {n: "only in one state dict" for n in sorted(set(base) ^ set(tuned))}
    return analysis


def analyze_checkpoints(base: str, tuned: str, options: AnalysisOptions | None = None, save_mask: str | Path | None = None) -> Analysis:
    """Stream two checkpoints tensor by tensor; optionally write the changed mask (bool safetensors)."""
    from .masks import MaskWriter

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


# ---------------------------------------------------------------- cross-run comparison


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
                     and _is_float_dtype(base_ckpt.dtype(n))]
            names.sort(key=_sort_key)
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


# ---------------------------------------------------------------- outputs


def write_outputs(analysis: Analysis, out_dir: str | Path) -> dict[str, Path]:
    """DIR/summary.json, DIR/spectra.safetensors (σ of every 2-D ΔW) and DIR/report.html (self-contained)."""
    from safetensors.torch import save_file

    from .report import render_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "spectra": out / "spectra.safetensors", "report": out / "report.html"}
    _write_atomic(paths["summary"], json.dumps(analysis.summary, indent=1, default=_json_default).encode())
    if analysis.spectra:
        tmp = paths["spectra"].with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in analysis.spectra.items()}, str(tmp), metadata={"content": "singular values of ΔW, descending"})
        os.replace(tmp, paths["spectra"])
    _write_atomic(paths["report"], render_report(analysis.summary, analysis.spectra).encode())
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

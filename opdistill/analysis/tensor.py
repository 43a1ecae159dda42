"""Every update-geometry metric (docs/analysis.md) of one tensor pair (BASE w, TUNED ŵ): sparsity, concentration,
mask enrichment, and for 2-D tensors the spectrum of ΔW and the alignment of the principal subspaces."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..masks import fraction_mask
from . import metrics as M
from .aggregate import MaskCounts, Totals
from .names import layer_index, module_type, percent_key, threshold_key
from .options import AnalysisOptions

TOPK_ENERGY_KS = (1, 2, 4, 8, 16, 32, 64)
PRINCIPAL_PERCENTS = (1, 5, 10, 20)
CONCENTRATION_PERCENTS = (0.1, 1.0, 5.0)


@dataclass
class TensorResult:
    """The metrics of one tensor pair, plus what the caller aggregates or saves and then drops."""

    metrics: dict[str, Any]
    totals: Totals
    changed: torch.Tensor  # bool, by options.changed
    delta_sq: torch.Tensor
    sigma_delta: torch.Tensor | None = None
    principal: MaskCounts | None = None  # 2-D tensors only
    low_magnitude: MaskCounts | None = None


def analyze_tensor(name: str, base: torch.Tensor, tuned: torch.Tensor, options: AnalysisOptions, seed: int = 0) -> TensorResult:
    """Every update-geometry metric of one tensor pair (float64 on options' device)."""
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

    low = fraction_mask(w.abs(), alpha, largest=False)
    result.low_magnitude = MaskCounts(int((low & changed).sum()), int(changed.sum()), int(low.sum()), low.numel())
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
    principal = fraction_mask(reconstruction.abs(), alpha, largest=True)
    del reconstruction
    result.principal = MaskCounts(int((principal & changed).sum()), int(changed.sum()), int(principal.sum()), principal.numel())
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

"""Pure tensor functions for the update-geometry metrics of "Dense Supervision, Sparse Updates"
(arXiv 2606.13657) and "The Path Not Taken" (arXiv 2511.08567). No I/O, no models.

Every function takes the base weight W, the tuned weight Ŵ or the update ΔW = Ŵ − W as float64 tensors
(the caller converts), so an exact difference of two float32 or bf16 checkpoints stays exact. Each one is
small on purpose: a test plants an update with a known answer and checks that one number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


# ---------------------------------------------------------------- elementwise


def unchanged_bf16(base: torch.Tensor, tuned: torch.Tensor, eta: float = 1e-3) -> torch.Tensor:
    """|ŵ − w| ≤ η·max(|w|, |ŵ|). With η = 1e-3 this is bitwise equality for two bf16 values (neighbouring
    bf16 numbers differ by at least 2^-8 of the larger one), so it counts changes a bf16 model can hold,
    and it does not call a large weight 'changed' for a rounding-sized move the way an absolute cut does."""
    return (tuned - base).abs() <= eta * torch.maximum(base.abs(), tuned.abs())


def unchanged_abs(delta: torch.Tensor, threshold: float = 1e-5) -> torch.Tensor:
    """|Δ| < threshold: the OPD paper's headline definition (scale-blind: see unchanged_bf16)."""
    return delta.abs() < threshold


def relative_update(delta_sq_sum: float, base_sq_sum: float) -> float | None:
    """‖ΔW‖_F / ‖W‖_F from the two sums of squares (sums add across tensors, so the same function gives
    the global number); None when the base is all zeros."""
    if base_sq_sum <= 0:
        return None
    return math.sqrt(delta_sq_sum / base_sq_sum)


def top_fraction_energy(delta_sq: torch.Tensor, fraction: float) -> float | None:
    """Share of Σ Δ² held by the ⌈fraction·N⌉ largest coordinates. Exact, ties included: the k-th largest
    value t splits the sum into the values above t plus as many copies of t as are needed to reach k."""
    values = delta_sq.reshape(-1)
    total = float(values.sum())
    if total <= 0:
        return None
    n = values.numel()
    k = min(n, max(1, math.ceil(fraction * n)))
    threshold = values.kthvalue(n - k + 1).values
    above = values > threshold
    count_above = int(above.sum())
    top = float(values[above].sum()) + (k - count_above) * float(threshold)
    return top / total


def overlap_enrichment(mask: torch.Tensor, changed: torch.Tensor) -> tuple[float | None, float | None]:
    """overlap = |mask ∩ changed| / |changed|, enrichment = overlap / density(mask): 1 is what a random
    mask of that density gets, > 1 means the changed coordinates are over-represented in the mask."""
    n_changed = int(changed.sum())
    if n_changed == 0:
        return None, None
    overlap = int((mask & changed).sum()) / n_changed
    density = int(mask.sum()) / mask.numel()
    return overlap, overlap / density


def jaccard(n_intersection: int, n_a: int, n_b: int) -> float | None:
    """|A ∩ B| / |A ∪ B| from counts."""
    union = n_a + n_b - n_intersection
    return n_intersection / union if union else None


def random_jaccard(p: float, q: float) -> float | None:
    """Expected Jaccard of two independent random masks of densities p and q: pq / (p + q − pq)."""
    union = p + q - p * q
    return p * q / union if union > 0 else None


# ---------------------------------------------------------------- spectrum of ΔW


def numerical_rank(sigma: torch.Tensor, rel_tol: float = 1e-5) -> int:
    """#{σ_i > rel_tol·σ_1} (sigma sorted descending)."""
    if sigma.numel() == 0 or float(sigma[0]) <= 0:
        return 0
    return int((sigma > rel_tol * sigma[0]).sum())


def stable_rank(sigma: torch.Tensor, frob_sq: float) -> float | None:
    """‖ΔW‖_F² / σ_1²: how many directions carry the energy, robust to tiny singular values."""
    if sigma.numel() == 0 or float(sigma[0]) <= 0:
        return None
    return frob_sq / float(sigma[0]) ** 2


def effective_rank(sigma: torch.Tensor) -> float | None:
    """exp(−Σ p_i log p_i), p_i = σ_i / Σσ (entropy effective rank; needs the whole spectrum)."""
    total = float(sigma.sum())
    if total <= 0:
        return None
    p = sigma[sigma > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def topk_energy(sigma: torch.Tensor, k: int, frob_sq: float) -> float | None:
    """Σ_{i≤k} σ_i² / ‖ΔW‖_F². The denominator is the exact Frobenius norm, so a randomised top-q
    spectrum gives the same number as a full one for every k ≤ q."""
    if frob_sq <= 0:
        return None
    return float((sigma[:k] ** 2).sum()) / frob_sq


# ---------------------------------------------------------------- principal alignment


def projection_energy(u_k: torch.Tensor, v_k: torch.Tensor, delta: torch.Tensor, frob_sq: float) -> float | None:
    """‖U_kᵀ ΔW V_k‖_F² / ‖ΔW‖_F²: the share of the update inside the base's top-k singular block."""
    if frob_sq <= 0:
        return None
    return float(((u_k.T @ delta @ v_k) ** 2).sum()) / frob_sq


def principal_sines(basis_a: torch.Tensor, basis_b: torch.Tensor) -> torch.Tensor:
    """sin θ_i of the principal angles between span(A) and span(B) (orthonormal columns), ascending θ.
    Computed as the singular values of (I − AAᵀ)B, which stays accurate for tiny angles where
    arccos of σ(AᵀB) ≈ 1 would lose every digit."""
    residual = basis_b - basis_a @ (basis_a.T @ basis_b)
    return torch.linalg.svdvals(residual).clamp(0.0, 1.0).flip(0)


def spectrum_drift(sigma_base: torch.Tensor, sigma_tuned: torch.Tensor) -> float | None:
    """‖σ(Ŵ) − σ(W)‖ / ‖σ(W)‖ over the singular values both spectra have."""
    n = min(sigma_base.numel(), sigma_tuned.numel())
    norm = float(sigma_base[:n].norm())
    if norm <= 0:
        return None
    return float((sigma_tuned[:n] - sigma_base[:n]).norm()) / norm


# ---------------------------------------------------------------- decompositions


@dataclass
class Spectrum:
    """Singular values (descending; all of them when exact, the top q when randomised) and, when asked,
    orthonormal bases of the top-k left (u) and right (v) singular subspaces."""

    sigma: torch.Tensor
    u: torch.Tensor | None
    v: torch.Tensor | None
    exact: bool


def exact_spectrum(matrix: torch.Tensor, k: int = 0) -> Spectrum:
    """All singular values and the top-k singular subspaces, exactly (no sampling).

    Uses the symmetric eigendecomposition of the Gram matrix of the smaller side in float64: σ_i² are its
    eigenvalues, with an absolute error of at most ~max(m, n)·ε·σ_1², so σ_i is resolved down to
    √(max(m, n)·ε)·σ_1 (≤ 3.3e-6·σ_1 for a 49152-row embedding, below the 1e-5·σ_1 numerical-rank cut);
    singular values under that floor are noise of the method and are set to 0. Measured on this project's
    2-core CPU it is 3–6x faster than LAPACK's SVD for the 576×1536 matrices of SmolLM2, which is what
    keeps a whole-model analysis within minutes.
    """
    a = matrix.to(torch.float64)
    m, n = a.shape
    tall = m >= n
    gram = a.T @ a if tall else a @ a.T
    if k <= 0:
        return Spectrum(_floored(torch.linalg.eigvalsh(gram), max(m, n)), None, None, True)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    sigma = _floored(eigenvalues, max(m, n))
    side = vectors.flip(1)[:, :k]  # top-k right (tall) or left (wide) singular vectors
    other = a @ side if tall else a.T @ side  # = U_k Σ_k (tall) or V_k Σ_k (wide)
    other = torch.linalg.qr(other).Q  # an orthonormal basis even where σ_k is tiny
    u, v = (other, side) if tall else (side, other)
    return Spectrum(sigma, u, v, True)


def _floored(eigenvalues: torch.Tensor, long_side: int) -> torch.Tensor:
    """Ascending Gram eigenvalues -> descending singular values, zero below the method's resolution."""
    sigma = eigenvalues.flip(0).clamp_min(0).sqrt()
    if sigma.numel():
        floor = float(sigma[0]) * math.sqrt(long_side * torch.finfo(torch.float64).eps)
        sigma = torch.where(sigma < floor, torch.zeros_like(sigma), sigma)
    return sigma


def randomized_spectrum(matrix: torch.Tensor, q: int, k: int = 0, niter: int = 4, seed: int = 0) -> Spectrum:
    """Top-q singular values (and top-k ≤ q subspaces) by randomised range finding (torch.svd_lowrank, with
    10 extra columns of oversampling). Seeded, so reruns agree."""
    a = matrix.to(torch.float64)
    columns = min(q + 10, min(a.shape))
    devices = [a.device] if a.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(a, q=columns, niter=niter)
    q = min(q, s.numel())
    if k <= 0:
        return Spectrum(s[:q], None, None, False)
    return Spectrum(s[:q], u[:, :k], v[:, :k], False)

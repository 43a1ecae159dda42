"""Capability subspaces for Self-Policy Distillation (SPD; Hao et al., "Self-Policy Distillation via Capability-Selective
Subspace Projection", arXiv 2605.22675): pure tensor math, no models.

The paper "extracts a low-rank capability subspace from the model's own gradients on correctness-defining tokens" and
"projects key-value (KV) activations into this subspace during self-generation". Here, per attention layer and per
K or V projection, with G the matrix whose rows are the gradients ∂L/∂h_t of the answer-token loss L with respect to
that projection's output h_t (one row per position t of every extraction sequence):

    basis U_r = the top-r right singular vectors of G  (= the top-r eigenvectors of Gram(G) = GᵀG)
    P = U_r U_rᵀ,   h ← h + β (P h − h)   (β = 1: h ← P h, the projection itself; β = 0: h unchanged)

The Gram matrix is accumulated in float64 over micro-batches (Gram(G) = Σ_batches Gram(G_b)), so extraction
never holds every gradient row at once; its eigenvectors are the right singular vectors of G.
"""

from __future__ import annotations

import torch


def gradient_gram(grads: torch.Tensor) -> torch.Tensor:
    """GᵀG in float64 for gradient rows `grads` (..., d): every leading index is one row of G. Shape (d, d)."""
    rows = grads.reshape(-1, grads.shape[-1]).to(torch.float64)
    return rows.T @ rows


def top_subspace(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """The top-`rank` eigenvectors of a symmetric PSD (d, d) Gram matrix as an orthonormal (d, r) float64 basis, and the
    share of the Gram's trace (the gradients' energy) they hold. r = min(rank, d).

    Columns are ordered by eigenvalue, largest first; each column's sign is fixed (its entry of largest magnitude is
    positive), so the same Gram always gives the same basis, bit for bit (the projection P does not depend on signs)."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix, got {tuple(gram.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    gram = gram.to(torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh((gram + gram.T) / 2)  # ascending; symmetrised against round-off
    r = min(rank, gram.shape[0])
    basis = eigenvectors[:, -r:].flip(-1)
    signs = torch.sign(basis.gather(0, basis.abs().argmax(dim=0, keepdim=True)))
    basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)
    total = float(eigenvalues.clamp(min=0).sum())
    energy = float(eigenvalues[-r:].clamp(min=0).sum()) / total if total > 0 else 0.0
    return basis, energy


def project(hidden: torch.Tensor, basis: torch.Tensor, strength: float) -> torch.Tensor:
    """h + β (U Uᵀ h − h) for every vector h along the last dimension of `hidden` (..., d); `basis` U is (d, r)
    orthonormal. β = 0 returns `hidden` itself (no arithmetic, so exactly the unprojected activations)."""
    if strength == 0.0:
        return hidden
    projected = (hidden @ basis) @ basis.T
    if strength == 1.0:
        return projected
    return hidden + strength * (projected - hidden)


def subspace_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of two orthonormal bases (d, r) and (d, r')."""
    cosines = torch.linalg.svdvals(a.T.to(torch.float64) @ b.to(torch.float64)).clamp(max=1.0)
    return torch.arccos(cosines).flip(0)

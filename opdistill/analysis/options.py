"""Options of the update-geometry analysis (torch-free, so the CLI can show their defaults cheaply)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import OpdistillError

if TYPE_CHECKING:
    import torch


@dataclass
class AnalysisOptions:
    """Knobs of the analysis; the defaults are those of "Dense Supervision, Sparse Updates" (arXiv 2606.13657)
    and "The Path Not Taken" (arXiv 2511.08567)."""

    eta: float = 1e-3  # bf16-aware tolerance: unchanged iff |ŵ − w| ≤ η·max(|w|, |ŵ|)
    abs_threshold: float = 1e-5  # absolute definition: unchanged iff |Δ| < threshold
    changed: str = "bf16"  # which definition gives the changed mask (overlaps, --save-mask, --compare): bf16 or abs
    exact_svd_max_dim: int = 2048  # exact spectrum when min(m, n) ≤ this, else randomised top-`svd_rank`
    svd_rank: int = 128  # singular values/vectors computed on the randomised path
    svd_niter: int = 4  # power iterations of the randomised path
    mask_alpha: float = 0.1  # density α of the principal and low-magnitude masks
    principal_rank_frac: float = 0.01  # k = this·min(m, n) (≥ 1) for the principal mask's rank-k reconstruction
    spectral: bool = True  # compute spectra and principal alignment of 2-D tensors (the slow part)
    device: str = "auto"  # auto: cuda when available, else cpu
    seed: int = 0  # seed of the randomised SVD
    progress: bool = True  # tqdm over tensors on stderr

    def validate(self) -> None:
        """Reject values that make no sense, naming the option."""
        if self.changed not in ("bf16", "abs"):
            raise OpdistillError(f"changed definition {self.changed!r} is unknown", "use bf16 or abs")
        for name in ("eta", "abs_threshold"):
            if not getattr(self, name) > 0:
                raise OpdistillError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("mask_alpha", "principal_rank_frac"):
            if not 0 < getattr(self, name) <= 1:
                raise OpdistillError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("exact_svd_max_dim", "svd_rank", "svd_niter"):
            if getattr(self, name) < 1:
                raise OpdistillError(f"{name} must be >= 1, got {getattr(self, name)}")

    def torch_device(self) -> "torch.device":
        import torch  # here: the CLI reads these defaults without loading torch

        from ..models import default_device

        return default_device() if self.device == "auto" else torch.device(self.device)

"""Update-geometry analysis: what fine-tuning did to the weights, after
"Dense Supervision, Sparse Updates" (arXiv 2606.13657) and "The Path Not Taken" (arXiv 2511.08567).

`updates.py` streams two checkpoints (`checkpoint.py`) through the per-tensor metrics of `tensor.py` (built on
the pure tensor functions of `metrics.py`) and sums them up (`aggregate.py`); `names.py` reads module types
and layers from tensor names; `compare.py` compares the changed coordinates of two runs; `outputs.py` writes
summary.json, spectra.safetensors and report.html (rendered by `report.py`); the changed-mask file
format and sparse-subnetwork training live on the training side, in `opdistill/masks.py`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public names and the module that defines each. Loaded on first use (PEP 562), so importing
# opdistill.analysis.options (the CLI) does not load torch.
_EXPORTS = {
    "Analysis": "updates", "AnalysisOptions": "options", "analyze_checkpoints": "updates", "analyze_pairs": "updates",
    "analyze_tensor": "tensor", "analyze_tensors": "updates", "compare_runs": "compare", "write_outputs": "outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)

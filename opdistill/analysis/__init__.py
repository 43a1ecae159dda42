"""Update-geometry analysis (what fine-tuning did to the weights) and sparse-subnetwork training (SPEC §4).

`updates.py` streams two checkpoints and aggregates the metrics of `metrics.py` (pure tensor functions);
`masks.py` saves/loads changed-masks and applies one as gradient masking; `report.py` renders report.html.
"""

from .masks import apply_gradient_mask, apply_train_mask, build_masks, load_mask, mask_density, save_mask
from .updates import AnalysisOptions, Analysis, analyze_checkpoints, analyze_pairs, analyze_tensor, analyze_tensors, compare_runs, write_outputs

__all__ = [
    "Analysis", "AnalysisOptions", "analyze_checkpoints", "analyze_pairs", "analyze_tensor", "analyze_tensors", "compare_runs",
    "write_outputs", "apply_gradient_mask", "apply_train_mask", "build_masks", "load_mask", "mask_density", "save_mask",
]

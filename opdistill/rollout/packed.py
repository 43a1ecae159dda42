"""Pre-packed bf16 linear layers for sampling on a CPU with native bf16 (oneDNN).

A decode step multiplies a handful of rows by every weight matrix. oneDNN's bf16 matmul reorders the
weight into its blocked layout on every call when handed a plain tensor; reordering it once per weight
update (torch.ops.mkldnn._reorder_linear_weight, the packing PyTorch's own inductor uses when it freezes
a CPU model) measured here ≈ 2x faster per call at 8 rows (0.10 vs 0.21 ms for a 1536x576 weight, 3.0 vs
5.5 ms for SmolLM2's 49152x576 LM head). The packed weights are derived data: the bf16 parameters stay
where they are (sync copies into them in place) and `repack` rebuilds the packed form from them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def packing_available(model: Any) -> bool:
    """True for a bf16 model on a CPU whose oneDNN has native bf16 matmuls."""
    parameter = next(model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is also kept in oneDNN's packed layout; same parameter names as nn.Linear."""

    def __init__(self, linear: nn.Linear, rows_hint: int) -> None:
        super().__init__()
        self.weight = linear.weight  # the same Parameter object: tied weights stay tied, sync sees the same names
        self.bias = linear.bias
        self.rows_hint = rows_hint
        self.packed: torch.Tensor | None = None
        self.repack()

    @torch.no_grad()
    def repack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), self.rows_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module, rows_hint: int) -> dict[int, list[PackedLinear]]:
    """Replace every plain nn.Linear of `model` by a PackedLinear; returns weight id -> its packed layers."""
    by_weight: dict[int, list[PackedLinear]] = {}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                packed = PackedLinear(child, rows_hint)
                setattr(module, name, packed)
                by_weight.setdefault(id(packed.weight), []).append(packed)
    return by_weight

"""What a tensor's name says (module type, layer, order) and how summary keys spell numbers.

Torch-free and import-free inside the package, so every other analysis module (the report included) can
use it without importing the modules that compute.
"""

from __future__ import annotations

import re

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


def tensor_sort_key(name: str) -> tuple[int, int, str]:
    """Model order: embeddings, then the blocks by layer number, then everything else (final norm, head)."""
    layer = layer_index(name)
    if layer is None:
        return (0 if module_type(name) == "embeddings" else 2, 0, name)
    return (1, layer, name)


def threshold_key(value: float) -> str:
    """1e-5 -> '1e-5' (the summary key `sparsity_abs_1e-5`), 2.5e-06 -> '2.5e-6'."""
    mantissa, exponent = f"{value:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def percent_key(percent: float) -> str:
    """0.1 -> '0.1pct', 1.0 -> '1pct'."""
    return f"{percent:g}pct"

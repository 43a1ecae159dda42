"""Forward hooks on the attention's key and value projections, for SPD (arXiv 2605.22675; methods/spd.py):

- `projected_kv`: while sampling, every K/V projection output h of the chosen layers becomes h + β (P h − h)
  (objectives.subspace.project). The hooks live only inside the `with` block: they are removed on leaving it, an
  exception included, so no training forward pass ever runs through them.
- `captured_kv`: while extracting the subspace, the K/V projection outputs are kept so the loss can be
  differentiated with respect to them (torch.autograd.grad: no parameter's .grad is touched).

Modules are found by name, `...layers.<i>.self_attn.k_proj` / `v_proj` (the Hugging Face Llama / Qwen2 / Mistral
layout, a LoRA wrapper or the sampler's packed linear at that name included): the hook sees the module's output,
the keys before rotary embedding and the values, shape (batch, positions, kv_heads × head_dim).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ConfigError
from ..objectives.subspace import project
from .base import Sampler
from .hf import HFSampler

KV_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.([kv])_proj$")


def kv_modules(model: nn.Module) -> dict[str, nn.Module]:
    """'<layer>.<k|v>' -> the module whose output is that layer's keys or values, for every attention layer."""
    found = {f"{int(m[1])}.{m[2]}": module for name, module in model.named_modules() if (m := KV_NAME.search(name))}
    if not found:
        raise ConfigError("SPD hooks the attention's key/value projections, but the model has no modules named "
                          "`layers.<i>.self_attn.k_proj` / `v_proj`",
                          "use a model with the Hugging Face Llama / Qwen2 / Mistral attention layout")
    return found


def sampling_model(sampler: Sampler) -> nn.Module:
    """The module the sampler runs forward passes through: the hf sampler's policy (the student itself, or its bf16
    copy). Other engines (vLLM) run their own kernels, where a PyTorch hook never fires."""
    if not isinstance(sampler, HFSampler):
        raise ConfigError(f"SPD projects keys and values with PyTorch hooks, which the {sampler.name} sampler never runs",
                          "set rollout_engine: hf")
    return sampler.policy


@contextlib.contextmanager
def projected_kv(model: nn.Module, bases: dict[str, torch.Tensor], strength: float) -> Iterator[None]:
    """Within the block, the output h of each module named in `bases` ('<layer>.<k|v>' -> orthonormal (d, r) basis)
    becomes h + strength (U Uᵀ h − h). At strength 0 nothing is installed."""
    modules = kv_modules(model)
    missing = sorted(set(bases) - set(modules))
    if missing:
        raise ConfigError(f"the subspace names K/V projections the sampling model lacks: {', '.join(missing)}",
                          "check `layers` against the model's number of layers")
    handles = []
    try:
        if strength != 0.0:
            for name, basis in bases.items():
                module = modules[name]
                weight = next(module.parameters())
                cast = basis.to(device=weight.device, dtype=weight.dtype)  # once, not per decode step
                handles.append(module.register_forward_hook(_projection_hook(cast, strength)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _projection_hook(basis: torch.Tensor, strength: float) -> Any:
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return project(output, basis.to(output.dtype), strength)  # a no-op cast unless autocast changed the dtype

    return hook


@contextlib.contextmanager
def captured_kv(model: nn.Module, names: list[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, each forward pass appends the output of the modules `names` ('<layer>.<k|v>') to the
    yielded lists, still attached to the autograd graph. The hooks are removed on leaving the block."""
    modules = kv_modules(model)
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []
    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(lambda m, i, out, name=name: outputs[name].append(out)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()

"""What a step samples with: per-sample random streams and rollout horizons ("Are Full Rollouts Necessary for On-Policy
Distillation?", arXiv 2605.31490)."""

from __future__ import annotations

import math

import torch

from ..seeds import mix_seed


def row_generator(prompt_seed: int, sample_index: int) -> torch.Generator:
    """The random stream of one sample: fixed by its prompt's seed and its index, whatever batch it runs in."""
    return torch.Generator().manual_seed(mix_seed(prompt_seed, sample_index))


def row_uniforms(prompt_seeds: list[int], sample_indices: list[int], steps: int) -> torch.Tensor:
    """(rows, steps) U(0,1) draws: row r's draw for decode step t is the t-th number of its own stream.

    Drawn once per batch on the host, so the decode loop never touches a generator (no per-row Python
    work, no host round trip on a GPU)."""
    return torch.stack([torch.rand(steps, generator=row_generator(seed, index))
                        for seed, index in zip(prompt_seeds, sample_indices)])


def rollout_seeds(seed: int, step: int, record_indices: list[int]) -> list[int]:
    """Per-prompt sampling seeds of a training step: a function of the run seed, the step and each record's
    index in the data, so the rollouts are the same on 1 or N processes and after a resume."""
    return [mix_seed(seed, step, index) for index in record_indices]


def horizon_at(step: int, kind: str, max_tokens: int, *, ratio: float = 0.0, tokens: int = 0,
               start: int = 0, increment: int = 0, every: int = 1) -> int:
    """Rollout length at optimizer step `step` (0-based) under a horizon schedule (TOPD / POPD, arXiv 2605.31490).

    full: max_tokens. truncated (TOPD): H = ratio · max_tokens when ratio > 0, else the fixed `tokens`.
    progressive (POPD): H_k = min(max_tokens, start + increment · floor(k / every)). Always at least 1.
    """
    if kind == "full":
        horizon = max_tokens
    elif kind == "truncated":
        horizon = math.ceil(ratio * max_tokens) if ratio > 0 else tokens
    elif kind == "progressive":
        horizon = start + increment * (step // max(1, every))
    else:
        raise ValueError(f"unknown horizon {kind!r}; use full, truncated or progressive")
    return max(1, min(max_tokens, horizon))

"""Log-prob scoring helpers shared by samplers, methods and evaluation: padding, positions, token log-probs."""

from __future__ import annotations

from typing import Any

import torch


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts so every sequence's next token is at the same position."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    return ids, mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row, whatever the padding side."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def last_positions(count: int, length: int, device: torch.device) -> torch.Tensor:
    """`logits_to_keep` for the last `count` of `length` positions, as an index tensor.

    An int `logits_to_keep` makes transformers slice the hidden states into a non-contiguous view, and a
    matmul of a non-contiguous 3-D input with the LM head's weight falls back to a batched matmul that
    first copies the weight once per row: measured here 0.86 s for SmolLM2's 49152x576 head at 8 rows, more
    than the rest of the forward pass. Indexing with a tensor gives a contiguous copy of the few hidden
    states instead."""
    return torch.arange(length - count, length, device=device)


def token_logprobs(model: Any, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log π(y_t | y_<t) at every position of a collated batch, shape (B, L-1), aligned with loss_mask[:, 1:].

    Computed position by position from the logits (log_softmax, then gather), in fp32.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch["input_ids"][:, 1:].unsqueeze(-1)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)

"""Log-prob scoring helpers shared by samplers, methods, evaluation and the server: padding, positions, token log-probs,
top-k log-probs with ranks."""

from __future__ import annotations

from typing import Any, NamedTuple

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


def logprobs_of(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target] per row of (..., V) logits, in fp32 (float64 stays float64).

    cross_entropy fuses log_softmax and the gather, and its backward is softmax − one-hot: no V-wide
    log-probabilities are kept for the backward pass."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    flat = logits.reshape(-1, logits.shape[-1])
    return -torch.nn.functional.cross_entropy(flat, targets.reshape(-1), reduction="none").view(targets.shape)


def token_logprobs(model: Any, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log π(y_t | y_<t) at every position of a collated batch, shape (B, L-1), aligned with loss_mask[:, 1:]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return logprobs_of(logits, batch["input_ids"][:, 1:], temperature)


def response_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits at the response positions, flattened row-major to (tokens, V): the logits that predict
    each response token. Two batches holding the same responses behind different prompts line up row for row.

    For a batch collated with align_responses=True (every response starts at the same index) only the
    positions from there on get logits: the LM head and the (B, L, V) logits tensor shrink to the responses.
    """
    # A row with no loss token (an empty response, or one whose loss is masked) does not decide the alignment.
    has_response = loss_mask[:, 1:].any(dim=1)
    starts = loss_mask.float().argmax(dim=1)[has_response]
    start = int(starts.min()) if len(starts) else 0
    if start == 0 or not bool((starts == start).all()):  # not aligned: every position gets logits
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask)).logits[:, :-1]
        return logits[loss_mask[:, 1:].bool()]
    keep = input_ids.shape[1] - start + 1  # positions start-1 .. L-1 predict tokens start .. L
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask),
                   logits_to_keep=last_positions(keep, input_ids.shape[1], input_ids.device)).logits[:, :-1]
    return logits[loss_mask[:, start:].bool()]


def response_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The response tokens of a collated batch, flattened row-major like response_logits' rows."""
    return batch["input_ids"][:, 1:][batch["loss_mask"][:, 1:].bool()]


def response_logprobs(model: Any, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log π(y_t | x, y_<t) of every response token (flattened like response_targets), in fp32."""
    logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    return logprobs_of(logits, response_targets(batch), temperature)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(z)) = logsumexp(z) − Σ softmax(z) z per row (softmax, not exp(log_softmax): torch.exp is slow on
    the far-negative tail of real logits)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)



class TopLogprobs(NamedTuple):
    """What `top_k_logprobs` returns for T positions; every log-prob is log_softmax of the fp32-upcast logits."""

    ids: torch.Tensor  # (T, k) long: the k most likely tokens at each position, most likely first
    logprobs: torch.Tensor  # (T, k) fp32 (fp64 for fp64 logits): their log-probs
    ranks: torch.Tensor  # (T, k) long: 1 + the number of tokens with a strictly higher log-prob (ties share a rank)
    target_logprobs: torch.Tensor  # (T,) the log-prob of each position's target token
    target_ranks: torch.Tensor  # (T,) long: the target's rank, as for `ranks`


def top_k_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int, chunk_rows: int = 512) -> TopLogprobs:
    """The top-k log-probs of each row of (T, V) logits, plus the log-prob and rank of each row's target token:
    what a white-box teacher serves (vLLM's prompt_logprobs: top-k and the actual token, both ranked).

    Not `logprobs_of`: that fuses the gather into cross_entropy and never holds the row's log-probs, which the
    top-k and the rank need; the upcast rule is the same. Rows go `chunk_rows` at a time, so the fp32 copy of
    a long prompt's logits over a large vocabulary is never whole in memory. k is capped at V."""
    k = min(k, logits.shape[-1])
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, max(logits.shape[0], 1), chunk_rows):  # once for no rows (a one-token prompt): empty results
        rows = logits[start : start + chunk_rows]
        logp = torch.log_softmax(rows.to(torch.promote_types(rows.dtype, torch.float32)), dim=-1)
        top_values, top_ids = logp.topk(k, dim=-1)  # sorted, most likely first
        # Every token above a top-k entry is itself in the top-k, so counting within the top-k ranks it exactly.
        top_ranks = 1 + (top_values.unsqueeze(1) > top_values.unsqueeze(2)).sum(dim=-1)
        target = logp.gather(-1, targets[start : start + chunk_rows].unsqueeze(-1))
        parts.append((top_ids, top_values, top_ranks, target.squeeze(-1), 1 + (logp > target).sum(dim=-1)))
    return TopLogprobs(*(torch.cat(column) for column in zip(*parts)))

"""Batched sampling from a local causal LM: N samples per prompt, temperature / top-p, stop at EOS.

The local teacher and evaluation use it now; on-policy methods (GAD, OPD) build their rollouts on it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .sampling import SamplingParams


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    response_ids: list[int]  # up to and including EOS when the model stopped
    text: str
    finished: bool  # True when EOS was produced within max_new_tokens
    logprobs: list[float]  # log-prob of each response token under the sampling distribution at `temperature`


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


def eos_token_ids(tokenizer: Any, model: Any) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(configured)
    return {i for i in ids if i is not None}


def autocast_context(bf16: bool, device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def draw(probs: torch.Tensor, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One index per row with probability proportional to `probs` (rows need not sum to 1).

    Inverse-CDF sampling: a cumulative sum and a binary search, about 20x cheaper here than
    torch.multinomial over a 49k vocabulary, which draws an exponential per entry. `uniforms` (one U(0,1)
    per row) fixes the draw; by default they come from torch's global generator.
    """
    cdf = probs.cumsum(dim=-1)
    if uniforms is None:
        uniforms = torch.rand(probs.shape[0], device=probs.device)
    u = uniforms.to(device=probs.device, dtype=cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    # right=True: the first index whose cdf exceeds u, so zero-probability entries are never picked.
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1).squeeze(-1)


def sample_next(logits: torch.Tensor, params: SamplingParams,
                uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return (tokens, their log-probs under the policy at `params.temperature`).

    The log-prob is taken before nucleus truncation: it is what a forward pass of the same policy gives,
    so PPO's ratio compares like with like. Greedy (temperature <= 0) reports log-probs at temperature 1.
    """
    greedy = params.temperature <= 0
    logprobs = torch.log_softmax(logits.float() / (1.0 if greedy else params.temperature), dim=-1)
    if greedy:
        tokens = logprobs.argmax(dim=-1)
    elif params.top_p < 1.0:
        sorted_lp, order = logprobs.sort(dim=-1, descending=True)
        probs = sorted_lp.exp()
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = probs.cumsum(dim=-1) - probs >= params.top_p
        tokens = order.gather(-1, draw(probs.masked_fill(outside, 0.0), uniforms).unsqueeze(-1)).squeeze(-1)
    else:
        tokens = draw(logprobs.exp(), uniforms)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def pack_jobs(prompts: list[list[int]], n: int, batch_size: int,
              skip: Callable[[int, int], bool] | None) -> list[list[tuple[int, list[int]]]]:
    """Batches of (prompt index, sample indices): at most batch_size sequences each, prompts sorted by length
    so batches waste little padding, and the samples of one prompt kept together to share its prefill."""
    groups: list[tuple[int, list[int]]] = []
    for p in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        wanted = [s for s in range(n) if not (skip and skip(p, s))]
        groups += [(p, wanted[i : i + batch_size]) for i in range(0, len(wanted), batch_size)]
    batches: list[list[tuple[int, list[int]]]] = []
    size = batch_size
    for group in groups:
        if size + len(group[1]) > batch_size:
            batches.append([])
            size = 0
        batches[-1].append(group)
        size += len(group[1])
    return batches


def row_generator(prompt_seed: int, sample_index: int) -> torch.Generator:
    """The random stream of one sample: fixed by its prompt's seed and its index, whatever batch it runs in."""
    return torch.Generator().manual_seed((prompt_seed * 1_000_003 + sample_index) % 2**63)


@torch.no_grad()
def sample_batch(model: Any, prompts: list[list[int]], copies: list[int], params: SamplingParams,
                 pad_id: int, eos: set[int], generators: list[torch.Generator] | None = None,
                 ) -> tuple[list[list[int]], list[list[float]], list[bool]]:
    """Sample `copies[i]` continuations of prompt i with a KV cache.

    Each prompt is prefilled once and its cache copied for its samples; rows that reach EOS leave the batch,
    so the decode cost follows the sequences still running. With `generators` (one per row, prompt-major)
    every row draws its tokens from its own stream, so a sample does not depend on which batch, process or
    world size it ran in. Returns per row (prompt-major): tokens, log-probs, finished (EOS produced).
    """
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True, logits_to_keep=1)
    rows = torch.repeat_interleave(torch.arange(len(prompts), device=device), torch.tensor(copies, device=device))
    cache = out.past_key_values
    cache.reorder_cache(rows)
    logits, mask = out.logits[rows, -1], mask[rows]
    position = mask.sum(dim=1)  # the next token's position id
    total = len(rows)
    tokens: list[list[int]] = [[] for _ in range(total)]
    logprobs: list[list[float]] = [[] for _ in range(total)]
    finished = [False] * total
    active = torch.arange(total, device=device)  # original row of each row still in the batch
    eos_ids = torch.tensor(sorted(eos), device=device)
    for _ in range(params.max_new_tokens):
        uniforms = None if generators is None else torch.cat([torch.rand(1, generator=generators[r]) for r in active.tolist()])
        token, logprob = sample_next(logits, params, uniforms)
        for row, t, lp in zip(active.tolist(), token.tolist(), logprob.tolist()):
            tokens[row].append(t)
            logprobs[row].append(lp)
        done = torch.isin(token, eos_ids)
        if done.any():
            for row in active[done].tolist():
                finished[row] = True
            keep = (~done).nonzero().squeeze(-1)
            if len(keep) == 0:
                break
            cache.reorder_cache(keep)
            active, token, mask, position = active[keep], token[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        out = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position.unsqueeze(1),
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]
        position = position + 1
    return tokens, logprobs, finished


def iter_samples(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    n: int = 1,
    batch_size: int = 16,
    bf16: bool = False,
    skip: Callable[[int, int], bool] | None = None,
    seeds: list[int] | None = None,
) -> Iterator[list[Sample]]:
    """Yield the samples of each generated batch as soon as it is done.

    `skip(prompt_index, sample_index)` lets a resumed run leave out what it already has. `seeds` (one per
    prompt) gives every sample its own random stream (`row_generator`); without it torch's global one is used.
    """
    device = next(model.parameters()).device
    eos = eos_token_ids(tokenizer, model)
    model.eval()
    for batch in pack_jobs(prompts, n, batch_size, skip):
        jobs = [(p, s) for p, samples in batch for s in samples]
        generators = None if seeds is None else [row_generator(seeds[p], s) for p, s in jobs]
        with autocast_context(bf16, device):
            tokens, logprobs, finished = sample_batch(model, [prompts[p] for p, _ in batch], [len(s) for _, s in batch],
                                                      params, tokenizer.pad_token_id, eos, generators)
        yield [Sample(p, s, tokens[row], tokenizer.decode(tokens[row], skip_special_tokens=True).strip(), finished[row], logprobs[row])
               for row, (p, s) in enumerate(jobs)]


def samples_in_order(model: Any, tokenizer: Any, prompts: list[list[int]], params: SamplingParams, *, n: int = 1,
                     batch_size: int = 16, bf16: bool = False, seeds: list[int] | None = None) -> list[Sample]:
    """All n samples of every prompt, prompt-major (index p * n + s), whatever order the batches ran in."""
    by_job = {(s.prompt_index, s.sample_index): s
              for batch in iter_samples(model, tokenizer, prompts, params, n=n, batch_size=batch_size, bf16=bf16, seeds=seeds)
              for s in batch}
    return [by_job[(p, s)] for p in range(len(prompts)) for s in range(n)]


def rollout_seeds(seed: int, step: int, record_indices: list[int]) -> list[int]:
    """Per-prompt sampling seeds of a training step: a function of the run seed, the step and each record's
    index in the data, so the rollouts are the same on 1 or N processes and after a resume."""
    return [((seed * 1_000_003 + step) * 1_000_003 + index) % 2**63 for index in record_indices]


def horizon_at(step: int, kind: str, max_tokens: int, *, ratio: float = 0.0, tokens: int = 0,
               start: int = 0, increment: int = 0, every: int = 1) -> int:
    """Rollout length at optimizer step `step` (0-based) under a horizon schedule (SPEC §3, arXiv 2605.31490).

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


def token_logprobs(model: Any, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log π(y_t | y_<t) at every position of a collated batch, shape (B, L-1), aligned with loss_mask[:, 1:].

    Computed position by position from the logits (log_softmax, then gather), in fp32.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch["input_ids"][:, 1:].unsqueeze(-1)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)

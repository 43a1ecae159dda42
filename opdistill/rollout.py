"""Batched sampling from a local causal LM: N samples per prompt, temperature / top-p, stop at EOS.

The local teacher and evaluation use it now; on-policy methods (GAD, OPD) build their rollouts on it.
"""

from __future__ import annotations

import contextlib
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


def trim_at_eos(ids: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[: position + 1], True
    return ids, False


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
) -> Iterator[list[Sample]]:
    """Yield the samples of each generated batch as soon as it is done.

    `skip(prompt_index, sample_index)` lets a resumed run leave out what it already has.
    Sequences are sorted by prompt length so batches waste little padding.
    """
    jobs = [(p, s) for p in range(len(prompts)) for s in range(n) if not (skip and skip(p, s))]
    jobs.sort(key=lambda job: len(prompts[job[0]]))
    device = next(model.parameters()).device
    eos = eos_token_ids(tokenizer, model)
    model.eval()
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        ids, mask = left_pad([prompts[p] for p, _ in batch], tokenizer.pad_token_id)
        greedy = params.temperature <= 0
        with torch.no_grad(), autocast_context(bf16, device):
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=not greedy,
                temperature=None if greedy else params.temperature,
                top_p=None if greedy else params.top_p,
                top_k=None,
                max_new_tokens=params.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(eos),
                return_dict_in_generate=True,
                output_logits=True,
            )
        new = generated.sequences[:, ids.shape[1]:]
        # Raw logits per step -> log-probs at the sampling temperature (before top-p truncation, i.e. what a
        # forward pass of the same policy gives; PPO's ratio compares like with like).
        steps = torch.stack(generated.logits, dim=1).float() / (params.temperature if not greedy else 1.0)
        chosen = torch.log_softmax(steps, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        samples = []
        for row, ((p, s), tokens) in enumerate(zip(batch, new.tolist())):
            response, finished = trim_at_eos(tokens, eos)
            text = tokenizer.decode(response, skip_special_tokens=True).strip()
            samples.append(Sample(p, s, response, text, finished, chosen[row, : len(response)].tolist()))
        yield samples


def token_logprobs(model: Any, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log π(y_t | y_<t) at every position of a collated batch, shape (B, L-1), aligned with loss_mask[:, 1:].

    Computed position by position from the logits (log_softmax, then gather), in fp32.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch["input_ids"][:, 1:].unsqueeze(-1)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)

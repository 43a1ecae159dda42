"""The in-process sampler (`rollout_engine: hf`): a KV-cache decode loop over any transformers causal LM.

- Under bf16 precision it samples from a bf16 copy of the policy (half the bytes a decode step reads, and
  the CPU's or GPU's native bf16 matrix multiplies) while the trained weights stay fp32 masters; `sync`
  copies the trained parameters into that copy in place after every optimizer step.
- On a CPU with native bf16, the sampler's own bf16 weights are also kept pre-packed for oneDNN (packed.py):
  ≈ 1.4x the decode throughput of plain bf16 weights here, bitwise the same logits.
- A model the sampler owns attends at decode steps with attention.decode_attention (two small matmuls per layer).
- Each prompt is prefilled once and its cache shared by its n samples (GAD's groups).
- The KV cache is allocated once per batch (cache.py); a decode step writes its slice.
- Tokens, log-probs and lengths are collected in device tensors and read back once per batch. Finished rows
  leave the batch every `check_every` steps: every step on a CPU (where reading a flag back is free and the
  saved compute is not), every 8 steps on a GPU (where each read is a host sync that stalls the queue).
- Random draws come from per-sample streams drawn once per batch (schedules.row_uniforms), so a sample is
  the same whatever batch, process or world size it runs in.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Iterator

import torch

from ..logprobs import last_positions, left_pad, positions_from_mask
from ..sampling import SamplingParams
from .base import Sample, Sampler, Skip, eos_token_ids, pack_jobs
from .attention import use_decode_attention
from .cache import preallocated_cache, select_rows, supports_preallocated_cache
from .next_token import sample_next
from .packed import pack_linears, packing_available
from .schedules import row_uniforms

GPU_CHECK_EVERY = 8  # decode steps between reads of the "all finished?" flag on a GPU


class HFSampler(Sampler):
    """Samples from `model` itself, or from an own copy in `dtype` refreshed by `sync`.

    `owns_model`: the caller hands the model over (a model loaded only to sample from, as in evaluation), so
    the sampler may rewrite its linear layers into packed ones; a training model is never rewritten.
    """

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, *, dtype: torch.dtype | None = None, batch_size: int = 16,
                 check_every: int = 0, owns_model: bool = False) -> None:
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos = eos_token_ids(tokenizer, model.generation_config)
        weights_dtype = next(model.parameters()).dtype
        self.owns_copy = dtype is not None and dtype != weights_dtype
        self.policy = self._copy(model, dtype) if self.owns_copy else model
        device = next(model.parameters()).device
        self.check_every = check_every or (GPU_CHECK_EVERY if device.type == "cuda" else 1)
        self.preallocate = supports_preallocated_cache(model)
        may_rewrite = self.owns_copy or owns_model
        self.packed = pack_linears(self.policy, batch_size) if may_rewrite and packing_available(self.policy) else {}
        if may_rewrite and self.preallocate:
            use_decode_attention(self.policy)

    @staticmethod
    @torch.no_grad()
    def _copy(model: Any, dtype: torch.dtype) -> Any:
        """A frozen copy whose parameters are `dtype` clones, made without a full-precision copy in between
        (deepcopy's memo hands it the converted tensors): the sampler's memory is the bf16 weights only."""
        memo: dict[int, Any] = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()}
        return copy.deepcopy(model, memo).eval()

    @torch.no_grad()
    def sync(self, model: Any) -> None:
        """Copy the parameters that train (the others never change) into the sampling copy, in place."""
        if not self.owns_copy:
            return
        mine = dict(self.policy.named_parameters())
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                mine[name].copy_(parameter.detach())
                for layer in self.packed.get(id(mine[name]), []):
                    layer.repack()

    def close(self) -> None:
        if self.owns_copy:
            del self.policy

    def iter_batches(self, prompts: list[list[int]], params: SamplingParams, *, n: int = 1,
                     seeds: list[int] | None = None, skip: Skip | None = None) -> Iterator[list[Sample]]:
        model = self.policy
        was_training = model.training
        model.eval()
        try:
            for batch in pack_jobs(prompts, n, self.batch_size, skip):
                jobs = [(p, s) for p, samples in batch for s in samples]
                uniforms = None if seeds is None else row_uniforms([seeds[p] for p, _ in jobs], [s for _, s in jobs], params.max_new_tokens)
                tokens, logprobs, finished = sample_batch(model, [prompts[p] for p, _ in batch], [len(s) for _, s in batch], params,
                                                          self.tokenizer.pad_token_id, self.eos, uniforms, check_every=self.check_every,
                                                          preallocate=self.preallocate)
                yield [Sample(p, s, tokens[row], self.tokenizer.decode(tokens[row], skip_special_tokens=True).strip(), finished[row],
                              logprobs[row]) for row, (p, s) in enumerate(jobs)]
        finally:
            model.train(was_training)


def cache_keyword(model: Any) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.24 (`past_key_values` still works there, with a
    warning, and goes in 5.40), `past_key_values` before. A PEFT wrapper passes it on to the model it wraps, a compiled
    model to its original; a forward that names neither (`*args, **kwargs`) gets the installed version's name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "_orig_mod", base)
    parameters = inspect.signature(base.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return "cache" if transformers_at_least("5.24") else "past_key_values"


def transformers_at_least(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(version)


def returned_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name (see cache_keyword)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.inference_mode()
def sample_batch(model: Any, prompts: list[list[int]], copies: list[int], params: SamplingParams, pad_id: int, eos: set[int],
                 uniforms: torch.Tensor | None = None, *, check_every: int = 1, preallocate: bool = True,
                 ) -> tuple[list[list[int]], list[list[float]], list[bool]]:
    """Sample `copies[i]` continuations of prompt i; per row (prompt-major): tokens, log-probs, finished.

    `uniforms` (rows, max_new_tokens) fixes each row's draws; without it torch's global generator is used.
    """
    device = next(model.parameters()).device
    steps = params.max_new_tokens
    ids, prompt_mask = left_pad(prompts, pad_id)
    ids, prompt_mask = ids.to(device), prompt_mask.to(device)
    prompt_length = ids.shape[1]
    cache = preallocated_cache(model, prompt_length + steps) if preallocate else None
    cache_key = cache_keyword(model)

    # Prefill: each prompt once, then its cache row repeated for its samples.
    out = model(input_ids=ids, attention_mask=prompt_mask, position_ids=positions_from_mask(prompt_mask),
                use_cache=True, logits_to_keep=last_positions(1, prompt_length, device), **{cache_key: cache})
    cache = returned_cache(out)
    rows = torch.repeat_interleave(torch.arange(len(prompts), device=device), torch.tensor(copies, device=device))
    select_rows(cache, rows)
    logits = out.logits[rows, -1]
    total = len(rows)
    attention = torch.ones((total, prompt_length + steps), dtype=torch.long, device=device)
    attention[:, :prompt_length] = prompt_mask[rows]
    position = prompt_mask[rows].sum(dim=1)  # the next token's position id

    # Decode: results land in device tensors indexed by original row; `active` maps batch rows to them.
    tokens = torch.full((total, steps), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((total, steps), dtype=torch.float32, device=device)
    lengths = torch.full((total,), steps, dtype=torch.long, device=device)
    finished = torch.zeros(total, dtype=torch.bool, device=device)
    active = torch.arange(total, device=device)
    running = torch.ones(total, dtype=torch.bool, device=device)  # per batch row: no EOS yet
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    if uniforms is not None:
        uniforms = uniforms.to(device)
    for step in range(steps):
        token, logprob = sample_next(logits, params, None if uniforms is None else uniforms[active, step])
        tokens[active, step] = token
        logprobs[active, step] = logprob
        ended = running & torch.isin(token, eos_ids)
        lengths[active] = torch.where(ended, step + 1, lengths[active])
        finished[active] = finished[active] | ended
        running = running & ~ended
        if step == steps - 1:
            break
        if (step + 1) % check_every == 0:  # the only host read of the loop
            keep = running.nonzero().squeeze(-1)
            if len(keep) == 0:
                break
            if len(keep) < len(active):
                select_rows(cache, keep)
                active, token, running, position, attention = active[keep], token[keep], running[keep], position[keep], attention[keep]
        out = model(input_ids=token.unsqueeze(1), attention_mask=attention[:, : prompt_length + step + 1],
                    position_ids=position.unsqueeze(1), use_cache=True, **{cache_key: cache})
        logits = out.logits[:, -1]
        position = position + 1
    token_rows, logprob_rows, length_list = tokens.tolist(), logprobs.tolist(), lengths.tolist()
    return ([row[:n] for row, n in zip(token_rows, length_list)], [row[:n] for row, n in zip(logprob_rows, length_list)],
            finished.tolist())

"""The model's side of the server: rows of several requests in one forward pass.

Only the batcher's worker thread calls `ModelRunner.run`, so the model is never used by two threads at once; it never
touches the tokenizer (requests decode in asgi.py's thread pool), so the worker and the tokenizer's lock never wait on
each other.

- Scoring (prompt log-probs) packs the rows one after another into one sequence, no padding: the linear layers run
  as one matrix product over all the rows' tokens, position ids restart at 0 in each row, and attention runs row by
  row on exactly that row's keys (segment_attention), the call the row makes alone. Right padding would instead change
  the attention kernel's summation order with the batch's longest row. What is left is the matrix kernels' rounding,
  which may depend on where a row sits in the product: on the test's tiny model a row's scores are bit for bit those
  it gets alone; on SmolLM2-135M in fp32 they differ by up to ~5e-5 in a log-prob (--max-batch-rows 1 for bit-exact
  repeats). A pass holds at least MIN_PACK tokens (a filler row tops it up): below that, CPU matrix products switch
  kernels and a short row alone would round differently from the same row in a batch.
- Generation is left-padded by the project's sampler loop (rollout.hf.sample_batch), so every row's next token is at
  the same position; each row draws from its own random stream (its request's seed, or fresh numbers without one).
  Padding changes rounding there (not the tokens, short of an exact near-tie): greedy and seeded answers are those
  of the row alone. The loop stops at its next model call once the batcher says no row is wanted any more (a forward
  pre-hook raises Abandoned), so a client that leaves a long generation frees the model within one decode step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from ..logprobs import top_k_logprobs
from ..rollout import row_uniforms, sample_batch
from .batching import SCORE_CHUNK, Abandoned, Generated, GenerateJob, Job, ScoreJob, Scored

SEGMENTS = "opdistill_segments"
MIN_PACK = 16  # tokens: on the 2-core Xeon, a linear layer's kernel for fewer rows than this rounds otherwise


def segment_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                      segments: list[int] | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each of `segments` (row lengths, in order) of a packed (1, heads, tokens, dim) batch: SDPA
    on a contiguous copy of the row's own slice, the very call the row makes alone. The mask built for the packed
    sequence is not needed: a row sees only itself."""
    if segments is None:
        raise RuntimeError("segment_attention needs the packed rows' lengths (segments=...)")
    outputs, start = [], 0
    for length in segments:
        row = [t[:, :, start:start + length].contiguous() for t in (query, key, value)]
        outputs.append(sdpa_attention_forward(module, *row, None, is_causal=True, **kwargs)[0])  # (1, length, heads, dim)
        start += length
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(SEGMENTS, segment_attention)
AttentionMaskInterface.register(SEGMENTS, sdpa_mask)  # built by the model, then unused


class ModelRunner:
    """A frozen causal LM and the sampler's model, run on batches of jobs that share a `key`."""

    def __init__(self, model: Any, sampler: Any, pad_id: int | None, eos: set[int], vocab: int) -> None:
        self.model, self.sampler, self.eos = model, sampler, eos
        self.pad_id = pad_id if pad_id is not None else 0  # fills pads and filler rows, never read: any id does
        self.device = next(model.parameters()).device
        self.split_head = self._head_splits(vocab)
        self.packs = self._packing_works(vocab)

    def _head_splits(self, vocab: int) -> bool:
        """Whether the model's logits are its output layer applied to its backbone's last hidden state (most causal LMs):
        then a prompt is scored with one backbone pass and the head applied a chunk of positions at a time, so memory
        does not grow with prompt length x vocabulary. A model that changes its logits after the head (soft-capping,
        scaling) fails this check on a short probe and is scored whole."""
        backbone, head = getattr(self.model, "base_model", None), self.model.get_output_embeddings()
        if backbone is None or backbone is self.model or head is None:
            return False
        probe = torch.arange(1, min(9, vocab), device=self.device).unsqueeze(0)
        try:
            with torch.inference_mode():
                whole = self.model(input_ids=probe).logits[0].float()
                split = head(backbone(input_ids=probe).last_hidden_state[0]).float()
        except Exception:  # noqa: BLE001 - any failure means: score the plain way
            return False
        return split.shape == whole.shape and torch.allclose(split, whole, rtol=1e-3, atol=1e-3)

    def _packing_works(self, vocab: int) -> bool:
        """Whether this model passes `segments` down to its attention (transformers' own Llama, Qwen2, ... do): two probe
        rows packed must score as each alone. Else every row gets a pass of its own (correct, only not batched)."""
        # Rows of MIN_PACK tokens or more, so the model's own call on each runs the same matrix kernels as the pass.
        rows = [[1 + (i * step) % (vocab - 1) for i in range(MIN_PACK + extra)] for step, extra in ((1, 4), (3, 9))]
        try:
            packed = self._states(rows, packed=True)
            alone = [self._states([row], packed=False)[0] for row in rows]
        except Exception:  # noqa: BLE001 - a model that refuses the packed call is scored a row at a time
            return False
        return all(torch.allclose(p, a, rtol=1e-4, atol=1e-4) for p, a in zip(packed, alone))

    @contextmanager
    def _segments(self) -> Iterator[None]:
        """The model attends with segment_attention for one scoring pass; generation keeps its own attention."""
        config = self.model.config
        previous, config._attn_implementation = config._attn_implementation, SEGMENTS
        try:
            yield
        finally:
            config._attn_implementation = previous

    @torch.inference_mode()
    def _states(self, rows: list[list[int]], packed: bool) -> list[torch.Tensor]:
        """Each row's last hidden states (split head) or logits: `packed`, from one pass topped up to MIN_PACK tokens;
        else from the model's own call on the one row."""
        call = self.model.base_model if self.split_head else self.model
        if packed:
            lengths = [len(r) for r in rows]
            filler = max(0, MIN_PACK - sum(lengths))
            tokens = torch.tensor([t for r in rows for t in r] + [self.pad_id] * filler, device=self.device)
            lengths += [filler] if filler else []
            positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
            with self._segments():
                out = call(input_ids=tokens[None], position_ids=positions[None], segments=lengths)
        else:
            (row,) = rows
            out, lengths = call(input_ids=torch.tensor([row], device=self.device)), [len(row)]
        states = (out.last_hidden_state if self.split_head else out.logits)[0]
        return list(states.split(lengths)[:len(rows)])

    def run(self, jobs: list[Job], abandoned: Callable[[], bool] = lambda: False) -> list[Scored] | list[Generated]:
        """The answers of `jobs` (all of one key), in order. A scoring pass is one model call, so only generation asks
        `abandoned` (before each of its calls)."""
        if isinstance(jobs[0], ScoreJob):
            return self.score([j for j in jobs if isinstance(j, ScoreJob)])
        return self.generate([j for j in jobs if isinstance(j, GenerateJob)], abandoned)

    @torch.inference_mode()
    def score(self, jobs: list[ScoreJob]) -> list[Scored]:
        """Every row's prompt log-probs from one packed pass. Full-vocabulary logits exist for SCORE_CHUNK positions of one
        row at a time (see _head_splits): the batch costs its hidden states plus one chunk, not tokens x vocabulary."""
        if not self.packs and len(jobs) > 1:
            return [self.score([job])[0] for job in jobs]
        states = self._states([job.ids for job in jobs], packed=self.packs)
        head = self.model.get_output_embeddings() if self.split_head else None
        return [self._score_row(job, state, head) for job, state in zip(jobs, states)]

    def _score_row(self, job: ScoreJob, state: torch.Tensor, head: Any) -> Scored:
        """One row's answer from its hidden states (through `head`, a chunk of positions at a time) or its logits."""
        logits_of = (lambda start, end: head(state[start:end])) if head is not None else (lambda start, end: state[start:end])
        tokens, length = torch.tensor(job.ids, device=self.device), len(job.ids)
        columns: list[list[Any]] = [[], [], [], [], []]
        for start in range(0, length - 1, SCORE_CHUNK):  # positions start.. predict tokens start + 1..
            end = min(start + SCORE_CHUNK, length - 1)
            top = top_k_logprobs(logits_of(start, end), tokens[start + 1:end + 1], job.k, chunk_rows=SCORE_CHUNK)
            for column, values in zip(columns, top):
                column.extend(values.tolist())  # one host read per tensor, not one per entry
        last = logits_of(length - 1, length)[0].clone() if job.keep_last else None
        return Scored(*columns, last=last)

    def generate(self, jobs: list[GenerateJob], abandoned: Callable[[], bool] = lambda: False) -> list[Generated]:
        """Every row continued by one left-padded decode loop; a row's draws are its own (see the module's note)."""
        params = jobs[0].params
        uniforms = None
        if params.temperature > 0:  # greedy reads no random numbers
            # A seed's stream is the one the sampler gives that seed alone (sample index 0), whatever the batch.
            uniforms = torch.stack([torch.rand(params.max_new_tokens) if j.seed is None
                                    else row_uniforms([j.seed], [0], params.max_new_tokens)[0] for j in jobs])

        def stop_if_abandoned(module: Any, args: Any) -> None:  # before the prefill and every decode step
            if abandoned():
                raise Abandoned()

        # A hook, not a flag inside the loop: the project's sampler loop (rollout.hf) stays the one every method uses.
        hook = self.sampler.policy.register_forward_pre_hook(stop_if_abandoned)
        try:
            tokens, _, finished = sample_batch(self.sampler.policy, [j.ids for j in jobs], [1] * len(jobs), params, self.pad_id,
                                               self.eos, uniforms, check_every=self.sampler.check_every,
                                               preallocate=self.sampler.preallocate)
        finally:
            hook.remove()
        return [Generated(t, f) for t, f in zip(tokens, finished)]

"""The sampler seam: every caller that needs samples from a local policy (GAD, OPD, evaluation, the local
text teacher, the local judge) asks a `Sampler`, never a model directly.

A sampler is built once (`rollout.make_sampler`) from the run's `rollout_engine` and precision, so the
precision of rollouts is decided in one place. The engine calls `sync(model)` after every optimizer step,
so an engine that samples from its own copy of the weights (a bf16 copy, vLLM) samples the current policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..sampling import SamplingParams

Skip = Callable[[int, int], bool]  # skip(prompt_index, sample_index): already have it (a resumed collection)


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    response_ids: list[int]  # up to and including EOS when the model stopped
    text: str
    finished: bool  # True when EOS was produced within max_new_tokens
    logprobs: list[float]  # log-prob of each response token under the sampling policy at `temperature`


class Sampler(ABC):
    """Draws n samples per prompt from a policy; one engine behind each implementation."""

    name: str = "sampler"
    why: str = ""  # why this engine runs (rollout.choose_engine), for the caller's log

    @abstractmethod
    def iter_batches(self, prompts: list[list[int]], params: SamplingParams, *, n: int = 1,
                     seeds: list[int] | None = None, skip: Skip | None = None) -> Iterator[list[Sample]]:
        """Yield the samples of each finished batch as soon as it is done (callers commit them durably).

        `seeds` (one per prompt) fixes every sample's random stream by (prompt seed, sample index), so a
        sample does not depend on the batch, process or world size it ran in; without seeds the engine's
        default randomness is used. `skip` leaves out samples the caller already has.
        """

    def sample(self, prompts: list[list[int]], params: SamplingParams, *, n: int = 1,
               seeds: list[int] | None = None) -> list[Sample]:
        """All n samples of every prompt, prompt-major (index p * n + s), whatever order the batches ran in."""
        by_job = {(s.prompt_index, s.sample_index): s
                  for batch in self.iter_batches(prompts, params, n=n, seeds=seeds) for s in batch}
        return [by_job[(p, s)] for p in range(len(prompts)) for s in range(n)]

    def sync(self, model: Any) -> None:
        """Make the sampling policy equal to `model`'s current weights (after an optimizer step or a resume)."""

    def close(self) -> None:
        """Free what the engine holds (a copy of the weights, a vLLM instance)."""


def pack_jobs(prompts: list[list[int]], n: int, batch_size: int, skip: Skip | None) -> list[list[tuple[int, list[int]]]]:
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


def eos_token_ids(tokenizer: Any, generation_config: Any) -> set[int]:
    """Every token that ends a response: the tokenizer's EOS and the model's generation_config EOS ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(configured)
    return {i for i in ids if i is not None}

"""The one rollout type every on-policy method trains on: a step's responses, n per prompt, with where each came from.

GAD, OPD, CoD and SPD all sample through `sample_rollouts` (or, for OPD's off-policy steps, wrap the data's own
responses with `data_rollouts`) and turn the result into training micro-batches with `Rollouts.micro_batches`, so
sampling, seeding and collation are written once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Example, chunks, collate
from ..sampling import SamplingParams
from .base import Sampler
from .schedules import rollout_seeds


@dataclass
class Rollouts:
    """`n` responses for each of a step's prompts, prompt-major: response j answers prompts[j // n], data row
    indices[j // n]."""

    indices: list[int]  # the data row of each prompt
    prompts: list[list[int]]  # each prompt's token ids, as sampled
    responses: list[list[int]]  # each response's token ids, up to and including EOS when it ended
    finished: list[bool]  # True where the response ended with EOS, False where the length limit cut it
    logprobs: list[list[float]]  # the sampling policy's log-prob of each response token ([] per row for data responses)
    n: int = 1

    def __post_init__(self) -> None:
        if not (len(self.responses) == len(self.finished) == len(self.logprobs) == len(self.prompts) * self.n == len(self.indices) * self.n):
            raise ValueError(f"rollouts of {len(self.prompts)} prompts x n={self.n} need as many responses, finished flags and "
                             f"log-prob rows, got {len(self.responses)}, {len(self.finished)} and {len(self.logprobs)}")

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def rows(self) -> list[int]:
        """The data row of each response."""
        return [index for index in self.indices for _ in range(self.n)]

    @property
    def examples(self) -> list[Example]:
        """(prompt, response) of each response, in order."""
        return [Example(self.prompts[j // self.n], response) for j, response in enumerate(self.responses)]

    @property
    def lengths(self) -> list[int]:
        return [len(response) for response in self.responses]

    @property
    def mean_length(self) -> float:
        return sum(self.lengths) / len(self.responses)

    @property
    def truncated(self) -> float:
        """The share of responses cut by the length limit (no EOS)."""
        return sum(not done for done in self.finished) / len(self.finished)

    def finished_mask(self) -> torch.Tensor:
        """1.0 where a response ended, 0.0 where it was cut, as a float tensor (one entry per response)."""
        return torch.tensor([float(done) for done in self.finished])

    def micro_batches(self, size: int, pad_id: int, finished_only: bool = False) -> list[dict[str, torch.Tensor]]:
        """The responses collated `size` at a time with their prompts, responses aligned at one index (only response
        positions then reach the LM head: logprobs.response_logits); `rollout` holds each sequence's index among the
        responses (not its data row: `rows`), so a loss can look up what was scored for it. `finished_only` zeroes the
        loss mask of the responses that were cut: they stay in the batch (every process keeps its micro-batch count)
        but add no loss token."""
        examples, finished = self.examples, self.finished_mask()
        batches = []
        for group in chunks(list(range(len(examples))), size):
            batch = {**collate([examples[j] for j in group], pad_id, align_responses=True), "rollout": torch.tensor(group)}
            if finished_only:
                batch["loss_mask"] = batch["loss_mask"] * finished[group].to(batch["loss_mask"].dtype)[:, None]
            batches.append(batch)
        return batches


def sample_rollouts(sampler: Sampler, prompts: list[list[int]], indices: list[int], params: SamplingParams, *, seed: int, step: int,
                    n: int = 1) -> Rollouts:
    """`n` samples for each of the prompts at `indices` (rows of `prompts`), each with its own seeded random stream (by
    run seed, step and data row), so a sample does not depend on the batch, the process or a resume."""
    chosen = [prompts[i] for i in indices]
    samples = sampler.sample(chosen, params, n=n, seeds=rollout_seeds(seed, step, indices))
    return Rollouts(list(indices), chosen, [s.response_ids for s in samples], [s.finished for s in samples],
                    [s.logprobs for s in samples], n)


def data_rollouts(prompts: list[list[int]], indices: list[int], responses: list[list[int]], finished: list[bool]) -> Rollouts:
    """Responses that were not sampled (a dataset's, in an off-policy step) in the same form, one per prompt."""
    return Rollouts(list(indices), [prompts[i] for i in indices], responses, finished, [[] for _ in responses])

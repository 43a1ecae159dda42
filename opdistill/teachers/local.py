"""A local causal LM as a text teacher (batched generation, optional privileged system prompt)."""

from __future__ import annotations

from typing import Callable, Iterator

from ..data import Record, render_prompt
from ..models import load_tokenizer
from ..rollout import Sample, SamplingParams, generation_sampler


class LocalTextTeacher:
    """Generates responses with a local model through the generation seam (rollout.generation_sampler: vLLM or hf,
    `engine`). `system` (if given) is seen by the teacher only. `new_tokens`: the job's size, for engine auto."""

    def __init__(self, name: str, *, system: str = "", precision: str = "auto", batch_size: int = 16, engine: str = "auto",
                 new_tokens: int = 0, seed: int = 0, chat_template: str = "", trust_remote_code: bool = False) -> None:
        self.name = name
        self.system = system
        self.tokenizer = load_tokenizer(name, chat_template=chat_template, trust_remote_code=trust_remote_code)
        # A frozen model is loaded in the precision it samples in: no fp32 copy is kept beside it.
        self.sampler = generation_sampler(name, self.tokenizer, engine=engine, precision=precision, batch_size=batch_size,
                                          new_tokens=new_tokens, seed=seed, trust_remote_code=trust_remote_code)

    def prompts(self, records: list[Record]) -> list[list[int]]:
        return [render_prompt(self.tokenizer, r.with_system(self.system)) for r in records]

    def generate(self, records: list[Record], params: SamplingParams, n: int, skip: Callable[[int, int], bool] | None = None,
                 seeds: list[int] | None = None) -> Iterator[list[Sample]]:
        yield from self.sampler.iter_batches(self.prompts(records), params, n=n, seeds=seeds, skip=skip)

    def close(self) -> None:
        self.sampler.close()

"""A local causal LM as a text teacher (batched generation, optional privileged system prompt)."""

from __future__ import annotations

from typing import Callable, Iterator

from ..data import Record, render_prompt
from ..models import compute_dtype, default_device, load_model, load_tokenizer
from ..rollout import Sample, SamplingParams, make_sampler


class LocalTextTeacher:
    """Generates responses with a local model (bf16 under bf16 precision). `system` (if given) is seen by the teacher only."""

    def __init__(self, name: str, *, system: str = "", precision: str = "auto", batch_size: int = 16,
                 chat_template: str = "", trust_remote_code: bool = False) -> None:
        self.name = name
        self.system = system
        self.tokenizer = load_tokenizer(name, chat_template=chat_template, trust_remote_code=trust_remote_code)
        # A frozen model is loaded in the precision it samples in: no fp32 copy is kept beside it.
        model = load_model(name, dtype=compute_dtype(precision), trust_remote_code=trust_remote_code).to(default_device())
        self.sampler = make_sampler("hf", model, self.tokenizer, precision=precision, batch_size=batch_size, owns_model=True)

    def generate(self, records: list[Record], params: SamplingParams, n: int,
                 skip: Callable[[int, int], bool] | None = None) -> Iterator[list[Sample]]:
        prompts = [render_prompt(self.tokenizer, r.with_system(self.system)) for r in records]
        yield from self.sampler.iter_batches(prompts, params, n=n, skip=skip)

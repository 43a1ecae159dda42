"""A local causal LM as a text teacher (batched generation, optional privileged system prompt)."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..data import Record, render_prompt
from ..models import load_model, load_tokenizer, resolve_precision
from ..rollout import Sample, SamplingParams, iter_samples


class LocalTextTeacher:
    """Generates responses with a local model. `system` (if given) is seen by the teacher only."""

    def __init__(self, name: str, *, system: str = "", precision: str = "auto", batch_size: int = 16,
                 chat_template: str = "", trust_remote_code: bool = False) -> None:
        self.name = name
        self.system = system
        self.bf16 = resolve_precision(precision) == "bf16"
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(name, chat_template=chat_template, trust_remote_code=trust_remote_code)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(name, trust_remote_code=trust_remote_code).to(device)

    def generate(self, records: list[Record], params: SamplingParams, n: int,
                 skip: Callable[[int, int], bool] | None = None) -> Iterator[list[Sample]]:
        prompts = [render_prompt(self.tokenizer, r.with_system(self.system)) for r in records]
        yield from iter_samples(self.model, self.tokenizer, prompts, params, n=n,
                                batch_size=self.batch_size, bf16=self.bf16, skip=skip)

"""SeqKD (Kim & Rush, "Sequence-Level Knowledge Distillation", arXiv 1606.07947): cross-entropy on teacher responses,
loss on response tokens only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import RunConfig, opt
from ..data import chunks, collate, data_order, load_records, tokenize_records, total_steps_for
from ..engine import Engine
from .common import Method, response_nll_sum, response_tokens


@dataclass
class SeqKDConfig(RunConfig):
    """SeqKD (Kim & Rush, arXiv 1606.07947): cross-entropy on teacher responses, loss on response tokens only.

    Reference defaults from the SeqKD baseline of the GAD paper (Ye et al., "Black-Box On-Policy Distillation of Large
    Language Models", arXiv 2511.10643): 4 epochs, lr 5e-6.
    """

    method: str = opt("seqkd", "Training method.")

    def validate(self) -> None:
        super().validate()
        self.require_whole_micro_batches()


class SeqKD(Method):
    """Supervised distillation on teacher text; the engine does everything but the loss."""

    def __init__(self, config: SeqKDConfig, tokenizer: Any) -> None:
        self.config = config
        self.pad_id = tokenizer.pad_token_id
        records = load_records(config.data, require_response=True)
        self.examples, report = tokenize_records(tokenizer, records, config.max_prompt_tokens, config.max_response_tokens,
                                                 config.overlong, config.unfinished)
        print(f"train: data {config.data}: {report.summary()}")
        self.order = data_order(config, len(self.examples))
        self.total_steps = total_steps_for(config, self.order.steps_per_epoch)
        self.load_eval_examples(config, tokenizer)

    def micro_batches(self, engine: Engine, step: int) -> list[dict[str, torch.Tensor]]:
        picked = [self.examples[i] for i in self.order.indices(step, engine.rank, engine.world_size)]
        return [collate(group, self.pad_id) for group in chunks(picked, self.config.micro_batch_size)]

    def step(self, engine: Engine, step: int) -> dict[str, float]:
        engine.model.train()
        batches = self.micro_batches(engine, step)
        mean = engine.backward_token_mean(batches, response_nll_sum, response_tokens)
        return {"loss": mean.loss, **engine.optimizer_step(), "tokens": mean.tokens}

"""SeqKD (SPEC §1): cross-entropy on teacher responses, loss on response tokens only."""

from __future__ import annotations

from typing import Any

import torch

from ..config import RunConfig
from ..data import Example, collate, load_records, tokenize_records
from ..engine import Engine, chunks, data_order, total_steps_for
from ..rollout.scoring import response_logprobs


def response_nll_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token NLL over response positions (loss_mask marks response tokens); only those positions
    reach the cross-entropy (and, for a batch collated with align_responses, the LM head)."""
    return -response_logprobs(model, batch).sum()


def response_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["loss_mask"][:, 1:].sum())


class SeqKD:
    """Supervised distillation on teacher text; the engine does everything but the loss."""

    def __init__(self, config: RunConfig, tokenizer: Any) -> None:
        self.config = config
        self.pad_id = tokenizer.pad_token_id
        records = load_records(config.data, require_response=True)
        self.examples, report = tokenize_records(tokenizer, records, config.max_prompt_tokens, config.max_response_tokens, config.overlong)
        print(f"train: data {config.data}: {report.summary()}")
        self.order = data_order(config, len(self.examples))
        self.total_steps = total_steps_for(config, self.order.steps_per_epoch)
        self.eval_examples: list[Example] = []
        if config.eval_data:
            eval_records = load_records(config.eval_data, require_response=True)
            self.eval_examples, _ = tokenize_records(tokenizer, eval_records, config.max_prompt_tokens, config.max_response_tokens, config.overlong)

    def micro_batches(self, engine: Engine, step: int) -> list[dict[str, torch.Tensor]]:
        picked = [self.examples[i] for i in self.order.indices(step, engine.rank, engine.world_size)]
        return [collate(group, self.pad_id) for group in chunks(picked, self.config.micro_batch_size)]

    def step(self, engine: Engine, step: int) -> dict[str, float]:
        engine.model.train()
        batches = self.micro_batches(engine, step)
        loss = engine.backward_token_mean(batches, response_nll_sum, response_tokens)
        return {"loss": loss, **engine.optimizer_step(), "tokens": engine.global_sum(sum(map(response_tokens, batches)))}

    @torch.no_grad()
    def evaluate(self, engine: Engine) -> dict[str, float]:
        """Mean response-token NLL of the held-out teacher responses."""
        if not self.eval_examples:
            return {}
        engine.model.eval()
        total, count = 0.0, 0
        for group in chunks(self.eval_examples[engine.rank :: engine.world_size], self.config.micro_batch_size):
            batch = {k: v.to(engine.accelerator.device) for k, v in collate(group, self.pad_id).items()}
            with engine.accelerator.autocast():
                total += float(response_nll_sum(engine.model, batch))
            count += response_tokens(batch)
        return {"nll": engine.global_sum(total) / max(1.0, engine.global_sum(count))}

"""What every training method shares: the `Method` base class (hooks that do nothing unless a method needs
them), the response-token loss helpers, and the held-out response NLL that `eval_data` asks for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..data import Example, collated, load_records, tokenize_records
from ..logprobs import response_logprobs

if TYPE_CHECKING:
    from ..engine import Engine


def response_nll_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token NLL over response positions (loss_mask marks response tokens); only those positions
    reach the cross-entropy (and, for a batch collated with align_responses, the LM head)."""
    return -response_logprobs(model, batch).sum()


def response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Loss tokens of a collated micro-batch: its response tokens."""
    return int(batch["loss_mask"][:, 1:].sum())


class Method:
    """The base of every training method: the hooks of `engine.Method` (the contract, stated there once), each doing
    nothing by default. A subclass sets `total_steps` and implements `step`; `evaluate` reports the held-out response NLL
    of `eval_data` when the config has it (`held_out_nll`)."""

    total_steps: int = 0
    progress_metrics: tuple[str, ...] = ("loss",)  # shown beside the progress bar
    config: Any
    pad_id: int
    eval_examples: list[Example] = []

    def setup(self, engine: "Engine") -> None:
        pass

    def on_resume(self, engine: "Engine") -> None:
        pass

    def step(self, engine: "Engine", step: int) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, engine: "Engine") -> dict[str, float]:
        return held_out_nll(engine, self.eval_examples, self.pad_id, self.config.micro_batch_size)

    def save_outputs(self, engine: "Engine") -> dict[str, str]:
        return {}

    def load_eval_examples(self, config: Any, tokenizer: Any) -> None:
        """Tokenise `eval_data` (records with responses) for `evaluate`."""
        self.pad_id = tokenizer.pad_token_id
        if config.eval_data:
            records = load_records(config.eval_data, require_response=True)
            self.eval_examples, _ = tokenize_records(tokenizer, records, config.max_prompt_tokens, config.max_response_tokens,
                                                     config.overlong, config.unfinished)


@torch.no_grad()
def held_out_nll(engine: "Engine", examples: list[Example], pad_id: int, micro_batch_size: int) -> dict[str, float]:
    """Mean response-token NLL of held-out teacher responses under the student, over all processes."""
    if not examples:
        return {}
    engine.model.eval()
    total, count = 0.0, 0
    for batch in collated(examples[engine.rank :: engine.world_size], micro_batch_size, pad_id, engine.accelerator.device):
        with engine.accelerator.autocast():
            total += float(response_nll_sum(engine.model, batch))
        count += response_tokens(batch)
    return {"nll": engine.global_sum(total) / max(1.0, engine.global_sum(count))}

"""Generate responses from a model for a list of records (batched)."""

from __future__ import annotations

from typing import Any

import torch

from ..data import Record, render_prompt
from ..models import load_model, load_tokenizer, resolve_precision
from ..rollout import SamplingParams, samples_in_order


def generate_texts(model_name: str, records: list[Record], params: SamplingParams, *, system: str = "",
                   batch_size: int = 16, precision: str = "auto", seed: int = 0, model: Any = None, tokenizer: Any = None) -> list[str]:
    """One response per record, in record order; `system` (if given) is put first in each system prompt."""
    tokenizer = tokenizer or load_tokenizer(model_name)
    model = model or load_model(model_name)
    torch.manual_seed(seed)
    prompts = [render_prompt(tokenizer, r.with_system(system)) for r in records]
    samples = samples_in_order(model, tokenizer, prompts, params, batch_size=batch_size, bf16=resolve_precision(precision) == "bf16")
    return [s.text for s in samples]

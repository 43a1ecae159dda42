"""Training methods, one file each (its config dataclass and its Method), listed in opdistill/registry.py;
`train(config)` runs any of them on the shared engine."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..check import preflight
from ..config import RunConfig
from ..engine import Engine
from ..masks import apply_train_mask
from ..models import apply_lora, load_model, load_tokenizer
from ..registry import METHODS


def load_student(config: RunConfig, name: str = "") -> Any:
    """A model to train (the student, or `name`: cod's second peer) with the run's gradient checkpointing and LoRA."""
    model = load_model(name or config.student, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if config.lora_r:
        model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    return model


def train(config: RunConfig) -> dict[str, Any]:
    """Train a student with config.method; returns the run summary (also in out_dir/summary.json)."""
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.student, chat_template=config.chat_template, trust_remote_code=config.trust_remote_code)
    report = preflight(config, tokenizer)  # tokenizers and configs only: seconds, before any weights load
    report.raise_if_failed()
    if os.environ.get("RANK", "0") == "0":
        print(f"train: pre-flight check passed ({len(report.rows)} checks; `opdistill check` prints them)")
    method = METHODS[config.method].method()(config, tokenizer)  # reads and checks the data before the (slow) model load
    model = load_student(config)
    if config.train_mask:  # sparse-subnetwork training: gradient only on the mask's coordinates (masks.py)
        apply_train_mask(model, config.train_mask, seed=config.seed)
    engine = Engine(config, model, tokenizer, method.total_steps)
    return engine.fit(method)

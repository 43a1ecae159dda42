"""What each section of benchmarks/gpu_check.py does, in its own process, and the machinery to run it so.

- Model shapes built from their configs with random weights and a local byte-level BPE tokenizer whose
  vocabulary is padded with filler tokens to the model's size: nothing is downloaded.
- `run_isolated`: a section runs in a child process, so its crash, hang or CUDA error stays its own and its
  peak memory is its own. The children are forked from a fork server that imported torch, transformers and
  opdistill once, so those imports (about 10 s of CPU each) are paid once instead of once per section
  (`choose_isolation`).
- The FSDP worker: `accelerate launch ... gpu_check_sections.py --fsdp-worker SPEC.json`.

The timed rows reuse benchmarks/opd_vs_trl.py (`run_opdistill`, `run_trl`, `peak_memory_mb`, `prompt_texts`)
so that the settings compared with TRL live in one place.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:  # opd_vs_trl is imported as a sibling module, also under accelerate launch
    sys.path.insert(0, str(HERE))
try:
    import opdistill  # noqa: F401
except ImportError:  # a checkout that is not pip-installed (a bare GPU machine): import it from the tree
    sys.path.insert(1, str(REPO))

Result = dict[str, Any]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINED_VOCAB = 512  # BPE merges learnt from the built-in prompts; the rest of the vocabulary is filler


@dataclass(frozen=True)
class Shape:
    """A model shape; `family` picks the transformers config class."""

    name: str
    family: str  # "llama" or "qwen2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


# The real shapes (SmolLM2-135M and Qwen2.5-0.5B configs) and, for --dry-run, tiny ones under the same names so
# that a dry run writes exactly the sections (keys) a GPU run writes.
SHAPES = (Shape("smollm2-135m", "llama", 576, 30, 9, 3, 1536, 49152), Shape("qwen2.5-0.5b", "qwen2", 896, 24, 14, 2, 4864, 151936))
# Head dimension 32 in the tiny SmolLM2 shape: the smallest vLLM's CPU attention has a kernel for (the vllm section).
TINY_SHAPES = (Shape("smollm2-135m", "llama", 128, 2, 4, 2, 256, 640), Shape("qwen2.5-0.5b", "qwen2", 64, 2, 4, 2, 128, 640))


@dataclass(frozen=True)
class Settings:
    """Step sizes of the timed rows (OPD and TRL share opd_vs_trl's knobs: prompts, new_tokens, steps)."""

    prompts: int = 8
    new_tokens: int = 64
    steps: int = 2  # timed steps per row; one more runs first as a warm-up
    gad_prompts: int = 4
    gad_samples: int = 4
    fsdp_steps: int = 3
    gradient_checkpointing: str = "on"  # TRL's default, so the OPD/TRL rows compare like with like
    precision: str = "bf16"
    dry_run: bool = False


DRY_SETTINGS = Settings(prompts=2, new_tokens=8, steps=1, gad_prompts=2, gad_samples=2, fsdp_steps=2, dry_run=True)


def opd_vs_trl_args(settings: Settings) -> argparse.Namespace:
    """The namespace opd_vs_trl's run_opdistill / run_trl read."""
    return argparse.Namespace(prompts=settings.prompts, steps=settings.steps, new_tokens=settings.new_tokens,
                              precision=settings.precision, gradient_checkpointing=settings.gradient_checkpointing)


# ---------------------------------------------------------------- models without downloads


def build_tokenizer(vocab_size: int, out: Path) -> Any:
    """A byte-level BPE trained on the built-in prompts (as tests/conftest.py does), its vocabulary padded with
    never-merged filler entries to exactly `vocab_size`, so the LM head has the real model's width."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from opdistill.data import builtin_prompts_path

    corpus = [json.loads(line)["prompt"] for line in builtin_prompts_path().read_text().splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=min(TRAINED_VOCAB, vocab_size), special_tokens=SPECIAL_TOKENS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    # Filler entries go into the BPE model's own vocabulary, not in as added tokens: transformers handles
    # 150k added tokens very slowly, and fillers without merges are never produced by encoding anyway.
    data = json.loads(bpe.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    index = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"<filler_{index}>", len(vocab))
        index += 1
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def build_model(shape: Shape, out: Path, seed: int = 0) -> int:
    """Save a randomly initialised model of `shape` with its tokenizer to `out`; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(shape.vocab, out)
    assert len(tokenizer) == shape.vocab, (len(tokenizer), shape.vocab)
    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate, tie_word_embeddings=True,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    if shape.family == "llama":  # SmolLM2-135M's remaining settings
        config, cls = LlamaConfig(**common, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0), LlamaForCausalLM
    else:  # Qwen2.5-0.5B's
        config, cls = Qwen2Config(**common, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0), Qwen2ForCausalLM
    torch.manual_seed(seed)
    # Initialised on the GPU where there is one (a 0.5B model's random init takes seconds there, longer on a CPU);
    # saved in fp32 like the checkpoints opd_vs_trl loads, so both sides start from fp32 masters.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def write_records(path: Path, count: int) -> Path:
    """`count` prompt/response records from the built-in prompts (the response is another prompt's text: GAD and
    SeqKD only need some teacher text, and random weights make its content irrelevant)."""
    from opd_vs_trl import prompt_texts

    from opdistill.data import write_jsonl

    texts = prompt_texts(count + 1)
    write_jsonl(path, ({"prompt": texts[i], "response": texts[i + 1]} for i in range(count)))
    return path


# ---------------------------------------------------------------- isolation


def tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def _child(target: Callable[[dict], Result], params: dict, result_file: str, log_file: str) -> None:
    """Runs in the forked child: output to the section's log, the result (or the error) to result_file."""
    log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        result = target(params)
        result.setdefault("status", "ok")
    except BaseException as err:  # noqa: BLE001 - the section's failure is its result, whatever it is
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(err).__name__}: {err}"[:1000]}
    Path(result_file).write_text(json.dumps(result, default=str))


_context: Any = None


def _probe_cuda(params: dict) -> Result:
    import torch

    torch.ones(1, device="cuda").add_(1)
    torch.cuda.synchronize()
    return {}


def choose_isolation(kind: str, expect_cuda: bool, log: Path) -> str:
    """Pick how sections run: "forkserver" (its server imports torch, transformers and opdistill once; it never
    touches CUDA, so its children can) or "spawn" (a fresh interpreter per section, imports paid each time).
    `auto` takes the fork server unless, on a GPU machine, a child forked from it cannot use CUDA (an import
    that initialised CUDA in the server would do that); then spawn. Returns what was chosen and why."""
    global _context
    if kind in ("forkserver", "auto"):
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["gpu_check_sections", "opd_vs_trl", "torch", "transformers", "accelerate",
                                         "opdistill.methods", "opdistill.rollout"])
        if kind == "forkserver" or not expect_cuda:
            return "forkserver"
        probe = run_isolated(_probe_cuda, {}, 300, log)
        if probe["status"] == "ok":
            return "forkserver (a forked child reached CUDA)"
        kind = f"spawn (a child of the fork server could not use CUDA: {probe.get('error', '')[:200]})"
    _context = multiprocessing.get_context("spawn")
    return kind


def run_isolated(target: Callable[[dict], Result], params: dict, timeout_s: float, log: Path) -> Result:
    """target(params) in a child process; its result dict, or status "error" if it failed, died or timed out."""
    result_file = log.with_suffix(".result.json")
    process = _context.Process(target=_child, args=(target, params, str(result_file), str(log)))
    process.start()
    process.join(timeout_s)
    if process.is_alive():
        process.kill()
        process.join()
        return {"status": "error", "error": f"timed out after {timeout_s:.0f} s", "log_tail": tail(log)}
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        if result.get("status") != "ok":
            result["log_tail"] = tail(log)
        return result
    return {"status": "error", "error": f"the child process exited with code {process.exitcode} without a result", "log_tail": tail(log)}


# ---------------------------------------------------------------- sections (each runs in a child)


def child_build(params: dict) -> Result:
    """Every shape's model and tokenizer, saved under params["work"]/models."""
    shapes = [Shape(**s) for s in params["shapes"]]
    models: dict[str, Any] = {}
    for shape in shapes:
        started = time.perf_counter()
        out = Path(params["work"]) / "models" / shape.name
        count = build_model(shape, out)
        models[shape.name] = {"dir": str(out), "parameters": count, "seconds": round(time.perf_counter() - started, 2), **asdict(shape)}
    return {"models": models}


def _check(fn: Callable[[], Result]) -> Result:
    """One sanity check: its numbers plus status ok, or status error with the exception."""
    try:
        return {"status": "ok", **fn()}
    except Exception as err:  # noqa: BLE001 - a failed check is recorded, the next one still runs
        traceback.print_exc()
        return {"status": "error", "error": f"{type(err).__name__}: {err}"[:1000]}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_backward_check(model: Any, tokenizer: Any, prompts: list[list[int]], device: Any) -> Result:
    """One bf16-autocast forward and backward over fp32 weights (how opdistill trains): finite loss and gradients."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
        mask[row, : len(prompt)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    _sync(device)
    seconds = time.perf_counter() - started
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    if not torch.isfinite(out.loss):
        raise AssertionError(f"loss is {out.loss.item()}")
    if out.logits.dtype != torch.bfloat16:
        raise AssertionError(f"logits are {out.logits.dtype} under bf16 autocast")
    if not grads or not all(torch.isfinite(g).all() for g in grads):
        raise AssertionError("missing or non-finite gradients")
    return {"loss": round(out.loss.item(), 4), "parameters_with_grad": len(grads), "seconds": round(seconds, 3)}


def sampler_check(model: Any, tokenizer: Any, prompts: list[list[int]], new_tokens: int) -> Result:
    """opdistill's hf sampler at bf16: sane lengths and log-probs, and the same seeds give the same tokens."""
    from opdistill.rollout import SamplingParams, make_sampler

    sampler = make_sampler("hf", model, tokenizer, precision="bf16", batch_size=2 * len(prompts))
    params, seeds = SamplingParams(temperature=1.0, max_new_tokens=new_tokens), [100 + i for i in range(len(prompts))]
    started = time.perf_counter()
    first = sampler.sample(prompts, params, n=2, seeds=seeds)
    seconds = time.perf_counter() - started
    again = sampler.sample(prompts, params, n=2, seeds=seeds)
    sampler.close()
    if len(first) != 2 * len(prompts):
        raise AssertionError(f"{len(first)} samples for {len(prompts)} prompts x 2")
    for sample in first:
        if not 1 <= len(sample.response_ids) <= new_tokens or len(sample.logprobs) != len(sample.response_ids):
            raise AssertionError(f"sample of {len(sample.response_ids)} tokens with {len(sample.logprobs)} log-probs")
        if not all(-1e9 < lp <= 1e-3 for lp in sample.logprobs):
            raise AssertionError("a log-prob is not finite and <= 0")
    same = [a.response_ids for a in first] == [b.response_ids for b in again]
    if not same:
        raise AssertionError("the same seeds gave different tokens")
    tokens = sum(len(s.response_ids) for s in first)
    return {"samples": len(first), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1), "same_seeds_same_tokens": same}


def divergence_check(device: Any, vocab: int, rows: int = 32) -> Result:
    """Every divergence kind (values and student gradients, plus one chunked case) on `device` equals the CPU's."""
    import torch

    from opdistill.objectives.divergences import KINDS, per_token

    torch.manual_seed(0)
    student, teacher = 3 * torch.randn(rows, vocab), 3 * torch.randn(rows, vocab)
    worst: dict[str, float] = {}
    failed = []
    for kind, chunk in [(kind, None) for kind in KINDS] + [("rkl", 8), ("jsd", 8)]:
        outputs = []
        for where in (torch.device("cpu"), device):
            # A fresh leaf each time: on the CPU `.to` returns `student` itself, whose gradient would then build up
            # over the kinds (and be the very tensor the CPU side is compared with in a dry run).
            s = student.to(where, copy=True).requires_grad_(True)
            value = per_token(s, teacher.to(where), kind, chunk_size=chunk)
            value.sum().backward()
            outputs.append((value.detach().cpu(), s.grad.cpu()))
        (v_cpu, g_cpu), (v_dev, g_dev) = outputs
        name = kind if chunk is None else f"{kind}_chunked"
        worst[name] = max((v_cpu - v_dev).abs().max().item(), (g_cpu - g_dev).abs().max().item())
        if not (torch.allclose(v_cpu, v_dev, rtol=1e-4, atol=1e-5) and torch.allclose(g_cpu, g_dev, rtol=1e-4, atol=1e-6)):
            failed.append(name)
    if failed:
        raise AssertionError(f"{device} differs from the CPU for {failed}: max abs differences {worst}")
    return {"device": str(device), "max_abs_difference": worst}


def child_cuda_sanity(params: dict) -> Result:
    """The built-in CUDA sanity set on the SmolLM2 shape (on the CPU in a dry run)."""
    import torch
    from opd_vs_trl import peak_memory_mb, prompt_texts

    from opdistill.data import render_prompt
    from opdistill.models import load_model, load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = params["model_dir"]
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir).to(device)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": text}]) for text in prompt_texts(4)]
    checks = {"bf16_forward_backward": _check(lambda: forward_backward_check(model, tokenizer, prompts, device)),
              "hf_sampler": _check(lambda: sampler_check(model, tokenizer, prompts, params["new_tokens"])),
              "divergences_vs_cpu": _check(lambda: divergence_check(device, model.config.vocab_size))}
    failed = [name for name, check in checks.items() if check["status"] != "ok"]
    return {"status": "error" if failed else "ok", "device": str(device), "checks": checks, "peak_mem_mb": round(peak_memory_mb(), 1),
            **({"error": f"failed checks: {', '.join(failed)}"} if failed else {})}


def _timed_row(step_seconds: list[float], peak_mb: float, **extra: Any) -> Result:
    if not step_seconds:
        raise AssertionError("no timed step was recorded")
    return {"step_seconds": [round(s, 4) for s in step_seconds], "step_s_median": round(statistics.median(step_seconds), 4),
            "peak_mem_mb": round(peak_mb, 1), **extra}


def child_opd(params: dict) -> Result:
    """An OPD step through opdistill's real training API (opd_vs_trl.run_opdistill: hf engine, rkl, teacher = a copy)."""
    from opd_vs_trl import run_opdistill

    with tempfile.TemporaryDirectory(dir=params["work"]) as work:
        result = run_opdistill(opd_vs_trl_args(Settings(**params["settings"])), params["model_dir"], Path(work))
    return _timed_row(result["step_seconds"], result["peak_mb"], completion_tokens=result["completion_tokens"])


def child_trl(params: dict) -> Result:
    """TRL's DistillationTrainer at the OPD row's settings (opd_vs_trl.run_trl)."""
    import trl
    from opd_vs_trl import run_trl

    with tempfile.TemporaryDirectory(dir=params["work"]) as work:
        result = run_trl(opd_vs_trl_args(Settings(**params["settings"])), params["model_dir"], Path(work))
    return _timed_row(result["step_seconds"], result["peak_mb"], completion_tokens=result["completion_tokens"], trl=trl.__version__)


def child_gad(params: dict) -> Result:
    """A GAD adversarial step (the discriminator a copy of the student; one warm-up step, discriminator alone).
    The first adversarial step is a warm-up and is not timed; peak memory covers the whole run."""
    from opd_vs_trl import peak_memory_mb

    from opdistill.config import load_config
    from opdistill.methods import train

    s = Settings(**params["settings"])
    sequences = s.gad_prompts * s.gad_samples
    with tempfile.TemporaryDirectory(dir=params["work"]) as work:
        out = Path(work) / "gad"
        values = {"method": "gad", "student": params["model_dir"], "data": params["data"], "out_dir": out,
                  "batch_size": s.gad_prompts, "n_samples": s.gad_samples, "micro_batch_size": sequences, "rollout_batch_size": sequences,
                  "max_response_tokens": s.new_tokens, "warmup_steps": 1, "d_only_steps": 1, "max_steps": s.steps + 1,
                  "lr": "1e-6", "d_lr": "1e-6", "precision": s.precision, "checkpoint_every": 0, "keep_checkpoints": 1,
                  "gradient_checkpointing": str(s.gradient_checkpointing == "on").lower()}
        train(load_config(None, [f"{k}={v}" for k, v in values.items()]))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    adversarial = [r for r in rows if r.get("stage") == 1 and "step_seconds" in r]
    return _timed_row([r["step_seconds"] for r in adversarial[1:]], peak_memory_mb(), sequences_per_step=sequences,
                      response_length=statistics.mean(r["response_length"] for r in adversarial) if adversarial else None)


def vllm_agreement(sampler: Any, model: Any, tokenizer: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """vLLM's log-probs of its own samples against `model`'s forward on the same tokens (temperature 1): mean, max."""
    import torch

    from opdistill.data import Example, collate
    from opdistill.logprobs import token_logprobs
    from opdistill.rollout import SamplingParams

    samples = sampler.sample(prompts, SamplingParams(1.0, 1.0, new_tokens), n=2, seeds=list(range(len(prompts))))
    batch = collate([Example(prompts[x.prompt_index], x.response_ids) for x in samples], tokenizer.pad_token_id)
    device = next(model.parameters()).device
    with torch.no_grad():
        mine = token_logprobs(model.eval(), {k: v.to(device) for k, v in batch.items()}).float().cpu()
    gaps = torch.cat([(mine[r, len(prompts[x.prompt_index]) - 1:][:len(x.response_ids)] - torch.tensor(x.logprobs)).abs()
                      for r, x in enumerate(samples)])
    return {"mean": round(gaps.mean().item(), 7), "max": round(gaps.max().item(), 7), "tokens": len(gaps)}


def child_vllm(params: dict) -> Result:
    """rollout_engine: vllm, colocated: the sync (one AdamW step, then vLLM's log-probs of its own samples must equal the
    trained model's forward, fp32: mean |d log p| under 1e-3), then an OPD step timed as the opd row is, with vLLM rollouts."""
    if importlib.util.find_spec("vllm") is None:
        return {"status": "not installed", "note": "vllm: not installed"}
    import torch
    from opd_vs_trl import prompt_texts, run_opdistill

    from opdistill.data import render_prompt
    from opdistill.models import default_device, load_model, load_tokenizer
    from opdistill.rollout import make_sampler

    s, model_dir = Settings(**params["settings"]), params["model_dir"]
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir).to(default_device())
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": text}]) for text in prompt_texts(4)]
    sampler = make_sampler("vllm", model, tokenizer, precision="fp32", model_path=model_dir, kv_cache_gib=0.25, max_model_len=512)
    try:
        before = vllm_agreement(sampler, model, tokenizer, prompts, s.new_tokens)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.tensor([prompts[0] * 4], device=next(model.parameters()).device)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        stale = vllm_agreement(sampler, model, tokenizer, prompts, s.new_tokens)
        sampler.sync(model)
        synced = vllm_agreement(sampler, model, tokenizer, prompts, s.new_tokens)
    finally:
        sampler.close()
    del model, optimizer
    args = opd_vs_trl_args(s)
    args.engine = "vllm"
    with tempfile.TemporaryDirectory(dir=params["work"]) as work:
        result = run_opdistill(args, model_dir, Path(work))
    ok = synced["mean"] < 1e-3 and stale["mean"] > synced["mean"]
    return {**_timed_row(result["step_seconds"], result["peak_mb"], completion_tokens=result["completion_tokens"]),
            "agreement_before_step": before, "agreement_after_step_unsynced": stale, "agreement_after_sync": synced,
            "status": "ok" if ok else "error", **({} if ok else {"error": "vLLM does not sample the trained weights after a sync"})}


# ---------------------------------------------------------------- FSDP (under accelerate launch)


def fsdp_accelerate_config(path: Path, precision: str) -> Path:
    """One process with FSDP2 (examples/accelerate/ has no FSDP config); layers wrapped per decoder block."""
    import yaml

    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_machines": 1, "num_processes": 1,
              "mixed_precision": "bf16" if precision == "bf16" else "no",
              "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_state_dict_type": "FULL_STATE_DICT",
                              "fsdp_reshard_after_forward": True, "fsdp_offload_params": False, "fsdp_cpu_ram_efficient_loading": False}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fsdp_worker(spec_path: Path) -> None:
    """Under accelerate launch: a few steps of each method in spec["methods"], each recorded separately."""
    import torch
    from opd_vs_trl import peak_memory_mb, run_opdistill

    from opdistill.config import load_config
    from opdistill.engine import Engine
    from opdistill.methods import train

    spec = json.loads(spec_path.read_text())
    s = Settings(**spec["settings"])
    seen: list[dict[str, str]] = []
    original_init = Engine.__init__

    def init_and_record(self: Engine, *args: Any, **kwargs: Any) -> None:
        # What accelerate made of the launch: FSDP or not, and the prepared model's class (FSDP2 renames it FSDP<cls>).
        original_init(self, *args, **kwargs)
        seen.append({"distributed_type": str(self.accelerator.distributed_type.value), "prepared_model": type(self.model).__name__,
                     "accelerate_use_fsdp": os.environ.get("ACCELERATE_USE_FSDP", "unset"), "fsdp_version": os.environ.get("FSDP_VERSION", "unset")})

    Engine.__init__ = init_and_record  # type: ignore[method-assign]
    results: dict[str, Result] = {}
    for method in spec["methods"]:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        out = Path(spec["work"]) / f"fsdp-{method}"
        out.mkdir(parents=True, exist_ok=True)
        run_dir = out / "opdistill" if method == "opd" else out  # run_opdistill trains into WORK/opdistill
        started = time.perf_counter()
        try:
            if method == "opd":
                run_opdistill(opd_vs_trl_args(s), spec["model_dir"], out)
            else:
                values = {"method": "seqkd", "student": spec["model_dir"], "data": spec["data"], "out_dir": out, "batch_size": s.prompts,
                          "micro_batch_size": s.prompts, "max_steps": s.fsdp_steps, "max_response_tokens": s.new_tokens, "lr": "1e-5",
                          "precision": s.precision, "checkpoint_every": 0, "keep_checkpoints": 1,
                          "gradient_checkpointing": str(s.gradient_checkpointing == "on").lower()}
                train(load_config(None, [f"{k}={v}" for k, v in values.items()]))
            launch = seen[-1] if seen else {}
            steps = sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "step_seconds" in line)
            result: Result = {"status": "ok", "steps": steps, **launch, "student_saved": (run_dir / "student" / "config.json").is_file()}
            # On a GPU the point is FSDP itself; on a CPU accelerate only runs an FSDP config as plain data parallelism.
            if torch.cuda.is_available() and launch.get("distributed_type") != "FSDP":
                result.update(status="error", error=f"accelerate did not turn FSDP on: {launch}")
        except Exception as err:  # noqa: BLE001 - recorded; the next method still runs
            traceback.print_exc()
            result = {"status": "error", "error": f"{type(err).__name__}: {err}"[:1000]}
        result.update(train_seconds=round(time.perf_counter() - started, 2), peak_mem_mb=round(peak_memory_mb(), 1))
        results[method] = result
    Path(spec["result"]).write_text(json.dumps(results, default=str))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: the FSDP worker of benchmarks/gpu_check.py")
    parser.add_argument("--fsdp-worker", type=Path, required=True, help="the spec JSON written by gpu_check.py")
    fsdp_worker(parser.parse_args().fsdp_worker)

"""One on-policy distillation step, TRL's DistillationTrainer vs opdistill's OPD, measured in one run.

Same student and teacher (SmolLM2-135M-Instruct, a separate teacher instance on both sides), the same
prompts, 8 prompts per step, 64 new tokens, reverse KL (TRL β = 1), temperature 1, the same number of
steps, and the same precision (`--precision`): bf16 is TRL's `bf16=True` (autocast over fp32 master weights)
with its teacher loaded in bf16 (`teacher_model_init_kwargs`), and opdistill's `precision: bf16` (the same
autocast and fp32 masters, a bf16 teacher, rollouts from a bf16 copy of the student); fp32 is fp32 on both.
The default is bf16 where the machine has native bf16 (a GPU, or a CPU with AVX512-BF16/AMX), else fp32.
Each side runs in its own process so its peak memory is its own; it is read at the end of the last step
(the final save is not part of a step). The first step of each side is a warm-up and is not timed.

Prints seconds per step (median), peak memory and completion tokens per step for both, the floor of the
step (its FLOPs over the matrix-multiply rate measured in this run, plus the decode steps' weight
traffic over the memory bandwidth measured in this run), how far each side is from that floor, and
finally `speedup_vs_trl: X.XX` (TRL's median seconds per step over ours).

Where vLLM is installed (`./setup.sh --vllm`), a third column runs opdistill's OPD with `rollout_engine: vllm` (a
colocated engine, synced after every step; its start is outside the timed steps, as TRL's model loading is), and a
second line `speedup_vs_trl_vllm:`. TRL's own vLLM path (`use_vllm`) is not run: it supports vLLM 0.10.2-0.17.1 and
colocates on CUDA devices, neither of which this CPU build is.

    pip install trl==1.16.0        # the peer; not an opdistill dependency
    python benchmarks/opd_vs_trl.py [--steps 4] [--prompts 8] [--new-tokens 64] [--gradient-checkpointing on|off]
                                    [--precision bf16|fp32] [--vllm auto|on|off]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = "smollm2-135m-instruct"
SIDES = ("trl", "opdistill", "opdistill-vllm")


def prompt_texts(count: int) -> list[str]:
    from opdistill.data import load_records

    return [r.messages[-1]["content"] for r in load_records(f"builtin:train[:{count}]")]


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_trl(args: argparse.Namespace, model_dir: str, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.started = 0.0

        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.started)
            self.peak_mb = peak_memory_mb()

    cuda = torch.cuda.is_available()
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": text}]} for text in prompt_texts(args.prompts * (args.steps + 1))])
    config = DistillationConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.prompts, gradient_accumulation_steps=1,
                                max_steps=args.steps + 1, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, beta=1.0,
                                temperature=1.0, max_completion_length=args.new_tokens, logging_steps=1, save_strategy="no",
                                report_to=[], use_cpu=not cuda, bf16=args.precision == "bf16", seed=0, shuffle_dataset=False,
                                disable_tqdm=True, gradient_checkpointing=args.gradient_checkpointing == "on",
                                teacher_model_init_kwargs={"dtype": "bfloat16"} if args.precision == "bf16" else None)
    timer = StepTimer()
    trainer = DistillationTrainer(model=model_dir, teacher_model=model_dir, args=config, train_dataset=dataset,
                                  processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[timer])
    trainer.train()
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history if "completions/mean_length" in entry]
    return {"step_seconds": timer.seconds[1:], "peak_mb": timer.peak_mb,
            "completion_tokens": statistics.mean(lengths[1:]) * args.prompts if len(lengths) > 1 else float("nan")}


def run_opdistill(args: argparse.Namespace, model_dir: str, work: Path) -> dict:
    from opdistill.config import load_config
    from opdistill.data import write_jsonl
    from opdistill.methods import train

    data = work / "prompts.jsonl"
    write_jsonl(data, ({"prompt": text} for text in prompt_texts(args.prompts * (args.steps + 1))))
    out = work / "opdistill"
    config = load_config(None, [
        "method=opd", f"student={model_dir}", f"teacher={model_dir}", f"data={data}", f"out_dir={out}",
        f"batch_size={args.prompts}", f"micro_batch_size={args.prompts}", f"rollout_batch_size={args.prompts}",
        f"max_response_tokens={args.new_tokens}", f"max_steps={args.steps + 1}", "lr=1e-6", "lr_schedule=constant",
        "warmup_ratio=0", "divergence=rkl", "temperature=1.0", "checkpoint_every=0", "keep_checkpoints=1",
        f"precision={args.precision}", "max_grad_norm=1.0",
        f"gradient_checkpointing={str(args.gradient_checkpointing == 'on').lower()}", f"rollout_engine={getattr(args, 'engine', 'hf')}",
    ])
    # Peak memory up to the end of the last step, as on the TRL side: the final save is not part of a step.
    from opdistill.methods.opd import OPD

    step, peaks = OPD.step, []

    def step_then_record_peak(self, engine, index):
        metrics = step(self, engine, index)
        peaks.append(peak_memory_mb())
        return metrics

    OPD.step = step_then_record_peak
    train(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_seconds" in r]
    return {"step_seconds": [r["step_seconds"] for r in steps[1:]], "peak_mb": peaks[-1],
            "completion_tokens": statistics.mean(r["response_length"] for r in steps[1:]) * args.prompts}


# ---------------------------------------------------------------- the floor

def matmul_rate(precision: str) -> float:
    """FLOP/s of a large matrix multiply at the benchmark's precision on this machine, now."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    size = 4096 if device == "cuda" else 1024
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 20
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * reps / (time.perf_counter() - started)


def memory_bandwidth() -> float:
    """Bytes/s moved by a large tensor copy (read + write)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = torch.ones(64 * 2**20, device=device)  # 256 MiB
    target = torch.empty_like(source)
    target.copy_(source)
    reps = 5
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        target.copy_(source)
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * source.numel() * source.element_size() * reps / (time.perf_counter() - started)


def step_floor(model_dir: str, prompts: int, prompt_tokens: float, new_tokens: float, rate: float, bandwidth: float,
               precision: str) -> dict:
    """Seconds one step cannot go below: its matrix-multiply FLOPs at `rate` plus the weight traffic of its
    decode steps at `bandwidth` (each decode step reads every weight once, in the precision's dtype)."""
    from opdistill.models import load_model

    model = load_model(model_dir)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once: the lm_head matmul
    weight_bytes = params * (2 if precision == "bf16" else 4)
    per_token = 2 * params
    sampling = prompts * (prompt_tokens + new_tokens) * per_token
    teacher = prompts * (prompt_tokens + new_tokens) * per_token
    student = 3 * prompts * (prompt_tokens + new_tokens) * per_token  # forward + backward
    flops = sampling + teacher + student
    traffic = new_tokens * weight_bytes  # each decode step reads every weight once, for the whole batch
    return {"flops": flops, "compute_s": flops / rate, "decode_traffic_s": traffic / bandwidth,
            "floor_s": flops / rate + traffic / bandwidth}


def default_precision() -> str:
    from opdistill.models import resolve_precision

    return resolve_precision("auto")


def child(side: str, args: argparse.Namespace, out: str) -> None:
    from opdistill.models import resolve_model

    model_dir = resolve_model(MODEL)
    args.engine = "vllm" if side == "opdistill-vllm" else "hf"
    with tempfile.TemporaryDirectory() as work:
        result = (run_trl if side == "trl" else run_opdistill)(args, model_dir, Path(work))
    Path(out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side (one more runs first as warm-up)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on",
                        help="activation recomputation on both sides (on: TRL's default)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=default_precision(),
                        help="the same on both sides (default: bf16 where the machine has native bf16, else fp32)")
    parser.add_argument("--vllm", choices=["auto", "on", "off"], default="auto",
                        help="also run opdistill with rollout_engine: vllm (auto: where vllm is installed)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args.side, args, args.result)
        return

    from opdistill.data import render_prompt
    from opdistill.models import load_tokenizer, resolve_model

    import importlib.util

    with_vllm = args.vllm == "on" or (args.vllm == "auto" and importlib.util.find_spec("vllm") is not None)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for side in SIDES if with_vllm else SIDES[:2]:
            print(f"running {side} ...", file=sys.stderr, flush=True)
            result_file = Path(work) / f"{side}.json"
            subprocess.run([sys.executable, __file__, "--side", side, "--result", str(result_file), "--steps", str(args.steps),
                            "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens),
                            "--gradient-checkpointing", args.gradient_checkpointing, "--precision", args.precision], check=True,
                           env={**os.environ, "TQDM_DISABLE": "1"})
            results[side] = json.loads(result_file.read_text())
    model_dir = resolve_model(MODEL)
    tokenizer = load_tokenizer(model_dir)
    texts = prompt_texts(args.prompts * (args.steps + 1))
    prompt_tokens = statistics.mean(len(render_prompt(tokenizer, [{"role": "user", "content": t}])) for t in texts)
    rate, bandwidth = matmul_rate(args.precision), memory_bandwidth()
    print(f"\nmachine: {torch.get_num_threads()} threads, {args.precision} matmul {rate / 1e9:.1f} GFLOP/s, copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"{args.prompts} prompts/step (mean prompt {prompt_tokens:.0f} tokens), up to {args.new_tokens} new tokens, {args.steps} timed steps, "
          f"gradient checkpointing {args.gradient_checkpointing} on both sides, precision {args.precision} on both sides")
    titles = {"trl": "TRL DistillationTrainer", "opdistill": "opdistill OPD (hf rollouts)", "opdistill-vllm": "opdistill OPD (vLLM rollouts)"}
    print("\n| | " + " | ".join(titles[side] for side in results) + " |\n|---|" + "---:|" * len(results))
    rows = {}
    for side, result in results.items():
        median = statistics.median(result["step_seconds"])
        new_tokens = result["completion_tokens"] / args.prompts
        floor = step_floor(model_dir, args.prompts, prompt_tokens, new_tokens, rate, bandwidth, args.precision)
        rows[side] = {"median": median, "peak": result["peak_mb"], "tokens": result["completion_tokens"], "floor": floor["floor_s"],
                      "x_floor": median / floor["floor_s"]}
    for label, key, fmt in (("seconds per step (median)", "median", "{:.2f}"), ("peak memory (MiB)", "peak", "{:.0f}"),
                            ("completion tokens per step", "tokens", "{:.0f}"), ("floor for that step (s)", "floor", "{:.2f}"),
                            ("times the floor", "x_floor", "{:.1f}x")):
        print(f"| {label} | " + " | ".join(fmt.format(rows[side][key]) for side in results) + " |")
    print(f"\nspeedup_vs_trl: {rows['trl']['median'] / rows['opdistill']['median']:.2f}")
    if "opdistill-vllm" in rows:
        print(f"speedup_vs_trl_vllm: {rows['trl']['median'] / rows['opdistill-vllm']['median']:.2f}")


if __name__ == "__main__":
    main()

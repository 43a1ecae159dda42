"""Sampling throughput: opdistill's sampler vs plain `transformers` `generate`, in one run.

Same model (SmolLM2-135M-Instruct), same prompts (built-in held-out), same sampling settings, same precision
(`--precision`: the model's weights in bf16 or fp32 on both sides). Both sides generate exactly --new-tokens
tokens per sequence (EOS stops neither), so tokens/s compares equal work. Rows: one sample per prompt at
batch 16, nucleus sampling at batch 16, and 4 samples per prompt (GAD's groups; `generate` with
num_return_sequences vs opdistill's shared prefill). A last column gives opdistill's own fp32 path, so the
gain of bf16 rollouts shows too. Each cell is the median of --repeats runs after one warm-up run.

    python benchmarks/rollout.py [--new-tokens 48] [--repeats 3] [--precision bf16|fp32]

The hf engine against vLLM (rollout_engine: vllm), start-up included, at fp32 and bf16: benchmarks/rollout_vllm.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from opdistill.data import load_records, render_prompt
from opdistill.models import default_device, load_model, load_tokenizer, resolve_precision
from opdistill.rollout import HFSampler, left_pad
from opdistill.sampling import SamplingParams

MODEL = "smollm2-135m-instruct"


def hf_generate(model, tokenizer, prompts, n: int, params: SamplingParams) -> int:
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=params.temperature,
                             top_p=params.top_p, top_k=None, max_new_tokens=params.max_new_tokens,
                             min_new_tokens=params.max_new_tokens, num_return_sequences=n, pad_token_id=tokenizer.pad_token_id)
    return (out.shape[1] - ids.shape[1]) * out.shape[0]


def ours(sampler: HFSampler, prompts, n: int, params: SamplingParams) -> int:
    sampler.eos = set()  # EOS stops neither side: equal work
    return sum(len(s.response_ids) for s in sampler.sample(prompts, params, n=n))


def tokens_per_second(fn, repeats: int, *args) -> float:
    fn(*args)  # warm-up
    rates = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        count = fn(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=resolve_precision("auto"),
                        help="weights of both sides (default: bf16 where the machine has native bf16, else fp32)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    tokenizer = load_tokenizer(MODEL)
    fp32_model = load_model(MODEL).to(default_device()).eval()
    model = load_model(MODEL, dtype=dtype).to(default_device()).eval()
    # opdistill's sampler gets its own instance: it owns it, as evaluation's and the local teacher's samplers do,
    # and may rewrite its layers (oneDNN-packed bf16 linears, one-token decode attention); generate keeps the plain one.
    own = load_model(MODEL, dtype=dtype).to(default_device()).eval()
    prompts = [render_prompt(tokenizer, r.messages) for r in load_records("builtin:heldout[:16]")]
    cases = [("batch 16, T 1.0", prompts, 1, SamplingParams(1.0, 1.0, args.new_tokens)),
             ("batch 16, T 0.8, top-p 0.95", prompts, 1, SamplingParams(0.8, 0.95, args.new_tokens)),
             ("4 prompts x 4 samples, T 0.8", prompts[:4], 4, SamplingParams(0.8, 1.0, args.new_tokens))]
    print(f"{torch.get_num_threads()} threads on {default_device().type}, {args.precision}, {args.new_tokens} new tokens per sequence, "
          f"median of {args.repeats}\n")
    print(f"| case | generate {args.precision} (tok/s) | opdistill {args.precision} (tok/s) | ratio | opdistill fp32 (tok/s) | "
          f"{args.precision} / fp32 |\n|---|---:|---:|---:|---:|---:|")
    for name, batch, n, params in cases:
        peer = tokens_per_second(hf_generate, args.repeats, model, tokenizer, batch, n, params)
        mine = tokens_per_second(ours, args.repeats, HFSampler(own, tokenizer, batch_size=16, owns_model=True), batch, n, params)
        fp32 = tokens_per_second(ours, args.repeats, HFSampler(fp32_model, tokenizer, batch_size=16), batch, n, params)
        print(f"| {name} | {peer:.1f} | {mine:.1f} | {mine / peer:.2f}x | {fp32:.1f} | {mine / fp32:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

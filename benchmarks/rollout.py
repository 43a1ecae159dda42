"""Sampling throughput: opdistill's rollout loop vs plain `transformers` `generate`, in one run.

Same model (SmolLM2-135M-Instruct), same prompts (built-in held-out), same sampling settings. Both sides
generate exactly --new-tokens tokens per sequence (EOS does not stop either), so tokens/s compares equal
work. Rows: one sample per prompt at batch 16, nucleus sampling at batch 16, and 4 samples per prompt
(GAD's groups; `generate` with num_return_sequences vs opdistill's shared prefill). Each cell is the
median of --repeats runs after one warm-up run.

    python benchmarks/rollout.py [--new-tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from opdistill.data import load_records, render_prompt
from opdistill.models import load_model, load_tokenizer
from opdistill.rollout import left_pad, sample_batch
from opdistill.sampling import SamplingParams


def hf_generate(model, tokenizer, prompts, n: int, params: SamplingParams) -> int:
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=params.temperature,
                             top_p=params.top_p, top_k=None, max_new_tokens=params.max_new_tokens,
                             min_new_tokens=params.max_new_tokens, num_return_sequences=n, pad_token_id=tokenizer.pad_token_id)
    return (out.shape[1] - ids.shape[1]) * out.shape[0]


def ours(model, tokenizer, prompts, n: int, params: SamplingParams) -> int:
    tokens, _, _ = sample_batch(model, prompts, [n] * len(prompts), params, tokenizer.pad_token_id, eos=set())
    return sum(map(len, tokens))


def tokens_per_second(fn, repeats: int, *args) -> float:
    fn(*args)  # warm-up
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        count = fn(*args)
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m-instruct").eval(), load_tokenizer("smollm2-135m-instruct")
    prompts = [render_prompt(tokenizer, r.messages) for r in load_records("builtin:heldout[:16]")]
    cases = [("batch 16, T 1.0", prompts, 1, SamplingParams(1.0, 1.0, args.new_tokens)),
             ("batch 16, T 0.8, top-p 0.95", prompts, 1, SamplingParams(0.8, 0.95, args.new_tokens)),
             ("4 prompts x 4 samples, T 0.8", prompts[:4], 4, SamplingParams(0.8, 1.0, args.new_tokens))]
    print(f"{torch.get_num_threads()} threads, fp32, {args.new_tokens} new tokens per sequence, median of {args.repeats}\n")
    print("| case | transformers generate (tok/s) | opdistill (tok/s) | ratio |\n|---|---:|---:|---:|")
    for name, batch, n, params in cases:
        peer = tokens_per_second(hf_generate, args.repeats, model, tokenizer, batch, n, params)
        mine = tokens_per_second(ours, args.repeats, model, tokenizer, batch, n, params)
        print(f"| {name} | {peer:.1f} | {mine:.1f} | {mine / peer:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

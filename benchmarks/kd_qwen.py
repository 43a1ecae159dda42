"""`method: kd` in the weak-to-strong setting of Lu & Liu (arXiv 2605.23857) with real models of one tokenizer: the smaller
Qwen2.5-Coder-0.5B-Instruct as the teacher of the larger Qwen2.5-Coder-1.5B-Instruct (LoRA), kd_weight (the paper's α)
swept at equal tokens on GSM8K train texts (plain text records, no chat template).

    .venv/bin/python benchmarks/kd_qwen.py --size cpu --out runs/kd-qwen      # ./setup.sh --models first; about 40 minutes on 2 cores
    .venv/bin/python benchmarks/kd_qwen.py --size gpu --out runs/kd-qwen-gpu  # one GPU

Every student starts from the same weights and sees the same texts in the same order; only α differs. Measured:
- held-out NLL per token, in distribution (GSM8K test texts) and out of it (Self-Instruct's text-davinci-003 answers),
  with a paired bootstrap (over texts) of each student's difference from the α = 0 student (plain LM training);
- GSM8K test accuracy (`opdistill eval --suite gsm8k`, greedy, exact final answers) with McNemar's exact paired test.
It writes results.json and prints the tables docs/kd.md quotes.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from opdistill.data import chunks, collate, load_records, tokenize_records
from opdistill.logprobs import response_logprobs
from opdistill.models import load_model, load_tokenizer
from spd_gsm8k import evaluate as gsm8k_accuracy, train  # the same `opdistill eval --suite gsm8k` and `train` calls

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# steps x batch texts trained on (each cut to `tokens` trained tokens); `held_out` texts per NLL set; `eval_items` GSM8K
# test problems answered greedily with `eval_tokens` new tokens.
SIZES = {
    "cpu": dict(steps=3, batch=8, micro=4, tokens=128, lr="1e-4", held_out=16, eval_items=20, eval_tokens=256, precision="fp32"),
    "gpu": dict(steps=200, batch=16, micro=8, tokens=256, lr="1e-4", held_out=500, eval_items=1319, eval_tokens=384, precision="bf16"),
}


def train_run(out: Path, data: Path, student: str, teacher: str, weight: float, size: dict, seed: int) -> Path:
    """Train one KD student. Its checkpoint holds the LoRA adapters and their optimizer state (about 200 MB for the
    1.5B), written every step, so an interrupted run loses at most one step."""
    return train({"method": "kd", "student": student, "teacher": teacher, "kd_weight": weight, "divergence": "fkl",
                  "data": f"{data / 'gsm8k_train.jsonl'}[:{size['steps'] * size['batch']}]", "out_dir": str(out), "lora_r": 16,
                  "max_steps": size["steps"], "batch_size": size["batch"], "micro_batch_size": size["micro"], "lr": size["lr"],
                  "max_response_tokens": size["tokens"], "precision": size["precision"], "checkpoint_every": 1, "keep_checkpoints": 1,
                  "warmup_ratio": 0, "seed": seed})


@torch.no_grad()
def text_nlls(model_dir: str, data: str, max_tokens: int) -> list[tuple[float, int]]:
    """(summed NLL, tokens) of each plain text of `data` (every token after the first, at most max_tokens) under a model."""
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    examples, _ = tokenize_records(tokenizer, load_records(data, plain_text=True), 512, max_tokens, "truncate")
    rows = []
    for group in chunks(examples, 4):
        batch = collate(group, tokenizer.pad_token_id)
        logprobs = response_logprobs(model, batch)  # response tokens of the micro-batch, row-major
        lengths = batch["loss_mask"][:, 1:].sum(dim=1).tolist()
        for part, length in zip(logprobs.split(lengths), lengths):
            rows.append((-float(part.sum()), int(length)))
    return rows


def per_token(rows: list[tuple[float, int]]) -> float:
    return sum(nll for nll, _ in rows) / sum(n for _, n in rows)


def paired_bootstrap(x: list[tuple[float, int]], y: list[tuple[float, int]], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Per-token NLL of x minus y on the same texts, with a 95% percentile interval from resampling texts (pairs kept)."""
    rng = random.Random(seed)
    differences = []
    for _ in range(resamples):
        picks = [rng.randrange(len(x)) for _ in x]
        differences.append(per_token([x[i] for i in picks]) - per_token([y[i] for i in picks]))
    differences.sort()
    return per_token(x) - per_token(y), differences[int(0.025 * resamples)], differences[int(0.975 * resamples) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--student", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--teacher", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--weights", default="0,0.5,1", help="kd_weight values (the paper's α); 0 (plain LM) is the reference")
    parser.add_argument("--out", default="runs/kd-qwen")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", default=str(SHARED), help="the shared data directory (default: ../shared/data)")
    args = parser.parse_args()
    out, size, shared = Path(args.out), SIZES[args.size], Path(args.shared)
    weights = [float(w) for w in args.weights.split(",")]
    if 0.0 not in weights:
        parser.error("--weights must include 0: plain LM training is what every α is compared with")
    started = time.perf_counter()
    data = out / "data"
    subprocess.run([sys.executable, str(ROOT / "examples" / "kd" / "make_texts.py"), "--out", str(data), "--shared", str(shared)], check=True)
    students = {f"kd{w:g}": str(train_run(out / f"kd{w:g}", data, args.student, args.teacher, w, size, args.seed)) for w in weights}
    trained = time.perf_counter() - started

    sets = {"gsm8k_test": f"{data / 'gsm8k_test.jsonl'}[:{size['held_out']}]",
            "selfinstruct": f"{data / 'selfinstruct.jsonl'}[:{size['held_out']}]"}
    models = {"teacher": args.teacher, "base": args.student, **students}
    nlls = {label: {name: text_nlls(path, spec, size["tokens"]) for name, spec in sets.items()} for label, path in models.items()}
    accuracy = gsm8k_accuracy(out / "eval", {"base": args.student, **students}, size, shared)
    seconds = time.perf_counter() - started

    lines = ["| model | GSM8K test NLL | vs kd0 (95% CI) | Self-Instruct NLL | vs kd0 (95% CI) | GSM8K accuracy (95% CI) |",
             "|---|---|---|---|---|---|"]
    for label in models:
        cells = []
        for name in sets:
            cells.append(f"{per_token(nlls[label][name]):.4f}")
            if label.startswith("kd") and label != "kd0":
                diff, low, high = paired_bootstrap(nlls[label][name], nlls["kd0"][name])
                cells.append(f"{diff:+.4f} ({low:+.4f} to {high:+.4f})")
            else:
                cells.append("")
        suite = accuracy["models"].get(label, {}).get("suite")
        cells.append(f"{suite['passed']}/{suite['n']} = {suite['accuracy']:.3f} ({suite['ci_low']:.3f}–{suite['ci_high']:.3f})" if suite else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| pair (x vs y) | x only | y only | difference x − y | McNemar p |", "|---|---|---|---|---|"]
    lines += [f"| {p['x']} vs {p['y']} | {p['x_only']} | {p['y_only']} | {p['difference']:+.3f} | {p['p_value']:.3g} |" for p in accuracy["paired"]]
    table = "\n".join(lines)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "size": size, "nll": {k: {n: per_token(r) for n, r in v.items()}
                                                                                         for k, v in nlls.items()},
                                                  "accuracy": accuracy, "train_seconds": trained, "seconds": seconds,
                                                  "table": table}, indent=2), encoding="utf-8")
    print(table)
    print(f"\n{args.size}: {args.teacher} -> {args.student} (LoRA r=16), {size['steps']} steps x {size['batch']} texts per α; "
          f"{trained:.0f} s training, {seconds:.0f} s in all")


if __name__ == "__main__":
    main()

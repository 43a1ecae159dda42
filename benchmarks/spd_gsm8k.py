"""SPD against plain self-distillation on GSM8K (docs/spd.md; Hao et al., arXiv 2605.22675).

Two runs from the same student, on the same GSM8K train questions, for the same steps with the same seed: `method: spd`
(K/V projected into the capability subspace while sampling) and `method: spd project=false` (plain self-distillation
on unprojected samples). Then `opdistill eval --suite gsm8k` scores the base model and both students on GSM8K test
(greedy, exact final answers) with McNemar's paired test (evaluate/stats.py) between every two.

    .venv/bin/python benchmarks/spd_gsm8k.py --size cpu --out runs/spd-gsm8k     # Qwen2.5-Coder-0.5B-Instruct, ~30-40 min on 2 cores
    .venv/bin/python benchmarks/spd_gsm8k.py --size gpu --out runs/spd-gsm8k-gpu # one GPU
    .venv/bin/python benchmarks/spd_gsm8k.py --size smoke --student smollm2-135m-instruct --out runs/spd-smoke   # minutes: proves it runs
    .venv/bin/python benchmarks/spd_gsm8k.py --make-data runs/spd/data            # only the prompt file examples/spd_gsm8k.yaml reads

The prompts are GSM8K train questions with the suite's own instruction (end with "#### <number>"), written to
OUT/data/gsm8k_train_prompts.jsonl from ../shared/data/gsm8k_train.jsonl (read in place; opdistill's records need a
`prompt` field, GSM8K's is `question`). Writes OUT/results.json and prints a markdown table (docs/spd.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# steps x batch = prompts trained on; eval_items GSM8K test problems, greedy, eval_tokens new tokens each.
SIZES = {
    # smoke: 48 tokens rarely reach "####", so an answer without it gives its last 8 tokens (answer_tail_tokens), and
    # few samples end, so both runs train on cut ones (truncated_rollouts: keep) rather than skip their steps.
    "smoke": dict(steps=2, batch=4, micro=2, response_tokens=48, subspace_prompts=4, eval_items=8, eval_tokens=48, precision="auto",
                  spd={"answer_tail_tokens": 8}, both={"truncated_rollouts": "keep"}),
    "cpu": dict(steps=12, batch=8, micro=4, response_tokens=192, subspace_prompts=16, eval_items=100, eval_tokens=256, precision="auto"),
    "gpu": dict(steps=100, batch=32, micro=8, response_tokens=320, subspace_prompts=64, eval_items=1319, eval_tokens=384,
                precision="bf16"),
}


def make_prompts(out: Path, shared: Path = SHARED) -> Path:
    """GSM8K train questions as opdistill prompt records, with the instruction `opdistill eval --suite gsm8k` asks with."""
    from opdistill.evaluate.answers import GSM8K_INSTRUCTION

    source = shared / "gsm8k_train.jsonl"
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gsm8k_train_prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{r['question']}\n\n{GSM8K_INSTRUCTION}"}, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def train(values: dict) -> Path:
    """`opdistill train` with these config values, skipped when the run in `out_dir` finished before (an interrupted
    one resumes from its last checkpoint); returns the student's directory."""
    out = Path(values["out_dir"])
    if (out / "summary.json").is_file() and (out / "student" / "config.json").is_file():
        print(f"{Path(sys.argv[0]).stem}: {out} finished before, reused")
        return out / "student"
    subprocess.run([sys.executable, "-m", "opdistill", "train", *[f"{k}={v}" for k, v in values.items()]], check=True, cwd=ROOT)
    return out / "student"


def train_run(out: Path, data: Path, student: str, size: dict, seed: int, extra: dict) -> Path:
    """Train one SPD student."""
    return train({"method": "spd", "student": student, "data": f"{data}[:{size['steps'] * size['batch']}]", "out_dir": str(out),
                  "max_steps": size["steps"], "batch_size": size["batch"], "micro_batch_size": size["micro"], "rollout_batch_size": size["batch"],
                  "max_response_tokens": size["response_tokens"], "subspace_prompts": size["subspace_prompts"], "seed": seed,
                  "precision": size["precision"], "checkpoint_every": 2, "keep_checkpoints": 1, "warmup_ratio": 0, **extra})


def evaluate(out: Path, models: dict[str, str], size: dict, shared: Path) -> dict:
    command = [sys.executable, "-m", "opdistill", "eval", *[f"--model={label}={path}" for label, path in models.items()],
               f"--suite=gsm8k[0:{size['eval_items']}]", f"--data-dir={shared}", f"--max-new-tokens={size['eval_tokens']}",
               "--temperature=0", "--no-embeddings", "--no-progress", f"--precision={size['precision']}", f"--out={out}"]
    subprocess.run(command, check=True, cwd=ROOT)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return next(s for s in metrics["sets"].values() if s.get("suite") == "gsm8k")


def table(result: dict) -> str:
    lines = ["| model | GSM8K test accuracy (95% CI) |", "|---|---|"]
    for label, values in result["models"].items():
        s = values["suite"]
        lines.append(f"| {label} | {s['passed']}/{s['n']} = {s['accuracy']:.3f} ({s['ci_low']:.3f}–{s['ci_high']:.3f}) |")
    lines += ["", "| pair (x vs y) | x only | y only | difference x − y | McNemar p |", "|---|---|---|---|---|"]
    for p in result["paired"]:
        lines.append(f"| {p['x']} vs {p['y']} | {p['x_only']} | {p['y_only']} | {p['difference']:+.3f} | {p['p_value']:.3g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--student", default="qwen2.5-coder-0.5b-instruct", help="built-in name or model path (default: the issue's)")
    parser.add_argument("--out", default="runs/spd-gsm8k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", default=str(SHARED), help="the shared data directory (default: ../shared/data)")
    parser.add_argument("--spd", default="", help="extra SPD keys for the SPD run, e.g. 'rank=16,projection_strength=0.5'")
    parser.add_argument("--make-data", metavar="DIR", default="", help="only write DIR/gsm8k_train_prompts.jsonl and stop")
    args = parser.parse_args()
    shared = Path(args.shared)
    if args.make_data:
        print(f"wrote {make_prompts(Path(args.make_data), shared)}")
        return
    out, size = Path(args.out), SIZES[args.size]
    started = time.perf_counter()
    data = make_prompts(out / "data", shared)
    both = size.get("both", {})  # keys for the SPD run and its baseline alike
    spd_extra = {**both, **size.get("spd", {}), **dict(part.split("=", 1) for part in args.spd.split(",") if part)}
    students = {"spd": train_run(out / "spd", data, args.student, size, args.seed, spd_extra),
                "self_distill": train_run(out / "self_distill", data, args.student, size, args.seed, {**both, "project": "false"})}
    trained = time.perf_counter() - started
    result = evaluate(out / "eval", {"base": args.student, **{k: str(v) for k, v in students.items()}}, size, shared)
    seconds = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps({"args": vars(args), "size": size, "result": result, "train_seconds": trained,
                                                  "seconds": seconds}, indent=2), encoding="utf-8")
    print(table(result))
    print(f"\n{args.size}: {args.student}, {size['steps']} steps x {size['batch']} prompts; {trained:.0f} s training, {seconds:.0f} s in all")


if __name__ == "__main__":
    main()

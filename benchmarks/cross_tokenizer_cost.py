"""What a teacher of another tokenizer costs per OPD step, against same-tokenizer OPD, measured side by side in one run.

    .venv/bin/python benchmarks/cross_tokenizer_cost.py --out runs/xtok-cost [--steps 6] [--teacher qwen2.5-coder-0.5b-instruct]

One student (SmolLM2-135M-Instruct), the same prompts (built-in train), the same seed and settings, three teachers:
  same-tokenizer     a frozen copy of SmolLM2-135M-Instruct, reward_to_go on tokens (the default estimator)
  span-path          the same teacher with `cross_tokenizer: true`: every step re-tokenises and aligns the samples; with
                     one vocabulary every span is one token, so its losses must equal the first run's (checked here)
  other-tokenizer    --teacher (default Qwen2.5-Coder-0.5B-Instruct: 151,936 tokens, another chat template), spans
The table gives each run's mean step seconds after the first step (the first pays for warm-up), its rollout seconds and
its ratio to same-tokenizer OPD; the other-tokenizer run's ratio also includes its larger teacher's forward passes.
Needs `./setup.sh --models` for the default --teacher.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from opdistill.config import build_config
from opdistill.methods import train
from opdistill.models import resolve_precision

STUDENT = "smollm2-135m-instruct"


def run(out: Path, teacher: str, cross: bool, steps: int, **settings: Any) -> list[dict[str, Any]]:
    """One OPD run (a finished one is not run again); its per-step metrics (metrics.jsonl rows with a step time).
    `settings` override the defaults below (benchmarks/sampled_estimators.py compares estimators with it)."""
    metrics = out / "metrics.jsonl"
    if not metrics.is_file() or not (out / "student").is_dir():
        values = {"method": "opd", "student": STUDENT, "teacher": teacher, "cross_tokenizer": cross, "divergence": "reward_to_go",
                  "data": "builtin:train", "batch_size": 4, "micro_batch_size": 4, "rollout_batch_size": 4, "max_response_tokens": 64,
                  "max_steps": steps, "lr": 2e-5, "lr_schedule": "constant", "warmup_ratio": 0.0, "seed": 0, "out_dir": str(out),
                  "checkpoint_every": 0, **settings}
        train(build_config(values, where="benchmarks/cross_tokenizer_cost.py"))
    return [json.loads(line) for line in metrics.read_text().splitlines() if "step_seconds" in line]


def mean_after_first(rows: list[dict[str, Any]], key: str) -> float:
    values = [row[key] for row in rows[1:]] or [row[key] for row in rows]
    return statistics.fmean(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--teacher", default="qwen2.5-coder-0.5b-instruct", help="the teacher of another tokenizer")
    args = parser.parse_args()
    runs = {"same-tokenizer": (STUDENT, False), "span-path": (STUDENT, True), "other-tokenizer": (args.teacher, True)}
    results = {name: run(args.out / name, teacher, cross, args.steps) for name, (teacher, cross) in runs.items()}
    base = mean_after_first(results["same-tokenizer"], "step_seconds")
    # Rollouts do not depend on the teacher: the step without them is where a teacher of another tokenizer costs, and
    # it is the fairer ratio when the machine's load drifts between runs.
    base_rest = base - mean_after_first(results["same-tokenizer"], "rollout_seconds")
    same_losses = [row["loss"] for row in results["same-tokenizer"]]
    span_losses = [row["loss"] for row in results["span-path"]]
    lines = [f"OPD step cost, student {STUDENT}, 4 prompts x 64 new tokens, reward_to_go, precision {resolve_precision('auto')}, "
             f"{args.steps} steps (mean after the first)", "",
             "| teacher | cross_tokenizer | step s | rollout s | ratio to same-tokenizer | step − rollout s | its ratio | shared boundaries "
             "| teacher tokens / span |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in results.items():
        teacher, cross = runs[name]
        step = mean_after_first(rows, "step_seconds")
        shared = f"{mean_after_first(rows, 'align_shared_boundaries'):.3f}" if cross else "–"
        span = f"{mean_after_first(rows, 'align_mean_teacher_tokens'):.2f}" if cross else "–"
        rollout = mean_after_first(rows, "rollout_seconds")
        lines.append(f"| {name} ({teacher}) | {cross} | {step:.2f} | {rollout:.2f} | {step / base:.2f}x | {step - rollout:.2f} | "
                     f"{(step - rollout) / base_rest:.2f}x | {shared} | {span} |")
    lines += ["", f"span path equals the per-token path (same teacher, losses of every step): {same_losses == span_losses} "
              f"(max difference {max(abs(a - b) for a, b in zip(same_losses, span_losses)):.2e})"]
    (args.out / "results.json").write_text(json.dumps({"runs": results, "table": lines}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

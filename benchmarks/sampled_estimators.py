"""Which sampled-token estimator should cross-tokenizer OPD use by default? Measured on the real pair, side by side.

    .venv/bin/python benchmarks/sampled_estimators.py --out runs/estimators [--seeds 0 1 2]

Student SmolLM2-135M-Instruct, teacher Qwen2.5-Coder-0.5B-Instruct (another tokenizer, `cross_tokenizer: true`), 4
built-in train prompts x 4 samples x 64 new tokens. Each estimator takes one optimizer step from the same student on
the same samples (a seed fixes them), for every seed:
  reward            A_t = r_t (per-token reverse KL, each prefix held fixed; tinker-cookbook's default)
  reward_to_go      A_t = Σ_{u>=t} r_u (the sequence-level reverse KL)
  reward_to_go+loo  the same minus the mean return of the prompt's other 3 samples
Adam's first step moves every weight by about lr · sign(gradient), so the sign of each weight's change is the sign of
that estimator's gradient estimate from one batch. For two seeds (independent batches) the share of weights whose
signs agree measures how much of the estimate is signal: 0.5 is pure noise, 1.0 no noise. All three estimators are
unbiased for their objective (tests/test_estimators.py); this says what a 16-sample batch of each is worth. The
step's `kl` (the samples' reverse KL per token before the update) is printed beside it. Needs `./setup.sh --models`.
Rule declared before measuring: the default is reward_to_go, the objective docs/opd.md claims (the sequence-level
reverse KL), unless its agreement is within 0.01 of chance while reward's is not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch
from cross_tokenizer_cost import run
from safetensors.torch import load_file

from opdistill.models import resolve_model, resolve_precision

STUDENT, TEACHER = "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"
ESTIMATORS = {"reward": {"divergence": "reward"}, "reward_to_go": {"divergence": "reward_to_go"},
              "reward_to_go+loo": {"divergence": "reward_to_go", "baseline": "loo"}}


def update_signs(out: Path, start: dict[str, torch.Tensor]) -> torch.Tensor:
    """sign(Δw) of every weight after the run's one step, flattened (0 where the weight did not move)."""
    final = load_file(str(out / "student" / "model.safetensors"))
    return torch.cat([(final[name].float() - start[name].float()).sign().flatten() for name in sorted(final) if name in start])


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    moved = (a != 0) & (b != 0)
    return float((a[moved] == b[moved]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    start = load_file(str(Path(resolve_model(STUDENT)) / "model.safetensors"))
    rows, summary = [], {}
    for name, settings in ESTIMATORS.items():
        signs, kl, seconds = {}, [], []
        for seed in args.seeds:
            out = args.out / f"{name}-seed{seed}"
            steps = run(out, TEACHER, True, 1, samples_per_prompt=4, rollout_batch_size=16, micro_batch_size=8, seed=seed, lr=1e-5,
                        weight_decay=0.0, max_grad_norm=0.0, precision="fp32", **settings)
            signs[seed] = update_signs(out, start)
            kl.append(steps[0]["kl"])
            seconds.append(steps[0]["step_seconds"])
        pairs = [agreement(signs[a], signs[b]) for a, b in itertools.combinations(args.seeds, 2)]
        summary[name] = {"sign_agreement": statistics.fmean(pairs), "pairs": pairs, "kl": kl, "step_seconds": seconds}
        rows.append(f"| {name} | {statistics.fmean(pairs):.4f} ({min(pairs):.4f}–{max(pairs):.4f}) | "
                    f"{statistics.fmean(kl):.3f} | {statistics.fmean(seconds):.1f} |")
    lines = [f"Sampled estimators, {STUDENT} <- {TEACHER} (cross_tokenizer), 4 prompts x 4 samples x 64 tokens, one Adam step, "
             f"seeds {args.seeds}, precision fp32 (auto here: {resolve_precision('auto')})", "",
             "| estimator | sign agreement between seeds (range over pairs) | kl per token | step s |", "|---|---:|---:|---:|", *rows]
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "table": lines}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

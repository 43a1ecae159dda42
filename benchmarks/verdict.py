"""The small verdict: does on-policy distillation beat SeqKD here, with matched updates, 3 seeds and paired tests?

Context distillation as in `opdistill demo`: the teacher is SmolLM2-135M-Instruct reading a privileged system prompt
("Always respond in French, in one short sentence."), the student the same model without it. Rows:

- teacher (with the system prompt) and base (the untrained student): greedy, so one row each for every seed;
- seqkd-S, gad-S, opd-S for each training seed S (default 0, 1, 2).

**Matching.** Every student gets the same number of generator updates (`--updates`, default 16) of the same number
of prompts (4) drawn from the same 96 built-in train prompts, at the same learning rate (2e-5), from one collection
of teacher texts (temperature 0.7, 48 tokens, unfinished answers dropped, as the demo does):
- SeqKD: `--updates` cross-entropy steps on the teacher texts;
- GAD: a warm-up of 10 steps whose first 2 train the discriminator only (8 cross-entropy updates on the same texts),
  then `--updates` - 8 adversarial steps of 4 prompts x 4 samples (the demo's settings);
- OPD (white-box): `--updates` steps of reverse KL to the teacher (the student's starting weights reading the
  system prompt) on 4 prompts, one sample each.
The seed sets data order, sampling and initialisation of the discriminator; the teacher texts are the same for all.

**Evaluation** (greedy, `--eval-tokens` new tokens): in distribution, the built-in prompts the students never trained
on (the first 200 of train[96:] and heldout: everyday requests); out of distribution, 40 GSM8K test questions, 35
MATH-500 problems, 40 HumanEval functions to complete and 35 Vicuna-80 questions (150; from ../shared/data). Scored by programs:
French share (the task), brevity (share of answers of at most 25 words: the "one short sentence" asked for), EOS rate
(the answer ended), 4-gram repetition, mean words, and the teacher's log-prob of each answer. Per seed, with Wilson
intervals and McNemar's exact test per prompt (paired) for French and brevity; over the seeds, with the prompt the
unit (an interval over prompts of each prompt's share across seeds, and the sign test of the prompts one row won in
more seeds than the other: opdistill.evaluate.stats says why); and the spread of each row's share across seeds.

Resumable: each stage (collection, each training run, the evaluation) is kept in --out and skipped when done; the
evaluation caches every answer and score, so an interrupted run continues where it stopped.

    python benchmarks/verdict.py --out runs/verdict [--seeds 0,1,2] [--updates 16] [--eval-tokens 64] [--plan]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from quality_results import sameness  # benchmarks/, beside this script
from quality_stages import Stages, machine, read_json_lines, say, write_json_lines

MODEL = "smollm2-135m-instruct"
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN_PROMPTS = 96
BRIEF_WORDS = 25  # "in one short sentence": at most this many words
INDIST_PROMPTS = 200
OOD_PER_KIND = {"gsm8k": 40, "math500": 35, "humaneval": 40, "vicuna": 35}  # 150 in all
TEACHER_ROW, BASE_ROW = "teacher", "base"
METHODS = ("seqkd", "gad", "opd")
PAIRS = (("gad", "seqkd"), ("opd", "seqkd"), ("opd", "gad"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="run directory; rerun the same command to continue")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    parser.add_argument("--updates", type=int, default=16, help="generator updates per student (GAD's warm-up included)")
    parser.add_argument("--eval-tokens", type=int, default=64, help="new tokens per evaluated answer")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--engine", choices=["auto", "hf", "vllm"], default="auto", help="collection, rollouts and evaluation")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--plan", action="store_true", help="check every training config and print the stages; run nothing")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- the training runs, matched


def demo_options(args: argparse.Namespace, seed: int) -> Any:
    from opdistill.demo import DemoOptions

    warmup, d_only = 10, 2
    if args.updates <= warmup - d_only:
        raise SystemExit(f"--updates {args.updates}: GAD's warm-up alone makes {warmup - d_only} generator updates")
    return DemoOptions(out=str(args.out), seed=seed, precision=args.precision, engine=args.engine, train_prompts=TRAIN_PROMPTS,
                       warmup_steps=warmup, d_only_steps=d_only, gad_steps=args.updates - (warmup - d_only), seqkd_steps=args.updates,
                       opd_steps=args.updates, opd_batch_size=4, opd_lr=2e-5)


def training_config(method: str, args: argparse.Namespace, seed: int, teacher_file: Path) -> dict[str, Any]:
    """The demo's config for `method`, matched as the docstring says; the run directory is set by the stage."""
    from opdistill.demo import DEMO_METHODS, common_config

    opts = demo_options(args, seed)
    opts.method = method
    config = DEMO_METHODS[method].config(opts, common_config(opts, teacher_file, args.out))
    config["checkpoint_every"] = 0  # resumable by stage; nothing of a finished stage is needed but its student
    return config


def train_work(config: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    def work(directory: Path) -> dict[str, Any]:
        from opdistill.config import build_config
        from opdistill.methods import train

        train(build_config({**config, "out_dir": str(directory)}, where="benchmarks/verdict.py"))
        steps = [row for row in read_json_lines(directory / "metrics.jsonl") if "step_seconds" in row]
        updates = sum(("g_ce_loss" in row) or row.get("stage") == 1.0 or config["method"] != "gad" for row in steps)
        adversarial = [row for row in steps if row.get("stage") == 1.0]
        info: dict[str, Any] = {"generator_updates": updates, "seconds": round(sum(r["step_seconds"] for r in steps), 1)}
        if adversarial:  # what the discriminator saw: its accuracy and the reward gap over the adversarial steps
            info["gad"] = [{k: round(r[k], 4) for k in ("d_acc", "teacher_score", "student_score", "response_length") if k in r}
                           for r in adversarial]
        return info

    return work


# ---------------------------------------------------------------- the prompts


def ood_prompts(data_dir: Path) -> list[dict[str, Any]]:
    """Math word problems, competition math, code to complete and open questions (OOD_PER_KIND): kinds of request the
    students never trained on."""
    def lines(name: str) -> list[dict[str, Any]]:
        path = data_dir / name
        if not path.is_file():
            raise SystemExit(f"{path} is missing: the verdict reads its out-of-distribution prompts from ../shared/data")
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    n = OOD_PER_KIND
    rows = [{"prompt": r["question"], "kind": "gsm8k"} for r in lines("gsm8k_test.jsonl")[:n["gsm8k"]]]
    rows += [{"prompt": r["problem"], "kind": "math500"} for r in lines("math500_test.jsonl")[:n["math500"]]]
    rows += [{"prompt": "Complete this Python function.\n\n" + r["prompt"], "kind": "humaneval"} for r in lines("HumanEval.jsonl.gz")[:n["humaneval"]]]
    rows += [{"prompt": r["text"], "kind": "vicuna"} for r in lines("vicuna80_questions.jsonl")[:n["vicuna"]]]
    return rows


def write_prompt_sets(directory: Path, data_dir: Path) -> dict[str, Path]:
    from opdistill.data import load_records

    unseen = load_records(f"builtin:train[{TRAIN_PROMPTS}:]") + load_records("builtin:heldout")
    indist = [{"prompt": r.messages[-1]["content"]} for r in unseen[:INDIST_PROMPTS]]
    sets = {"indist": indist, "ood": ood_prompts(data_dir)}
    paths = {name: directory / f"{name}.jsonl" for name in sets}
    for name, rows in sets.items():
        write_json_lines(paths[name], rows)
    return paths


# ---------------------------------------------------------------- the numbers


def per_prompt(out: Path, rows: list[str]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """set -> row -> per prompt (in order): french, brief, ended, words, repetition, teacher log-prob (sum, tokens)."""
    from opdistill.evaluate.metrics import is_french, repetition, words

    generations = read_json_lines(out / "generations.jsonl")
    answers: dict[tuple[str, str, int], dict[str, Any]] = {(g["set"], g["model"], g["index"]): g for g in generations}
    result: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for set_name in ("indist", "ood"):
        count = 1 + max(i for s, _, i in answers if s == set_name)
        result[set_name] = {}
        for row in rows:
            items = []
            for i in range(count):
                g = answers[(set_name, row, i)]
                text = g["response"]
                items.append({"french": is_french(text), "brief": bool(text.strip()) and len(words(text)) <= BRIEF_WORDS,
                              "ended": bool(g["finished"]), "words": len(words(text)), "repetition": repetition(text), "text": text})
            result[set_name][row] = items
    return result


def share(items: list[dict[str, Any]], key: str) -> dict[str, Any]:
    from opdistill.evaluate.stats import proportion

    return proportion(sum(bool(item[key]) for item in items), len(items))


def row_summary(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"french": share(items, "french"), "brief": share(items, "brief"), "ended": share(items, "ended"),
            "mean_words": round(statistics.mean(i["words"] for i in items), 1),
            "repetition_4": round(statistics.mean(i["repetition"] for i in items), 3)}


def paired(x: list[dict[str, Any]], y: list[dict[str, Any]], key: str) -> dict[str, Any]:
    from opdistill.evaluate.stats import paired_comparison

    return paired_comparison([bool(i[key]) for i in x], [bool(i[key]) for i in y])


def report(args: argparse.Namespace, seeds: list[int], stages: Stages, eval_dir: Path) -> dict[str, Any]:
    from opdistill.evaluate.stats import paired_over_seeds, rate_over_seeds

    rows = [TEACHER_ROW, BASE_ROW, *(f"{m}-{s}" for s in seeds for m in METHODS)]
    items = per_prompt(eval_dir, rows)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    results: dict[str, Any] = {"machine": machine(args.precision), "seeds": seeds, "updates": args.updates, "sets": {}}
    for set_name, by_row in items.items():
        logprobs = {row: metrics["sets"][set_name]["models"][row].get("teacher_logprob") for row in rows}
        table: dict[str, Any] = {"prompts": len(by_row[BASE_ROW]), "rows": {}, "pooled": {}, "paired": [], "sameness": []}

        def passes(method: str, key: str) -> list[list[bool]]:  # [seed][prompt]: the method's runs on this set
            return [[bool(item[key]) for item in by_row[f"{method}-{s}"]] for s in seeds]

        for row in rows:
            table["rows"][row] = {**row_summary(by_row[row]), "teacher_logprob": logprobs[row]}
        for method in METHODS:  # over seeds, the prompt the unit (opdistill.evaluate.stats: rate_over_seeds)
            pooled = [item for s in seeds for item in by_row[f"{method}-{s}"]]
            shares = [table["rows"][f"{method}-{s}"]["french"]["accuracy"] for s in seeds]
            briefs = [table["rows"][f"{method}-{s}"]["brief"]["accuracy"] for s in seeds]
            over_seeds = {key: rate_over_seeds(passes(method, key)) for key in ("french", "brief")}
            table["pooled"][method] = {**row_summary(pooled), **over_seeds, "french_seed_range": [min(shares), max(shares)],
                                       "brief_seed_range": [min(briefs), max(briefs)],
                                       "teacher_logprob_mean_of_seeds": statistics.mean(logprobs[f"{method}-{s}"] for s in seeds)}
        for x, y in PAIRS:
            for key in ("french", "brief"):
                per_seed = {s: paired(by_row[f"{x}-{s}"], by_row[f"{y}-{s}"], key) for s in seeds}
                pooled = paired_over_seeds(passes(x, key), passes(y, key))
                table["paired"].append({"x": x, "y": y, "metric": key, "pooled": pooled, "per_seed": per_seed})
            table["sameness"].append({"x": x, "y": y, **{str(s): sameness([a["text"] for a in by_row[f"{x}-{s}"]], [b["text"] for b in by_row[f"{y}-{s}"]]) for s in seeds}})
        results["sets"][set_name] = table
    results["training"] = {f"{m}-{s}": stages.info(f"{m}-{s}") for s in seeds for m in METHODS}
    results["stage_seconds"] = stages.total_seconds()
    return results


def percent(p: dict[str, Any]) -> str:
    return f"{p['accuracy']:.0%} [{p['ci_low']:.0%}, {p['ci_high']:.0%}]"


def markdown(results: dict[str, Any]) -> str:
    host = results["machine"]
    lines = ["# Verdict: SeqKD vs GAD vs OPD, context distillation of SmolLM2-135M-Instruct",
             "", f"Machine: {host['cpu']}, {host['cores']} cores, precision {host['precision']}; seeds {results['seeds']}; "
             f"{results['updates']} generator updates per student. Shares with 95% Wilson intervals; p: McNemar's exact test, paired per prompt."]
    for set_name, table in results["sets"].items():
        lines += ["", f"## {set_name} ({table['prompts']} prompts)", "",
                  "| row | French | brief (<= 25 words) | EOS | mean words | repetition | teacher log-prob |", "|---|---|---|---:|---:|---:|---:|"]
        for row, r in table["rows"].items():
            lp = r["teacher_logprob"]
            lines.append(f"| {row} | {percent(r['french'])} | {percent(r['brief'])} | {r['ended']['accuracy']:.2f} | {r['mean_words']} | "
                         f"{r['repetition_4']} | {'-' if lp is None else f'{lp:.3f}'} |")
        lines += ["", "| pooled over seeds | French | French, seed range | brief | brief, seed range | mean words |", "|---|---|---|---|---|---:|"]
        for method, r in table["pooled"].items():
            lo, hi = r["french_seed_range"]
            blo, bhi = r["brief_seed_range"]
            lines.append(f"| {method} | {percent(r['french'])} | {lo:.0%} to {hi:.0%} | {percent(r['brief'])} | {blo:.0%} to {bhi:.0%} | {r['mean_words']} |")
        lines += ["", "| paired | metric | difference over seeds | prompts x more / y more | sign test p | McNemar p per seed |",
                  "|---|---|---:|---:|---:|---|"]
        for p in table["paired"]:
            q = p["pooled"]
            seeds = ", ".join(f"{v['p_value']:.2g}" for v in p["per_seed"].values())
            lines.append(f"| {p['x']} vs {p['y']} | {p['metric']} | {q['difference']:+.3f} | {q['x_more']} / {q['y_more']} | {q['p_value']:.2g} | {seeds} |")
    lines += ["", "## Training", ""]
    for run, info in results["training"].items():
        gad = info.get("gad")
        tail = ""
        if gad:
            tail = "; discriminator accuracy " + ", ".join(f"{g['d_acc']:.2f}" for g in gad) + "; reward gap (teacher - student) " + \
                   ", ".join(f"{g['teacher_score'] - g['student_score']:+.2f}" for g in gad)
        lines.append(f"- {run}: {info.get('generator_updates')} generator updates, {info.get('seconds')} s in steps{tail}")
    lines += ["", "Wall seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in results["stage_seconds"].items())]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the stages


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out = args.out.resolve()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    teacher_file = args.out / "collect" / "teacher.jsonl"
    configs = {f"{m}-{s}": training_config(m, args, s, teacher_file) for s in seeds for m in METHODS}
    if args.plan:
        from opdistill.config import build_config

        for name, config in configs.items():
            build_config({**config, "out_dir": "/nonexistent"}, where=f"benchmarks/verdict.py stage {name}")
            say(f"stage {name}: {json.dumps(config)}")
        return
    from opdistill.demo import DEFAULT_SYSTEM
    from opdistill.evaluate.run import EvalOptions, run_eval
    from opdistill.teachers.collect import CollectOptions, collect

    args.out.mkdir(parents=True, exist_ok=True)
    stages = Stages(args.out)
    started = time.monotonic()

    def collect_work(directory: Path) -> dict[str, Any]:
        summary = collect(CollectOptions(prompts=f"builtin:train[:{TRAIN_PROMPTS}]", out=str(directory / "teacher.jsonl"), teacher_model=MODEL,
                                         system=DEFAULT_SYSTEM, temperature=0.7, top_p=0.95, max_tokens=48, seed=0, batch_size=32,
                                         precision=args.precision, engine=args.engine))
        return {"stored": summary.stored}

    stages.run("collect", {"prompts": TRAIN_PROMPTS, "system": DEFAULT_SYSTEM, "precision": args.precision}, [], collect_work)
    for name, config in configs.items():
        stages.run(name, config, ["collect"], train_work(config))

    rows = {TEACHER_ROW: MODEL, BASE_ROW: MODEL, **{name: str(args.out / name / "student") for name in configs}}

    def eval_work(directory: Path) -> dict[str, Any]:
        paths = write_prompt_sets(directory / "prompts", args.data_dir)
        run_eval(EvalOptions(models=[f"{k}={v}" for k, v in rows.items()], systems=[f"{TEACHER_ROW}={DEFAULT_SYSTEM}"], teacher=TEACHER_ROW,
                             prompts=[f"{name}={path}" for name, path in paths.items()], out=str(directory), checks=["french"],
                             max_new_tokens=args.eval_tokens, temperature=0.0, batch_size=32, seed=0, precision=args.precision,
                             engine=args.engine, embeddings=False))
        return {}

    # Not wiped on a change: answers and scores are cached by model weights and exact request.
    stages.run("eval", {"rows": rows, "tokens": args.eval_tokens}, list(configs), eval_work, wipe_on_change=False)
    results = report(args, seeds, stages, args.out / "eval")
    (args.out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    text = markdown(results)
    (args.out / "results.md").write_text(text, encoding="utf-8")
    print(text)
    say(f"results: {args.out / 'results.md'} ({time.monotonic() - started:.0f} s this invocation)")


if __name__ == "__main__":
    sys.exit(main())

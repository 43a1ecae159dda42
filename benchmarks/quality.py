"""Quality benchmark: real distillation from a stronger model, measured with program-checked suites and a calibrated judge.

    python benchmarks/quality.py --out runs/quality [--size auto|smoke|compact|cpu|full|gpu] [--only blackbox|whitebox|all]
                                 [--whitebox-tuning lora|full] [--teacher-system TEXT] [--threads N] [--seed N] [--reuse-from DIR] [--tune | --tuned-from DIR]
                                 [--plan] [--report-now]

Needs `./setup.sh --models` (the two Qwen2.5-Coder built-ins) and ../shared/data beside the checkout.

**Teacher.** Qwen2.5-Coder-1.5B-Instruct, for both families.

**Black-box, cross-family** (→ SmolLM2-135M-Instruct, another tokenizer). The teacher answers Self-Instruct and built-in
train prompts (everyday tasks whose requests carry constraints: formats, lengths, audiences; never an IFEval prompt)
reading a privileged system prompt (`--teacher-system`, default in quality_runs.py; '' turns it off) that keeps its
answers short unless a length is asked for: on a CPU every teacher token costs 45 ms or more. Rows: `teacher`;
`smollm2-base` (untrained); `smollm2-seqkd` (cross-entropy on the teacher's text); `smollm2-gad` (GAD: a warm-up whose
first steps train only the discriminator, then adversarial steps; the same text); `smollm2-opd-xtok` (OPD with the
teacher's log-probs through `cross_tokenizer: true`: reward_to_go, the sequence-level reverse KL by policy gradient over
spans, on the student's own samples of the
same prompts). Scored on IFEval (program-checked: prompt-level strict accuracy with its interval, loose and
instruction-level beside it) and on Vicuna's 80 questions, the GAD paper's out-of-distribution set, judged pairwise
against the teacher by the 1.5B's logits in both orders (raw and length-controlled win rates), printed with the judge's
accuracy on a calibration set with known answers (docs/eval.md).

**White-box, same family** (→ Qwen2.5-Coder-0.5B-Instruct). The teacher solves GSM8K train questions, asked as the gsm8k
suite asks (one stated answer format), reading a privileged "Solve it in a few short steps." (the same in OPD's
teacher and the teacher row: one teacher). Rows: `teacher`; `qwen0.5b-base`; `qwen0.5b-seqkd` (the
teacher's own solutions, right or wrong, as there are no gold answers in distillation); `qwen0.5b-opd` (on-policy
reverse KL to the teacher's full distributions on the same questions, the same steps). `--whitebox-tuning lora`
(default) or `full`: LoRA because full fine-tuning of the 0.5B needs about 10 GB for fp32 weights, gradients and AdamW
state beside the 3.4 GB teacher, on a 23 GB machine others share. Scored on GSM8K test (in distribution), MATH-500 and
HumanEval (pass@1 in a sandbox; out of distribution).

Every comparison of two rows on a suite comes with McNemar's exact paired test (trained rows against their base, and
against SeqKD), and every row with the teacher's per-token log-prob of its answers (re-tokenised with the teacher's
tokenizer): before (base) and after (trained) training.

**Compute matching.** Every run of a family draws its prompts from the same file of teacher texts in the same seeded
order. Black-box: SeqKD makes `seqkd_steps` generator updates of `blackbox_batch` prompts; GAD makes the same number
of the same size, (`gad_warmup` - `gad_d_only`) cross-entropy updates in its warm-up plus `seqkd_steps - (gad_warmup -
gad_d_only)` adversarial ones; cross-tokenizer OPD makes `seqkd_steps` updates of `blackbox_batch` prompts. So every
student gets equal generator optimizer steps x prompts per step from the same prompts. GAD and OPD spend more per update
(samples, the discriminator or the teacher's passes): that is their method, and each run's seconds per update are
reported (results.json `training`). White-box: SeqKD and OPD make `whitebox_steps` updates of `whitebox_batch` prompts.

**Training texts that end.** Only teacher answers that ended (EOS) and fit the training limit with their EOS in every
student's tokenizer are kept (collect*/train.jsonl): no training text is cut and none gains an EOS it never had.
Rollouts use the same limit. The black-box evaluation is greedy at twice the limit, so the EOS rate and repetition show
whether the students learned to stop.

**Stages** (each in its own directory under --out, with done.json; a stage is skipped when its done.json has the
same settings and is newer than the stages it depends on; a rerun continues where the last one stopped: collection
and evaluation resume from their durable stores, training from its newest checkpoint; delete a stage's directory to
redo it and, through the timestamps, everything after it):
  collect, collect-gsm8k             the teacher's texts per family (opdistill collect, local model)
  blackbox-{seqkd,gad,opd-xtok}      SmolLM2's runs      whitebox-{seqkd,opd}   the 0.5B's runs (opdistill train)
  eval-blackbox, eval-whitebox       one `opdistill eval` per family, every row
  report                             results.json, results.md, report.html
Every attempt's wall time goes to --out/timings.jsonl; results.json sums them per stage.

**Sizes** (quality_runs.SIZES). smoke: a handful of items and 2-3 steps per stage, the plumbing in minutes; its numbers
mean nothing. full: a 2-core CPU with native bf16 (AVX512-BF16/AMX) and the machine to itself,
70 adversarial GAD updates: about 2 h 15 min for the black-box family and 1 h 15 min for the white-box one (estimated;
`--only` runs one family per invocation, in the same --out). compact: a 2-core AVX2-only CPU, where `auto` precision is fp32 (bf16 is emulated) and the
1.5B runs about 4x slower: few updates and items, for the plumbing and the stopping, not a verdict. cpu: the black-box
verdict on such a CPU (`--size cpu --only blackbox`, about 2 h): 40 generator updates per student, the students on all
541 IFEval prompts and all 80 Vicuna questions; the 1.5B's passes limit the rest: the teacher row and its log-probs on
the first 48 IFEval items (a part of its own, `ifeval-teacher`), and the judge reads GAD and cross-tokenizer OPD
against SeqKD in both orders (no teacher row on Vicuna). gpu: one command
on a GPU with every black-box prompt there is (524), 2,000 GSM8K questions, 260 adversarial updates and the whole
suites. auto (the default): full on a GPU or a CPU with native bf16, compact otherwise. Every result records the
machine it ran on and the size. `--plan` prints the stages and checks every training config, loading nothing.

**Tuning.** `--tune` runs the size's declared sweeps (Size.gad_sweep and opd_sweep; the cpu size's: GAD with a one-epoch
warm-up, a 50x KL coefficient, the discriminator at the generator's learning rate, 8 samples per prompt; cross-tokenizer
OPD with the per-token estimator), each variant from the same teacher text with the same generator updates, and
chooses per method among its default and its variants on the tuning split alone: `tune_prompts` training-distribution
prompts after the first train_prompts, which no student trained on and no held-out set holds (stage tune, its rule in
quality_runs.TUNING_RULE). Only the choices meet the held-out sets, as the rows smollm2-gad-tuned and
smollm2-opd-xtok-tuned (judged against SeqKD on Vicuna too), unless a default won. `--gad-variant NAME:key=value,...`
(repeatable) adds a held-out row smollm2-gad-NAME by hand, matched the same way; finished rows are not redone.

**Seeds.** `--seed N` sets every training run's seed; each seed has its own --out, and `--reuse-from` the first seed's
--out reuses its teacher texts and the base and teacher rows' answers, log-probs and judge replies (every store is
keyed by weights and request), so another seed pays only for its students. `benchmarks/quality_seeds.py` pools the
runs: per seed, over the seeds with intervals over items, and the seed range, with paired tests. `--tuned-from` the
first seed's --out trains its sweep's choices here as the *-tuned rows, so every seed has the same tuned settings
and the tuning is done once.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from quality_results import results_markdown  # benchmarks/, beside this script
from quality_runs import (COLLECT, DATA_DIR, DEFAULT_TEACHER_SYSTEM, FAMILIES, SIZES, TAKEN_CHOICES, TEACHER, TUNE_STAGE, TUNED,
                          WHITEBOX_TEACHER_SYSTEM, Size, blackbox_row, blackbox_stage, changed_settings, collect_blackbox,
                          collect_gsm8k, eval_rows, eval_settings, eval_stage, gad_variant, recorded_choices, report_stage,
                          reuse_stores, sweep_configs, train_stage, training_configs, tune_stage, tuning_rows)
from quality_stages import Stages, fast_machine, machine, say


def choose_size(requested: str, host: dict[str, Any]) -> str:
    """`auto` picks the size this machine can run: full where the 1.5B runs fast, compact where it runs in fp32 on a
    CPU (about 4x slower; docs/quality.md, "Machines")."""
    if requested != "auto":
        return requested
    return "full" if fast_machine(host) else "compact"


def slow_machine_warning(size_name: str, host: dict[str, Any]) -> str | None:
    """Said before a full- or gpu-size run on a machine it is not sized for."""
    if size_name == "gpu" and not host["gpu"]:
        return "the gpu size runs thousands of prompts and the whole suites: days on a CPU"
    if size_name != "full" or fast_machine(host):
        return None
    return (f"this CPU ({host['cpu']}) runs precision {host['precision']} (native bf16: {host['native_bf16']}); the full "
            "size is sized for a 2-core CPU with native bf16 (about 3.5 hours for both families); without it the 1.5B runs about 4x slower "
            "and training about 2x: expect 10 hours or more (docs/quality.md, 'Machines'). --only blackbox and --only whitebox "
            "split it over two runs in the same --out; every stage resumes.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="run directory; rerun the same command to continue")
    parser.add_argument("--size", choices=["auto", *sorted(SIZES)], default="auto",
                        help="auto (default): full on a GPU or a CPU with native bf16, compact otherwise (docstring, 'Sizes')")
    parser.add_argument("--only", choices=["blackbox", "whitebox", "all"], default="all")
    parser.add_argument("--whitebox-tuning", choices=["lora", "full"], default="lora", help="how the 0.5B student trains (docstring)")
    parser.add_argument("--teacher-system", default=DEFAULT_TEACHER_SYSTEM,
                        help="the black-box teacher's privileged system prompt ('' for none)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="the shared data (Self-Instruct, GSM8K, the suites)")
    parser.add_argument("--gad-variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="one more black-box GAD row, smollm2-gad-NAME, with these train settings over the default GAD's "
                             "(e.g. long-warmup:warmup_steps=16,lr=1e-5); repeatable; generator updates stay matched to SeqKD")
    parser.add_argument("--seed", type=int, default=0,
                        help="every training run's seed; a second seed goes in its own --out (see --reuse-from)")
    parser.add_argument("--reuse-from", type=Path, default=None, metavar="DIR",
                        help="another run's --out: its teacher texts and the base and teacher rows' answers, log-probs and "
                             "judge replies are reused (keyed by weights and request), so another seed pays only its students")
    parser.add_argument("--tuned-from", type=Path, default=None, metavar="DIR",
                        help="another run's --out whose --tune has chosen: train its choices here (this seed) as the "
                             "*-tuned rows, without sweeping again")
    parser.add_argument("--tune", action="store_true",
                        help="train the size's declared GAD and cross-tokenizer OPD sweeps, choose on the in-distribution "
                             "tuning split only, and evaluate each choice on the held-out sets as smollm2-gad-tuned and "
                             "smollm2-opd-xtok-tuned (docstring, 'Tuning')")
    parser.add_argument("--plan", action="store_true", help="print the stages and check every training config; load nothing")
    parser.add_argument("--report-now", action="store_true",
                        help="write results.md/json from the evaluation parts finished so far (interim tables of a run still going on)")
    return parser.parse_args(argv)


def add_gad_variants(specs: list[str], size: Size, configs: dict[str, dict[str, Any]]) -> None:
    """Register each --gad-variant as a black-box stage and a held-out row smollm2-gad-NAME."""
    for spec in specs:
        stage, config = gad_variant(spec, size, configs["blackbox-gad"])
        FAMILIES["blackbox"][blackbox_row(stage)] = stage  # the table every later step reads its rows from
        configs[stage] = config


def tune(stages: Stages, size: Size, args: argparse.Namespace, sweep: dict[str, dict[str, Any]]) -> Size:
    """Issue 38 item 4, once: train the declared sweeps, choose on the in-distribution tuning split alone, and make
    each method's choice a held-out row (smollm2-gad-tuned, smollm2-opd-xtok-tuned; judged against SeqKD on Vicuna
    too), unless it is the method's default. The variants themselves never meet a held-out set. Returns the size
    with the judged pairs added."""
    for stage, config in sweep.items():
        stages.run(stage, config, [COLLECT["blackbox"]], train_stage(config))
    rows = tuning_rows(args.out, sweep)
    key = {"rows": rows, "prompts": size.tune_prompts, "tokens": size.eval_tokens, "system": args.teacher_system, "precision": args.precision}
    stages.run(TUNE_STAGE, key, ["blackbox-seqkd", *(stage for stage, _ in TUNED.values()), *sweep], tune_stage(size, args, rows),
               wipe_on_change=False)
    for method, choice in stages.info(TUNE_STAGE)["choices"].items():
        if choice == method:
            say(f"tuning: {method}'s default won; the held-out sets get no new row for it")
    return adopt_tuned_choices(stages, size)


def take_tuned_choices(source: Path, configs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """--tuned-from: another run's choices, trained here as this run's own stages (its seed, its texts): each variant
    is this run's default config with the settings the chosen variant changed there. Tuning stays once."""
    theirs = Stages(source)
    if not theirs.finished(TUNE_STAGE):
        raise SystemExit(f"quality: --tuned-from {source}: its sweep has not chosen yet (no finished stage {TUNE_STAGE})")
    choices = theirs.info(TUNE_STAGE)["choices"]
    for method, choice in choices.items():
        if choice != method:
            default, stage = TUNED[method][0], blackbox_stage(choice)
            configs[stage] = {**configs[default], **changed_settings(theirs, stage, default)}
    return choices


def adopt_tuned_choices(stages: Stages, size: Size) -> Size:
    """Where --out holds a finished sweep (or choices taken over), each choice that is not its method's default is a
    black-box row in every later invocation (--only whitebox and --report-now included), so no report drops it.
    Returns the size with the judged pairs added."""
    choices = recorded_choices(stages)
    tuned_rows = [row for _, row in TUNED.values()]
    for row in tuned_rows:  # a choice made again (the sweep or its inputs redone) replaces the one adopted before
        FAMILIES["blackbox"].pop(row, None)
    pairs = [pair for pair in size.vicuna_pairs if pair.split(":")[0] not in tuned_rows]
    for method, choice in choices.items():
        if choice != method:
            FAMILIES["blackbox"][TUNED[method][1]] = blackbox_stage(choice)
            pairs.append(f"{TUNED[method][1]}:smollm2-seqkd")
    # Without declared pairs every row meets the teacher on Vicuna, the tuned rows too.
    return replace(size, vicuna_pairs=tuple(pairs)) if size.vicuna_pairs else size


def check_plan(configs: dict[str, dict[str, Any]], families: list[str], sweep: dict[str, dict[str, Any]]) -> None:
    """--plan: each training config through opdistill's own validation (the data files do not exist yet), and the
    stages in their order."""
    from opdistill.config import build_config

    for family in families:
        say(f"stage {COLLECT[family]}")
        tuning = list(sweep) if family == "blackbox" else []
        for stage in [*FAMILIES[family].values(), *tuning]:
            config = configs.get(stage) or sweep[stage]
            build_config({**config, "out_dir": "/nonexistent"}, where=f"benchmarks/quality.py stage {stage}")
            say(f"stage {stage}: {json.dumps(config)}")
        if tuning:
            say(f"stage {TUNE_STAGE}: choose per method on the tuning split; the choices are evaluated as "
                f"{', '.join(row for _, row in TUNED.values())}")
        say(f"stage eval-{family}")
    say("stage report")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out = args.out.resolve()  # the stages' settings hold paths under it: the same run whatever the working directory
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    host = machine(args.precision)
    say(f"machine: {host}")
    size_name = choose_size(args.size, host)
    size = SIZES[size_name]
    chosen = f" (auto: GPU {host['gpu']}, precision {host['precision']})" if args.size == "auto" else ""
    say(f"size {size_name}{chosen}: {asdict(size)}; GAD adversarial steps {size.gad_adversarial}")
    if warning := slow_machine_warning(size_name, host):
        say(f"warning: {warning}")
    configs = training_configs(size, args, args.out)
    add_gad_variants(args.gad_variant, size, configs)
    families = list(FAMILIES) if args.only == "all" else [args.only]
    if args.tune and "blackbox" not in families:
        raise SystemExit("quality: --tune tunes the black-box methods; run it with --only blackbox or all")
    sweep = sweep_configs(size_name, size, configs) if args.tune else {}
    if args.tune and args.tuned_from:
        raise SystemExit("quality: --tune sweeps here, --tuned-from takes another run's choices: pass one of them")
    tuned_from = args.tuned_from.resolve() if args.tuned_from else None
    taken = take_tuned_choices(tuned_from, configs) if tuned_from else {}
    if args.plan:
        check_plan(configs, families, sweep)
        return
    if taken:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / TAKEN_CHOICES).write_text(json.dumps({"from": str(tuned_from), "choices": taken}), encoding="utf-8")
    size = adopt_tuned_choices(Stages(args.out), size)
    if args.report_now:  # read-only on the stages: a run in another process goes on and writes the final tables
        finished = [f for f in families if any((args.out / f"eval-{f}").glob("*/metrics.json"))]
        if not finished:
            raise SystemExit(f"quality: no evaluation part has finished in {args.out} yet")
        write_results(size_name, size, args, Stages(args.out), finished, host, interim=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reuse_from:
        say(f"reused {reuse_stores(args.reuse_from.resolve(), args.out)} store(s) from {args.reuse_from}")
    stages = Stages(args.out)
    collect_work = {"blackbox": collect_blackbox, "whitebox": collect_gsm8k}
    for family in families:
        # Only what collection reads is in its key: a change to the evaluation's size must not redo every stage after it.
        limits = [size.train_prompts, size.train_tokens] if family == "blackbox" else [size.gsm8k_questions, size.math_tokens]
        key = {"limits": limits, "teacher": TEACHER, "precision": args.precision,
               "system": args.teacher_system if family == "blackbox" else WHITEBOX_TEACHER_SYSTEM}
        stages.run(COLLECT[family], key, [], collect_work[family](size, args))
        for stage in FAMILIES[family].values():
            config = configs.get(stage) or stages.key(stage)  # a tuned row's stage: its sweep trained it, with this config
            stages.run(stage, config, [COLLECT[family]], train_stage(config))
        if family == "blackbox" and sweep:
            size = tune(stages, size, args, sweep)
        rows = eval_rows(family, args.out)
        eval_key = {"rows": rows, "size": eval_settings(family, size), "system": key["system"], "precision": args.precision}
        # Not wiped on a change: generations and judge replies are cached by model weights and exact request.
        stages.run(f"eval-{family}", eval_key, list(FAMILIES[family].values()), eval_stage(family, size, args, rows), wipe_on_change=False)
    # Families finished in an earlier invocation are reported too; an evaluation that did not finish is not.
    done = [f for f in FAMILIES if stages.finished(f"eval-{f}")]
    write_results(size_name, size, args, stages, done, host)


def write_results(size_name: str, size: Size, args: argparse.Namespace, stages: Stages, families: list[str], host: dict[str, Any],
                  interim: bool = False) -> None:
    started = time.monotonic()
    results = report_stage(size_name, size, args, stages, families)
    results["machine"] = host
    results["interim"] = interim and any(not stages.finished(f"eval-{family}") for family in families)
    seconds = round(time.monotonic() - started, 1)
    results["stage_seconds"]["report"] = seconds
    results["this_invocation_seconds"]["report"] = seconds
    (args.out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    markdown = results_markdown(results)
    (args.out / "results.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    for name, stage_seconds in results["stage_seconds"].items():
        say(f"wall time {name}: {stage_seconds:.0f} s")
    say(f"results: {args.out / 'results.md'}, {args.out / 'results.json'}; report: {results['files']['report']}")


if __name__ == "__main__":
    main()

"""`opdistill demo`: the built-in end-to-end job on one small machine.

Teacher: SmolLM2-135M-Instruct with a privileged system prompt (default "Always respond in French, in one short sentence.").
Student: the same model without it. Context distillation, black-box: the student only ever sees the
teacher's text. Steps: collect teacher texts on the built-in train prompts -> train (GAD: warm-up, then
adversarial steps; or SeqKD alone) -> evaluate the teacher, the base student and every trained student on
the built-in held-out prompts with a language test -> metrics.json, generations.jsonl, report.html.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .config import build_config
from .errors import NothingToTrainOn
from .teachers.collect import CollectOptions, collect

DEFAULT_SYSTEM = "Always respond in French, in one short sentence."  # brief: many of its answers end, so students learn to stop
MODEL = "smollm2-135m-instruct"
TEACHER_ROW = "teacher (with system prompt)"
EVAL_LENGTH_FACTOR = 3  # evaluation's new tokens per training token: does a student stop, and without looping, when it may go on?
BASE_ROW = "student before (base)"


@dataclass
class DemoOptions:
    out: str
    method: str = "gad"
    system: str = DEFAULT_SYSTEM
    model: str = MODEL
    train_prompts: int = 96
    heldout_prompts: int = 40
    max_new_tokens: int = 48  # collection and training; evaluation runs at EVAL_LENGTH_FACTOR times this
    # Teacher answers that did not end within max_new_tokens: drop them (the default) or keep them without an EOS. Students
    # trained on cut texts never learn to stop and loop when allowed to go on (docs/demo.md); the brief system prompt
    # ends about a quarter of the teacher's answers within 48 tokens, and those are what the students learn from.
    unfinished: str = "drop"
    batch_size: int = 4
    lr: float = 2e-5
    # GAD
    warmup_steps: int = 10
    d_only_steps: int = 2
    gad_steps: int = 8
    n_samples: int = 4
    d_lr: float = 2e-4
    discriminator_layers: int = 6
    # SeqKD-only demo
    seqkd_steps: int = 30
    # GAD demo: also train SeqKD alone with GAD's generator updates (warm-up cross-entropy + adversarial) on the same
    # texts and evaluate it beside GAD, so the table compares GAD with SeqKD given the same updates, not with its warm-up
    matched_seqkd: bool = True
    # white-box OPD demo: the teacher is the student's own weights with the system prompt (no text collected)
    opd_steps: int = 32
    opd_batch_size: int = 8
    opd_lr: float = 2e-5
    divergence: str = "rkl"
    beta: float = -1.0  # jsd's β or Veto's β (-1: the divergence's default)
    horizon_tokens: int = 0  # > 0: truncated rollouts (TOPD) of this many tokens
    seed: int = 0
    precision: str = "auto"  # collection, training and evaluation: auto (bf16 where native), bf16 or fp32
    engine: str = "auto"  # collection, GAD/OPD rollouts and evaluation: auto (vLLM where installed and worth it), hf or vllm


def _say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def collect_teacher(opts: DemoOptions, out: Path) -> Path:
    teacher_file = out / "teacher.jsonl"
    _say(f"1/3 collecting teacher responses ({opts.model} with system prompt {opts.system!r}) on {opts.train_prompts} built-in train prompts")
    summary = collect(CollectOptions(prompts=f"builtin:train[:{opts.train_prompts}]", out=str(teacher_file), teacher_model=opts.model,
                                     system=opts.system, temperature=0.7, top_p=0.95, max_tokens=opts.max_new_tokens, seed=opts.seed,
                                     batch_size=32, precision=opts.precision, engine=opts.engine))
    for line in summary.lines():
        _say("   " + line)
    return teacher_file


def common_config(opts: DemoOptions, teacher_file: Path, out: Path) -> dict[str, Any]:
    return {"method": opts.method, "student": opts.model, "data": str(teacher_file), "out_dir": str(out / opts.method),
            "batch_size": opts.batch_size, "lr": opts.lr, "seed": opts.seed, "max_response_tokens": opts.max_new_tokens,
            "precision": opts.precision, "unfinished": opts.unfinished}


def rollout_engine(opts: DemoOptions) -> str:
    """Training's rollouts: vLLM where it runs the model (auto), as asked otherwise. A training run samples many
    thousand tokens, so auto does not weigh the job's size here."""
    if opts.engine != "auto":
        return opts.engine
    from .rollout.engines import model_config, vllm_unusable

    return "hf" if vllm_unusable(model_config(opts.model)) else "vllm"


def gad_config(opts: DemoOptions, common: dict[str, Any]) -> dict[str, Any]:
    return {**common, "warmup_steps": opts.warmup_steps, "d_only_steps": opts.d_only_steps, "max_steps": opts.gad_steps,
            "n_samples": opts.n_samples, "rollout_batch_size": opts.batch_size * opts.n_samples,
            "micro_batch_size": opts.batch_size * opts.n_samples, "d_lr": opts.d_lr, "discriminator_layers": opts.discriminator_layers,
            "max_grad_norm": 1.0, "d_max_grad_norm": 1.0, "checkpoint_every": opts.warmup_steps + opts.gad_steps,
            "rollout_engine": rollout_engine(opts)}


def seqkd_config(opts: DemoOptions, common: dict[str, Any]) -> dict[str, Any]:
    return {**common, "max_steps": opts.seqkd_steps, "micro_batch_size": opts.batch_size, "warmup_ratio": 0.1,
            "checkpoint_every": max(10, opts.seqkd_steps // 2), "max_grad_norm": 1.0}


def opd_config(opts: DemoOptions, common: dict[str, Any]) -> dict[str, Any]:
    return {**common, "data": f"builtin:train[:{opts.train_prompts}]", "teacher_system": opts.system, "divergence": opts.divergence,
            "beta": opts.beta, "max_steps": opts.opd_steps, "batch_size": opts.opd_batch_size, "micro_batch_size": opts.opd_batch_size,
            "lr": opts.opd_lr, "rollout_batch_size": opts.opd_batch_size, "lr_schedule": "constant", "warmup_ratio": 0.0,
            "max_grad_norm": 1.0, "checkpoint_every": opts.opd_steps, "rollout_engine": rollout_engine(opts),
            **({"horizon": "truncated", "horizon_tokens": opts.horizon_tokens} if opts.horizon_tokens else {})}


@dataclass(frozen=True)
class DemoMethod:
    """What the demo needs to know about a training method: whether it learns from teacher text, its training config,
    the line that announces it, and its evaluation rows (label -> the saved model's folder under the run)."""

    needs_text: bool
    config: Callable[[DemoOptions, dict[str, Any]], dict[str, Any]]
    announce: Callable[[DemoOptions], str]
    rows: dict[str, str]


# One entry per method the demo runs; `opdistill demo --method` offers exactly these.
DEMO_METHODS: dict[str, DemoMethod] = {
    "gad": DemoMethod(True, gad_config, lambda o: (
        f"GAD: {o.warmup_steps} warm-up steps (first {o.d_only_steps} discriminator only), then {o.gad_steps} adversarial steps; "
        f"{o.batch_size} prompts x {o.n_samples} samples per step, lr {o.lr}, discriminator lr {o.d_lr}"),
        # GAD's warm-up generator (SeqKD only) is a row of its own, beside the final student.
        {"student after warm-up (SeqKD only)": "reference", "student after GAD": "student"}),
    "seqkd": DemoMethod(True, seqkd_config, lambda o: f"SeqKD: {o.seqkd_steps} steps of {o.batch_size}, lr {o.lr}",
                        {"student after SeqKD": "student"}),
    # White-box OPD needs no teacher text: the teacher (the student's weights with the system prompt) scores its samples.
    "opd": DemoMethod(False, opd_config, lambda o: (
        f"OPD (white-box, teacher = the student's weights with the system prompt): {o.opd_steps} steps of {o.opd_batch_size} "
        f"prompts, {o.divergence}, lr {o.opd_lr}"), {"student after OPD": "student"}),
}


MATCHED_ROW = "student after SeqKD (as many updates as GAD)"


def gad_generator_updates(opts: DemoOptions) -> int:
    """GAD's generator updates: its warm-up steps that train the generator (cross-entropy), then every adversarial step."""
    return opts.warmup_steps - opts.d_only_steps + opts.gad_steps


def matched_seqkd_config(opts: DemoOptions, teacher_file: Path, out: Path) -> dict[str, Any]:
    """SeqKD alone on GAD's texts, prompts per step and learning rate, with GAD's number of generator updates."""
    common = {**common_config(opts, teacher_file, out), "method": "seqkd", "out_dir": str(out / "seqkd-matched")}
    return {**seqkd_config(opts, common), "max_steps": gad_generator_updates(opts), "warmup_ratio": 0.0,
            "checkpoint_every": gad_generator_updates(opts)}


def train_config(opts: DemoOptions, teacher_file: Path, out: Path) -> dict[str, Any]:
    """The training run's config; every value can be checked in DIR/<method>/config.yaml afterwards."""
    return DEMO_METHODS[opts.method].config(opts, common_config(opts, teacher_file, out))


def trained_rows(opts: DemoOptions, run_dir: Path) -> dict[str, Path]:
    """Evaluation rows for the trained students."""
    return {label: run_dir / folder for label, folder in DEMO_METHODS[opts.method].rows.items()}


def run_demo(opts: DemoOptions) -> dict:
    # Imported here so that building the CLI (which reads DemoOptions' defaults) does not load torch.
    from .evaluate.run import EvalOptions, run_eval
    from .methods import train
    from .report import write_report

    if opts.method not in DEMO_METHODS:
        raise ValueError(f"demo method must be one of {', '.join(DEMO_METHODS)}, got {opts.method!r}")
    method = DEMO_METHODS[opts.method]
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stages: dict[str, float] = {}  # wall seconds per stage, in metrics.json and the last line
    teacher_file = collect_teacher(opts, out) if method.needs_text else out / "teacher.jsonl"
    stages["collect"] = round(time.monotonic() - started, 1)

    config = build_config(train_config(opts, teacher_file, out), where="demo")
    _say(f"2/3 {method.announce(opts)}")
    try:
        train(config)
    except NothingToTrainOn as err:  # its fix names config keys; the demo's user sets flags
        raise NothingToTrainOn(err.message, f"raise --max-new-tokens (now {opts.max_new_tokens}), keep cut answers with --unfinished "
                                            "keep, or ask for shorter answers in --system") from None
    matched = opts.method == "gad" and opts.matched_seqkd
    if matched:
        _say(f"2/3 SeqKD alone with GAD's {gad_generator_updates(opts)} generator updates on the same texts (the matched row)")
        train(build_config(matched_seqkd_config(opts, teacher_file, out), where="demo"))
    stages["train"] = round(time.monotonic() - started - sum(stages.values()), 1)
    run_dir = out / opts.method
    student_dir = out / "student"
    shutil.rmtree(student_dir, ignore_errors=True)
    shutil.copytree(run_dir / "student", student_dir)

    # Three times the training limit: a student that learned to stop ends within it; one that did not shows as a low EOS
    # rate, and one that loops as a high 4-gram repetition.
    eval_tokens = EVAL_LENGTH_FACTOR * opts.max_new_tokens
    _say(f"3/3 evaluating on {opts.heldout_prompts} held-out prompts (greedy, {eval_tokens} new tokens, "
         f"{EVAL_LENGTH_FACTOR}x the training limit)")
    rows = {TEACHER_ROW: opts.model, BASE_ROW: opts.model, **{name: str(path) for name, path in trained_rows(opts, run_dir).items()}}
    if matched:  # beside GAD's final row, just before it
        final = list(rows)[-1]
        rows = {**{k: v for k, v in rows.items() if k != final}, MATCHED_ROW: str(out / "seqkd-matched" / "student"), final: rows[final]}
    evaluation = run_eval(EvalOptions(
        models=[f"{name}={path}" for name, path in rows.items()], systems=[f"{TEACHER_ROW}={opts.system}"],
        prompts=[f"heldout=builtin:heldout[:{opts.heldout_prompts}]"], out=str(out), teacher=TEACHER_ROW, checks=["french"],
        max_new_tokens=eval_tokens, temperature=0.0, batch_size=40, seed=opts.seed, precision=opts.precision, engine=opts.engine))
    stages["evaluate"] = round(time.monotonic() - started - sum(stages.values()), 1)
    metrics = {**evaluation, "task": f"share of held-out responses in French (system prompt: {opts.system!r})",
               "options": asdict(opts), "training_run": str(run_dir), "rollout_engine": getattr(config, "rollout_engine", "none"),
               "seconds": round(time.monotonic() - started, 1), "stage_seconds": stages}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    report = write_report([out])
    models = metrics["sets"]["heldout"]["models"]
    print(f"\n{'model':40} {'French share':>12} {'mean words':>10} {'EOS rate':>8} {'repetition':>10} {'distinct-2':>10} {'teacher logp':>12}")
    for name, values in models.items():
        logprob = values.get("teacher_logprob")  # None when a model wrote nothing the teacher could score
        print(f"{name:40} {values['french_share']:>11.0%} {values['mean_words']:>10.1f} {values['eos_rate']:>8.2f} "
              f"{values['repetition_4']:>10.2f} {values['distinct_2']:>10.2f} {'–' if logprob is None else f'{logprob:.3f}':>12}")
    final = list(models)[-1]
    others = ", ".join(f"{name} {values['french_share']:.0%}" for name, values in models.items() if name != final)
    print(f"\nheadline: the {final.removeprefix('student after ')} student answers {models[final]['french_share']:.0%} of held-out "
          f"prompts in French with no system prompt ({others})")
    timing = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages.items())
    print(f"student: {student_dir}   report: {report}   time: {metrics['seconds']:.0f} s ({timing}; rollouts: {metrics['rollout_engine']})")
    return metrics

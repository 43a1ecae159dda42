"""Quality benchmark: real distillation from a stronger model, GAD against SeqKD and OPD against SeqKD, measured.

    python benchmarks/quality.py --out runs/quality [--size auto|smoke|compact|full] [--only blackbox|whitebox|all]
                                 [--eval-prompts N] [--whitebox-tuning lora|full] [--teacher-system TEXT] [--threads N]

Needs `./setup.sh --models` (the two Qwen2.5-Coder built-ins) and ../shared/data beside the checkout.

**Teacher.** Qwen2.5-Coder-1.5B-Instruct reading a privileged system prompt that asks for short answers
(`--teacher-system`, default below; '' turns it off). Only the teacher sees it, in collection, in OPD's scoring and
in evaluation, so the students learn the teacher's content and its brevity from text or log-probs alone. Why: on this
CPU every teacher token costs ~45 ms, and without it most of Qwen-Coder's answers to everyday prompts run past 256
tokens (measured with the 0.5B: 7 of 16 built-in train prompts ended within 256), so training texts would be cut
before they end and the students would rarely see an ending (issue 15, item 3).

**Rows.**
- black-box, cross-family: `teacher`; `smollm2-base` (SmolLM2-135M-Instruct untrained); `smollm2-seqkd` (cross-entropy
  on the teacher's text); `smollm2-gad` (GAD: warm-up, whose first steps train only the discriminator, then
  adversarial steps; the same teacher text).
- white-box, same family: `teacher`; `qwen0.5b-base` (Qwen2.5-Coder-0.5B-Instruct untrained); `qwen0.5b-seqkd` (the
  same teacher text); `qwen0.5b-opd` (on-policy reverse KL to the 1.5B teacher's distributions, same prompts, same
  steps). `--whitebox-tuning lora` (default) or `full`: LoRA because full fine-tuning of the 0.5B needs about 10 GB for
  fp32 weights, gradients and AdamW state beside the 3.4 GB teacher and the sampling copy, on a 23 GB machine others
  share; LoRA keeps gradients and AdamW state for the adapters only and skips the frozen base's weight gradients.

**Compute matching.** Every training run draws its prompts from the same file of teacher texts in the same seeded
order. Black-box: SeqKD makes `seqkd_steps` generator updates of `blackbox_batch` prompts; GAD makes the same number
of generator updates of the same size: (`gad_warmup` - `gad_d_only`) cross-entropy updates in its warm-up plus
`seqkd_steps - (gad_warmup - gad_d_only)` adversarial updates. So the two students get equal generator optimizer
steps x prompts per step, from the same teacher texts. GAD spends more compute per update on top (N samples per
prompt, the discriminator, the reference pass); that is its method, and it is reported as each run's seconds in
steps next to its update and sequence counts (results.json `training`). White-box: SeqKD and OPD make
`whitebox_steps` updates of `whitebox_batch` prompts each; OPD adds its rollouts and the teacher's forward passes.

**Training texts that end.** The teacher answers at most `train_tokens` tokens; only answers that ended (EOS) and fit
`train_tokens` tokens with their EOS in both students' tokenizers are kept (collect/train.jsonl), so no training text
is cut and none gains an EOS it never had. Rollouts (GAD, OPD) use the same limit. Evaluation is greedy at
2 x `train_tokens` new tokens, so EOS rate and repetition show whether the students learned to stop.

**Scores** (all from opdistill's own `run_eval`, one evaluation with every row, in --out/eval): on the built-in
held-out prompts (in distribution) and on MT-Bench first turns (out of distribution, stratified over its 8
categories): the local judge (the 1.5B itself, no system prompt) pairwise against the teacher in both orders (win
rate with a 95% interval) and its reference-ratio score against the teacher's answer; the teacher's per-token
log-prob of each row's answers (re-tokenised with the teacher's tokenizer, its system prompt included); n-gram F1,
ROUGE-L and embedding cosine to the teacher's answer; length, EOS rate, 4-gram repetition, distinct-2.

**Stages** (each in its own directory under --out, with done.json; a stage is skipped when its done.json has the
same settings and is newer than the stages it depends on; a rerun continues where the last one stopped: collection
and evaluation resume from their durable stores, training from its newest checkpoint; delete a stage's directory to
redo it and, through the timestamps, everything after it):
  collect          teacher texts on the train prompts (opdistill collect, local model) -> collect/train.jsonl
  blackbox-seqkd   SmolLM2 SeqKD                 (opdistill train)
  blackbox-gad     SmolLM2 GAD                   (opdistill train)
  whitebox-seqkd   Qwen 0.5B SeqKD               (opdistill train)
  whitebox-opd     Qwen 0.5B OPD, rkl            (opdistill train)
  eval             every row of the selected families (and of any family finished earlier in --out), both sets
  report           results.json, results.md, report.html (opdistill's report: tables, plots, curves, samples)
Every attempt's wall time goes to --out/timings.jsonl; results.json sums them per stage.

**Sizes.** smoke: a handful of prompts and 1-2 steps per stage, to check the plumbing in minutes; its numbers mean
nothing. full: sized for <= 90 minutes on a 2-core CPU with native bf16 (AVX512-BF16/AMX) and the machine to itself.
compact: sized for <= 90 minutes on a 2-core AVX2-only CPU, where `auto` precision is fp32 (bf16 is emulated) and the
1.5B runs about 4x slower, so the full size would take 4 to 5 hours: fewer teacher texts, fewer updates, a 96-token
training limit (evaluation at 192) and 6 + 6 evaluation prompts; its judge win rates are too coarse to rank the rows
(intervals near +-0.3), its stopping, repetition, overlap and log-prob columns are not. auto (the default): full on a
GPU or a CPU with native bf16, compact otherwise. Every result records the machine it ran on and the size.
docs/quality.md has the arithmetic (measured speeds per stage, both kinds of CPU) and the measured results.

**Tuning GAD.** `--gad-variant NAME:key=value,...` (repeatable) adds a row smollm2-gad-NAME trained with those settings over
the default GAD's, from the same teacher text and with the same number of generator updates; finished rows are not redone.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from quality_results import results_markdown, row_result  # benchmarks/, beside this script

TEACHER = "qwen2.5-coder-1.5b-instruct"
BLACKBOX_STUDENT = "smollm2-135m-instruct"
WHITEBOX_STUDENT = "qwen2.5-coder-0.5b-instruct"
DEFAULT_TEACHER_SYSTEM = "Answer briefly, in at most three sentences."
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout
SELF_INSTRUCT = "selfinstruct_user_oriented_text-davinci-003.jsonl"
MT_BENCH = "mt_bench_questions.jsonl"
FAMILIES = {  # family -> its training stages, row label -> stage
    "blackbox": {"smollm2-seqkd": "blackbox-seqkd", "smollm2-gad": "blackbox-gad"},
    "whitebox": {"qwen0.5b-seqkd": "whitebox-seqkd", "qwen0.5b-opd": "whitebox-opd"},
}
BASE_ROWS = {"blackbox": ("smollm2-base", BLACKBOX_STUDENT), "whitebox": ("qwen0.5b-base", WHITEBOX_STUDENT)}


@dataclass(frozen=True)
class Size:
    train_prompts: int  # prompts the teacher answers: half Self-Instruct, half built-in train, interleaved
    train_tokens: int  # the training limit: the teacher's max_tokens, the students' max_response_tokens and rollouts
    blackbox_batch: int  # prompts per optimizer step, black-box SeqKD and GAD
    seqkd_steps: int  # black-box SeqKD updates = GAD's generator updates (compute matching, docstring)
    gad_warmup: int  # GAD warm-up steps; the first gad_d_only train only the discriminator
    gad_d_only: int
    gad_samples: int  # N, student samples per prompt
    whitebox_batch: int  # prompts per optimizer step, white-box SeqKD and OPD
    whitebox_steps: int  # white-box SeqKD and OPD updates
    eval_prompts: int  # per prompt set (held-out and MT-Bench)
    checkpoint_every: int

    @property
    def gad_adversarial(self) -> int:
        return self.seqkd_steps - (self.gad_warmup - self.gad_d_only)

    @property
    def eval_tokens(self) -> int:
        return 2 * self.train_tokens  # above the training limit: do the students stop on their own?


SIZES = {
    "smoke": Size(train_prompts=16, train_tokens=48, blackbox_batch=2, seqkd_steps=2, gad_warmup=2, gad_d_only=1, gad_samples=2,
                  whitebox_batch=2, whitebox_steps=2, eval_prompts=2, checkpoint_every=1),
    "full": Size(train_prompts=128, train_tokens=128, blackbox_batch=4, seqkd_steps=20, gad_warmup=10, gad_d_only=2, gad_samples=4,
                 whitebox_batch=8, whitebox_steps=10, eval_prompts=16, checkpoint_every=5),
    # For a CPU without native bf16 (docstring, "Sizes"); docs/quality.md has the per-stage arithmetic behind it.
    "compact": Size(train_prompts=40, train_tokens=96, blackbox_batch=4, seqkd_steps=8, gad_warmup=4, gad_d_only=1, gad_samples=4,
                    whitebox_batch=4, whitebox_steps=6, eval_prompts=6, checkpoint_every=2),
}


def say(message: str) -> None:
    print(f"quality: {message}", file=sys.stderr, flush=True)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_json_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------- the machine: what the numbers were measured on


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(precision: str) -> dict[str, Any]:
    """The machine and the precision `auto` resolved to: speed here depends on native bf16 above all (docs/quality.md,
    "Machines"), so every result says which kind of CPU it came from."""
    import torch

    from opdistill.models import bf16_is_fast, resolve_precision

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "native_bf16": bf16_is_fast(), "precision": resolve_precision(precision)}


def fast_machine(host: dict[str, Any]) -> bool:
    """A GPU, or a CPU running bf16 natively: the machines the full size is sized for."""
    return bool(host["gpu"]) or (host["native_bf16"] and host["precision"] == "bf16")


def choose_size(requested: str, host: dict[str, Any]) -> str:
    """`auto` picks the size that fits 90 minutes on this machine: full where the 1.5B runs fast, compact where it
    runs in fp32 on a CPU (about 4x slower; docs/quality.md, "Machines")."""
    if requested != "auto":
        return requested
    return "full" if fast_machine(host) else "compact"


def slow_machine_warning(size_name: str, host: dict[str, Any]) -> str | None:
    """Said before a full-size run on a CPU without native bf16: the full size is sized for one with it. On a 2-core
    AVX2-only CPU (fp32; bf16 is emulated there and far slower) the 1.5B teacher generated 4.4x slower and SmolLM2
    trained about 2x slower (docs/quality.md, "Machines")."""
    if size_name != "full" or fast_machine(host):
        return None
    return (f"this CPU ({host['cpu']}) runs precision {host['precision']} (native bf16: {host['native_bf16']}); the full "
            "size is sized for <= 90 minutes on a 2-core CPU with native bf16; on a 2-core AVX2-only CPU the 1.5B teacher "
            "measured 4.4x slower and training about 2x: expect 4 to 5 hours (docs/quality.md, 'Machines'). --size compact "
            "(what --size auto picks here) fits 90 minutes; --only blackbox and --only whitebox split the full size over "
            "two runs in the same --out; every stage resumes.")


# ---------------------------------------------------------------- stages: skip what is done, time every attempt


class Stages:
    """Runs named stages in --out. A stage's done.json holds the settings it ran with (`key`) and when it finished;
    it counts as done when the key matches and every stage it depends on finished before it (make's rule, so a
    redone stage makes the ones after it run again)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.seconds: dict[str, float] = {}  # this invocation's attempts

    def marker(self, name: str) -> Path:
        return self.out / name / "done.json"

    def finished(self, name: str) -> float | None:
        path = self.marker(name)
        return json.loads(path.read_text()).get("finished") if path.is_file() else None

    def is_done(self, name: str, key: Any, deps: list[str]) -> bool:
        path = self.marker(name)
        if not path.is_file():
            return False
        marker = json.loads(path.read_text())
        if marker.get("key") != key or marker.get("finished") is None:
            return False
        return all((self.finished(d) or float("inf")) <= marker["finished"] for d in deps)

    def run(self, name: str, key: Any, deps: list[str], work: Callable[[Path], dict[str, Any]], *, wipe_on_change: bool = True) -> None:
        directory = self.out / name
        if self.is_done(name, key, deps):
            say(f"stage {name}: already complete, skipped")
            return
        marker = self.marker(name)
        previous = json.loads(marker.read_text()) if marker.is_file() else None
        if wipe_on_change and previous and (previous.get("key") != key or "finished" in previous):
            # Its outputs (a teacher store, a training run) came from other settings or from inputs that have been
            # redone since: resuming them would mix the two. An interrupted attempt with the same settings resumes.
            say(f"stage {name}: its settings or inputs changed since its last run, starting it over")
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"key": key}, indent=2))
        say(f"stage {name}: running")
        started = time.monotonic()
        completed = False
        try:
            info = work(directory)
            completed = True
        finally:
            seconds = round(time.monotonic() - started, 1)
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            with open(self.out / "timings.jsonl", "a", encoding="utf-8") as log:
                log.write(json.dumps({"stage": name, "seconds": seconds, "completed": completed, "time": time.time()}) + "\n")
            gc.collect()  # the stage's models go before the next stage loads its own
        marker.write_text(json.dumps({"key": key, "info": info, "seconds": seconds, "finished": time.time()}, indent=2))
        say(f"stage {name}: done in {seconds:.0f} s")

    def info(self, name: str) -> dict[str, Any]:
        path = self.marker(name)
        return json.loads(path.read_text()).get("info", {}) if path.is_file() else {}

    def total_seconds(self) -> dict[str, float]:
        """Wall seconds per stage over every attempt in --out (interrupted ones included)."""
        totals: dict[str, float] = {}
        log = self.out / "timings.jsonl"
        for row in read_json_lines(log) if log.is_file() else []:
            totals[row["stage"]] = round(totals.get(row["stage"], 0.0) + row["seconds"], 1)
        return totals


# ---------------------------------------------------------------- prompts and teacher text


def train_prompts(count: int, data_dir: Path) -> list[dict[str, Any]]:
    """Self-Instruct and built-in train prompts, alternating, so every prefix mixes the two."""
    from opdistill.data import load_records

    sources = [("self-instruct", load_records(str(data_dir / SELF_INSTRUCT))), ("builtin-train", load_records("builtin:train"))]
    rows: list[dict[str, Any]] = []
    for i in range(count):
        origin, records = sources[i % 2]
        rows.append({"prompt": records[i // 2].messages[-1]["content"], "origin": f"{origin}:{i // 2}"})
    return rows


def mtbench_subset(count: int, data_dir: Path) -> list[dict[str, Any]]:
    """`count` MT-Bench questions taken round-robin over its categories (the file lists them category by category)."""
    by_category: dict[str, list[dict[str, Any]]] = {}
    for row in read_json_lines(data_dir / MT_BENCH):
        by_category.setdefault(row["category"], []).append(row)
    picked: list[dict[str, Any]] = []
    depth = 0
    while len(picked) < count and depth < max(map(len, by_category.values())):
        picked += [rows[depth] for rows in by_category.values() if depth < len(rows)][: count - len(picked)]
        depth += 1
    return picked


def collect_stage(size: Size, args: argparse.Namespace) -> Callable[[Path], dict[str, Any]]:
    def work(directory: Path) -> dict[str, Any]:
        from opdistill.data import response_ids
        from opdistill.models import load_tokenizer
        from opdistill.teachers.collect import CollectOptions, collect

        prompts = directory / "prompts.jsonl"
        write_json_lines(prompts, train_prompts(size.train_prompts, args.data_dir))
        store = directory / "teacher.jsonl"
        summary = collect(CollectOptions(prompts=str(prompts), out=str(store), teacher_model=TEACHER, system=args.teacher_system,
                                         temperature=0.7, top_p=0.95, max_tokens=size.train_tokens, batch_size=16,
                                         precision=args.precision, seed=0))
        for line in summary.lines():
            say("   " + line)
        if summary.interrupted:
            raise KeyboardInterrupt("collection interrupted; rerun the same command to resume it")
        if summary.failed:
            raise RuntimeError(f"{summary.failed} teacher answers failed; rerun the same command to retry them")
        # Keep only answers that ended and fit the training limit with their EOS in both students' tokenizers: a cut
        # text would teach the student to stop mid-sentence (or never to stop).
        tokenizers = [load_tokenizer(BLACKBOX_STUDENT), load_tokenizer(WHITEBOX_STUDENT)]
        rows = read_json_lines(store)
        kept = [row for row in rows if row["meta"].get("finish_reason") == "stop" and row["response"].strip()
                and all(len(response_ids(t, row["response"], 10**9)) <= size.train_tokens for t in tokenizers)]
        write_json_lines(directory / "train.jsonl", kept)
        say(f"   {len(kept)} of {len(rows)} teacher answers ended within {size.train_tokens} tokens and are the training texts")
        if len(kept) < max(size.blackbox_batch, size.whitebox_batch):
            raise RuntimeError(f"only {len(kept)} teacher answers ended within {size.train_tokens} tokens, fewer than a batch; "
                               "use a larger size or a teacher system prompt that asks for shorter answers")
        finished = [row for row in rows if row["meta"].get("finish_reason") == "stop"]
        return {"prompts": len(rows), "finished": len(finished), "kept": len(kept),
                "mean_teacher_tokens": sum(r["meta"]["usage"]["completion_tokens"] for r in rows) / len(rows),
                "seconds_generating": round(summary.seconds, 1)}

    return work


# ---------------------------------------------------------------- training


def training_configs(size: Size, args: argparse.Namespace, train_file: Path, out: Path) -> dict[str, dict[str, Any]]:
    """Every training run's config (opdistill train keys); each run's config.yaml has the resolved values."""
    common = {"data": str(train_file), "seed": 0, "lr_schedule": "constant", "warmup_ratio": 0.0, "max_grad_norm": 1.0,
              "max_response_tokens": size.train_tokens, "precision": args.precision, "checkpoint_every": size.checkpoint_every,
              "keep_checkpoints": 1}
    # SmolLM2 (135M) trains fully at the demo's learning rate; the 0.5B per --whitebox-tuning.
    blackbox = {**common, "student": BLACKBOX_STUDENT, "lr": 2e-5, "batch_size": size.blackbox_batch}
    lora = args.whitebox_tuning == "lora"
    whitebox = {**common, "student": WHITEBOX_STUDENT, "lr": 1e-4 if lora else 1e-5, "batch_size": size.whitebox_batch,
                "micro_batch_size": min(size.whitebox_batch, 4), **({"lora_r": 16, "lora_alpha": 32} if lora else {})}
    samples = size.blackbox_batch * size.gad_samples
    return {
        "blackbox-seqkd": {**blackbox, "method": "seqkd", "max_steps": size.seqkd_steps, "micro_batch_size": size.blackbox_batch},
        "blackbox-gad": {**blackbox, "method": "gad", "warmup_steps": size.gad_warmup, "d_only_steps": size.gad_d_only,
                         "max_steps": size.gad_adversarial, "n_samples": size.gad_samples, "rollout_batch_size": samples,
                         "micro_batch_size": samples, "d_lr": 2e-4, "discriminator_layers": 6, "d_max_grad_norm": 1.0},
        "whitebox-seqkd": {**whitebox, "method": "seqkd", "max_steps": size.whitebox_steps},
        "whitebox-opd": {**whitebox, "method": "opd", "max_steps": size.whitebox_steps, "teacher": TEACHER,
                         "teacher_system": args.teacher_system, "divergence": "rkl", "rollout_batch_size": size.whitebox_batch},
    }


def train_stage(values: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    def work(directory: Path) -> dict[str, Any]:
        from opdistill.config import build_config
        from opdistill.methods import train

        run = {**values, "out_dir": str(directory)}
        if values["method"] == "opd":
            # OPD needs only the prompts. A collect store's `teacher` field records which model wrote the text, but OPD
            # reads that field as the name of a configured teacher to route the record to, and stops; so OPD gets the
            # same prompts, in the same order, without the store's other fields.
            prompts = directory / "prompts.jsonl"
            write_json_lines(prompts, [{"messages": row["messages"]} for row in read_json_lines(Path(values["data"]))])
            run["data"] = str(prompts)
        summary = train(build_config(run, where="benchmarks/quality.py"))
        # The student is saved; the checkpoints (weights and optimizer state, GBs for the 0.5B) are only for resuming.
        shutil.rmtree(directory / "checkpoints", ignore_errors=True)
        return {"steps": summary["steps"], **training_counts(values, directory)}

    return work


def training_counts(values: dict[str, Any], directory: Path) -> dict[str, Any]:
    """What a run spent, from its metrics.jsonl: generator updates, sequences trained on, seconds in steps."""
    steps = [row for row in read_json_lines(directory / "metrics.jsonl") if "step_seconds" in row]
    batch = values["batch_size"]
    if values["method"] == "gad":
        warmup_updates = sum("g_ce_loss" in row for row in steps)
        adversarial = sum(row.get("stage") == 1.0 for row in steps)
        updates, sequences = warmup_updates + adversarial, warmup_updates * batch + adversarial * batch * values["n_samples"]
    else:
        updates, sequences = len(steps), len(steps) * batch
    return {"generator_updates": updates, "prompts_per_update": batch, "generator_sequences": sequences,
            "step_seconds": round(sum(row["step_seconds"] for row in steps), 1)}


# ---------------------------------------------------------------- evaluation


def eval_rows(families: list[str], out: Path) -> dict[str, str]:
    """Row label -> model: the teacher, then per family its base student and its trained students."""
    rows = {"teacher": TEACHER}
    for family in families:
        label, model = BASE_ROWS[family]
        rows[label] = model
        rows.update({label: str(out / stage / "student") for label, stage in FAMILIES[family].items()})
    return rows


def eval_options(size: Size, args: argparse.Namespace, rows: dict[str, str], directory: Path, mtbench: Path) -> Any:
    from opdistill.evaluate.options import EvalOptions

    return EvalOptions(
        models=[f"{label}={model}" for label, model in rows.items()], out=str(directory),
        prompts=[f"heldout=builtin:heldout[:{size.eval_prompts}]", f"mtbench={mtbench}"],
        systems=[f"teacher={args.teacher_system}"] if args.teacher_system else [], teacher="teacher",
        max_new_tokens=size.eval_tokens, temperature=0.0, batch_size=16, precision=args.precision, seed=0,
        judge_local=TEACHER, judge_retries=1, judge_max_tokens=16,  # the verdict / scores line comes first; the rest is prose
        pairwise=[f"{label}:teacher" for label in rows if label != "teacher"])


def eval_stage(size: Size, args: argparse.Namespace, rows: dict[str, str]) -> Callable[[Path], dict[str, Any]]:
    def work(directory: Path) -> dict[str, Any]:
        from opdistill.evaluate.run import run_eval

        mtbench = directory / "mtbench.jsonl"
        write_json_lines(mtbench, mtbench_subset(size.eval_prompts, args.data_dir))
        metrics = run_eval(eval_options(size, args, rows, directory, mtbench))
        return {"rows": list(rows), "eval_seconds": metrics["seconds"]}

    return work


# ---------------------------------------------------------------- results


def report_stage(size_name: str, size: Size, args: argparse.Namespace, stages: Stages, families: list[str]) -> dict[str, Any]:
    """results.json, results.md and report.html from the evaluation and the training runs."""
    from opdistill.report import write_report

    out = args.out
    metrics = json.loads((out / "eval" / "metrics.json").read_text(encoding="utf-8"))
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    for family in families:
        labels = ["teacher", BASE_ROWS[family][0], *FAMILIES[family]]
        tables[family] = {set_name: {label: row_result(result, label) for label in labels} for set_name, result in metrics["sets"].items()}
    training_runs = [stage for family in families for stage in FAMILIES[family].values()]
    report = write_report([out / "eval", *(out / stage for stage in training_runs)], out / "report.html")
    results = {
        "settings": {"size": size_name, **asdict(size), "gad_adversarial": size.gad_adversarial, "eval_tokens": size.eval_tokens,
                     "teacher": TEACHER, "teacher_system": args.teacher_system, "blackbox_student": BLACKBOX_STUDENT,
                     "whitebox_student": WHITEBOX_STUDENT, "whitebox_tuning": args.whitebox_tuning, "precision": args.precision,
                     "families": families},
        "teacher_text": stages.info("collect"),
        "training": {stage: stages.info(stage) for stage in training_runs},
        "prompts": {name: result["prompts"] for name, result in metrics["sets"].items()},
        "judge": metrics.get("judge"),
        "tables": tables,
        "stage_seconds": stages.total_seconds(),
        "this_invocation_seconds": stages.seconds,
        "files": {"eval_metrics": str(out / "eval" / "metrics.json"), "generations": str(out / "eval" / "generations.jsonl"),
                  "report": str(report)},
    }
    return results


# ---------------------------------------------------------------- the command


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="run directory; rerun the same command to continue")
    parser.add_argument("--size", choices=["auto", *sorted(SIZES)], default="auto",
                        help="auto (default): full on a GPU or a CPU with native bf16, compact otherwise (docstring, 'Sizes')")
    parser.add_argument("--eval-prompts", type=int, default=0, metavar="N",
                        help="prompts per evaluation set (held-out, MT-Bench) instead of the size's (full: 16; the tables in "
                             "docs/quality.md used 20); only the evaluation reruns, and it reuses every cached answer and verdict")
    parser.add_argument("--only", choices=["blackbox", "whitebox", "all"], default="all")
    parser.add_argument("--whitebox-tuning", choices=["lora", "full"], default="lora", help="how the 0.5B student trains (docstring)")
    parser.add_argument("--teacher-system", default=DEFAULT_TEACHER_SYSTEM, help="the teacher's privileged system prompt ('' for none)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="the shared data (Self-Instruct, MT-Bench)")
    parser.add_argument("--gad-variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="one more black-box GAD row, smollm2-gad-NAME, with these train settings over the default GAD's "
                             "(e.g. long-warmup:warmup_steps=16,lr=1e-5); repeatable; generator updates stay matched to SeqKD")
    return parser.parse_args()


def add_gad_variants(specs: list[str], size: Size, configs: dict[str, dict[str, Any]]) -> None:
    """Register each --gad-variant as a black-box stage and row (tuning GAD, issue 15 item 4). Its warm-up
    cross-entropy updates plus its adversarial updates equal SeqKD's updates, whatever warm-up it asks for."""
    from opdistill.config import parse_overrides

    for spec in specs:
        name, _, settings = spec.partition(":")
        if not name.replace("-", "").isalnum():
            raise SystemExit(f"--gad-variant {spec!r}: NAME must be letters, digits and dashes")
        overrides = parse_overrides([item for item in settings.split(",") if item])  # the same parsing as `opdistill train k=v`
        if "max_steps" in overrides:
            raise SystemExit(f"--gad-variant {spec!r}: max_steps follows from the warm-up (compute matching); set warmup_steps instead")
        config = {**configs["blackbox-gad"], **overrides}
        config["max_steps"] = size.seqkd_steps - (config["warmup_steps"] - config["d_only_steps"])
        if config["max_steps"] < 1:
            raise SystemExit(f"--gad-variant {spec!r}: its warm-up uses all {size.seqkd_steps} generator updates")
        config["rollout_batch_size"] = config["micro_batch_size"] = size.blackbox_batch * config["n_samples"]
        stage = f"blackbox-gad-{name}"
        FAMILIES["blackbox"][f"smollm2-gad-{name}"] = stage  # the table every later step reads its rows from
        configs[stage] = config


def main() -> None:
    args = parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_prompts < 0:
        raise SystemExit(f"quality: --eval-prompts must be positive, got {args.eval_prompts}")
    host = machine(args.precision)
    say(f"machine: {host}")
    size_name = choose_size(args.size, host)
    size = SIZES[size_name]
    if args.eval_prompts:
        size = replace(size, eval_prompts=args.eval_prompts)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = Stages(args.out)
    # The reason is fast_machine's own inputs: --precision fp32 on a bf16 CPU also gets compact.
    chosen = f" (auto: GPU {host['gpu']}, precision {host['precision']})" if args.size == "auto" else ""
    say(f"size {size_name}{chosen}: {asdict(size)}; GAD adversarial steps {size.gad_adversarial}, "
        f"evaluation at {size.eval_tokens} tokens")
    if warning := slow_machine_warning(size_name, host):
        say(f"warning: {warning}")

    # Only what collection reads is in its key: a change to the evaluation's size must not redo every stage after it.
    collect_key = {"train_prompts": size.train_prompts, "train_tokens": size.train_tokens, "teacher": TEACHER,
                   "system": args.teacher_system, "precision": args.precision}
    stages.run("collect", collect_key, [], collect_stage(size, args))
    configs = training_configs(size, args, args.out / "collect" / "train.jsonl", args.out)
    add_gad_variants(args.gad_variant, size, configs)
    selected = list(FAMILIES) if args.only == "all" else [args.only]
    for family in selected:
        for stage in FAMILIES[family].values():
            stages.run(stage, configs[stage], ["collect"], train_stage(configs[stage]))
    # Families finished in an earlier invocation are evaluated too: the evaluation's caches make that cheap.
    families = [f for f in FAMILIES if f in selected or all(stages.is_done(s, configs[s], ["collect"]) for s in FAMILIES[f].values())]
    rows = eval_rows(families, args.out)
    deps = [stage for family in families for stage in FAMILIES[family].values()]
    key = {"rows": rows, "size": asdict(size), "system": args.teacher_system, "precision": args.precision}
    # Not wiped on a change: generations and judge replies are cached by model weights and exact request.
    stages.run("eval", key, deps, eval_stage(size, args, rows), wipe_on_change=False)

    started = time.monotonic()
    results = report_stage(size_name, size, args, stages, families)
    results["machine"] = host
    seconds = round(time.monotonic() - started, 1)
    results["stage_seconds"]["report"] = seconds
    results["this_invocation_seconds"]["report"] = seconds
    (args.out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    markdown = results_markdown(results)
    (args.out / "results.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    for name, seconds in results["stage_seconds"].items():
        say(f"wall time {name}: {seconds:.0f} s")
    say(f"results: {args.out / 'results.md'}, {args.out / 'results.json'}; report: {results['files']['report']}")


if __name__ == "__main__":
    main()

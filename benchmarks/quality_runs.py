"""Quality benchmark stages: the sizes, the prompts, the teacher's texts, the training runs and the evaluations.

Used by benchmarks/quality.py (run that; its docstring says what every stage does and why).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from quality_results import answer_sameness, row_result  # benchmarks/, beside this script
from quality_stages import Stages, read_json_lines, say, write_json_lines

TEACHER = "qwen2.5-coder-1.5b-instruct"
BLACKBOX_STUDENT = "smollm2-135m-instruct"
WHITEBOX_STUDENT = "qwen2.5-coder-0.5b-instruct"
# Privileged: only the teacher reads it. It keeps the teacher's everyday answers short (CPU cost) without overriding
# an instruction about length, which IFEval's prompts carry and a plain "answer briefly" would make the teacher fail.
DEFAULT_TEACHER_SYSTEM = "Follow every instruction in the request exactly. Unless it asks for a length, answer briefly."
# Privileged too, white-box: it shortens the teacher's solutions (still 105 to over 160 tokens in a smoke test: 2 of 8
# ended within 160), each token costing 45 ms or more on a CPU.
# The same text is OPD's teacher_system and the teacher row's system prompt in evaluation, so SeqKD's texts, OPD's
# teacher and the row the students are compared with are one teacher.
WHITEBOX_TEACHER_SYSTEM = "Solve it in a few short steps."
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout
SELF_INSTRUCT = "selfinstruct_user_oriented_text-davinci-003.jsonl"
VICUNA_QUESTIONS = "vicuna80_questions.jsonl"
GSM8K_TRAIN = "gsm8k_train.jsonl"
FAMILIES = {  # family -> its training stages (row label -> stage); each family has its own teacher texts
    "blackbox": {"smollm2-seqkd": "blackbox-seqkd", "smollm2-gad": "blackbox-gad", "smollm2-opd-xtok": "blackbox-opd-xtok"},
    "whitebox": {"qwen0.5b-seqkd": "whitebox-seqkd", "qwen0.5b-opd": "whitebox-opd"},
}
BASE_ROWS = {"blackbox": ("smollm2-base", BLACKBOX_STUDENT), "whitebox": ("qwen0.5b-base", WHITEBOX_STUDENT)}
COLLECT = {"blackbox": "collect", "whitebox": "collect-gsm8k"}
TEACHER_PART = "-teacher"  # PART-teacher: the teacher row on a subset of PART's items (Size.teacher_items)


@dataclass(frozen=True)
class Size:
    train_prompts: int  # black-box: prompts the teacher answers, Self-Instruct and built-in train interleaved
    train_tokens: int  # black-box training limit: the teacher's max_tokens, max_response_tokens, rollouts
    blackbox_batch: int  # prompts per optimizer step, every black-box run
    seqkd_steps: int  # black-box SeqKD updates = GAD's generator updates = cross-tokenizer OPD's (compute matching)
    gad_warmup: int  # GAD warm-up steps; the first gad_d_only train only the discriminator
    gad_d_only: int
    gad_samples: int  # N, student samples per prompt
    gsm8k_questions: int  # white-box: GSM8K train questions the teacher solves
    math_tokens: int  # white-box training limit (solutions, rollouts)
    whitebox_batch: int  # prompts per optimizer step, white-box SeqKD and OPD
    whitebox_steps: int  # white-box SeqKD and OPD updates
    ifeval: int  # evaluation items: IFEval prompts, Vicuna questions, GSM8K test, MATH-500, HumanEval (0: all)
    vicuna: int
    gsm8k_test: int
    math500: int
    humaneval: int
    suite_tokens: int  # white-box evaluation limit (a worked solution needs room; above math_tokens)
    calibration: int  # the judge's calibration pairs per kind (7 kinds, both orders: 14 forward passes of the 1.5B each)
    checkpoint_every: int
    # Where the 1.5B's passes do not fit (fp32 CPUs): the teacher row and its log-prob of every row's answers on each
    # program-checked suite's first `teacher_items` items only (0: on all of them, in one run), and Vicuna judged on
    # these X:Y pairs of students without a teacher row (empty: every student against the teacher).
    teacher_items: int = 0
    vicuna_pairs: tuple[str, ...] = ()
    # Tuning (`--tune`, issue 38 item 4): the declared sweeps, one `NAME:key=value,...` variant per lever, and
    # the in-distribution split it is chosen on: the `tune_prompts` training-distribution prompts after the first
    # train_prompts (never trained on, never an IFEval or Vicuna item). Empty: the size declares no sweep.
    gad_sweep: tuple[str, ...] = ()
    opd_sweep: tuple[str, ...] = ()  # cross-tokenizer OPD's, the same way
    tune_prompts: int = 0

    @property
    def gad_adversarial(self) -> int:
        return self.seqkd_steps - (self.gad_warmup - self.gad_d_only)

    @property
    def eval_tokens(self) -> int:
        return 2 * self.train_tokens  # above the training limit: do the black-box students stop on their own?


SIZES = {
    "smoke": Size(train_prompts=16, train_tokens=48, blackbox_batch=2, seqkd_steps=3, gad_warmup=2, gad_d_only=1, gad_samples=2,
                  gsm8k_questions=8, math_tokens=160, whitebox_batch=2, whitebox_steps=2, ifeval=3, vicuna=2, gsm8k_test=3,
                  math500=2, humaneval=2, suite_tokens=160, calibration=1, checkpoint_every=1,
                  gad_sweep=("kl:kl_coef=0.05",), opd_sweep=("per-token:divergence=reward",), tune_prompts=3),
    # A 2-core CPU with native bf16: about 2 h 15 min for the black-box family and 1 h 15 min for the white-box one,
    # estimated from the speeds measured there (docs/quality.md, "The verdict's setup"); --only splits them.
    "full": Size(train_prompts=128, train_tokens=128, blackbox_batch=4, seqkd_steps=78, gad_warmup=10, gad_d_only=2, gad_samples=4,
                 gsm8k_questions=64, math_tokens=384, whitebox_batch=8, whitebox_steps=8, ifeval=48, vicuna=24, gsm8k_test=48,
                 math500=16, humaneval=16, suite_tokens=512, calibration=4, checkpoint_every=8),
    # A CPU without native bf16 (fp32, the 1.5B about 4x slower): the plumbing and the stopping, not a verdict.
    "compact": Size(train_prompts=40, train_tokens=96, blackbox_batch=4, seqkd_steps=15, gad_warmup=4, gad_d_only=1, gad_samples=4,
                    gsm8k_questions=24, math_tokens=320, whitebox_batch=4, whitebox_steps=6, ifeval=24, vicuna=12, gsm8k_test=24,
                    math500=12, humaneval=12, suite_tokens=400, calibration=3, checkpoint_every=4),
    # The black-box verdict on a 2-core CPU without native bf16 (fp32), in about 2 hours: the students on all 541
    # IFEval prompts and all 80 Vicuna questions, 40 generator updates each. The 1.5B reads about 50 tokens a second
    # there (3 GFLOP a token at about 160 GFLOP/s), so the teacher row and its log-probs cover the first 48 IFEval items
    # and the judge reads only the verdict's pairs, GAD and cross-tokenizer OPD against SeqKD, in both orders.
    # White-box at this size: 500 GSM8K test questions and 100 MATH-500 problems (its cost on such a CPU: docs/quality.md).
    "cpu": Size(train_prompts=128, train_tokens=96, blackbox_batch=4, seqkd_steps=40, gad_warmup=4, gad_d_only=1, gad_samples=4,
                gsm8k_questions=96, math_tokens=320, whitebox_batch=4, whitebox_steps=24, ifeval=0, vicuna=0, gsm8k_test=500,
                math500=100, humaneval=40, suite_tokens=400, calibration=2, checkpoint_every=5, teacher_items=48,
                vicuna_pairs=("smollm2-gad:smollm2-seqkd", "smollm2-opd-xtok:smollm2-seqkd"),
                # The levers the GAD paper names, one each, from what the verdict at this size showed (GAD 4 points below
                # SeqKD; its samples fell from 86 to 38 tokens while the discriminator was weak, accuracy 0.56):
                # a warm-up of about one epoch of the 89 texts (the paper's; 22 cross-entropy updates, 18 adversarial),
                # a 50x KL coefficient to hold the student near its warm-up, the discriminator at the generator's
                # learning rate (the paper's equal rates; ours is 10x), and the paper's 8 samples per prompt.
                gad_sweep=("warmup-epoch:warmup_steps=24,d_only_steps=2", "kl-0.05:kl_coef=0.05", "dlr-2e-5:d_lr=2e-5",
                           "samples-8:n_samples=8"),
                # Cross-tokenizer OPD answered nothing on 65 of 541 IFEval prompts: reward_to_go charges the first token
                # with the whole answer's KL, so ending at once is its cheapest sample. The per-token estimator (Thinking
                # Machines' default, kl_discount 0) charges each token its own KL only.
                opd_sweep=("per-token:divergence=reward",),
                tune_prompts=64),
    # One command on a GPU: every black-box prompt there is, 2,000 GSM8K questions, the whole suites.
    "gpu": Size(train_prompts=524, train_tokens=256, blackbox_batch=16, seqkd_steps=300, gad_warmup=40, gad_d_only=10, gad_samples=8,
                gsm8k_questions=2000, math_tokens=512, whitebox_batch=32, whitebox_steps=60, ifeval=0, vicuna=0, gsm8k_test=0,
                math500=0, humaneval=0, suite_tokens=768, calibration=20, checkpoint_every=25),
}


def rows_spec(count: int) -> str:
    """A suite's or a file's [a:b] slice for the first `count` items (0: all of them)."""
    return f"[:{count}]" if count else ""


# ---------------------------------------------------------------- prompts and teacher text


def train_prompts(count: int, data_dir: Path) -> list[dict[str, Any]]:
    """Self-Instruct and built-in train prompts, alternating while both last, so every prefix mixes the two. They
    ask for everyday tasks with constraints in the request (formats, lengths, audiences), which is what IFEval
    checks; no IFEval prompt is ever trained on."""
    from opdistill.data import load_records

    sources = [("self-instruct", load_records(str(data_dir / SELF_INSTRUCT))), ("builtin-train", load_records("builtin:train"))]
    rows: list[dict[str, Any]] = []
    for depth in range(max(len(records) for _, records in sources)):
        rows += [{"prompt": records[depth].messages[-1]["content"], "origin": f"{origin}:{depth}"}
                 for origin, records in sources if depth < len(records)]
    if len(rows) < count:
        raise SystemExit(f"quality: {count} training prompts asked, only {len(rows)} exist (Self-Instruct and built-in train)")
    return rows[:count]


def tuning_prompts(size: Size, data_dir: Path) -> list[dict[str, Any]]:
    """The tuning split of GAD and cross-tokenizer OPD, in distribution: the training prompts' sources after the first train_prompts. The teacher
    never answered them for training, so no student saw them; none is an IFEval or Vicuna item."""
    return train_prompts(size.train_prompts + size.tune_prompts, data_dir)[size.train_prompts:]


def gsm8k_prompts(count: int, data_dir: Path) -> list[dict[str, Any]]:
    """The first `count` GSM8K train questions, asked exactly as the gsm8k suite asks its test questions (the same
    stated answer format), so what the students learn is what the suite scores."""
    from opdistill.evaluate.suites import load_gsm8k

    items = load_gsm8k(data_dir / GSM8K_TRAIN)[:count]
    return [{"prompt": item.prompt, "origin": f"gsm8k-train:{item.id}", "gold": item.reference} for item in items]


def collect_texts(prompts: list[dict[str, Any]], directory: Path, system: str | None, max_tokens: int, precision: str) -> list[dict[str, Any]]:
    """The teacher's answers to `prompts` (opdistill collect, a durable store that resumes), all of them."""
    from opdistill.teachers.collect import CollectOptions, collect

    path = directory / "prompts.jsonl"
    write_json_lines(path, prompts)
    store = directory / "teacher.jsonl"
    summary = collect(CollectOptions(prompts=str(path), out=str(store), teacher_model=TEACHER, system=system,
                                     temperature=0.7, top_p=0.95, max_tokens=max_tokens, batch_size=16, precision=precision, seed=0))
    for line in summary.lines():
        say("   " + line)
    if summary.interrupted:
        raise KeyboardInterrupt("collection interrupted; rerun the same command to resume it")
    if summary.failed:
        raise RuntimeError(f"{summary.failed} teacher answers failed; rerun the same command to retry them")
    return read_json_lines(store)


def keep_ended(rows: list[dict[str, Any]], students: list[str], limit: int, batch: int, directory: Path) -> list[dict[str, Any]]:
    """The answers that ended and fit `limit` tokens with their EOS in every student's tokenizer (a cut text would
    teach a student to stop mid-sentence, or never to stop); written to train.jsonl."""
    from opdistill.data import response_ids
    from opdistill.models import load_tokenizer

    tokenizers = [load_tokenizer(name) for name in students]
    kept = [row for row in rows if row["meta"].get("finish_reason") == "stop" and row["response"].strip()
            and all(len(response_ids(t, row["response"], 10**9)) <= limit for t in tokenizers)]
    write_json_lines(directory / "train.jsonl", kept)
    say(f"   {len(kept)} of {len(rows)} teacher answers ended within {limit} tokens and are the training texts")
    if len(kept) < batch:
        raise RuntimeError(f"only {len(kept)} teacher answers ended within {limit} tokens, fewer than a batch; use a larger size")
    return kept


def text_info(rows: list[dict[str, Any]], kept: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    return {"prompts": len(rows), "finished": sum(r["meta"].get("finish_reason") == "stop" for r in rows), "kept": len(kept),
            "mean_teacher_tokens": sum(r["meta"]["usage"]["completion_tokens"] for r in rows) / len(rows), "seconds": round(seconds, 1)}


def collect_blackbox(size: Size, args: argparse.Namespace) -> Callable[[Path], dict[str, Any]]:
    def work(directory: Path) -> dict[str, Any]:
        started = time.monotonic()
        rows = collect_texts(train_prompts(size.train_prompts, args.data_dir), directory, args.teacher_system, size.train_tokens,
                             args.precision)
        kept = keep_ended(rows, [BLACKBOX_STUDENT, WHITEBOX_STUDENT], size.train_tokens, size.blackbox_batch, directory)
        return text_info(rows, kept, time.monotonic() - started)

    return work


def collect_gsm8k(size: Size, args: argparse.Namespace) -> Callable[[Path], dict[str, Any]]:
    """The teacher's own solutions to GSM8K train questions (WHITEBOX_TEACHER_SYSTEM). Kept whether right or wrong: the
    distillation setting has no gold answers, and OPD gets none either; their accuracy is reported."""
    def work(directory: Path) -> dict[str, Any]:
        from opdistill.evaluate.answers import gsm8k_correct

        started = time.monotonic()
        prompts = gsm8k_prompts(size.gsm8k_questions, args.data_dir)
        rows = collect_texts(prompts, directory, WHITEBOX_TEACHER_SYSTEM, size.math_tokens, args.precision)
        kept = keep_ended(rows, [WHITEBOX_STUDENT], size.math_tokens, size.whitebox_batch, directory)
        gold = {p["prompt"]: p["gold"] for p in prompts}
        correct = sum(gsm8k_correct(r["response"], gold[r["messages"][-1]["content"]])[0] for r in kept)
        return {**text_info(rows, kept, time.monotonic() - started), "kept_correct": correct}

    return work


REUSABLE_STORES = ("teacher.jsonl", "generations.jsonl", "teacher_logprobs.jsonl", "judge.jsonl")


def reuse_stores(source: Path, out: Path) -> int:
    """--reuse-from: start this run's durable stores (the teacher's texts, every evaluation part's answers, the
    teacher's log-probs, the judge's replies) with another run's. Each entry is keyed by the model's weights and the
    exact request, so only what is the same here is reused: the teacher's texts and the base and teacher rows, never a
    student trained with another seed. A store this run already has is left alone. Returns the files copied."""
    if not (source / COLLECT["blackbox"]).is_dir() and not (source / COLLECT["whitebox"]).is_dir():
        raise SystemExit(f"quality: --reuse-from {source}: not a quality run directory (no collect stage in it)")
    copied = 0
    for stage in [*COLLECT.values(), *(f"eval-{family}" for family in FAMILIES), TUNE_STAGE]:
        for path in sorted((source / stage).rglob("*.jsonl")) if (source / stage).is_dir() else []:
            target = out / path.relative_to(source)
            if path.name in REUSABLE_STORES and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                copied += 1
    return copied


# ---------------------------------------------------------------- training


def training_configs(size: Size, args: argparse.Namespace, out: Path) -> dict[str, dict[str, Any]]:
    """Every training run's config (opdistill train keys); each run's config.yaml has the resolved values."""
    common = {"seed": args.seed, "lr_schedule": "constant", "warmup_ratio": 0.0, "max_grad_norm": 1.0, "precision": args.precision,
              "checkpoint_every": size.checkpoint_every, "keep_checkpoints": 1}
    # SmolLM2 (135M) trains fully at the demo's learning rate; the 0.5B per --whitebox-tuning.
    blackbox = {**common, "data": str(out / "collect" / "train.jsonl"), "student": BLACKBOX_STUDENT, "lr": 2e-5,
                "batch_size": size.blackbox_batch, "max_response_tokens": size.train_tokens}
    lora = args.whitebox_tuning == "lora"
    whitebox = {**common, "data": str(out / "collect-gsm8k" / "train.jsonl"), "student": WHITEBOX_STUDENT,
                "lr": 1e-4 if lora else 1e-5, "batch_size": size.whitebox_batch, "max_response_tokens": size.math_tokens,
                "micro_batch_size": min(size.whitebox_batch, 4), **({"lora_r": 16, "lora_alpha": 32} if lora else {})}
    samples = size.blackbox_batch * size.gad_samples
    return {
        "blackbox-seqkd": {**blackbox, "method": "seqkd", "max_steps": size.seqkd_steps, "micro_batch_size": size.blackbox_batch},
        "blackbox-gad": {**blackbox, "method": "gad", "warmup_steps": size.gad_warmup, "d_only_steps": size.gad_d_only,
                         "max_steps": size.gad_adversarial, "n_samples": size.gad_samples, "rollout_batch_size": samples,
                         "micro_batch_size": samples, "d_lr": 2e-4, "discriminator_layers": 6, "d_max_grad_norm": 1.0},
        # The teacher's probabilities instead of its text: the span-level reverse KL on the student's own samples.
        "blackbox-opd-xtok": {**blackbox, "method": "opd", "max_steps": size.seqkd_steps, "teacher": TEACHER, "cross_tokenizer": True,
                              "teacher_system": args.teacher_system, "divergence": "reward_to_go", "rollout_batch_size": size.blackbox_batch,
                              "micro_batch_size": size.blackbox_batch},
        "whitebox-seqkd": {**whitebox, "method": "seqkd", "max_steps": size.whitebox_steps},
        "whitebox-opd": {**whitebox, "method": "opd", "max_steps": size.whitebox_steps, "teacher": TEACHER,
                         "teacher_system": WHITEBOX_TEACHER_SYSTEM, "divergence": "rkl", "rollout_batch_size": size.whitebox_batch},
    }


def parse_variant(spec: str, fixed: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """`NAME:key=value,...` -> (NAME, the train settings), refusing the keys that compute matching fixes."""
    from opdistill.config import parse_overrides

    name, _, settings = spec.partition(":")
    if not name.replace("-", "").replace(".", "").isalnum():
        raise SystemExit(f"variant {spec!r}: NAME must be letters, digits, dots and dashes")
    overrides = parse_overrides([item for item in settings.split(",") if item])  # the same parsing as `opdistill train k=v`
    for key in fixed:
        if key in overrides:  # each would change the generator updates or the prompts per update
            raise SystemExit(f"variant {spec!r}: {key} is fixed by the size (compute matching with SeqKD; GAD's max_steps "
                             "follows from its warmup_steps)")
    return name, overrides


FIXED_OPD = ("max_steps", "batch_size", "rollout_batch_size", "micro_batch_size", "cross_tokenizer", "teacher")
FIXED_GAD = ("max_steps", "batch_size", "rollout_batch_size", "micro_batch_size", "ppo_epochs")


def gad_variant(spec: str, size: Size, gad: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """`NAME:key=value,...` -> (stage, config): GAD with these settings over `gad`'s (the default GAD run), from the
    same teacher text. Its warm-up cross-entropy updates plus its adversarial ones equal SeqKD's updates, whatever
    warm-up it asks for, and its prompts per update are the size's (compute matching)."""
    name, overrides = parse_variant(spec, FIXED_GAD)
    config = {**gad, **overrides}
    config["max_steps"] = size.seqkd_steps - (config["warmup_steps"] - config["d_only_steps"])
    if config["max_steps"] < 1 or config["warmup_steps"] < config["d_only_steps"]:
        raise SystemExit(f"variant {spec!r}: its warm-up uses all {size.seqkd_steps} generator updates")
    config["rollout_batch_size"] = config["micro_batch_size"] = size.blackbox_batch * config["n_samples"]
    return f"blackbox-gad-{name}", config


def opd_variant(spec: str, opd: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The same for cross-tokenizer OPD over `opd`'s settings: the same updates of the same prompts."""
    name, overrides = parse_variant(spec, FIXED_OPD)
    return f"blackbox-opd-xtok-{name}", {**opd, **overrides}


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
    seconds = sum(row["step_seconds"] for row in steps)
    counts = {"generator_updates": updates, "prompts_per_update": batch, "generator_sequences": sequences,
              "step_seconds": round(seconds, 1), "seconds_per_update": round(seconds / max(updates, 1), 2)}
    if values["method"] == "gad":  # what the discriminator saw at each adversarial step: is the reward being gamed?
        counts["adversarial_steps"] = [{k: round(row[k], 4) for k in GAD_SIGNALS if k in row} for row in steps if row.get("stage") == 1.0]
    return counts


GAD_SIGNALS = ("d_acc", "teacher_score", "student_score", "response_length")


# ---------------------------------------------------------------- evaluation: one run per family


def eval_rows(family: str, out: Path) -> dict[str, str]:
    """Row label -> model: the teacher, the family's base student and its trained students."""
    label, model = BASE_ROWS[family]
    return {"teacher": TEACHER, label: model, **{row: str(out / stage / "student") for row, stage in FAMILIES[family].items()}}


EVAL_FIELDS = {"blackbox": ("ifeval", "vicuna", "train_tokens", "calibration", "teacher_items", "vicuna_pairs"),
               "whitebox": ("gsm8k_test", "math500", "humaneval", "suite_tokens", "teacher_items")}


def eval_settings(family: str, size: Size) -> dict[str, Any]:
    """What a family's evaluation reads from the size (its stage key): a change to another field (a sweep, the other
    family's items) does not redo it."""
    return {name: getattr(size, name) for name in EVAL_FIELDS[family]}


def eval_common(rows: dict[str, str], system: str, args: argparse.Namespace) -> dict[str, Any]:
    """What every evaluation of the benchmark shares: its rows, the teacher row's privileged system prompt and its
    log-probs of every row's answers, greedy answers."""
    return {"models": [f"{label}={model}" for label, model in rows.items()], "teacher": "teacher", "temperature": 0.0,
            "batch_size": 16, "precision": args.precision, "seed": 0, "data_dir": str(args.data_dir),
            "systems": [f"teacher={system}"] if system else []}


def eval_options(family: str, size: Size, args: argparse.Namespace, rows: dict[str, str], directory: Path) -> list[Any]:
    """One `opdistill eval` per part, each in its own folder under `directory`. Black-box: IFEval (program-checked, no
    judge) and Vicuna-80 (the GAD paper's out-of-distribution set) judged pairwise against the teacher by the 1.5B's
    logits, its calibration measured; two runs, so the judge sees only Vicuna. White-box: GSM8K test (in
    distribution), MATH-500 and HumanEval (out of distribution), all program-checked."""
    from opdistill.evaluate.options import EvalOptions

    common = eval_common(rows, args.teacher_system if family == "blackbox" else WHITEBOX_TEACHER_SYSTEM, args)
    students = {key: value for key, value in common.items() if key not in ("teacher", "systems")}
    students["models"] = [spec for spec in common["models"] if not spec.startswith("teacher=")]
    if family == "whitebox":
        counts = {"gsm8k": size.gsm8k_test, "math500": size.math500, "humaneval": size.humaneval}
        return checked_parts("suites", counts, size, common, students, directory, size.suite_tokens)
    vicuna = f"vicuna={args.data_dir / VICUNA_QUESTIONS}{rows_spec(size.vicuna)}"
    ifeval_parts = checked_parts("ifeval", {"ifeval": size.ifeval}, size, common, students, directory, size.eval_tokens)
    judged = {**students, "pairwise": list(size.vicuna_pairs)} if size.vicuna_pairs else \
        {**common, "pairwise": [f"{label}:teacher" for label in rows if label != "teacher"]}
    return [*ifeval_parts,
            EvalOptions(**judged, out=str(directory / "vicuna"), prompts=[vicuna], max_new_tokens=size.eval_tokens,
                        judge_local=TEACHER, judge_logits=True,  # nothing fails to parse; position bias cancels over both orders
                        judge_calibration=size.calibration,
                        judge_retries=1, judge_max_tokens=16)]  # reference-ratio scores: their line comes first, the rest is prose


def checked_parts(part: str, counts: dict[str, int], size: Size, common: dict[str, Any], students: dict[str, Any], directory: Path,
                  tokens: int) -> list[Any]:
    """The program-checked suites (name -> items, 0: all) as one `opdistill eval` part with every row; or, where the
    size gives the teacher fewer items (`teacher_items`: the 1.5B's passes on a CPU), the students on every item and
    a PART-teacher part with the teacher row and its log-probs on each suite's first `teacher_items`."""
    from opdistill.evaluate.options import EvalOptions

    suites = [f"{name}{rows_spec(count)}" for name, count in counts.items()]
    if not size.teacher_items:
        return [EvalOptions(**common, out=str(directory / part), prompts=[], suites=suites, max_new_tokens=tokens)]
    few = [f"{name}{rows_spec(min(count, size.teacher_items) if count else size.teacher_items)}" for name, count in counts.items()]
    return [EvalOptions(**students, out=str(directory / part), prompts=[], suites=suites, max_new_tokens=tokens),
            EvalOptions(**common, out=str(directory / f"{part}{TEACHER_PART}"), prompts=[], suites=few, max_new_tokens=tokens)]


def seed_generations(source: Path, target: Path) -> None:
    """Start a part's generation store with an earlier part's answers: they are keyed by set, item, model weights
    and sampling, so the students' answers to the first IFEval items are reused, not generated twice."""
    if (source / "generations.jsonl").is_file() and not (target / "generations.jsonl").exists():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / "generations.jsonl", target / "generations.jsonl")


def eval_stage(family: str, size: Size, args: argparse.Namespace, rows: dict[str, str]) -> Callable[[Path], dict[str, Any]]:
    def work(directory: Path) -> dict[str, Any]:
        from opdistill.evaluate.run import run_eval

        seconds = []
        for options in eval_options(family, size, args, rows, directory):
            if Path(options.out).name.endswith(TEACHER_PART):  # the students' answers to its items exist already
                seed_generations(directory / Path(options.out).name.removesuffix(TEACHER_PART), Path(options.out))
            seconds.append(run_eval(options)["seconds"])
        return {"rows": list(rows), "eval_seconds": sum(seconds)}

    return work


def read_metrics(directory: Path) -> dict[str, Any]:
    """A family's evaluation: the sets of its parts' metrics.json together, and the judge of the part that has one."""
    merged: dict[str, Any] = {"sets": {}, "judge": None, "generations": [], "set_answers": {}}
    for path in sorted(directory.glob("*/metrics.json")):
        metrics = json.loads(path.read_text(encoding="utf-8"))
        for name, result in metrics["sets"].items():  # a set evaluated twice (IFEval's teacher part) is named by its part
            key = name if name not in merged["sets"] else f"{name} ({path.parent.name})"  # e.g. `gsm8k (suites-teacher)`
            merged["sets"][key] = result
            merged["set_answers"][key] = (str(path.parent / "generations.jsonl"), name)  # where its answers are, under which name
        merged["judge"] = merged["judge"] or metrics.get("judge")
        merged["generations"].append(str(path.parent / "generations.jsonl"))
    return merged


# ---------------------------------------------------------------- tuning on the in-distribution split

TUNE_STAGE = "tune"
# Each tuned method's default row -> its training stage and the held-out row of its sweep's choice (where the choice
# is not the default).
TUNED = {"smollm2-gad": ("blackbox-gad", "smollm2-gad-tuned"), "smollm2-opd-xtok": ("blackbox-opd-xtok", "smollm2-opd-xtok-tuned")}
TUNING_RULE = ("for each method (GAD, cross-tokenizer OPD), the row (its default or a variant) whose greedy answers to the "
               "tuning split have the highest mean teacher log-prob per token (the teacher reading its privileged system "
               "prompt, its tokenizer)")


TAKEN_CHOICES = "tuned.json"  # in --out: the choices --tuned-from took over from another run's sweep


def blackbox_row(stage: str) -> str:
    """A black-box training stage's row label (blackbox-gad-kl -> smollm2-gad-kl)."""
    return "smollm2-" + stage.removeprefix("blackbox-")


def blackbox_stage(row: str) -> str:
    """A black-box row's training stage (smollm2-gad-kl -> blackbox-gad-kl)."""
    return "blackbox-" + row.removeprefix("smollm2-")


def changed_settings(stages: Stages, variant: str, default: str) -> dict[str, Any]:
    """The train settings a variant's stage ran with that differ from its default's."""
    base = stages.key(default) or {}
    return {k: v for k, v in (stages.key(variant) or {}).items() if base.get(k) != v}


def recorded_choices(stages: Stages) -> dict[str, str]:
    """Method -> chosen row, from this run's finished sweep, or from the run whose choices it took over."""
    if stages.finished(TUNE_STAGE):
        return stages.info(TUNE_STAGE).get("choices", {})
    taken = stages.out / TAKEN_CHOICES
    return json.loads(taken.read_text(encoding="utf-8"))["choices"] if taken.is_file() else {}


def method_of(label: str) -> str | None:
    """The tuned method a row belongs to (its default row's label), or None."""
    return next((method for method in TUNED if label == method or label.startswith(method + "-")), None)


def sweep_configs(size_name: str, size: Size, configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The size's declared sweeps, GAD's then cross-tokenizer OPD's: stage -> config."""
    if not (size.gad_sweep or size.opd_sweep) or not size.tune_prompts:
        raise SystemExit(f"quality: --tune: size {size_name} declares no sweep (Size.gad_sweep, opd_sweep, tune_prompts); "
                         "the cpu size does, or add --gad-variant rows by hand")
    return {**dict(gad_variant(spec, size, configs["blackbox-gad"]) for spec in size.gad_sweep),
            **dict(opd_variant(spec, configs["blackbox-opd-xtok"]) for spec in size.opd_sweep)}


def tuning_rows(out: Path, sweep: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The tuning split's rows: the teacher, SeqKD (the row to beat), each tuned method's default and its variants."""
    stages = ["blackbox-seqkd", *(stage for stage, _ in TUNED.values()), *sweep]
    return {"teacher": TEACHER, **{blackbox_row(stage): str(out / stage / "student") for stage in stages}}


def choose(rows: dict[str, dict[str, Any]]) -> dict[str, str]:
    """TUNING_RULE: per method, the row the teacher finds likeliest per token. The teacher's log-prob is what every
    method here moves the student toward, and no answer key exists in distribution; each row's length, EOS rate and
    repetition sit beside it in the table to show a gamed choice (on Vicuna at the compact size it put GAD last, as
    the calibrated judge did)."""
    choices = {}
    for method in TUNED:
        scores = {label: r["teacher_logprob"] for label, r in rows.items() if method_of(label) == method and r["teacher_logprob"] is not None}
        if scores:
            choices[method] = max(scores, key=lambda label: scores[label])
    return choices


def tune_stage(size: Size, args: argparse.Namespace, rows: dict[str, str]) -> Callable[[Path], dict[str, Any]]:
    """One `opdistill eval` of the tuning rows on the tuning split (greedy, as the held-out sets), then the choice."""
    def work(directory: Path) -> dict[str, Any]:
        from opdistill.evaluate.options import EvalOptions
        from opdistill.evaluate.run import run_eval

        prompts = tuning_prompts(size, args.data_dir)
        write_json_lines(directory / "prompts.jsonl", prompts)
        run_eval(EvalOptions(**eval_common(rows, args.teacher_system, args), out=str(directory / "eval"),
                             prompts=[f"tune={directory / 'prompts.jsonl'}"], max_new_tokens=size.eval_tokens))
        result = json.loads((directory / "eval" / "metrics.json").read_text(encoding="utf-8"))["sets"]["tune"]
        table = {label: row_result(result, label) for label in rows}
        choices = choose(table)
        say(f"tuning: chose {', '.join(choices.values()) or 'nothing'} ({TUNING_RULE})")
        return {"prompts": len(prompts), "rows": table, "choices": choices, "rule": TUNING_RULE}

    return work


def tuning_results(stages: Stages) -> dict[str, Any] | None:
    """The sweep's table, choice and rule, with each variant's training counts and discriminator signals."""
    tuning = stages.info(TUNE_STAGE) if stages.finished(TUNE_STAGE) else {}
    if not tuning:
        return None
    variants = {blackbox_stage(label): TUNED[method][0] for label in tuning["rows"]
                if (method := method_of(label)) and label != method}  # variant stage -> its default's stage
    changed = {stage: changed_settings(stages, stage, default) for stage, default in variants.items()}
    return {**tuning, "training": {stage: stages.info(stage) for stage in variants}, "changed": changed}


# ---------------------------------------------------------------- results


def family_tables(metrics: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """Per set: every row's flat scores, and for a suite its paired tests."""
    tables: dict[str, Any] = {}
    answers: dict[str, list[dict[str, Any]]] = {}  # each part's generations.jsonl, read once for all its sets
    for set_name, result in metrics["sets"].items():
        path, name = metrics["set_answers"][set_name]
        if path not in answers:
            answers[path] = read_json_lines(Path(path)) if Path(path).is_file() else []
        here = [label for label in labels if label in result["models"]]  # a part may leave the teacher row out
        tables[set_name] = {"rows": {label: row_result(result, label) for label in here}, "suite": result.get("suite"),
                            "paired": result.get("paired", []), "prompts": result["prompts"],
                            "pairwise": result.get("pairwise", []), "sameness": answer_sameness(answers[path], name, here)}
    return tables


def recorded_settings(stages: Stages, families: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The flags a reported family ran with, read from what its stages recorded: a family evaluated by an earlier
    invocation (--only) keeps its own, whatever this invocation was given. Flags of a family not run fall back to args."""
    collected = {family: stages.key(COLLECT[family]) or {} for family in families}
    whitebox_training = stages.key("whitebox-opd") if "whitebox" in families else None
    return {"teacher_system": collected.get("blackbox", {}).get("system", args.teacher_system),
            "whitebox_tuning": ("lora" if "lora_r" in whitebox_training else "full") if whitebox_training else args.whitebox_tuning,
            "precision": {family: collected[family].get("precision", args.precision) for family in families}}


def report_stage(size_name: str, size: Size, args: argparse.Namespace, stages: Stages, families: list[str]) -> dict[str, Any]:
    """results.json's content, and report.html, from the evaluations and the training runs."""
    from opdistill.report import write_report

    out = args.out
    tables, judges = {}, {}
    generations = {}
    for family in families:
        metrics = read_metrics(out / f"eval-{family}")
        tables[family] = family_tables(metrics, list(eval_rows(family, out)))
        judges[family], generations[family] = metrics["judge"], metrics["generations"]
    training_runs = [stage for family in families for stage in FAMILIES[family].values()]
    parts = [Path(path).parent for family in families for path in generations[family]]
    trained = [out / stage for stage in training_runs if (out / stage).is_dir()]  # an interim report may come before one exists
    report = write_report([*parts, *trained], out / "report.html")
    return {
        "settings": {"size": size_name, **asdict(size), "gad_adversarial": size.gad_adversarial, "eval_tokens": size.eval_tokens,
                     "teacher": TEACHER, "whitebox_teacher_system": WHITEBOX_TEACHER_SYSTEM, "blackbox_student": BLACKBOX_STUDENT,
                     "whitebox_student": WHITEBOX_STUDENT, **recorded_settings(stages, families, args), "families": families},
        "teacher_text": {family: stages.info(COLLECT[family]) for family in families},
        "training": {stage: stages.info(stage) for stage in training_runs if stages.info(stage)},
        "judge": judges, "tables": tables, "tuning": tuning_results(stages) if "blackbox" in families else None,
        "stage_seconds": stages.total_seconds(), "this_invocation_seconds": stages.seconds,
        "files": {"generations": generations, "report": str(report)},
    }

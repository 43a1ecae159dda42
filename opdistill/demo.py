"""`opdistill demo`: the built-in end-to-end job on one small machine.

Teacher: SmolLM2-135M-Instruct with a privileged system prompt (default "Always respond in French.").
Student: the same model without it. Context distillation, black-box: the student only ever sees the
teacher's text. Steps: collect teacher texts on the built-in train prompts -> SeqKD -> evaluate base,
trained student and the teacher itself on the built-in held-out prompts with a language test.
(GAD joins this pipeline when it lands; SeqKD is the supervised baseline.)
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import build_config
from .data import load_records
from .evaluate.metrics import french_share, mean_length_words
from .sampling import SamplingParams
from .teachers.collect import CollectOptions, collect

DEFAULT_SYSTEM = "Always respond in French."
MODEL = "smollm2-135m-instruct"


@dataclass
class DemoOptions:
    out: str
    system: str = DEFAULT_SYSTEM
    model: str = MODEL
    train_prompts: int = 96
    heldout_prompts: int = 40
    max_new_tokens: int = 48
    steps: int = 30
    batch_size: int = 8
    lr: float = 5e-5
    seed: int = 0


def _say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def run_demo(opts: DemoOptions) -> dict:
    # Imported here so that building the CLI (which reads DemoOptions' defaults) does not load torch.
    from .evaluate.generate import generate_texts
    from .methods import train
    from .models import load_model, load_tokenizer

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    teacher_file = out / "teacher.jsonl"
    _say(f"1/3 collecting teacher responses ({opts.model} with system prompt {opts.system!r}) on {opts.train_prompts} built-in train prompts")
    summary = collect(CollectOptions(prompts=f"builtin:train[:{opts.train_prompts}]", out=str(teacher_file), teacher_model=opts.model,
                                     system=opts.system, temperature=0.7, top_p=0.95, max_tokens=opts.max_new_tokens, seed=opts.seed))
    for line in summary.lines():
        _say("   " + line)

    _say(f"2/3 SeqKD: {opts.steps} steps of {opts.batch_size}, lr {opts.lr}")
    config = build_config({
        "method": "seqkd", "student": opts.model, "data": str(teacher_file), "out_dir": str(out / "seqkd"),
        "max_steps": opts.steps, "batch_size": opts.batch_size, "micro_batch_size": opts.batch_size, "lr": opts.lr,
        "warmup_ratio": 0.1, "checkpoint_every": max(10, opts.steps // 2), "max_response_tokens": opts.max_new_tokens + 1,
        "seed": opts.seed, "max_grad_norm": 1.0,
    }, where="demo")
    train(config)
    student_dir = out / "student"
    shutil.rmtree(student_dir, ignore_errors=True)
    shutil.copytree(out / "seqkd" / "student", student_dir)

    _say(f"3/3 evaluating on {opts.heldout_prompts} held-out prompts (greedy, {opts.max_new_tokens} new tokens)")
    heldout = load_records(f"builtin:heldout[:{opts.heldout_prompts}]")
    params = SamplingParams(temperature=0.0, max_new_tokens=opts.max_new_tokens)
    base, tokenizer = load_model(opts.model), load_tokenizer(opts.model)
    rows = {
        "teacher (with system prompt)": generate_texts(opts.model, heldout, params, system=opts.system, model=base, tokenizer=tokenizer),
        "student before (base)": generate_texts(opts.model, heldout, params, model=base, tokenizer=tokenizer),
        "student after SeqKD": generate_texts(str(student_dir), heldout, params),
    }
    metrics = {
        "task": f"share of held-out responses in French (system prompt: {opts.system!r})",
        "models": {name: {"french_share": french_share(texts), "mean_words": mean_length_words(texts)} for name, texts in rows.items()},
        "train_prompts": opts.train_prompts, "heldout_prompts": len(heldout), "steps": opts.steps,
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(out / "generations.jsonl", "w", encoding="utf-8") as handle:
        for i, record in enumerate(heldout):
            handle.write(json.dumps({"prompt": record.messages[-1]["content"], **{n: t[i] for n, t in rows.items()}}, ensure_ascii=False) + "\n")
    print(f"\n{'model':32} {'French share':>12} {'mean words':>10}")
    for name, values in metrics["models"].items():
        print(f"{name:32} {values['french_share']:>11.0%} {values['mean_words']:>10.1f}")
    print(f"\nstudent: {student_dir}   metrics: {out / 'metrics.json'}   time: {metrics['seconds']:.0f} s")
    return metrics

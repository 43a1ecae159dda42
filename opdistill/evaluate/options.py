"""The options of `opdistill eval` and their parsing: model labels, system prompts, task checks, prompt sets.

All of it runs before the first model loads.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import DataError, OpdistillError
from .metrics import TASK_CHECKS
from .prompts import EvalSet, join_answer_file, load_eval_set, load_suite_set


@dataclass
class ModelSpec:
    label: str
    path: str
    system: str = ""  # a privileged system prompt this model sees (e.g. the teacher of context distillation)


@dataclass
class EvalOptions:
    models: list[str]  # [LABEL=]MODEL
    prompts: list[str]  # [NAME=]SPEC
    out: str
    suites: list[str] = field(default_factory=list)  # NAME[a:b]: program-checked suites (suites.py)
    data_dir: str = ""  # the suites' data folder (default $OPDISTILL_DATA)
    systems: list[str] = field(default_factory=list)  # LABEL=TEXT
    references: list[str] = field(default_factory=list)  # MT-Bench answer files joined on question_id
    teacher: str = ""  # label of the teacher row (reference row; white-box log-probs when local)
    checks: list[str] = field(default_factory=list)  # task checks: french, or module:function
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 16
    precision: str = "auto"
    seed: int = 0
    embeddings: bool = True
    judge_url: str = ""
    judge_model: str = ""
    judge_api_key_env: str = "OPENAI_API_KEY"
    judge_local: str = ""
    judge_reference: str = ""  # reference the judge ratio uses (default: the teacher row, else each set's first reference)
    judge_concurrency: int = 8
    judge_retries: int = 2
    judge_max_tokens: int = 256
    pairwise: list[str] = field(default_factory=list)  # X:Y label pairs
    progress: bool = True


def parse_models(opts: EvalOptions) -> list[ModelSpec]:
    specs: list[ModelSpec] = []
    for text in opts.models:
        head, sep, tail = text.partition("=")
        # LABEL=PATH, unless what precedes "=" looks like part of a path
        label, path = (head.strip(), tail) if sep and head.strip() and "/" not in head else (Path(text.rstrip("/")).name or text, text)
        if not path:
            raise OpdistillError(f"--model {text!r} names no model", "use --model LABEL=PATH or --model PATH")
        if any(s.label == label for s in specs):
            raise OpdistillError(f"two models have the label {label!r}", "give each a label: --model base=PATH --model gad=PATH2")
        specs.append(ModelSpec(label, path))
    if not specs:
        raise OpdistillError("no --model given", "pass at least one --model [LABEL=]PATH")
    labels = {s.label: s for s in specs}
    for text in opts.systems:
        label, sep, system = text.partition("=")
        if not sep or label not in labels:
            raise OpdistillError(f"--system {text!r}: expected LABEL=TEXT with one of the model labels {sorted(labels)}")
        labels[label].system = system
    if opts.teacher and opts.teacher not in labels:
        raise OpdistillError(f"--teacher {opts.teacher!r} is not a model label", f"use one of {sorted(labels)}")
    for pair in opts.pairwise:
        x, sep, y = pair.partition(":")
        if not sep or x not in labels or y not in labels or x == y:
            raise OpdistillError(f"--pairwise {pair!r}: expected X:Y with two different model labels from {sorted(labels)}")
    return specs


def resolve_check(name: str) -> Callable[[str], bool]:
    """A built-in task check by name, or any importable `module:function` taking a response and returning a bool."""
    if name in TASK_CHECKS:
        return TASK_CHECKS[name]
    module_name, sep, attribute = name.partition(":")
    if not sep:
        raise OpdistillError(f"unknown --check {name!r}", f"use one of {sorted(TASK_CHECKS)} or module:function")
    try:
        check = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise OpdistillError(f"--check {name!r} cannot be loaded: {err}", "make the module importable (PYTHONPATH) and the function exist") from None
    if not callable(check):
        raise OpdistillError(f"--check {name!r} is not a function")
    return check


def validate(opts: EvalOptions) -> None:
    if opts.max_new_tokens < 1 or opts.batch_size < 1:
        raise OpdistillError("--max-new-tokens and --batch-size must be >= 1")
    if opts.temperature < 0 or not 0 < opts.top_p <= 1:
        raise OpdistillError("--temperature must be >= 0 and --top-p in (0, 1]")
    if opts.judge_url and opts.judge_local:
        raise OpdistillError("--judge-url and --judge-local both given", "pick one judge")
    if opts.judge_url and not opts.judge_model:
        raise OpdistillError("--judge-url needs --judge-model (the model name at the endpoint)")
    if opts.pairwise and not (opts.judge_url or opts.judge_local):
        raise OpdistillError("--pairwise needs a judge", "add --judge-url URL --judge-model NAME, or --judge-local MODEL")
    if opts.judge_retries < 0 or opts.judge_concurrency < 1:
        raise OpdistillError("--judge-retries must be >= 0 and --judge-concurrency >= 1")


def load_sets(opts: EvalOptions) -> list[EvalSet]:
    sets = [load_eval_set(spec) for spec in opts.prompts] + [load_suite_set(spec, opts.data_dir) for spec in opts.suites]
    if not sets:
        raise OpdistillError("no --prompts or --suite given", "pass e.g. --prompts builtin:heldout, --prompts questions.jsonl or --suite gsm8k[0:100]")
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise OpdistillError(f"two prompt sets are named alike ({names})", "name them: --prompts a=FILE1 --prompts b=FILE2")
    for file in opts.references:
        if not sum(join_answer_file(s, Path(file)) for s in sets):
            raise DataError(f"{file}: no question_id matches a prompt of {', '.join(names)}", "pass the answer file of the same benchmark")
    return sets

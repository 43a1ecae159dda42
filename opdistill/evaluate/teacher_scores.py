"""The white-box teacher's log-probability of every model's answers (`opdistill eval`'s teacher_logprob metric): scored
by the teacher row's local model or by a served teacher (--teacher-url), each score kept in teacher_logprobs.jsonl by
teacher weights, conversation and text, so a rerun or an added model scores only what is new."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from ..errors import OpdistillError
from ..teachers.store import JsonlLog, content_key
from .common import model_fingerprint, responses, say
from .options import EvalOptions, ModelSpec
from .prompts import EvalSet


def logprob_key(teacher: ModelSpec, fingerprint: list[Any], messages: list[dict[str, str]], response: str, finished: bool) -> str:
    identity = {"teacher": teacher.path, "system": teacher.system, "weights": fingerprint, "messages": messages,
                "response": response, "finished": finished}
    return content_key({**identity, "url": teacher.url} if teacher.url else identity)


def logprob_scorer(opts: EvalOptions, teacher: ModelSpec) -> ModelSpec | None:
    """Who scores the teacher log-prob: the served teacher of --teacher-url, else the teacher row's local model;
    None for an endpoint teacher row without --teacher-url (a closed API returns no prompt log-probs)."""
    if opts.teacher_url:
        tokenizer = opts.teacher_tokenizer or ("" if teacher.url else teacher.path)
        if not tokenizer:
            raise OpdistillError(f"the served teacher {opts.teacher_model!r} needs its tokenizer to render its prompt",
                                 "pass --teacher-tokenizer DIR (a local copy of the teacher's tokenizer files, a few MB)")
        return ModelSpec(teacher.label, opts.teacher_model, teacher.system, url=opts.teacher_url.rstrip("/"),
                         api_key_env=opts.teacher_api_key_env, tokenizer=tokenizer)
    if teacher.url:
        say(f"no teacher log-prob: the teacher row {teacher.label!r} is an endpoint; a served white-box teacher (vLLM, opdistill serve) "
            "scores it with --teacher-url URL --teacher-model ID")
        return None
    return teacher


def teacher_logprobs(opts: EvalOptions, teacher: ModelSpec, sets: list[EvalSet], generated: dict[str, dict[str, Any]],
                     models: list[ModelSpec], out: Path) -> dict[tuple[str, str], dict[str, float | int | None]]:
    """The teacher's mean log-prob of each model's responses per set. Each response's score is kept in
    teacher_logprobs.jsonl by teacher weights, conversation and text, so adding a model scores only its responses
    (and the teacher is not even loaded when nothing is new)."""
    from .scoring import mean_logprob

    fingerprint = [] if teacher.url else model_fingerprint(teacher.path)
    keyed: dict[tuple[str, str], list[str]] = {}
    todo: dict[str, tuple[list[dict[str, str]], str, bool]] = {}
    store = JsonlLog(out / "teacher_logprobs.jsonl")
    try:
        cached = {row["key"]: (row["logprob_sum"], row["tokens"]) for row in store.rows}
        for eval_set in sets:
            conversations = [r.with_system(teacher.system) for r in eval_set.records]
            for spec in models:
                rows = responses(generated, spec.label, eval_set)
                keys = [logprob_key(teacher, fingerprint, c, r["response"], bool(r["finished"])) for c, r in zip(conversations, rows)]
                keyed[(eval_set.name, spec.label)] = keys
                todo.update({k: (c, r["response"], bool(r["finished"])) for k, c, r in zip(keys, conversations, rows) if k not in cached})
        if todo:
            scorer = score_with_served_teacher if teacher.url else score_with_teacher
            cached.update(scorer(opts, teacher, todo, store))
    finally:
        store.close()
    return {where: mean_logprob([cached[k] for k in keys]) for where, keys in keyed.items()}


def score_with_teacher(opts: EvalOptions, teacher: ModelSpec, todo: dict[str, tuple[list[dict[str, str]], str, bool]],
                       store: JsonlLog) -> dict[str, tuple[float, int]]:
    """Loads the teacher and scores `todo` (key -> conversation, response, finished), committing each batch: through a
    vLLM engine's prompt log-probs or the local model's forward, picked as generation's engine is (rollout.choose_engine:
    the demo's 183 answers took 46 s through vLLM against 81 s through the hf forward, fp32, docs/demo.md)."""
    from ..models import compute_dtype, default_device, load_model, load_tokenizer
    from ..rollout.engines import choose_engine, generation_sampler, model_config
    from ..teachers.logprob import LocalTeacher
    from .scoring import response_logprob_sums

    tokenizer = load_tokenizer(teacher.path)
    engine, why = choose_engine(opts.engine, model_config(teacher.path), len(todo) * opts.max_new_tokens)
    if engine == "vllm":
        scorer: Any = generation_sampler(teacher.path, tokenizer, engine="vllm", precision=opts.precision, seed=opts.seed)
    else:
        model = load_model(teacher.path, dtype=compute_dtype(opts.precision)).to(default_device()).eval()
        scorer = LocalTeacher(model, tokenizer.pad_token_id, micro_batch_size=opts.batch_size)
    say(f"scoring {len(todo)} response(s) with the teacher {teacher.label!r} ({teacher.path}) on the {engine} engine ({why})")
    try:
        return score_in_batches(opts, todo, store, lambda chunk: response_logprob_sums(
            scorer, tokenizer, [todo[k][0] for k in chunk], [todo[k][1] for k in chunk], [todo[k][2] for k in chunk]), "teacher log-prob")
    finally:
        if hasattr(scorer, "close"):
            scorer.close()


def score_with_served_teacher(opts: EvalOptions, teacher: ModelSpec, todo: dict[str, tuple[list[dict[str, str]], str, bool]],
                              store: JsonlLog) -> dict[str, tuple[float, int]]:
    """Scores `todo` through a served teacher's prompt log-probs (k = 1: only each actual token's log-prob is used).
    The conversation is rendered with a local copy of the teacher's tokenizer (--teacher-tokenizer, a few MB even for
    a 70B model), the response re-tokenised with it, EOS scored when the response finished, as for a local teacher."""
    from ..models import load_tokenizer
    from ..teachers.remote import RemoteTeacher
    from .scoring import response_logprob_sums

    tokenizer = load_tokenizer(teacher.tokenizer)
    say(f"scoring {len(todo)} response(s) with the served teacher {teacher.path!r} at {teacher.url}")
    remote = RemoteTeacher(teacher.url, teacher.path, k=1, vocab=2**31 - 1, cache_path=Path(opts.out) / "served_teacher_cache.jsonl",
                           api_key_env=teacher.api_key_env, concurrency=opts.api_concurrency, seed=opts.seed)
    try:
        return score_in_batches(opts, todo, store, lambda chunk: response_logprob_sums(
            remote, tokenizer, [todo[k][0] for k in chunk], [todo[k][1] for k in chunk], [todo[k][2] for k in chunk]),
            "teacher log-prob (served)")
    finally:
        remote.close()


def score_in_batches(opts: EvalOptions, todo: dict[str, tuple[list[dict[str, str]], str, bool]], store: JsonlLog,
                     score: Callable[[list[str]], list[tuple[float, int]]], desc: str) -> dict[str, tuple[float, int]]:
    """`score` over `todo`'s keys in batches of similar response length (little padding), each batch committed to
    `store` before the next: an interrupted run keeps what it scored."""
    keys, scores = sorted(todo, key=lambda k: len(todo[k][1])), {}
    for start in tqdm(range(0, len(keys), opts.batch_size), desc=desc, unit="batch", disable=not opts.progress, dynamic_ncols=True,
                      file=sys.stderr):
        chunk = keys[start:start + opts.batch_size]
        for key, (total, tokens) in zip(chunk, score(chunk)):
            store.append({"key": key, "logprob_sum": total, "tokens": tokens})
            scores[key] = (total, tokens)
    return scores

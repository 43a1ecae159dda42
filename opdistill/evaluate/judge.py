"""LLM-as-judge: reference-based scores (MiniLLM / GAD) and pairwise comparison with position swapping.

(a) Reference-based: the judge reads the question, the reference answer (as Answer 1) and the model's answer
    (as Answer 2) and scores both 1-10 in one reply. The metric is the ratio of the model's total score to the
    reference's total over the prompts both were scored on (MiniLLM, arXiv 2306.08543; GAD's GPT-4o scores).
(b) Pairwise: the judge picks the better of two answers, once with each model first. Each order gives model X
    1 (win), 0.5 (tie) or 0 (loss); a prompt's outcome is the mean of its two orders, so a verdict that flips
    with the order counts as a tie (a judge that always picks the first answer scores exactly 0.5). The win
    rate is the mean outcome; its 95% interval is mean ± 1.96·s/√n (normal approximation, sample std s).
(c) Logit verdicts (local judges): P(A) from the verdict token's logits after a forced "Verdict:", one forward pass
    per order; a prompt's outcome is the order-averaged probability (judge_stats). Calibration: calibration.py.

Every judge reply is cached in DIR/judge.jsonl (flushed and fsynced per line) keyed by the judge and the
exact request, so a rerun never pays twice. A reply that does not parse is asked again (up to `retries`
more times, at `retry_temperature`); if it still does not parse it is stored and counted as unparsed in the
metrics, never dropped silently. A request the API fails after its own retry budget is not stored: the
rerun asks again.
"""

from __future__ import annotations

import asyncio
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from tqdm import tqdm

from ..teachers.store import JsonlLog, content_key
from .judge_stats import (
    VERDICT_PREFIX, Lengths, last_token_logits, length_controlled, verdict_probability, verdict_prompt_ids, verdict_token_ids, win_rate,
)

SYSTEM = "You are a careful, impartial judge of answers to user questions."

SCORE_PROMPT = """Rate two answers to the question below for helpfulness, relevance, accuracy, depth and level of detail. Give each an integer score from 1 (useless) to 10 (excellent). Judge the content; neither the order of the answers nor their length is a merit.

[Question]
{question}

[Answer 1]
{reference}

[Answer 2]
{answer}

Reply with one line that starts with "Scores:" followed by two integers from 1 to 10, the score of Answer 1 and then the score of Answer 2, then at most two sentences of explanation."""

PAIR_PROMPT = """Compare two assistants' answers to the user question below and decide which is better: more helpful, relevant, accurate and detailed. The order of the answers and their length must not influence you.

[Question]
{question}

[Assistant A]
{first}

[Assistant B]
{second}

Reply with one line "Verdict: A", "Verdict: B" or "Verdict: tie", then at most two sentences of explanation."""

SCORES = re.compile(r"scores?\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*[,;/ ]\s*(?:and\s+)?(\d+(?:\.\d+)?)", re.IGNORECASE)
VERDICT = re.compile(r"verdict\s*[:=]?\s*\**\s*\[*\s*(a|b|tie)\b", re.IGNORECASE)


# ---------------------------------------------------------------- prompts and parsing (pure)


def score_messages(question: str, reference: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": SCORE_PROMPT.format(question=question, reference=reference, answer=answer)}]


def pair_messages(question: str, first: str, second: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": PAIR_PROMPT.format(question=question, first=first, second=second)}]


def parse_scores(text: str) -> tuple[float, float] | None:
    """(reference score, answer score) from 'Scores: 7 9'; None unless both are in [1, 10]."""
    match = SCORES.search(text)
    if not match:
        return None
    first, second = float(match[1]), float(match[2])
    return (first, second) if 1 <= first <= 10 and 1 <= second <= 10 else None


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from 'Verdict: ...'; None when absent."""
    match = VERDICT.search(text)
    if not match:
        return None
    value = match[1].lower()
    return "tie" if value == "tie" else value.upper()


def score_ratio(scores: list[tuple[float, float]]) -> float | None:
    """Σ answer score / Σ reference score over the prompts scored (None when none were)."""
    reference = sum(r for r, _ in scores)
    return sum(a for _, a in scores) / reference if scores and reference else None


def order_outcome(verdict: str, model_first: bool) -> float:
    """Model X's result in one order: 1 win, 0.5 tie, 0 loss."""
    if verdict == "tie":
        return 0.5
    return 1.0 if (verdict == "A") == model_first else 0.0


def prompt_outcome(verdict_x_first: str, verdict_y_first: str) -> float:
    """Mean of the two orders: an order-dependent verdict becomes a tie."""
    return (order_outcome(verdict_x_first, True) + order_outcome(verdict_y_first, False)) / 2


# ---------------------------------------------------------------- judges


class Judge(Protocol):
    name: str

    def reply_all(self, requests: list[list[dict[str, str]]], temperature: float,
                  on_reply: Callable[[int, str | None], None] = lambda index, reply: None) -> list[str | None]:
        """One reply per request; None where the request failed (it is not cached and a rerun asks again).
        `on_reply(i, reply)` is called as request i's reply arrives, so the caller can store it at once."""
        ...


class ApiJudge:
    """A judge behind an OpenAI-compatible endpoint (the key comes from the environment, never stored)."""

    def __init__(self, url: str, model: str, api_key: str | None, *, concurrency: int = 8, max_tokens: int = 256,
                 max_attempts: int = 6, retry_base_delay: float = 0.5, timeout: float = 120.0) -> None:
        from ..teachers.api import RetryPolicy

        self.name = f"api:{model}"
        self.url, self.model, self.api_key = url, model, api_key
        self.concurrency, self.max_tokens = concurrency, max_tokens
        self.policy = RetryPolicy(max_attempts=max_attempts, base_delay=retry_base_delay, timeout=timeout)
        self.failures: list[str] = []
        self.requests = 0
        self.retries = 0

    def reply_all(self, requests: list[list[dict[str, str]]], temperature: float,
                  on_reply: Callable[[int, str | None], None] = lambda index, reply: None) -> list[str | None]:
        return asyncio.run(self._reply_all(requests, temperature, on_reply))

    async def _reply_all(self, requests: list[list[dict[str, str]]], temperature: float,
                         on_reply: Callable[[int, str | None], None]) -> list[str | None]:
        from ..teachers.api import ChatCompletionsTeacher, RequestFailed

        client = ChatCompletionsTeacher(self.url, self.model, self.api_key, self.policy)
        gate = asyncio.Semaphore(self.concurrency)
        sampling = {"temperature": temperature, "max_tokens": self.max_tokens}

        async def one(index: int, messages: list[dict[str, str]]) -> str | None:
            async with gate:
                reply: str | None = None
                try:
                    reply = (await client.complete(messages, sampling)).text
                except RequestFailed as failure:
                    self.failures.append(failure.reason)
                on_reply(index, reply)
                return reply

        try:
            return list(await asyncio.gather(*(one(i, m) for i, m in enumerate(requests))))
        finally:
            self.requests += client.stats.requests
            self.retries += client.stats.retries
            await client.close()


class LocalJudge:
    """A local chat model as the judge (batched generation; greedy at temperature 0)."""

    def __init__(self, model: str, *, max_tokens: int = 128, batch_size: int = 8, precision: str = "auto", seed: int = 0,
                 engine: str = "hf", new_tokens: int = 0) -> None:
        """engine: the generation seam's (auto, hf, vllm); logit verdicts read the hf engine's model, so they need hf."""
        from ..teachers.local import LocalTextTeacher

        self.name = f"local:{model}"
        self.teacher = LocalTextTeacher(model, precision=precision, batch_size=batch_size, engine=engine, new_tokens=new_tokens, seed=seed)
        self.max_tokens, self.seed, self.batch_size = max_tokens, seed, batch_size
        self.failures: list[str] = []
        self.requests = 0
        self.retries = 0
        self.forward_passes = 0  # batches scored by pair_probabilities (the tests count them to prove caching)
        self._verdict_ids: tuple[list[int], list[int]] | None = None

    def reply_all(self, requests: list[list[dict[str, str]]], temperature: float,
                  on_reply: Callable[[int, str | None], None] = lambda index, reply: None) -> list[str | None]:
        from ..data import Record
        from ..sampling import SamplingParams

        records = [Record(messages=m) for m in requests]
        replies: list[str | None] = [None] * len(records)
        # One random stream per request (engine-independent, batch-independent), numbered across this judge's requests.
        seeds = [self.seed + self.requests + i for i in range(len(records))]
        for batch in self.teacher.generate(records, SamplingParams(temperature, 1.0, self.max_tokens), 1, seeds=seeds):
            for sample in batch:
                replies[sample.prompt_index] = sample.text
                on_reply(sample.prompt_index, sample.text)
        self.requests += len(records)
        return replies

    def close(self) -> None:
        self.teacher.close()

    def pair_probabilities(self, requests: list[list[dict[str, str]]],
                           on_result: Callable[[int, float], None] = lambda index, p: None) -> list[float]:
        """P(A): the probability that the first answer is better, for each pair_messages request, from one forward
        pass (see "logit verdicts" below). Uncached: judge_pair_probabilities is the cached way to ask."""
        import torch

        tokenizer, model = self.teacher.tokenizer, self.teacher.sampler.policy
        if self._verdict_ids is None:
            self._verdict_ids = verdict_token_ids(tokenizer)
        ids_a, ids_b = self._verdict_ids
        prompts = [verdict_prompt_ids(tokenizer, m) for m in requests]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths per batch: little padding
        results: list[float] = [0.5] * len(prompts)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                with torch.inference_mode():
                    logits = last_token_logits(model, [prompts[i] for i in chunk], tokenizer.pad_token_id)
                self.forward_passes += 1
                # Each verdict's log-mass is the logsumexp over its token variants; float64 for the margin.
                mass_a, mass_b = (torch.logsumexp(logits[:, ids].double(), dim=1) for ids in (ids_a, ids_b))
                for i, a, b in zip(chunk, mass_a.tolist(), mass_b.tolist()):
                    results[i] = verdict_probability(a, b)
                    on_result(i, results[i])
        finally:
            model.train(was_training)
        self.requests += len(prompts)
        return results


# ---------------------------------------------------------------- cached, retried judging


def request_key(judge: str, messages: list[dict[str, str]]) -> str:
    return content_key({"judge": judge, "messages": messages})


@dataclass
class Verdict:
    text: str
    parsed: Any  # parse_scores / parse_verdict output; None when unparseable after every retry
    attempts: int


class JudgeCache:
    """Judge replies by request key, in an append-only JSONL file that survives crashes."""

    def __init__(self, path: str | Path) -> None:
        self.log = JsonlLog(path)
        self.rows = {row["key"]: row for row in self.log.rows if isinstance(row.get("key"), str)}

    def close(self) -> None:
        self.log.close()


def judge_requests(judge: Judge, cache: JudgeCache, requests: list[list[dict[str, str]]], parse: Any, *,
                   temperature: float = 0.0, retries: int = 2, retry_temperature: float = 0.7,
                   kind: str = "", progress: bool = True) -> list[Verdict | None]:
    """The parsed verdict of every request (None where the API failed), asking only what the cache lacks."""
    keys = [request_key(judge.name, m) for m in requests]
    pending: list[int] = []
    asked: set[str] = set()
    for i, key in enumerate(keys):
        if key not in cache.rows and key not in asked:  # identical requests (two models, same answer) are asked once
            asked.add(key)
            pending.append(i)
    attempt = 0
    while pending:
        attempt += 1
        still: list[int] = []

        def settle(asked_index: int, reply: str | None) -> None:
            """Stores a reply the moment it arrives: a crash loses only the requests still in flight."""
            bar.update(1)
            i = pending[asked_index]
            if reply is None:
                return  # the API gave up on it: not cached, a rerun asks again
            parsed = parse(reply)
            if parsed is None and attempt <= retries:
                still.append(i)
                return
            if keys[i] not in cache.rows:
                row = {"key": keys[i], "kind": kind, "judge": judge.name, "text": reply,
                       "parsed": list(parsed) if isinstance(parsed, tuple) else parsed, "attempts": attempt}
                cache.log.append(row)
                cache.rows[keys[i]] = row

        with tqdm(total=len(pending), desc=f"judge {kind}" + (f" (re-ask {attempt - 1})" if attempt > 1 else ""), unit="req",
                  disable=not progress, dynamic_ncols=True, file=sys.stderr) as bar:
            judge.reply_all([requests[i] for i in pending], temperature if attempt == 1 else retry_temperature, settle)
        pending = sorted(still)
    verdicts: list[Verdict | None] = []
    for key in keys:
        row = cache.rows.get(key)
        parsed = row["parsed"] if row else None
        verdicts.append(Verdict(row["text"], tuple(parsed) if isinstance(parsed, list) else parsed, row["attempts"]) if row else None)
    return verdicts


def judge_groups(judge: Judge, cache: JudgeCache, groups: list[list[list[dict[str, str]]]], parse: Any,
                 **options: Any) -> list[list[Verdict | None]]:
    """judge_requests over many groups of requests in one call (full batches for a local judge); each group's verdicts."""
    verdicts = judge_requests(judge, cache, [request for group in groups for request in group], parse, **options)
    split, start = [], 0
    for group in groups:
        split.append(verdicts[start:start + len(group)])
        start += len(group)
    return split


def score_requests(questions: list[str], references: list[str], answers: list[str]) -> list[list[dict[str, str]]]:
    return [score_messages(q, r, a) for q, r, a in zip(questions, references, answers)]


def score_summary(verdicts: list[Verdict | None]) -> dict[str, Any]:
    """Judge ratio of one model against one reference (from its score_requests' verdicts), with its counts."""
    scored = [v.parsed for v in verdicts if v is not None and v.parsed is not None]
    return {"judge_ratio": score_ratio(scored), "judge_score": sum(a for _, a in scored) / len(scored) if scored else None,
            "judge_reference_score": sum(r for r, _ in scored) / len(scored) if scored else None,
            "judged": len(scored), "unparsed": sum(v is not None and v.parsed is None for v in verdicts),
            "failed": sum(v is None for v in verdicts)}


def pair_requests(questions: list[str], answers_x: list[str], answers_y: list[str]) -> list[list[dict[str, str]]]:
    """Every prompt with X first, then every prompt with Y first."""
    return ([pair_messages(q, x, y) for q, x, y in zip(questions, answers_x, answers_y)]
            + [pair_messages(q, y, x) for q, x, y in zip(questions, answers_x, answers_y)])


def pairwise_summary(verdicts: list[Verdict | None], lengths: Lengths | None = None) -> dict[str, Any]:
    """Win / tie / loss of X against Y from its pair_requests' verdicts (both orders per prompt); with `lengths`,
    also the length-controlled win rate (judge_stats.length_controlled_win_rate)."""
    n = len(verdicts) // 2
    outcomes, judged, unparsed, failed, consistent = [], [], 0, 0, 0
    for i, (x_first, y_first) in enumerate(zip(verdicts[:n], verdicts[n:])):
        if x_first is None or y_first is None:
            failed += 1
        elif x_first.parsed is None or y_first.parsed is None:
            unparsed += 1
        else:
            outcomes.append(prompt_outcome(x_first.parsed, y_first.parsed))
            judged.append(i)
            consistent += order_outcome(x_first.parsed, True) == order_outcome(y_first.parsed, False)
    return {**win_rate(outcomes), "unparsed": unparsed, "failed": failed,
            "order_consistency": consistent / len(outcomes) if outcomes else None, **length_controlled(outcomes, judged, lengths)}


# ---------------------------------------------------------------- cached logit verdicts


def probability_key(judge: str, messages: list[dict[str, str]]) -> str:
    """Not request_key: a logit verdict of a request is another result than its text reply, kept beside it."""
    return content_key({"judge": judge, "messages": messages, "logit_verdict": VERDICT_PREFIX})


def judge_pair_probabilities(judge: LocalJudge, cache: JudgeCache, requests: list[list[dict[str, str]]], *,
                             kind: str = "pair_logit", progress: bool = True) -> list[float]:
    """P(A) of every pair_messages request, computing only what the cache lacks; each result is stored (flushed
    and fsynced) as its batch finishes, in the same judge.jsonl as the text replies."""
    keys = [probability_key(judge.name, m) for m in requests]
    pending = [i for i, key in enumerate(keys) if key not in cache.rows and key not in keys[:i]]  # duplicates asked once
    with tqdm(total=len(pending), desc=f"judge {kind}", unit="req", disable=not progress, dynamic_ncols=True, file=sys.stderr) as bar:
        def store(asked_index: int, p_first: float) -> None:
            key = keys[pending[asked_index]]
            row = {"key": key, "kind": kind, "judge": judge.name, "p_first": p_first}
            cache.log.append(row)
            cache.rows[key] = row
            bar.update(1)

        if pending:
            judge.pair_probabilities([requests[i] for i in pending], store)
    return [float(cache.rows[key]["p_first"]) for key in keys]

"""A white-box teacher behind HTTP: vLLM's OpenAI-compatible completions API with prompt log-probs.

Request (vLLM, "Completions API" extra parameters, docs.vllm.ai/en/latest/serving/openai_compatible_server.html):
  POST {base_url}/completions  {"model": M, "prompt": [token ids], "max_tokens": 1, "prompt_logprobs": k}
The prompt is the token ids this client rendered (the teacher's context, privileged context included, then the
response), so the server never re-tokenises. `max_tokens` is 1, not 0: older vLLM versions reject 0.
Response: choices[0].prompt_logprobs is a list with one entry per prompt token; the first is null (nothing
predicts the first token; vllm/logprobs.py, PromptLogprobs), entry j maps token ids (JSON keys, so strings)
to {"logprob", "rank", "decoded_token"} for the top-k tokens at position j plus the prompt token j itself.
We keep the entries of the response positions: the top-k (sorted, most likely first) and the response token's
own log-prob.

Every scored row is appended to a durable cache (fsynced JSONL) keyed by the teacher, k, the context and the
response ids, before the step uses it: a resumed or repeated run asks the server only for rows it never got.
Requests run concurrently up to `concurrency`; faults are retried with the collection policy (teachers.api);
a row that still fails stops the step with an error before any gradient is taken, so no step is corrupted.
An answer whose body parses but whose entries are wrong (a missing or null log-prob, a NaN, a token id that is
not an integer or lies outside the vocabulary, fewer than k entries) would be the same answer again: it is not
retried and not cached, and stops the run with one error naming the row and the position.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import OpdistillError
from .api import ApiClient, RequestFailed, RetryPolicy
from .logprob import LogProbTeacher, TeacherRow, TeacherScores
from .store import JsonlLog


def row_key(teacher: str, k: int, row: TeacherRow) -> str:
    """What determines one scored row: the teacher (URL and model), k, and the token ids."""
    canonical = json.dumps({"teacher": teacher, "k": k, "prompt": row.prompt, "response": row.response}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class BadAnswer(Exception):
    """A well-formed completions body whose prompt log-probs are wrong in a way a retry cannot change. Not a ValueError,
    so the API client does not retry it (it retries ValueError, a body that may come back right)."""


def _logprob(value: Any, where: str) -> float:
    """One `logprob` field as a float; BadAnswer when it is missing, null, not a number or NaN. -inf (a token the
    server rules out; vLLM itself sends -9999.0) is read as -9999.0 too."""
    number = value.get("logprob") if isinstance(value, dict) else None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise BadAnswer(f"{where} has no numeric `logprob` (got {json.dumps(number)[:40] if number is not None else 'null'})")
    if math.isnan(number) or number == math.inf:
        raise BadAnswer(f"{where} has `logprob` {number}")
    return max(float(number), -9999.0)


def _token_id(key: str, where: str) -> int:
    if not (key.isascii() and key.removeprefix("-").isdigit()):  # a negative id is an integer, refused as outside the vocabulary
        raise BadAnswer(f"{where} names token {key[:20]!r}, which is not an integer id")
    return int(key)


def parse_prompt_logprobs(body: Any, row: TeacherRow, k: int, vocab: int, label: str = "the row") -> dict[str, list]:
    """The response positions of one completions body: {"top_ids", "top_logprobs", "token_logprobs"}.
    ValueError when the body is not shaped like vLLM's answer for this row (a truncated or foreign body: retried);
    BadAnswer when its entries are wrong (not retried). `label` names the row in messages."""
    choices = body.get("choices") if isinstance(body, dict) else None
    entries = choices[0].get("prompt_logprobs") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    length = len(row.prompt) + len(row.response)
    if not isinstance(entries, list) or len(entries) != length:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ValueError(f"choices[0].prompt_logprobs should be a list of {length} entries (one per prompt token), got {got}")
    top_ids, top_logprobs, token_logprobs = [], [], []
    for offset, token in enumerate(row.response):
        position = len(row.prompt) + offset
        where = f"{label}, response token {offset} (prompt_logprobs[{position}])"
        entry = entries[position]
        if not isinstance(entry, dict) or str(token) not in entry:
            raise BadAnswer(f"{where} lacks the response token {token}")
        pairs = [(_logprob(value, f"{where}, token {key[:20]!r}"), _token_id(key, where)) for key, value in entry.items()]
        ranked = sorted(pairs, key=lambda pair: -pair[0])[:k]
        if len(ranked) < k:
            raise BadAnswer(f"{where} has {len(ranked)} entries, fewer than k = {k} (does the server cap prompt_logprobs lower?)")
        outside = next((t for _, t in ranked if not 0 <= t < vocab), None)
        if outside is not None:
            raise BadAnswer(f"{where} names token id {outside}, outside the student's {vocab}-token vocabulary")
        top_ids.append([t for _, t in ranked])
        top_logprobs.append([v for v, _ in ranked])
        token_logprobs.append(_logprob(entry[str(token)], f"{where}, token {token}"))
    return {"top_ids": top_ids, "top_logprobs": top_logprobs, "token_logprobs": token_logprobs}


class RemoteTeacher(LogProbTeacher):
    """Prompt log-probs from an OpenAI-compatible server (vLLM, or `opdistill serve`), cached on disk.

    `base_url` ends before /completions (e.g. http://host:8000/v1); the API key comes from the environment
    variable `api_key_env` and is only ever put in the Authorization header."""

    remote = True

    def __init__(self, base_url: str, model: str, *, k: int, vocab: int, cache_path: str | Path, api_key_env: str = "",
                 policy: RetryPolicy | None = None, concurrency: int = 8, seed: int = 0) -> None:
        if k < 1:
            raise OpdistillError(f"a remote teacher needs k >= 1 log-probs per position, got {k}")
        self.base_url, self.model, self.k, self.vocab = base_url.rstrip("/"), model, k, vocab
        self.name = f"{self.base_url}#{model}"
        self.api_key_env = api_key_env
        self.policy = policy or RetryPolicy()
        self.concurrency = concurrency
        self.seed = seed
        self.cache = JsonlLog(cache_path)
        self.cached = {row["key"]: row for row in self.cache.rows if isinstance(row.get("key"), str)}
        self.requests = 0  # HTTP attempts, for the metrics

    def score(self, rows: list[TeacherRow]) -> TeacherScores:
        keys = [row_key(self.name, self.k, row) for row in rows]
        missing = [i for i, key in enumerate(keys) if key not in self.cached]
        if missing:
            asyncio.run(self._fetch([rows[i] for i in missing], [keys[i] for i in missing], missing))
        scored = [self.cached[key] for key in keys]
        return TeacherScores(top_ids=torch.tensor([ids for s in scored for ids in s["top_ids"]], dtype=torch.long).view(-1, self.k),
                             top_logprobs=torch.tensor([v for s in scored for v in s["top_logprobs"]], dtype=torch.float32).view(-1, self.k),
                             token_logprobs=torch.tensor([v for s in scored for v in s["token_logprobs"]], dtype=torch.float32))

    async def _fetch(self, rows: list[TeacherRow], keys: list[str], numbers: list[int]) -> None:
        """Score `rows` (row `numbers[i]` of the batch being scored) concurrently; the first failure cancels the rest."""
        api_key = os.environ.get(self.api_key_env) if self.api_key_env else None
        client = ApiClient(self.base_url, api_key, self.policy, seed=self.seed,
                           key_hint=f"the environment variable {self.api_key_env or '(none: set teacher_api_key_env)'}")
        gate = asyncio.Semaphore(self.concurrency)

        async def one(row: TeacherRow, key: str, number: int) -> None:
            payload = {"model": self.model, "prompt": row.prompt + row.response, "max_tokens": 1, "prompt_logprobs": self.k,
                       "temperature": 0.0}
            label = f"row {number} of the batch"
            async with gate:
                parsed, _ = await client.post("/completions", payload,
                                              lambda body: parse_prompt_logprobs(body, row, self.k, self.vocab, label))
            # Committed (fsynced) before the step uses it: a kill after this line never pays for the row again.
            self.cache.append({"key": key, **parsed})
            self.cached[key] = {"key": key, **parsed}

        try:
            # A task group, not gather: the first failure cancels the requests still in flight before the client closes.
            async with asyncio.TaskGroup() as group:
                for row, key, number in zip(rows, keys, numbers):
                    group.create_task(one(row, key, number))
        except BaseExceptionGroup as failures:
            first = failures.exceptions[0]
            if isinstance(first, RequestFailed):
                raise OpdistillError(f"remote teacher {self.base_url} failed a prompt log-prob request after {first.attempts} "
                                     f"attempt(s): {first.reason}", "check the server and teacher_model; rows already scored are "
                                     "cached and a rerun resumes from the last checkpoint") from None
            if isinstance(first, BadAnswer):
                raise OpdistillError(f"remote teacher {self.base_url} answered with unusable prompt log-probs: {first}",
                                     "the server would answer the same again, so it was not retried and nothing was cached: check "
                                     "that it is vLLM-compatible (prompt_logprobs, teacher_model) and that its vocabulary is the "
                                     "student's") from None
            raise first from None  # AuthError (already a clear message) or a bug: as it was raised
        finally:
            self.requests += client.stats.requests
            await client.close()

    def close(self) -> None:
        self.cache.close()

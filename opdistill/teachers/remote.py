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
Each row carries the last training step that used it, so a run may `compact` the cache at a checkpoint to the rows a
resume could still ask for (OPD's teacher_cache_keep: resume). Requests run concurrently up to `concurrency`; faults are retried with the collection policy (teachers.api);
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
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Coroutine

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


@dataclass
class CachedRow:
    """One scored row in memory, as tensors (top-20 over n tokens: ~170 bytes a token instead of ~1 KB as Python lists).
    `step` is the last training step that used it (-1: none known), which decides whether a compaction keeps it."""

    top_ids: torch.Tensor  # (n, k) int32
    top_logprobs: torch.Tensor  # (n, k) float32
    token_logprobs: torch.Tensor  # (n,) float32
    step: int

    @staticmethod
    def from_json(row: dict[str, Any], k: int) -> "CachedRow":
        return CachedRow(torch.tensor(row["top_ids"], dtype=torch.int32).view(-1, k),
                         torch.tensor(row["top_logprobs"], dtype=torch.float32).view(-1, k),
                         torch.tensor(row["token_logprobs"], dtype=torch.float32), int(row.get("step", -1)))

    def to_json(self, key: str) -> dict[str, Any]:
        # float32 -> Python float -> JSON -> float32 gives back the same float32 bits: a rewritten row scores as before.
        return {"key": key, "step": self.step, "top_ids": self.top_ids.tolist(), "top_logprobs": self.top_logprobs.tolist(),
                "token_logprobs": self.token_logprobs.tolist()}


class RemoteTeacher(LogProbTeacher):
    """Prompt log-probs from an OpenAI-compatible server (vLLM, or `opdistill serve`), cached on disk.

    `base_url` ends before /completions (e.g. http://host:8000/v1); the API key comes from the environment
    variable `api_key_env` and is only ever put in the Authorization header.

    One HTTP client (and its pool of keep-alive connections) lives as long as the teacher, on an event loop of its
    own that `score` runs until the batch is answered: no new client, connection or TLS handshake per call."""

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
        self.cache = JsonlLog(cache_path, keep_rows=False)
        self.cached = {row["key"]: CachedRow.from_json(row, k) for row in self.cache.rows if isinstance(row.get("key"), str)}
        self.cache.rows = []  # indexed above as tensors; the parsed lines are not kept twice
        self.wait_seconds = 0.0  # time spent waiting on the server (all calls), for the metrics and benchmarks/remote_latency.py
        self._session = Session()
        # Runs do not always close their teachers (an exception, a notebook): the connections go when the teacher does.
        weakref.finalize(self, self._session.close)

    @property
    def requests(self) -> int:
        """HTTP attempts sent so far, for the metrics."""
        return self._session.requests()

    def score(self, rows: list[TeacherRow], step: int = -1) -> TeacherScores:
        """The rows' scores: cached ones from memory, the others requested together (up to `concurrency` in flight).
        `step` tags each row with the training step using it, so `compact` knows which rows a resume may still ask for."""
        keys = [row_key(self.name, self.k, row) for row in rows]
        missing = [i for i, key in enumerate(keys) if key not in self.cached]
        if missing:
            started = time.perf_counter()
            try:
                self._session.run(self._fetch([rows[i] for i in missing], [keys[i] for i in missing], missing, step))
            finally:
                self.wait_seconds += time.perf_counter() - started
        scored = [self.cached[key] for key in keys]
        for entry in scored:
            entry.step = max(entry.step, step)
        return TeacherScores(top_ids=torch.cat([s.top_ids for s in scored]).long(), top_logprobs=torch.cat([s.top_logprobs for s in scored]),
                             token_logprobs=torch.cat([s.token_logprobs for s in scored]))

    def score_step(self, rows: list[TeacherRow], step: int) -> TeacherScores:
        return self.score(rows, step)

    def compact(self, first_step: int) -> None:
        """Keep only the rows a resume from the checkpoint at `first_step` may ask for: those last used at a step >= it.
        A resume restarts at that step and the data order is fixed by the step number, so an older row is asked again
        only when a later step happens to score the very same tokens (then it costs one more request, never a wrong
        answer). Disk and memory then hold the rows of the steps since the last checkpoint, not of the whole run."""
        keep = {key: entry for key, entry in self.cached.items() if entry.step >= first_step}
        self.cache.rewrite([entry.to_json(key) for key, entry in keep.items()])
        self.cached = keep

    def cache_bytes(self) -> int:
        return self.cache.path.stat().st_size if self.cache.path.exists() else 0

    def _api_client(self) -> ApiClient:
        if self._session.client is None:  # made on the teacher's own loop, where its connections will live
            self._session.client = ApiClient(self.base_url, os.environ.get(self.api_key_env) if self.api_key_env else None, self.policy,
                                             seed=self.seed,
                                             key_hint=f"the environment variable {self.api_key_env or '(none: set teacher_api_key_env)'}")
        return self._session.client

    async def _fetch(self, rows: list[TeacherRow], keys: list[str], numbers: list[int], step: int) -> None:
        """Score `rows` (row `numbers[i]` of the batch being scored) concurrently; the first failure cancels the rest."""
        client = self._api_client()
        gate = asyncio.Semaphore(self.concurrency)

        async def one(row: TeacherRow, key: str, number: int) -> None:
            payload = {"model": self.model, "prompt": row.prompt + row.response, "max_tokens": 1, "prompt_logprobs": self.k,
                       "temperature": 0.0}
            label = f"row {number} of the batch"
            async with gate:
                parsed, _ = await client.post("/completions", payload,
                                              lambda body: parse_prompt_logprobs(body, row, self.k, self.vocab, label))
            # Committed (fsynced) before the step uses it: a kill after this line never pays for the row again.
            self.cache.append({"key": key, "step": step, **parsed})
            self.cached[key] = CachedRow.from_json({**parsed, "step": step}, self.k)

        try:
            # A task group, not gather: the first failure cancels the requests still in flight.
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

    def close(self) -> None:
        self._session.close()
        self.cache.close()


class Session:
    """A remote teacher's event loop and HTTP client, made on first use and kept until `close`: a private loop, not
    asyncio.run per call, because a client's pooled connections belong to the loop that opened them."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.client: ApiClient | None = None
        self.closed_requests = 0  # attempts sent by clients already closed

    def run(self, work: Coroutine[Any, Any, None]) -> None:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(work)

    def requests(self) -> int:
        return self.closed_requests + (self.client.stats.requests if self.client is not None else 0)

    def close(self) -> None:
        if self.loop is None:
            return
        try:
            if self.client is not None:
                self.closed_requests += self.client.stats.requests
                self.loop.run_until_complete(self.client.close())
        except RuntimeError:  # collected while another loop runs in this thread: the sockets close with their objects
            pass
        finally:
            self.loop.close()
            self.loop, self.client = None, None

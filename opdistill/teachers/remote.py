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

A log-prob of -9999.0 or less is vLLM's stand-in for -inf (JSON has no infinity) and is read as -inf, so no
consumer mistakes it for a real log-prob; the cache writes it as -Infinity, which Python's json reads back as -inf.

Every scored row is appended to a durable cache (store.RowLog: fsynced JSONL, bounded in bytes, only an index in
memory) keyed by the teacher, k, the context and the response ids, before the step uses it: a resumed or repeated run
asks the server only for rows it never got (or that the bound has since let go). Each row carries the last training
step that used it, so a run may `compact` the cache at a checkpoint to the rows a resume from any checkpoint still on
disk could ask for (OPD's teacher_cache_keep: resume). Requests run concurrently up to `concurrency`; faults are
retried with the collection policy (teachers.api); a row that still fails stops the step with an error before any
gradient is taken, so no step is corrupted. An answer whose body parses but whose entries are wrong (a missing or
null log-prob, a NaN, a token id that is not an integer or lies outside the vocabulary, fewer than k entries) would
be the same answer again: it is not retried and not cached, and stops the run with one error naming the row and the
position.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import time
import weakref
from pathlib import Path
from typing import Any, Coroutine

import torch

from ..checkpoints import CHECKPOINT_PREFIX, checkpoint_dirs
from ..errors import OpdistillError
from .api import ApiClient, RequestFailed, RetryPolicy
from .logprob import LogProbTeacher, TeacherRow, TeacherScores
from .store import RowLog, Slot

# The cache file's default bound: ~2M response tokens at k = 20 (~540 bytes each), e.g. ~480 steps of 8 x 512 tokens,
# while memory holds ~350 bytes of index per row. Past it the least recently used rows go (a later need re-asks).
CACHE_MAX_BYTES = 1 << 30


def row_key(teacher: str, k: int, row: TeacherRow) -> str:
    """What determines one scored row: the teacher (URL and model), k, and the token ids."""
    canonical = json.dumps({"teacher": teacher, "k": k, "prompt": row.prompt, "response": row.response}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class BadAnswer(Exception):
    """A well-formed completions body whose prompt log-probs are wrong in a way a retry cannot change. Not a ValueError,
    so the API client does not retry it (it retries ValueError, a body that may come back right)."""


# vLLM sends a -inf log-prob (a token the model rules out) as -9999.0, since JSON has no infinity
# (vLLM's clamp_prompt_logprobs, vllm/entrypoints/openai/serving_engine.py; opdistill serve does the same). Read as a log-prob it
# would be a real, finite -1e4 (an advantage of ~-1e4 downstream), so anything at or below it is read as -inf.
MINUS_INF_STANDIN = -9999.0


def _logprob(value: Any, where: str) -> float:
    """One `logprob` field as a float; BadAnswer when it is missing, null, not a number, NaN or +inf. A value at or
    below -9999.0 (vLLM's stand-in for -inf) and a -Infinity are read as -inf."""
    number = value.get("logprob") if isinstance(value, dict) else None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise BadAnswer(f"{where} has no numeric `logprob` (got {json.dumps(number)[:40] if number is not None else 'null'})")
    if math.isnan(number) or number == math.inf:
        raise BadAnswer(f"{where} has `logprob` {number}")
    return -math.inf if number <= MINUS_INF_STANDIN else float(number)


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


def scores_of(rows: list[dict[str, Any]], k: int) -> TeacherScores:
    """Parsed (or cached) rows, concatenated in order into one top-k answer. Log-probs become float32 here, for fresh
    and cached rows alike (the cache keeps the server's values), so a repeated run scores bit for bit the same."""
    return TeacherScores(top_ids=torch.tensor([ids for row in rows for ids in row["top_ids"]], dtype=torch.long).view(-1, k),
                         top_logprobs=torch.tensor([lp for row in rows for lp in row["top_logprobs"]], dtype=torch.float32).view(-1, k),
                         token_logprobs=torch.tensor([lp for row in rows for lp in row["token_logprobs"]], dtype=torch.float32))


async def run_all(works: list[Coroutine[Any, Any, None]]) -> None:
    """Run `works` concurrently until all end. The first to fail cancels the others (no request stays in flight or
    reaches the cache after the error) and, once every one has ended, its exception is raised as it is.
    asyncio.TaskGroup does this from Python 3.11 (wrapping the error in a BaseExceptionGroup); opdistill supports 3.10."""
    tasks = [asyncio.ensure_future(work) for work in works]
    failures: list[BaseException] = []

    def settled(task: asyncio.Future[None]) -> None:  # done callbacks run in completion order: failures[0] came first
        error = None if task.cancelled() else task.exception()
        if error is not None:
            failures.append(error)
            for other in tasks:
                other.cancel()

    for task in tasks:
        task.add_done_callback(settled)
    await asyncio.gather(*tasks, return_exceptions=True)  # cancelled itself, gather cancels them all
    if failures:
        raise failures[0]


class RemoteTeacher(LogProbTeacher):
    """Prompt log-probs from an OpenAI-compatible server (vLLM, or `opdistill serve`), cached on disk.

    `base_url` ends before /completions (e.g. http://host:8000/v1); the API key comes from the environment
    variable `api_key_env` and is only ever put in the Authorization header.

    One HTTP client (and its pool of keep-alive connections) lives as long as the teacher, on an event loop of its
    own that `score` runs until the batch is answered: no new client, connection or TLS handshake per call."""

    remote = True

    def __init__(self, base_url: str, model: str, *, k: int, vocab: int, cache_path: str | Path, api_key_env: str = "",
                 policy: RetryPolicy | None = None, concurrency: int = 8, seed: int = 0, cache_max_bytes: int | None = None,
                 run_dir: str | Path | None = None) -> None:
        """`cache_max_bytes` bounds the cache file (default CACHE_MAX_BYTES); `run_dir` is the run's out_dir, whose
        checkpoints `compact` keeps the rows of (None: only the step it is given)."""
        if k < 1:
            raise OpdistillError(f"a remote teacher needs k >= 1 log-probs per position, got {k}")
        max_bytes = CACHE_MAX_BYTES if cache_max_bytes is None else cache_max_bytes
        if max_bytes < 1:
            raise OpdistillError(f"a remote teacher's cache needs a bound of at least 1 byte, got {max_bytes}")
        self.base_url, self.model, self.k, self.vocab = base_url.rstrip("/"), model, k, vocab
        self.name = f"{self.base_url}#{model}"
        self.api_key_env = api_key_env
        self.policy = policy or RetryPolicy()
        self.concurrency = concurrency
        self.seed = seed
        self.cache = RowLog(cache_path, max_bytes)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.wait_seconds = 0.0  # time spent waiting on the server (all calls), for the metrics and benchmarks/remote_latency.py
        self._session = Session()
        # Runs do not always close their teachers (an exception, a notebook): the connections go when the teacher does.
        weakref.finalize(self, self._session.close)

    @property
    def cached(self) -> dict[str, Slot]:
        """The cache's index (key -> where its line is): what memory holds of it, one small entry per row."""
        return self.cache.index

    @property
    def requests(self) -> int:
        """HTTP attempts sent so far, for the metrics."""
        return self._session.requests()

    def score(self, rows: list[TeacherRow], step: int = -1) -> TeacherScores:
        """The rows' scores: cached ones read back from the cache file, the others requested together (up to `concurrency`
        in flight). `step` tags each row with the training step using it, so `compact` knows which rows a resume may still ask for."""
        keys = [row_key(self.name, self.k, row) for row in rows]
        # Cached rows are read (and tagged with `step`) before any is fetched: appending the new ones may shrink the cache,
        # and it then keeps the rows of this step first.
        found: dict[str, dict[str, Any]] = {}
        missing: list[int] = []
        for i, key in enumerate(keys):
            if key in found or key in (keys[j] for j in missing):  # a row asked for twice is read or fetched once
                continue
            if key in self.cache:
                found[key] = self.cache.get(key)
                self.cache.touch(key, step)
            else:
                missing.append(i)
        if missing:
            started = time.perf_counter()
            try:
                self._session.run(self._fetch([rows[i] for i in missing], [keys[i] for i in missing], missing, step, found))
            finally:
                self.wait_seconds += time.perf_counter() - started
        return scores_of([found[key] for key in keys], self.k)

    def score_step(self, rows: list[TeacherRow], step: int) -> TeacherScores:
        return self.score(rows, step)

    def compact(self, first_step: int) -> None:
        """After the checkpoint of `first_step` is on disk: keep only the rows a resume may ask for, those last used at or
        after the oldest checkpoint still in `run_dir` (a resume takes the newest, or an older one when the newest is
        deleted; `first_step` when there is no run_dir). A resume restarts at its checkpoint's step and the data order is
        fixed by the step number, so an older row is asked again only when a later step happens to score the very same
        tokens (then it costs one more request, never a wrong answer)."""
        kept = [int(path.name.removeprefix(CHECKPOINT_PREFIX)) for path in checkpoint_dirs(self.run_dir)] if self.run_dir else []
        self.cache.retain(min([first_step, *kept]))

    def cache_bytes(self) -> int:
        return self.cache.size

    def _api_client(self) -> ApiClient:
        if self._session.client is None:  # made on the teacher's own loop, where its connections will live
            self._session.client = ApiClient(self.base_url, os.environ.get(self.api_key_env) if self.api_key_env else None, self.policy,
                                             seed=self.seed,
                                             key_hint=f"the environment variable {self.api_key_env or '(none: set teacher_api_key_env)'}")
        return self._session.client

    async def _fetch(self, rows: list[TeacherRow], keys: list[str], numbers: list[int], step: int, found: dict[str, dict[str, Any]]) -> None:
        """Score `rows` (row `numbers[i]` of the batch being scored) concurrently into `found`; the first failure cancels
        the rest."""
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
            self.cache.add(key, parsed, step)
            found[key] = parsed

        try:
            # Not gather alone: the first failure must cancel the requests still in flight (run_all). AuthError (already
            # a clear message) or a bug propagates as it was raised.
            await run_all([one(row, key, number) for row, key, number in zip(rows, keys, numbers)])
        except RequestFailed as first:
            raise OpdistillError(f"remote teacher {self.base_url} failed a prompt log-prob request after {first.attempts} "
                                 f"attempt(s): {first.reason}", "check the server and teacher_model; rows already scored are "
                                 "cached and a rerun resumes from the last checkpoint") from None
        except BadAnswer as first:
            raise OpdistillError(f"remote teacher {self.base_url} answered with unusable prompt log-probs: {first}",
                                 "the server would answer the same again, so it was not retried and nothing was cached: check "
                                 "that it is vLLM-compatible (prompt_logprobs, teacher_model) and that its vocabulary is the "
                                 "student's") from None

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

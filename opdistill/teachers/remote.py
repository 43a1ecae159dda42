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
"""

from __future__ import annotations

import asyncio
import hashlib
import json
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


def parse_prompt_logprobs(body: Any, row: TeacherRow, k: int, vocab: int) -> dict[str, list]:
    """The response positions of one completions body: {"top_ids", "top_logprobs", "token_logprobs"}.
    ValueError when the body is not what vLLM's API returns for this row (the request is then retried)."""
    choices = body.get("choices") if isinstance(body, dict) else None
    entries = choices[0].get("prompt_logprobs") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    length = len(row.prompt) + len(row.response)
    if not isinstance(entries, list) or len(entries) != length:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ValueError(f"choices[0].prompt_logprobs should be a list of {length} entries (one per prompt token), got {got}")
    top_ids, top_logprobs, token_logprobs = [], [], []
    for position, token in enumerate(row.response, start=len(row.prompt)):
        entry = entries[position]
        if not isinstance(entry, dict) or str(token) not in entry:
            raise ValueError(f"prompt_logprobs[{position}] lacks the prompt token {token}")
        ranked = sorted(((float(v["logprob"]), int(t)) for t, v in entry.items()), key=lambda pair: -pair[0])[:k]
        if len(ranked) < k:
            raise ValueError(f"prompt_logprobs[{position}] has {len(ranked)} entries, fewer than k = {k}")
        if any(t >= vocab or t < 0 for _, t in ranked):
            raise ValueError(f"prompt_logprobs[{position}] names a token id outside the student's {vocab}-token vocabulary")
        top_ids.append([t for _, t in ranked])
        top_logprobs.append([v for v, _ in ranked])
        token_logprobs.append(float(entry[str(token)]["logprob"]))
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
            asyncio.run(self._fetch([rows[i] for i in missing], [keys[i] for i in missing]))
        scored = [self.cached[key] for key in keys]
        return TeacherScores(top_ids=torch.tensor([ids for s in scored for ids in s["top_ids"]], dtype=torch.long).view(-1, self.k),
                             top_logprobs=torch.tensor([v for s in scored for v in s["top_logprobs"]], dtype=torch.float32).view(-1, self.k),
                             token_logprobs=torch.tensor([v for s in scored for v in s["token_logprobs"]], dtype=torch.float32))

    async def _fetch(self, rows: list[TeacherRow], keys: list[str]) -> None:
        api_key = os.environ.get(self.api_key_env) if self.api_key_env else None
        client = ApiClient(self.base_url, api_key, self.policy, seed=self.seed,
                           key_hint=f"the environment variable {self.api_key_env or '(none: set teacher_api_key_env)'}")
        gate = asyncio.Semaphore(self.concurrency)

        async def one(row: TeacherRow, key: str) -> None:
            payload = {"model": self.model, "prompt": row.prompt + row.response, "max_tokens": 1, "prompt_logprobs": self.k,
                       "temperature": 0.0}
            async with gate:
                parsed, _ = await client.post("/completions", payload, lambda body: parse_prompt_logprobs(body, row, self.k, self.vocab))
            # Committed (fsynced) before the step uses it: a kill after this line never pays for the row again.
            self.cache.append({"key": key, **parsed})
            self.cached[key] = {"key": key, **parsed}

        try:
            await asyncio.gather(*(one(row, key) for row, key in zip(rows, keys)))
        except RequestFailed as err:
            raise OpdistillError(f"remote teacher {self.base_url} failed a prompt log-prob request after {err.attempts} attempt(s): "
                                 f"{err.reason}", "check the server and teacher_model; rows already scored are cached and a rerun "
                                 "resumes from the last checkpoint") from None
        finally:
            self.requests += client.stats.requests
            await client.close()

    def close(self) -> None:
        self.cache.close()

"""OpenAI-compatible chat-completions teacher: async, bounded concurrency, retries with back-off.

Retried: HTTP 408/409/429/5xx, time-outs, refused or dropped connections, malformed bodies (a failure's reason
says which: `transport_reason`). Delay: the server's
Retry-After when given, else exponential back-off with jitter. Each request has its own retry budget
(`max_attempts`); once spent, the failure is recorded and the run goes on. 401/403 stop the run: every
other request would fail the same way. The API key is read from the environment and only ever placed in
the Authorization header; it is never logged, stored or put in an exception message.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import httpx

from ..errors import OpdistillError

RETRY_STATUS = {408, 409, 425, 429}
T = TypeVar("T")


@dataclass
class RetryPolicy:
    max_attempts: int = 6  # the per-request budget: first try + retries
    base_delay: float = 0.5  # seconds, doubled each retry
    max_delay: float = 30.0
    max_retry_after: float = 120.0  # a Retry-After above this is capped
    timeout: float = 120.0  # per attempt, seconds


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    usage: dict[str, int]
    attempts: int


@dataclass
class RequestFailed(Exception):
    """A request spent its retry budget (or failed permanently); the run records it and goes on."""

    reason: str
    attempts: int


@dataclass
class ApiStats:
    requests: int = 0  # HTTP attempts sent
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def count_error(self, reason: str) -> None:
        kind = reason.split(":")[0]
        self.errors[kind] = self.errors.get(kind, 0) + 1


class AuthError(OpdistillError):
    pass


def retry_after_seconds(value: str | None) -> float | None:
    """Parse a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Exponential back-off with 'equal jitter': half fixed, half random, so retries spread out."""
    ceiling = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def parse_completion(body: Any) -> tuple[str, str | None, dict[str, int]]:
    """Pull (text, finish_reason, usage) out of a chat-completions body; ValueError when malformed."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list) or not body["choices"]:
        raise ValueError("no choices in the body")
    choice = body["choices"][0]
    message = choice.get("message") if isinstance(choice, dict) else None
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        raise ValueError("choices[0].message.content is not a string")
    usage_raw = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    usage = {k: int(usage_raw.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}
    return text, choice.get("finish_reason"), usage


class ApiClient:
    """POSTs JSON to one OpenAI-compatible endpoint with the retry policy above. `key_hint` names where the key
    came from, for the message when it is refused."""

    def __init__(self, base_url: str, api_key: str | None, policy: RetryPolicy, seed: int = 0,
                 key_hint: str = "the environment variable named by --api-key-env") -> None:
        self.base_url = base_url.rstrip("/")
        self.policy = policy
        self.stats = ApiStats()
        self.key_hint = key_hint
        self._rng = random.Random(seed)
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(headers=headers, timeout=policy.timeout)

    async def close(self) -> None:
        await self._client.aclose()

    async def post(self, path: str, payload: dict[str, Any], parse: Callable[[Any], T]) -> tuple[T, int]:
        """POST `payload` to base_url + path until `parse` accepts the body; returns (parsed, attempts).
        Raises RequestFailed when the budget is spent or the request is wrong, AuthError when refused."""
        reason = ""
        for attempt in range(1, self.policy.max_attempts + 1):
            self.stats.requests += 1
            server_delay: float | None = None
            try:
                response = await self._client.post(self.base_url + path, json=payload)
            except httpx.TransportError as err:  # timed out, refused, unresolved, reset, dropped mid-body
                reason = transport_reason(err, self.base_url + path, self.policy.timeout)
            else:
                status = response.status_code
                if status in (401, 403):
                    raise AuthError(f"the teacher endpoint refused the credentials (HTTP {status})", f"check the API key in {self.key_hint}")
                if status == 200:
                    try:
                        return parse(response.json()), attempt
                    except ValueError as err:  # json.JSONDecodeError is a ValueError
                        reason = f"malformed body: {err}"
                elif status in RETRY_STATUS or status >= 500:
                    reason = f"http {status}"
                    server_delay = retry_after_seconds(response.headers.get("retry-after"))
                else:  # 400, 404, 422...: the request itself is wrong; retrying cannot help
                    reason = f"http {status}: {response.text[:200]}"
                    self.stats.count_error(reason)
                    raise RequestFailed(reason, attempt)
            self.stats.count_error(reason)
            if attempt == self.policy.max_attempts:
                break
            self.stats.retries += 1
            delay = backoff_delay(attempt, self.policy, self._rng)
            if server_delay is not None:
                delay = min(max(delay, server_delay), self.policy.max_retry_after)
            await asyncio.sleep(delay)
        raise RequestFailed(reason, self.policy.max_attempts)


def transport_reason(err: httpx.TransportError, url: str, timeout: float) -> str:
    """A failed request's reason, saying which of refused / unresolved (DNS) / timed out / dropped it was, so the user
    knows whether to start the server, fix the host name, or wait. The part before ':' is the error kind counted in
    ApiStats (timeout or connection)."""
    where = httpx.URL(url)
    address = f"{where.host}:{where.port or (443 if where.scheme == 'https' else 80)}"
    if isinstance(err, httpx.ConnectTimeout):
        return f"timeout: no connection to {address} within {timeout:g} s (timed out: host down, firewalled or unreachable)"
    if isinstance(err, httpx.ReadTimeout):
        return f"timeout: {address} sent no answer within {timeout:g} s (timed out; raise the timeout for a slow model)"
    if isinstance(err, httpx.TimeoutException):
        return f"timeout: {address} timed out ({type(err).__name__}, {timeout:g} s)"
    causes: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and len(causes) < 8:  # httpx -> httpcore -> OSError -> the socket's own error
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(c, socket.gaierror) for c in causes):
        return f"connection: cannot resolve host {where.host!r} (DNS lookup failed: check the host name in the URL)"
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return f"connection: refused by {address} (nothing listens there: is the server started, on this port?)"
    if isinstance(err, httpx.ConnectError):
        return f"connection: cannot connect to {address} ({err or type(err).__name__})"
    return f"connection: {address} dropped the connection ({type(err).__name__})"  # reset, closed mid-body


class ChatCompletionsTeacher(ApiClient):
    """Text from an OpenAI-compatible endpoint (`base_url` ends before /chat/completions, e.g. .../v1)."""

    def __init__(self, base_url: str, model: str, api_key: str | None, policy: RetryPolicy, seed: int = 0) -> None:
        super().__init__(base_url, api_key, policy, seed)
        self.model = model

    async def complete(self, messages: list[dict[str, str]], sampling: dict[str, Any]) -> Completion:
        """One completion, retried within the budget; raises RequestFailed or AuthError."""
        (text, finish, usage), attempts = await self.post("/chat/completions", {"model": self.model, "messages": messages, **sampling},
                                                          parse_completion)
        self.stats.prompt_tokens += usage["prompt_tokens"]
        self.stats.completion_tokens += usage["completion_tokens"]
        return Completion(text, finish, usage, attempts)

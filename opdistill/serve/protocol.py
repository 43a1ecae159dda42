"""What a request may hold: the server's options, vLLM's error shape, and the checks of JSON fields as vLLM types them.

Pure Python (no torch): the HTTP layer parses and refuses bodies with it before anything reaches the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_JSON_DEPTH = 32  # deeper request JSON is refused: no field of the API nests more than a few levels
LOGPROB_FLOOR = -9999.0  # vLLM's value for a -inf log-prob (JSON has no infinity)


@dataclass
class ServeOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    system: str = ""  # privileged system prompt for chat requests only; token-id prompts are served as sent
    api_key_env: str = ""  # environment variable holding the key; unset or empty: no key is required
    precision: str = "auto"
    max_request_bytes: int = 1 << 20
    max_prompt_tokens: int = 0  # 0: the model's context length
    max_logprobs: int = 20  # vLLM's default max_logprobs
    model_name: str = ""  # the id clients send as "model" (default: MODEL as given)
    chat_template: str = ""
    max_connections: int = 512  # open connections (each costs a socket, not a thread); more get 503 without being read
    max_connections_per_client: int = 64  # open connections from one client address; more get 503 without being read
    request_timeout: float = 60.0  # seconds to send one whole request, and again to read its reply
    compute_timeout: float = 300.0  # seconds a request may wait for the model (queue and passes) before its 504
    max_queue: int = 256  # rows (prompts) waiting for the model; a request that would pass it gets 429
    max_prompts_per_request: int = 64  # prompts in one /v1/completions request; more get 400
    max_new_tokens: int = 2048  # the most max_tokens a request may ask for, and the chat default's cap
    max_batch_rows: int = 16  # rows (prompts) in one forward pass; 1: every row alone, as before batching
    max_batch_tokens: int = 8192  # tokens in one pass: scoring, the rows' own; generation, rows x (longest + max_tokens)
    batch_wait_ms: float = 5.0  # how long the first row of a batch waits for others to join it


class RequestError(Exception):
    """A request the server refuses: HTTP status and vLLM's error body, naming the field (`param`) at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "BadRequestError", *,
                 retry_after: int | None = None, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.retry_after = retry_after  # seconds, sent as Retry-After: the client may try again then (429, 503)
        self.close = close  # the connection is closed after the reply: what follows on it cannot be trusted or read

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not the integer 1


KINDS = {"an integer": is_int, "a number": lambda v: is_int(v) or isinstance(v, float), "a boolean": lambda v: isinstance(v, bool),
         "a string": lambda v: isinstance(v, str), "an object": lambda v: isinstance(v, dict)}


def show(value: Any) -> str:
    """A value for an error message: short, and safe for any JSON (no recursion into what the client sent)."""
    return json.dumps(value)[:40] if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__


def typed(body: dict[str, Any], name: str, kind: str) -> Any:
    """body[name] when absent, null or of `kind` (a key of KINDS); else a 400 naming the field."""
    value = body.get(name)
    if value is not None and not KINDS[kind](value):
        raise RequestError(400, f"`{name}` must be {kind}, got {show(value)}", name)
    return value


def number(body: dict[str, Any], name: str, default: Any, low: float, high: float, integer: bool = False) -> Any:
    value = typed(body, name, "an integer" if integer else "a number")
    if value is None:
        return default
    if not low <= value <= high:
        raise RequestError(400, f"`{name}` must be between {low} and {high}, got {value}", name)
    return value


def off(body: dict[str, Any], name: str, kind: str, values: tuple[Any, ...]) -> None:
    """An option this server does not implement: accepted when absent, null or one of the `values` that mean "off" (so a
    client that sends the API's defaults works), refused otherwise rather than silently ignored."""
    value = typed(body, name, kind)
    if value is not None and value not in values:
        raise RequestError(400, f"`{name}` = {show(value)} is not supported by opdistill serve", name)


# Options of both endpoints, with the values that mean "off" (field names and types as in vLLM's protocol.py).
Off = tuple[tuple[str, str, tuple[Any, ...]], ...]  # (field, JSON kind, the values that mean off)
COMMON_OFF: Off = (("stream", "a boolean", (False,)), ("n", "an integer", (1,)), ("frequency_penalty", "a number", (0,)),
              ("presence_penalty", "a number", (0,)), ("repetition_penalty", "a number", (1,)), ("min_p", "a number", (0,)),
              ("top_k", "an integer", (0, -1)), ("min_tokens", "an integer", (0,)), ("logit_bias", "an object", ({},)),
              ("ignore_eos", "a boolean", (False,)))
COMPLETIONS_OFF: Off = (("best_of", "an integer", (1,)), ("echo", "a boolean", (False,)), ("logprobs", "an integer", ()))
CHAT_OFF: Off = (("logprobs", "a boolean", (False,)), ("top_logprobs", "an integer", (0,)), ("prompt_logprobs", "an integer", ()))


def depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (a deep value must not exhaust the stack here)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_JSON_DEPTH:  # deeper is refused anyway: no need to walk further
                stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # json.loads accepts NaN and Infinity; the JSON standard does not


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 naming `body`."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except ValueError:  # includes bad UTF-8, NaN and Infinity
        raise RequestError(400, "the request body is not valid JSON", "body") from None
    except RecursionError:  # nesting deep enough to exhaust the parser's stack
        raise RequestError(400, f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels", "body") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", "body")
    if depth(body) > MAX_JSON_DEPTH:
        raise RequestError(400, f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels", "body")
    return body


def is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(is_int(i) for i in value)


def floor(logprob: float) -> float:
    """vLLM's clamp: JSON cannot carry -inf (a token the model rules out), so it is sent as -9999.0."""
    return LOGPROB_FLOOR if logprob == -math.inf else logprob

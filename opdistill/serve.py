"""`opdistill serve`: one model behind a subset of vLLM's OpenAI-compatible HTTP API.

Why: a white-box teacher (prompt log-probs) can then run on another machine without vLLM, and tests get a real
server. Field names follow vLLM's server (https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html,
"Extra parameters" of the Completions API: `prompt_logprobs`) and vllm/logprobs.py, where PromptLogprobs is None
for the first prompt token (nothing predicts it) and {token id: {logprob, rank, decoded_token}} for each later one.

Standard library only (http.server): handler threads authorise, read, parse and validate; one lock serialises the
model and its tokenizer (a fast tokenizer is not safe to call from two threads at once). A client is held to limits
before it costs anything: the API key is checked on the headers, before any byte of the body is read; at most
`max_connections` connections are served at once (one thread each; more are answered 503 at once); a connection
has `request_timeout` seconds to deliver each request (line, headers, body) and again to take the reply, however
slowly it trickles bytes; a body must come with Content-Length (Transfer-Encoding is refused and the connection
closed, so no two framings of one stream can disagree).
"""

from __future__ import annotations

import errno
import functools
import hmac
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from .errors import OpdistillError

DRAIN_LIMIT = 8 << 20  # an oversized body up to this is read and dropped, so the 413 reaches the client (no TCP reset)
REFUSED_DRAIN = 64 << 10  # after a 401 or a refused framing, this much of a body already on its way is dropped (then close)
MAX_JSON_DEPTH = 32  # deeper request JSON is refused: no field of the API nests more than a few levels
LOGPROB_FLOOR = -9999.0  # vLLM's value for a -inf log-prob (JSON has no infinity)
SCORE_CHUNK = 256  # prompt positions whose full-vocabulary logits exist at once when scoring a prompt


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
    max_connections: int = 32  # connections served at once, one thread each; more get 503 without being read
    request_timeout: float = 60.0  # seconds to send one whole request, and again to read its reply


class RequestError(Exception):
    """A request the server refuses: HTTP status and vLLM's error body, naming the field (`param`) at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not the integer 1


KINDS = {"an integer": _is_int, "a number": lambda v: _is_int(v) or isinstance(v, float), "a boolean": lambda v: isinstance(v, bool),
         "a string": lambda v: isinstance(v, str), "an object": lambda v: isinstance(v, dict)}


def _show(value: Any) -> str:
    """A value for an error message: short, and safe for any JSON (no recursion into what the client sent)."""
    return json.dumps(value)[:40] if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__


def _typed(body: dict[str, Any], name: str, kind: str) -> Any:
    """body[name] when absent, null or of `kind` (a key of KINDS); else a 400 naming the field."""
    value = body.get(name)
    if value is not None and not KINDS[kind](value):
        raise RequestError(400, f"`{name}` must be {kind}, got {_show(value)}", name)
    return value


def _number(body: dict[str, Any], name: str, default: Any, low: float, high: float, integer: bool = False) -> Any:
    value = _typed(body, name, "an integer" if integer else "a number")
    if value is None:
        return default
    if not low <= value <= high:
        raise RequestError(400, f"`{name}` must be between {low} and {high}, got {value}", name)
    return value


def _off(body: dict[str, Any], name: str, kind: str, off: tuple[Any, ...]) -> None:
    """An option this server does not implement: accepted when absent, null or one of the values that mean "off" (so a
    client that sends the API's defaults works), refused otherwise rather than silently ignored."""
    value = _typed(body, name, kind)
    if value is not None and value not in off:
        raise RequestError(400, f"`{name}` = {_show(value)} is not supported by opdistill serve", name)


# Options of both endpoints, with the values that mean "off" (field names and types as in vLLM's protocol.py).
COMMON_OFF = (("stream", "a boolean", (False,)), ("n", "an integer", (1,)), ("frequency_penalty", "a number", (0,)),
              ("presence_penalty", "a number", (0,)), ("repetition_penalty", "a number", (1,)), ("min_p", "a number", (0,)),
              ("top_k", "an integer", (0, -1)), ("min_tokens", "an integer", (0,)), ("logit_bias", "an object", ({},)),
              ("ignore_eos", "a boolean", (False,)))
COMPLETIONS_OFF = (("best_of", "an integer", (1,)), ("echo", "a boolean", (False,)), ("logprobs", "an integer", ()))
CHAT_OFF = (("logprobs", "a boolean", (False,)), ("top_logprobs", "an integer", (0,)), ("prompt_logprobs", "an integer", ()))


def _depth(value: Any) -> int:
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


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(i) for i in value)


def _floor(logprob: float) -> float:
    """vLLM's clamp: JSON cannot carry -inf (a token the model rules out), so it is sent as -9999.0."""
    return LOGPROB_FLOOR if logprob == -math.inf else logprob


class ModelServer:
    """The model, its tokenizer and sampler, and one method per endpoint (request dict in, response dict out)."""

    def __init__(self, options: ServeOptions) -> None:
        from .models import compute_dtype, default_device, load_model, load_tokenizer
        from .rollout import eos_token_ids, make_sampler

        self.options = options
        self.name = options.model_name or options.model
        self.tokenizer = load_tokenizer(options.model, chat_template=options.chat_template)
        # Frozen, so loaded in the precision it runs in (no fp32 copy beside a bf16 one); the sampler may pack it.
        self.model = load_model(options.model, dtype=compute_dtype(options.precision)).to(default_device()).eval()
        self.sampler = make_sampler("hf", self.model, self.tokenizer, precision=options.precision, owns_model=True)
        self.eos = eos_token_ids(self.tokenizer, self.model.generation_config)
        config = self.model.config
        self.max_model_len = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 2048)
        self.max_prompt_tokens = min(options.max_prompt_tokens or self.max_model_len, self.max_model_len)
        # Ids past the tokenizer (a padded embedding matrix) decode to nothing, so prompts may not use them.
        self.vocab = min(len(self.tokenizer), self.model.get_input_embeddings().num_embeddings)
        # decoded_token, cached: the same few thousand ids come back in every reply.
        self.decode = functools.lru_cache(maxsize=None)(lambda token: self.tokenizer.decode([token]))
        self.lock = threading.Lock()
        self.created = int(time.time())
        self.split_head = self._head_splits()

    def _head_splits(self) -> bool:
        """Whether the model's logits are its output layer applied to its backbone's last hidden state (most causal LMs):
        then a prompt is scored with one backbone pass and the head applied a chunk of positions at a time, so memory
        does not grow with prompt length x vocabulary. A model that changes its logits after the head (soft-capping,
        scaling) fails this check on a short probe and is scored whole."""
        import torch

        backbone, head = getattr(self.model, "base_model", None), self.model.get_output_embeddings()
        if backbone is None or backbone is self.model or head is None:
            return False
        probe = torch.arange(1, min(9, self.vocab), device=next(self.model.parameters()).device).unsqueeze(0)
        try:
            with torch.inference_mode():
                whole = self.model(input_ids=probe).logits[0].float()
                split = head(backbone(input_ids=probe).last_hidden_state[0]).float()
        except Exception:  # noqa: BLE001 - any failure means: score the plain way
            return False
        return split.shape == whole.shape and torch.allclose(split, whole, rtol=1e-3, atol=1e-3)

    def check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.name:  # vLLM's wording; an absent model means the served one
            raise RequestError(404, f"The model `{model}` does not exist.", "model", "NotFoundError")

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created, "owned_by": "opdistill",
                                            "max_model_len": self.max_model_len}]}

    def _prompt(self, ids: list[int], field: str) -> list[int]:
        if not ids:
            raise RequestError(400, f"`{field}` must not be empty", field)
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(400, f"`{field}` has {len(ids)} tokens, more than the limit of {self.max_prompt_tokens}", field)
        bad = next((i for i in ids if not 0 <= i < self.vocab), None)
        if bad is not None:
            raise RequestError(400, f"`{field}` holds token id {bad}, outside the vocabulary [0, {self.vocab})", field)
        return ids

    def _prompts(self, value: Any) -> list[list[int]]:
        items = [value] if isinstance(value, str) or _is_ids(value) else value
        if not isinstance(items, list) or not items or not all(isinstance(i, str) or _is_ids(i) for i in items):
            raise RequestError(400, "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids", "prompt")
        # A text prompt gets the tokenizer's special tokens, as vLLM does; token ids are used exactly as sent.
        return [self._prompt(self.tokenizer(i)["input_ids"] if isinstance(i, str) else i, "prompt") for i in items]

    def _messages(self, body: dict[str, Any]) -> list[int]:
        from .data import Record, render_prompt

        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "`messages` must be a non-empty list of {role, content} objects", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RequestError(400, f"`messages` item {i} must be an object with string `role` and `content`", "messages")
        # Record.with_system puts --system first in the system prompt, before the client's own system message.
        conversation = Record([{"role": m["role"], "content": m["content"]} for m in messages]).with_system(self.options.system)
        try:
            ids = render_prompt(self.tokenizer, conversation)
        except Exception as err:  # the chat template rejects the conversation (a template may raise anything, e.g. roles out of order)
            raise RequestError(400, f"`messages` cannot be rendered with the chat template: {str(err)[:200]}", "messages") from None
        return self._prompt(ids, "messages")

    def _sampling(self, body: dict[str, Any], longest: int, default_tokens: int | None, max_name: str = "max_tokens") -> tuple[Any, int | None]:
        from .rollout import SamplingParams

        for name, kind, off in COMMON_OFF:
            _off(body, name, kind, off)
        stop = body.get("stop")
        if not (stop is None or isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(i, str) for i in stop))):
            raise RequestError(400, f"`stop` must be a string or a list of strings, got {_show(stop)}", "stop")
        if stop:  # "" and [] stop nothing
            raise RequestError(400, "`stop` is not supported by opdistill serve (generation ends at EOS or max_tokens)", "stop")
        if body.get("stream_options") is not None:  # vLLM's check: it only applies to a stream
            raise RequestError(400, "`stream_options` can only be set when `stream` is true", "stream_options")
        _typed(body, "user", "a string")
        room = self.max_model_len - longest
        max_tokens = _number(body, max_name, room if default_tokens is None else min(default_tokens, room), 0, 2**31, True)
        if max_tokens > room:
            raise RequestError(400, f"`{max_name}` = {max_tokens} with a {longest}-token prompt exceeds the model's context of "
                                    f"{self.max_model_len} tokens", max_name)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:  # an empty nucleus: nothing could be drawn
            raise RequestError(400, "`top_p` must be in (0, 1], got 0", "top_p")
        params = SamplingParams(temperature=_number(body, "temperature", 1.0, 0.0, 100.0), top_p=top_p, max_new_tokens=max_tokens)
        return params, _number(body, "seed", None, 0, 2**63 - 1, True)

    def _generate(self, prompts: list[list[int]], params: Any, seed: int | None) -> list[tuple[list[int], str, str]]:
        """(token ids, text, finish reason) per prompt, from the project's sampler; greedy at temperature 0."""
        if params.max_new_tokens == 0:
            return [([], "", "length") for _ in prompts]
        samples = self.sampler.sample(prompts, params, seeds=None if seed is None else [seed] * len(prompts))
        # Sample.text is stripped; a completion's text is not (a client may join it to the prompt), as in vLLM.
        return [(s.response_ids, self._text(s.response_ids), "stop" if s.finished else "length") for s in samples]

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _first_token(self, logits: Any, params: Any, seed: int | None) -> tuple[list[int], str, str]:
        """One token from the scoring pass's last logits, drawn as the sampler draws it (sample_next, the seed's first
        uniform): white-box clients send max_tokens 1 (older vLLM refuses 0), and this spares them a second prefill."""
        from .rollout import row_uniforms, sample_next

        uniforms = None if seed is None else row_uniforms([seed], [0], 1)[:, 0]
        token = int(sample_next(logits.unsqueeze(0), params, uniforms)[0])
        return [token], self._text([token]), "stop" if token in self.eos else "length"

    def _prompt_logprobs(self, ids: list[int], k: int) -> tuple[list[dict[str, dict[str, Any]] | None], Any]:
        """vLLM's prompt_logprobs of one prompt, and the logits after its last token.

        Full-vocabulary logits exist for SCORE_CHUNK positions at a time (see _head_splits): a long prompt over a large
        vocabulary costs the hidden states plus one chunk, not prompt length x vocabulary."""
        import torch

        from .rollout import top_k_logprobs

        entries: list[dict[str, dict[str, Any]] | None] = [None]
        with torch.inference_mode():
            tokens = torch.tensor([ids], device=next(self.model.parameters()).device)
            if self.split_head:
                hidden, head = self.model.base_model(input_ids=tokens).last_hidden_state[0], self.model.get_output_embeddings()
                logits_of = lambda start, end: head(hidden[start:end])  # noqa: E731
            else:
                whole = self.model(input_ids=tokens).logits[0]
                logits_of = lambda start, end: whole[start:end]  # noqa: E731
            for start in range(0, len(ids) - 1, SCORE_CHUNK):  # positions start.. predict tokens start + 1..
                end = min(start + SCORE_CHUNK, len(ids) - 1)
                top = top_k_logprobs(logits_of(start, end), tokens[0, start + 1:end + 1], k, chunk_rows=SCORE_CHUNK)
                columns = [t.tolist() for t in top]  # one host read per tensor, not one per entry
                for token, top_ids, top_lps, top_ranks, lp, rank in zip(ids[start + 1:end + 1], *columns):
                    # The prompt token first, as vLLM orders it; it appears once even when it is in the top-k.
                    entry = {str(token): {"logprob": _floor(lp), "rank": rank, "decoded_token": self.decode(token)}}
                    for i, value, r in zip(top_ids, top_lps, top_ranks):
                        entry.setdefault(str(i), {"logprob": _floor(value), "rank": r, "decoded_token": self.decode(i)})
                    entries.append(entry)
            last = logits_of(len(ids) - 1, len(ids))[0]
        return entries, last

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        self.check_model(body)
        if body.get("suffix") is not None:  # vLLM refuses it too, with this message
            raise RequestError(400, "suffix is not currently supported", "suffix")
        for name, kind, off in COMPLETIONS_OFF:
            _off(body, name, kind, off)
        prompts = self._prompts(body.get("prompt"))
        k = body.get("prompt_logprobs")
        if k is not None:
            k = _number(body, "prompt_logprobs", 0, 0, self.options.max_logprobs, True)
        params, seed = self._sampling(body, max(len(p) for p in prompts), 16)  # 16: the OpenAI API's default max_tokens
        scored = [self._prompt_logprobs(p, k) for p in prompts] if k is not None else []
        if scored and params.max_new_tokens == 1:
            outputs = [self._first_token(last, params, seed) for _, last in scored]
        else:
            outputs = self._generate(prompts, params, seed)
        # stop_reason: the stop string or token that ended the text; null for EOS and length, the only ends here (vLLM).
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": None,
                    "prompt_logprobs": scored[i][0] if scored else None} for i, (_, text, reason) in enumerate(outputs)]
        return self._reply("cmpl", "text_completion", choices, sum(map(len, prompts)), sum(len(o[0]) for o in outputs))

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        self.check_model(body)
        for name, kind, off in CHAT_OFF:
            _off(body, name, kind, off)
        prompt = self._messages(body)
        # max_completion_tokens is the chat API's newer name for max_tokens; vLLM prefers it when both are given.
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        params, seed = self._sampling(body, len(prompt), None, name)  # vLLM's default: up to the end of the context
        ids, text, reason = self._generate([prompt], params, seed)[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason,
                  "stop_reason": None}
        return self._reply("chatcmpl", "chat.completion", [choice], len(prompt), len(ids))

    def _reply(self, prefix: str, kind: str, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's /tokenize. Messages are rendered as /v1/chat/completions renders them, --system included."""
        self.check_model(body)
        if "messages" in body:
            tokens = self._messages(body)
        elif isinstance(body.get("prompt"), str):
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise RequestError(400, "`add_special_tokens` must be true or false", "add_special_tokens")
            tokens = self.tokenizer(body["prompt"], add_special_tokens=special)["input_ids"]
        else:
            raise RequestError(400, "`prompt` (a string) or `messages` is required", "prompt")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.max_model_len}


ROUTES = {("GET", "/v1/models"): "models", ("POST", "/v1/completions"): "completions",
          ("POST", "/v1/chat/completions"): "chat", ("POST", "/tokenize"): "tokenize"}


class Handler(BaseHTTPRequestHandler):
    server: "Server"
    protocol_version = "HTTP/1.1"  # keep-alive: a training client reuses its connections

    def setup(self) -> None:
        # One blocking read or write gives up after this; the server's watch (Server.watch) bounds their sum.
        self.timeout = self.server.options.request_timeout
        super().setup()

    def handle_one_request(self) -> None:
        # The clock starts when the server waits for the request line: an idle keep-alive connection is closed after
        # request_timeout too, and a client sending one byte a minute cannot hold this thread longer than that.
        self.server.watch(self.connection, "sending its request")
        try:
            super().handle_one_request()
        finally:
            self.server.unwatch(self.connection)

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue`: only a client with the key is told to send its body; the others get their 401 at once."""
        return super().handle_expect_100() if self._key_matches() else True

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        start, path = time.perf_counter(), urlsplit(self.path).path  # the query string is never logged
        self.unread = 0  # body bytes left unread when the request is refused (dropped, up to a bound, before closing)
        try:
            self._authorise()  # on the headers alone: a client without the key gets no byte of its body read
            raw = self._read_body()
            self.server.unwatch(self.connection)  # the request is in: waiting for the model is not the client's time
            name = ROUTES.get((method, path))
            if name is None:
                known = any(p == path for _, p in ROUTES)
                raise RequestError(405 if known else 404, f"{'Method Not Allowed' if known else 'Not Found'}: {method} {path}",
                                   kind="MethodNotAllowedError" if known else "NotFoundError")
            body: dict[str, Any] = {}
            if method == "POST":
                body = self._parse(raw)
            app = self.server.app
            with app.lock:
                status, payload = 200, getattr(app, name)(*([body] if method == "POST" else []))
        except RequestError as err:
            status, payload = err.status, err.body()
        except Exception as err:  # a bug or out-of-memory fails this request, not the server; no body or header is logged
            status, payload = 500, RequestError(500, f"internal error: {type(err).__name__}", kind="InternalServerError").body()
            self.server.log(f"error in {method} {path}: {type(err).__name__}: {str(err)[:300]}")
        self.server.watch(self.connection, "reading its reply")  # a client that never reads holds the thread no longer
        try:
            self._send(status, payload)
            if self.close_connection and self.unread:
                self._drop_unread()
        finally:
            self.server.unwatch(self.connection)
        self.server.log(f"{self.client_address[0]} {method} {path} {status} {time.perf_counter() - start:.3f} s")

    @staticmethod
    def _parse(raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw, parse_constant=_refuse_constant)
        except ValueError:  # includes bad UTF-8, NaN and Infinity
            raise RequestError(400, "the request body is not valid JSON", "body") from None
        except RecursionError:  # nesting deep enough to exhaust the parser's stack
            raise RequestError(400, f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels", "body") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object", "body")
        if _depth(body) > MAX_JSON_DEPTH:
            raise RequestError(400, f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels", "body")
        return body

    def _declared_length(self) -> int:
        """Content-Length as sent, -1 when it is not one non-negative integer."""
        values = set(self.headers.get_all("Content-Length") or [])
        if not values:
            return 0  # no body (`curl -X POST`)
        value = values.pop().strip()
        return int(value) if not values and value.isascii() and value.isdigit() else -1

    def _read_body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:
            # http.server cannot read chunks, and a Content-Length beside it may disagree with them (request smuggling).
            self.close_connection, self.unread = True, REFUSED_DRAIN
            raise RequestError(501, "Transfer-Encoding (e.g. chunked) is not supported: send the body with a Content-Length header",
                               "Transfer-Encoding", "NotImplementedError")
        length = self._declared_length()
        if length < 0:
            self.close_connection, self.unread = True, REFUSED_DRAIN  # the body's end is unknown
            raise RequestError(400, "Content-Length must be one non-negative integer", "Content-Length")
        limit = self.server.options.max_request_bytes
        if length > limit:
            if length <= DRAIN_LIMIT:
                self._read(length)
            else:
                self.unread = REFUSED_DRAIN
            self.close_connection = True
            raise RequestError(413, f"the request body has {length} bytes, more than the limit of {limit} (--max-request-bytes)",
                               "body", "RequestTooLargeError")
        raw = self._read(length)
        if len(raw) < length:
            self.close_connection = True
            raise RequestError(408, f"the request body did not arrive within {self.server.options.request_timeout:g} s "
                                    "(--request-timeout)", "body", "RequestTimeoutError")
        return raw

    def _read(self, length: int) -> bytes:
        try:
            return self.rfile.read(length)
        except OSError:  # timed out, or shut by the server's watch: what came is short
            return b""

    def _drop_unread(self) -> None:
        """Read and drop up to `self.unread` bytes for at most 2 s, then let the connection close: a client that sent
        its body before reading the reply then reads the reply, instead of a reset caused by unread bytes."""
        deadline = time.monotonic() + 2.0
        try:
            self.connection.shutdown(socket.SHUT_WR)  # the reply is complete: the client sees its end
            while self.unread > 0 and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                chunk = self.connection.recv(min(self.unread, 65536))
                if not chunk:
                    break
                self.unread -= len(chunk)
        except OSError:
            pass

    def _key_matches(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())

    def _authorise(self) -> None:
        if not self._key_matches():
            length = self._declared_length()
            self.close_connection, self.unread = True, min(length if length >= 0 else REFUSED_DRAIN, REFUSED_DRAIN)
            raise RequestError(401, "a valid API key is required: send the header `Authorization: Bearer <key>`", "Authorization",
                               "AuthenticationError")

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        try:
            data = json.dumps(payload, allow_nan=False).encode()
        except ValueError:  # a NaN log-prob: the model is broken, and JSON cannot carry it
            status, data = 500, json.dumps(RequestError(500, "the model produced NaN log-probs", kind="InternalServerError").body()).encode()
            self.server.log("error: the model produced NaN log-probs")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away (or timed out): nothing to tell it
            self.close_connection = True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Silenced: _handle logs each request once, with its duration."""

    def log_message(self, format: str, *args: Any) -> None:  # http.server's own notes (e.g. a malformed request line)
        self.server.log(format % args)


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a client holding a connection open never blocks shutdown
    request_queue_size = 64  # a training client opens several connections at once; the default backlog is 5
    app: ModelServer

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        # Read once; only its presence is ever reported, never the value.
        self.api_key = os.environ.get(options.api_key_env, "") if options.api_key_env else ""
        self.slots = threading.BoundedSemaphore(options.max_connections)  # one per connection being served (one thread each)
        self.deadlines: dict[socket.socket, tuple[float, str]] = {}  # connection -> (monotonic deadline, what it is doing)
        self.deadlines_lock = threading.Lock()
        self.stopping = threading.Event()
        super().__init__((options.host, options.port), Handler)
        threading.Thread(target=self._reap, name="opdistill-serve-deadlines", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection while a slot is free; past max_connections, 503 at once without reading anything."""
        if not self.slots.acquire(blocking=False):
            self._refuse_busy(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _refuse_busy(self, request: socket.socket, client_address: Any) -> None:
        limit = self.options.max_connections
        body = json.dumps(RequestError(503, f"the server is serving {limit} connections, its limit (--max-connections); retry later",
                                       kind="ServiceUnavailableError").body()).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Retry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)  # a few hundred bytes into a fresh socket's buffer: never blocks in practice
            request.sendall(head + body)
        except OSError:
            pass
        self.shutdown_request(request)
        self.log(f"{client_address[0]} refused: {limit} connections open (--max-connections)")

    def watch(self, connection: socket.socket, doing: str) -> None:
        """Give `connection` request_timeout seconds from now for what it is `doing`; past that it is shut down."""
        with self.deadlines_lock:
            self.deadlines[connection] = (time.monotonic() + self.options.request_timeout, doing)

    def unwatch(self, connection: socket.socket) -> None:
        with self.deadlines_lock:
            self.deadlines.pop(connection, None)

    def _reap(self) -> None:
        """Shut the connections past their deadline: their thread's blocked read or write then returns at once."""
        while not self.stopping.wait(0.2):
            now = time.monotonic()
            with self.deadlines_lock:
                late = [(connection, doing) for connection, (deadline, doing) in self.deadlines.items() if deadline <= now]
                for connection, _ in late:
                    del self.deadlines[connection]
            for connection, doing in late:
                try:
                    peer = connection.getpeername()[0]
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed
                    continue
                self.log(f"{peer} closed: {doing} took more than {self.options.request_timeout:g} s (--request-timeout)")

    def server_close(self) -> None:
        self.stopping.set()
        super().server_close()

    def log(self, line: str) -> None:
        print(f"opdistill serve: {line}", file=sys.stderr, flush=True)


def make_server(options: ServeOptions) -> Server:
    """Bind first (a taken port fails in a second, before minutes of loading), then load the model."""
    if (not 0 <= options.port <= 65535 or options.max_request_bytes < 1 or min(options.max_logprobs, options.max_prompt_tokens) < 0
            or options.max_connections < 1 or not options.request_timeout > 0):
        raise OpdistillError("--port must be 0..65535, --max-request-bytes, --max-connections and --request-timeout positive, "
                             "--max-logprobs and --max-prompt-tokens >= 0", "correct the option (--port 0: any free port)")
    try:
        server = Server(options)
    except OSError as err:
        taken = err.errno == errno.EADDRINUSE
        raise OpdistillError(f"cannot listen on {options.host}:{options.port}: {'the port is in use' if taken else err}",
                             "stop what uses that port or pick another --port (0: any free port)" if taken
                             else "pass --host as an IPv4 address or host name of this machine (127.0.0.1, 0.0.0.0)") from None
    try:
        server.app = ModelServer(options)
    except BaseException:
        server.server_close()
        raise
    return server


def serve(options: ServeOptions) -> None:
    """Serve until Ctrl-C or SIGTERM (the CLI turns SIGTERM into KeyboardInterrupt), then close the socket."""
    server = make_server(options)
    host, port = server.server_address[:2]
    try:
        key_note = f"required (from ${options.api_key_env})" if server.api_key else "none required"
        if options.api_key_env and not server.api_key:
            key_note += f"; ${options.api_key_env} is not set, so anyone who can reach the port may use it"
        print(f"opdistill serve: {server.app.name} ({server.app.max_model_len}-token context); API key: {key_note}", flush=True)
        print(f"opdistill serve: listening on http://{host}:{port}/v1", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("opdistill serve: stopped", file=sys.stderr, flush=True)
    finally:
        server.server_close()

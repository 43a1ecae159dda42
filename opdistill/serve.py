"""`opdistill serve`: one model behind a subset of vLLM's OpenAI-compatible HTTP API.

Why: a white-box teacher (prompt log-probs) can then run on another machine without vLLM, and tests get a real
server. Field names follow vLLM's server (https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html,
"Extra parameters" of the Completions API: `prompt_logprobs`) and vllm/logprobs.py, where PromptLogprobs is None
for the first prompt token (nothing predicts it) and {token id: {logprob, rank, decoded_token}} for each later one.

Standard library only (http.server): handler threads parse, authorise and validate; one lock serialises the model
and its tokenizer (a fast tokenizer is not safe to call from two threads at once).
"""

from __future__ import annotations

import errno
import functools
import hmac
import json
import os
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


class RequestError(Exception):
    """A request the server refuses: HTTP status and vLLM's error body, naming the field (`param`) at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(400, f"`{name}` must be {'an integer' if integer else 'a number'}, got {json.dumps(value)[:40]}", name)
    if not low <= value <= high:
        raise RequestError(400, f"`{name}` must be between {low} and {high}, got {value}", name)
    return value


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


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

    def _sampling(self, body: dict[str, Any], longest: int, default_tokens: int | None) -> tuple[Any, int | None]:
        from .rollout import SamplingParams

        for name, allowed in (("stream", (None, False)), ("n", (None, 1)), ("logprobs", (None, False)), ("best_of", (None, 1))):
            if body.get(name) not in allowed:
                raise RequestError(400, f"`{name}` = {json.dumps(body.get(name))[:40]} is not supported by opdistill serve", name)
        room = self.max_model_len - longest
        max_tokens = _number(body, "max_tokens", room if default_tokens is None else min(default_tokens, room), 0, 2**31, True)
        if max_tokens > room:
            raise RequestError(400, f"`max_tokens` = {max_tokens} with a {longest}-token prompt exceeds the model's context of "
                                    f"{self.max_model_len} tokens", "max_tokens")
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
        """vLLM's prompt_logprobs of one prompt, and the logits after its last token."""
        import torch

        from .rollout import top_k_logprobs

        with torch.inference_mode():
            tokens = torch.tensor([ids], device=next(self.model.parameters()).device)
            logits = self.model(input_ids=tokens).logits[0]
            top = top_k_logprobs(logits[:-1], tokens[0, 1:], k)
        columns = [t.tolist() for t in top]  # one host read per tensor, not one per entry
        entries: list[dict[str, dict[str, Any]] | None] = [None]
        for token, top_ids, top_lps, top_ranks, lp, rank in zip(ids[1:], *columns):
            # The prompt token first, as vLLM orders it; it appears once even when it is in the top-k.
            entry = {str(token): {"logprob": lp, "rank": rank, "decoded_token": self.decode(token)}}
            for i, value, r in zip(top_ids, top_lps, top_ranks):
                entry.setdefault(str(i), {"logprob": value, "rank": r, "decoded_token": self.decode(i)})
            entries.append(entry)
        return entries, logits[-1]

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        self.check_model(body)
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
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason,
                    "prompt_logprobs": scored[i][0] if scored else None} for i, (_, text, reason) in enumerate(outputs)]
        return self._reply("cmpl", "text_completion", choices, sum(map(len, prompts)), sum(len(o[0]) for o in outputs))

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        self.check_model(body)
        prompt = self._messages(body)
        params, seed = self._sampling(body, len(prompt), None)  # vLLM's default: up to the end of the context
        ids, text, reason = self._generate([prompt], params, seed)[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
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
    timeout = 120  # seconds a stalled client may hold a handler thread

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        start, path = time.perf_counter(), urlsplit(self.path).path  # the query string is never logged
        try:
            raw = self._read_body() if method == "POST" else b""  # read before refusing: unread bytes would reset the socket
            self._authorise()
            name = ROUTES.get((method, path))
            if name is None:
                known = any(p == path for _, p in ROUTES)
                raise RequestError(405 if known else 404, f"{'Method Not Allowed' if known else 'Not Found'}: {method} {path}",
                                   kind="MethodNotAllowedError" if known else "NotFoundError")
            body: dict[str, Any] = {}
            if method == "POST":
                try:
                    body = json.loads(raw)
                except ValueError:  # includes bad UTF-8
                    raise RequestError(400, "the request body is not valid JSON", "body") from None
                if not isinstance(body, dict):
                    raise RequestError(400, "the request body must be a JSON object", "body")
            app = self.server.app
            with app.lock:
                status, payload = 200, getattr(app, name)(*([body] if method == "POST" else []))
        except RequestError as err:
            status, payload = err.status, err.body()
        except Exception as err:  # a bug or out-of-memory fails this request, not the server; no body or header is logged
            status, payload = 500, RequestError(500, f"internal error: {type(err).__name__}", kind="InternalServerError").body()
            self.server.log(f"error in {method} {path}: {type(err).__name__}: {str(err)[:300]}")
        self._send(status, payload)
        self.server.log(f"{self.client_address[0]} {method} {path} {status} {time.perf_counter() - start:.3f} s")

    def _read_body(self) -> bytes:
        try:  # no Content-Length: no body (`curl -X POST`), unless one is coming in chunks, which http.server cannot read
            length = int(self.headers.get("Content-Length", "-1" if "Transfer-Encoding" in self.headers else "0"))
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True  # the body's end is unknown, so the stream cannot carry another request
            raise RequestError(411, "a Content-Length header is required (chunked bodies are not supported)", "Content-Length") from None
        limit = self.server.options.max_request_bytes
        if length > limit:
            if length <= DRAIN_LIMIT:
                self.rfile.read(length)
            self.close_connection = True
            raise RequestError(413, f"the request body has {length} bytes, more than the limit of {limit} (--max-request-bytes)",
                               "body", "RequestTooLargeError")
        return self.rfile.read(length)

    def _authorise(self) -> None:
        key = self.server.api_key
        if not key:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise RequestError(401, "a valid API key is required: send the header `Authorization: Bearer <key>`", "Authorization",
                               "AuthenticationError")

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
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
        super().__init__((options.host, options.port), Handler)

    def log(self, line: str) -> None:
        print(f"opdistill serve: {line}", file=sys.stderr, flush=True)


def make_server(options: ServeOptions) -> Server:
    """Bind first (a taken port fails in a second, before minutes of loading), then load the model."""
    if not 0 <= options.port <= 65535 or options.max_request_bytes < 1 or min(options.max_logprobs, options.max_prompt_tokens) < 0:
        raise OpdistillError("--port must be 0..65535, --max-request-bytes positive, --max-logprobs and --max-prompt-tokens >= 0",
                             "correct the option (--port 0: any free port)")
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

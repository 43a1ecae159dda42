"""One HTTP request of `opdistill serve`, as an ASGI app (Starlette's Request and Response; uvicorn runs it, server.py).

Per request, in order, each refusal costing as little as it can: the API key on the headers alone (a client without it
gets no byte of its body read); the body's framing and size (Content-Length only, up to --max-request-bytes); the
route; the JSON; then the endpoint (app.ModelServer), whose steps run in a small thread pool while the request awaits
the batcher's answers. That wait ends at the first of: the answers; the client going away (its jobs are cancelled, so it
costs no more model time); --compute-timeout (504, its jobs cancelled). A full queue answers 429 with Retry-After.
The connection's own deadlines (sending the request, reading the reply) are server.py's.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .app import ModelServer, Steps
from .batching import Job, Pending
from .protocol import RequestError, ServeOptions, parse_body

DRAIN_LIMIT = 8 << 20  # an oversized body up to this is read and dropped before the 413, so the client reads it (no reset)
ROUTES = {("GET", "/v1/models"): "models", ("POST", "/v1/completions"): "completions",
          ("POST", "/v1/chat/completions"): "chat", ("POST", "/tokenize"): "tokenize",
          ("GET", "/stats"): "stats"}  # /stats is opdistill's own: how concurrent requests were batched


class ClientGone(Exception):
    """The client closed its connection before its answer was ready: nobody is left to send a reply to."""


def advance(steps: Steps, answers: list[Any] | None) -> tuple[bool, Any]:
    """One step of an endpoint: (False, the jobs it yields) or (True, its reply). StopIteration cannot cross into a future."""
    try:
        return False, next(steps) if answers is None else steps.send(answers)
    except StopIteration as done:
        return True, done.value


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone. Called once the body is read, so the next message uvicorn has is the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Api:
    """The ASGI app: one call per request."""

    def __init__(self, app: ModelServer, options: ServeOptions, api_key: str, log: Callable[[str], None]) -> None:
        self.app, self.options, self.api_key, self.log = app, options, api_key, log
        # Checking, tokenising and formatting run here, off the event loop (the tokenizer's lock serialises most of it,
        # so a few threads suffice); waiting for the model holds none of them.
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="opdistill-serve")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off and websockets are not served: nothing else reaches here
            return
        request, start = Request(scope, receive), time.perf_counter()
        method, path = scope["method"], scope["path"]  # the query string is never logged
        client = scope["client"][0] if scope.get("client") else "-"
        headers: dict[str, str] = {}
        try:
            self._authorise(request)  # on the headers alone
            raw = await self._body(request)
            name = ROUTES.get((method, path))
            if name is None:
                known = any(p == path for _, p in ROUTES)
                raise RequestError(405 if known else 404, f"{'Method Not Allowed' if known else 'Not Found'}: {method} {path}",
                                   kind="MethodNotAllowedError" if known else "NotFoundError")
            status, payload = 200, await self._answer(name, parse_body(raw) if method == "POST" else None, receive)
        except RequestError as err:
            status, payload = err.status, err.body()
            if err.retry_after is not None:
                headers["Retry-After"] = str(err.retry_after)
            if err.close:
                headers["Connection"] = "close"
        except (ClientGone, ClientDisconnect):  # no reply: nobody would read it
            self.log(f"{client} {method} {path} client left after {time.perf_counter() - start:.3f} s; nothing more is done for it")
            return
        except Exception as err:  # a bug or out-of-memory fails this request, not the server; no body or header is logged
            status, payload = 500, RequestError(500, f"internal error: {type(err).__name__}", kind="InternalServerError").body()
            self.log(f"error in {method} {path}: {type(err).__name__}: {str(err)[:300]}")
        try:
            data = json.dumps(payload, allow_nan=False).encode()
        except ValueError:  # a NaN log-prob: the model is broken, and JSON cannot carry it
            status, data = 500, json.dumps(RequestError(500, "the model produced NaN log-probs", kind="InternalServerError").body()).encode()
            self.log("error: the model produced NaN log-probs")
        await Response(data, status, headers, media_type="application/json")(scope, receive, send)
        self.log(f"{client} {method} {path} {status} {time.perf_counter() - start:.3f} s")

    def _authorise(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.api_key.encode())):
            raise RequestError(401, "a valid API key is required: send the header `Authorization: Bearer <key>`", "Authorization",
                               "AuthenticationError", close=True)

    async def _body(self, request: Request) -> bytes:
        if "transfer-encoding" in request.headers:
            # Content-Length is the one framing served: no two framings of one stream can disagree (request smuggling).
            raise RequestError(501, "Transfer-Encoding (e.g. chunked) is not supported: send the body with a Content-Length header",
                               "Transfer-Encoding", "NotImplementedError", close=True)
        lengths = request.headers.getlist("content-length")  # h11 has already refused conflicting or malformed ones
        length = int(lengths[0]) if lengths else 0
        limit = self.options.max_request_bytes
        if length > limit:
            if length <= DRAIN_LIMIT:
                async for _ in request.stream():  # dropped; the connection's deadline bounds how long this may take
                    pass
            raise RequestError(413, f"the request body has {length} bytes, more than the limit of {limit} (--max-request-bytes)",
                               "body", "RequestTooLargeError", close=True)
        return b"".join([chunk async for chunk in request.stream()])  # h11 stops at Content-Length

    async def _answer(self, name: str, body: dict[str, Any] | None, receive: Receive) -> dict[str, Any]:
        """The endpoint's reply; a generator endpoint's jobs are awaited with the request's deadline and its client's
        disconnect in view."""
        loop = asyncio.get_running_loop()
        endpoint = getattr(self.app, name)
        result: dict[str, Any] | Steps = await loop.run_in_executor(self.pool, endpoint, *([] if body is None else [body]))
        if isinstance(result, dict):
            return result
        deadline = loop.time() + self.options.compute_timeout
        gone = asyncio.ensure_future(disconnected(receive))
        try:
            answers = None
            while True:
                finished, value = await loop.run_in_executor(self.pool, advance, result, answers)
                if finished:
                    return value
                answers = await self._wait(value, deadline, gone)
        finally:
            gone.cancel()

    async def _wait(self, jobs: list[Job], deadline: float, gone: asyncio.Future[None]) -> list[Any]:
        if gone.done():  # the client left while its request was checked and tokenised: queue nothing
            raise ClientGone()
        items: list[Pending] = self.app.batcher.submit(jobs)  # 429 at once when the queue is full
        answers = asyncio.gather(*(asyncio.wrap_future(item.future) for item in items))
        # A cancelled gather ends with a CancelledError as its exception: read it, or asyncio logs it as never retrieved.
        answers.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            done, _ = await asyncio.wait((answers, gone), timeout=max(0.0, deadline - asyncio.get_running_loop().time()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if answers in done:
                return answers.result()  # a job's error (a failed pass) is raised here, in its own request
            if gone in done:
                raise ClientGone()
            raise RequestError(504, f"the answer was not ready within {self.options.compute_timeout:g} s (--compute-timeout); "
                                    "its rows were cancelled", kind="TimeoutError")
        finally:
            if not all(item.future.done() for item in items):  # given up (or cancelled at shutdown): free the model
                self.app.batcher.cancel(items)
                answers.cancel()

"""The process of `opdistill serve`: uvicorn (HTTP/1.1 by h11, asyncio) running asgi.Api, and the limits a connection is
held to; make_server and serve.

On an asynchronous server a connection costs a socket and a few kilobytes, not a thread, so slow or idle clients no
longer use up what a well-behaved client needs. `Connection` (uvicorn's h11 protocol) adds the limits uvicorn lacks:
- At most --max-connections connections open, and --max-connections-per-client from one client address: past either,
  503 with Retry-After at once, before anything of the connection is read.
- --request-timeout from when the server starts waiting for a request (the connection opened, or the previous reply
  ended) until its body is all in, however slowly it trickles bytes (uvicorn's keep-alive timer restarts on every
  byte, and it has no such timer before the first request); and again from the reply's start to the next wait. The
  model's time is not the client's: that is --compute-timeout (asgi.py).
- A request h11 cannot parse (request line, headers, Content-Length, more than 16 KiB of unfinished headers) gets 400
  in vLLM's JSON error shape, not uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from ..errors import OpdistillError
from .app import ModelServer
from .asgi import Api
from .protocol import RequestError, ServeOptions

SENDING, READING = "sending its request", "reading its reply"


def log(line: str) -> None:
    print(f"opdistill serve: {line}", file=sys.stderr, flush=True)


@dataclass
class Limits:
    """What every connection of one server shares; used on the event loop's thread only, so it needs no lock."""

    options: ServeOptions
    per_client: Counter[str] = field(default_factory=Counter)  # open connections by client address


def error_bytes(status: int, reason: str, error: RequestError) -> bytes:
    """A whole HTTP reply carrying `error`, for a connection h11 is not (or no longer) serving a request on."""
    body = json.dumps(error.body()).encode()
    retry = f"Retry-After: {error.retry_after}\r\n" if error.retry_after is not None else ""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{retry}"
            "Connection: close\r\n\r\n").encode() + body


class Connection(H11Protocol):
    """One client connection: uvicorn's h11 protocol with the connection limits and deadlines of the module's note."""

    limits: ClassVar[Limits]  # set on a subclass made per server (make_server)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timer: asyncio.TimerHandle | None = None
        self.doing = ""  # what the client has request_timeout for ("" while the model works)
        self.watched: RequestResponseCycle | None = None  # the request cycle that was current when `doing` was set
        self.counted = self.refused = False
        served = self.app

        async def watched_app(scope: Any, receive: Any, send: Any) -> None:
            async def watched_send(message: Any) -> None:
                if message["type"] == "http.response.start":  # from here on the client's reading is what is timed
                    self._watch(READING)
                await send(message)

            await served(scope, receive, watched_send)

        self.app = watched_app

    @property
    def peer(self) -> str:
        return self.client[0] if self.client else "-"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn declares it
        super().connection_made(transport)
        options, per_client = self.limits.options, self.limits.per_client
        if len(self.connections) > options.max_connections:
            self._refuse(f"the server has {options.max_connections} connections open, its limit (--max-connections)")
        elif per_client[self.peer] >= options.max_connections_per_client:
            self._refuse(f"{self.peer} has {per_client[self.peer]} connections open, the limit for one client "
                         "(--max-connections-per-client)")
        else:
            per_client[self.peer] += 1
            self.counted = True
            self._watch(SENDING)

    def _refuse(self, why: str) -> None:
        self.refused = True
        error = RequestError(503, f"{why}; retry later", kind="ServiceUnavailableError", retry_after=1)
        self.transport.write(error_bytes(503, "Service Unavailable", error))
        # Half-closed, not closed: what the client sends meanwhile (its request) is read and dropped, so it cannot turn
        # into a reset that discards the 503 before the client reads it. Closed when the client closes, or after 1 s.
        self.transport.write_eof()
        self.loop.call_later(1.0, self.transport.close)
        log(f"{self.peer} refused: {why}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._watch("")
        if self.counted:
            self.counted = False
            self.limits.per_client[self.peer] -= 1
            if not self.limits.per_client[self.peer]:
                del self.limits.per_client[self.peer]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.refused:  # a refused connection's bytes are dropped unparsed
            super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if self.doing == SENDING and cycle is not None and cycle is not self.watched and not cycle.more_body:
            self._watch("")  # the whole request is in: now the model's time runs, not the client's

    def on_response_complete(self) -> None:
        # Armed before uvicorn starts a pipelined request already received, so that request disarms it at once.
        self._watch(SENDING)
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(RequestError(400, "the request is not valid HTTP/1.1 (its request line, a header or Content-Length), "
                                            "or its headers are too long").body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        try:  # through h11, as uvicorn's own reply: it knows what may still be sent on this stream
            for event in (h11.Response(status_code=400, reason=b"Bad Request", headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event) or b"")
        except h11.LocalProtocolError:  # a reply to an earlier request is under way: nothing more can be said on this stream
            pass
        self.transport.close()
        log(f"{self.peer} sent a malformed request (400)")

    def _watch(self, doing: str) -> None:
        """Give the client request_timeout from now for what it is `doing` ("": nothing is timed)."""
        if self.timer is not None:
            self.timer.cancel()
        self.doing, self.watched = doing, self.cycle
        self.timer = self.loop.call_later(self.limits.options.request_timeout, self._expire) if doing else None

    def _expire(self) -> None:
        self.timer = None
        stuck = self.transport.get_write_buffer_size() > 0  # a reply the client does not read
        if self.transport.is_closing() and not stuck:
            return
        log(f"{self.peer} closed: {self.doing} took more than {self.limits.options.request_timeout:g} s (--request-timeout)")
        if stuck:
            self.transport.abort()  # close() would wait for the client to read what is buffered
        else:
            self.transport.close()


class Server:
    """What make_server returns: the bound socket, the model, and uvicorn serving them from `serve_forever` until
    `shutdown` (from another thread); `server_close` frees the rest. The same calls as http.server's, which it replaced."""

    def __init__(self, options: ServeOptions, listener: socket.socket, app: ModelServer, api_key: str) -> None:
        self.options, self.socket, self.app, self.api_key = options, listener, app, api_key
        self.server_address: tuple[str, int] = listener.getsockname()[:2]
        self.api = Api(app, options, api_key, log)
        connection = type("Connection", (Connection,), {"limits": Limits(options)})
        config = uvicorn.Config(self.api, http=connection, loop="asyncio", lifespan="off", interface="asgi3",
                                proxy_headers=False,  # the client is the socket's peer: a header cannot change it
                                server_header=False, access_log=False, log_config=None,  # asgi.Api logs each request once
                                timeout_keep_alive=int(options.request_timeout) + 1,  # Connection's own deadline acts first
                                timeout_graceful_shutdown=5, backlog=2048)
        self.uvicorn = uvicorn.Server(config)
        self.serving, self.finished = threading.Event(), threading.Event()
        self.failure: BaseException | None = None  # what stopped serve_forever, when not shutdown

    def serve_forever(self) -> None:
        self.serving.set()
        try:
            self.uvicorn.run(sockets=[self.socket])
        except BaseException as err:
            self.failure = err
            raise
        finally:
            self.finished.set()

    def shutdown(self) -> None:
        """Stop: requests waiting for the model get 503 (a generation stops at its next step), then the replies are sent
        and the connections closed (uvicorn waits up to 5 s for them)."""
        self.app.close()
        self.uvicorn.should_exit = True
        if self.serving.is_set():
            self.finished.wait(timeout=30)

    def server_close(self) -> None:
        self.app.close()
        self.api.close()
        self.socket.close()


def _check(options: ServeOptions) -> None:
    if (not 0 <= options.port <= 65535 or options.max_request_bytes < 1 or min(options.max_logprobs, options.max_prompt_tokens) < 0
            or min(options.max_connections, options.max_connections_per_client) < 1 or not options.request_timeout > 0
            or not options.compute_timeout > 0):
        raise OpdistillError("--port must be 0..65535, --max-request-bytes, --max-connections, --max-connections-per-client, "
                             "--request-timeout and --compute-timeout positive, --max-logprobs and --max-prompt-tokens >= 0",
                             "correct the option (--port 0: any free port)")
    if options.max_batch_rows < 1 or options.max_batch_tokens < 1 or not options.batch_wait_ms >= 0:
        raise OpdistillError("--max-batch-rows and --max-batch-tokens must be positive and --batch-wait-ms >= 0",
                             "correct the option (--max-batch-rows 1: every request alone, no batching)")
    if options.max_new_tokens < 1 or not 1 <= options.max_prompts_per_request <= options.max_queue:
        raise OpdistillError("--max-new-tokens must be positive and --max-prompts-per-request between 1 and --max-queue "
                             "(a bigger request could never be queued)", "correct the option")


def make_server(options: ServeOptions) -> Server:
    """Bind first (a taken port fails in a second, before minutes of loading), then load the model."""
    _check(options)
    try:
        listener = socket.create_server((options.host, options.port), backlog=2048)
    except OSError as err:
        taken = err.errno == errno.EADDRINUSE
        raise OpdistillError(f"cannot listen on {options.host}:{options.port}: {'the port is in use' if taken else err}",
                             "stop what uses that port or pick another --port (0: any free port)" if taken
                             else "pass --host as an IPv4 address or host name of this machine (127.0.0.1, 0.0.0.0)") from None
    try:
        app = ModelServer(options, log)
    except BaseException:
        listener.close()
        raise
    # uvicorn's own warnings (a malformed request, an upgrade asked for) are logged by Connection in this server's words.
    logging.getLogger("uvicorn.error").setLevel(logging.ERROR)
    # Read once; only its presence is ever reported, never the value.
    api_key = os.environ.get(options.api_key_env, "") if options.api_key_env else ""
    return Server(options, listener, app, api_key)


def serve(options: ServeOptions) -> None:
    """Serve until Ctrl-C or SIGTERM (the CLI turns SIGTERM into KeyboardInterrupt), then stop cleanly. uvicorn runs in a
    thread of its own, so the signals stay the CLI's, as in every other command."""
    server = make_server(options)
    host, port = server.server_address
    thread = threading.Thread(target=server.serve_forever, name="opdistill-serve-http", daemon=True)
    try:
        key_note = f"required (from ${options.api_key_env})" if server.api_key else "none required"
        if options.api_key_env and not server.api_key:
            key_note += f"; ${options.api_key_env} is not set, so anyone who can reach the port may use it"
        print(f"opdistill serve: {server.app.name} ({server.app.max_model_len}-token context); API key: {key_note}", flush=True)
        print(f"opdistill serve: batches of up to {options.max_batch_rows} rows and {options.max_batch_tokens} tokens, "
              f"gathered for up to {options.batch_wait_ms:g} ms; up to {options.max_queue} rows queued", flush=True)
        thread.start()
        print(f"opdistill serve: listening on http://{host}:{port}/v1", flush=True)  # the socket listens already
        while thread.is_alive():
            thread.join(0.5)
        raise OpdistillError(f"the HTTP server stopped by itself: {server.failure!r}",
                             "see the error above; this is a bug of opdistill serve if it recurs")
    except KeyboardInterrupt:
        print("opdistill serve: stopped", file=sys.stderr, flush=True)
    finally:
        server.shutdown()
        server.server_close()

"""HTTP for `opdistill serve`: connections, limits, the API key, routing and replies (standard library http.server).

Handler threads authorise, read, parse and validate, then call the endpoint (app.ModelServer), which waits for the
batcher. A client is held to limits before it costs anything: the API key is checked on the headers, before any byte of
the body is read; at most `max_connections` connections are served at once (one thread each; more are answered 503 at
once); a connection has `request_timeout` seconds to deliver each request (line, headers, body) and again to take the
reply, however slowly it trickles bytes; a body must come with Content-Length (Transfer-Encoding is refused and the
connection closed, so no two framings of one stream can disagree).
"""

from __future__ import annotations

import errno
import hmac
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from ..errors import OpdistillError
from .app import ModelServer
from .protocol import RequestError, ServeOptions, parse_body

DRAIN_LIMIT = 8 << 20  # an oversized body up to this is read and dropped, so the 413 reaches the client (no TCP reset)
REFUSED_DRAIN = 64 << 10  # after a 401 or a refused framing, this much of a body already on its way is dropped (then close)

ROUTES = {("GET", "/v1/models"): "models", ("POST", "/v1/completions"): "completions",
          ("POST", "/v1/chat/completions"): "chat", ("POST", "/tokenize"): "tokenize",
          ("GET", "/stats"): "stats"}  # /stats is opdistill's own: how concurrent requests were batched


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
                body = parse_body(raw)
            # No lock: the endpoint locks the tokenizer while it uses it and waits for the batcher for the model.
            status, payload = 200, getattr(self.server.app, name)(*([body] if method == "POST" else []))
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
        app = getattr(self, "app", None)  # absent when the model failed to load
        if app is not None:
            app.close()
        super().server_close()

    def log(self, line: str) -> None:
        print(f"opdistill serve: {line}", file=sys.stderr, flush=True)


def make_server(options: ServeOptions) -> Server:
    """Bind first (a taken port fails in a second, before minutes of loading), then load the model."""
    if (not 0 <= options.port <= 65535 or options.max_request_bytes < 1 or min(options.max_logprobs, options.max_prompt_tokens) < 0
            or options.max_connections < 1 or not options.request_timeout > 0):
        raise OpdistillError("--port must be 0..65535, --max-request-bytes, --max-connections and --request-timeout positive, "
                             "--max-logprobs and --max-prompt-tokens >= 0", "correct the option (--port 0: any free port)")
    if options.max_batch_rows < 1 or options.max_batch_tokens < 1 or not options.batch_wait_ms >= 0:
        raise OpdistillError("--max-batch-rows and --max-batch-tokens must be positive and --batch-wait-ms >= 0",
                             "correct the option (--max-batch-rows 1: every request alone, no batching)")
    try:
        server = Server(options)
    except OSError as err:
        taken = err.errno == errno.EADDRINUSE
        raise OpdistillError(f"cannot listen on {options.host}:{options.port}: {'the port is in use' if taken else err}",
                             "stop what uses that port or pick another --port (0: any free port)" if taken
                             else "pass --host as an IPv4 address or host name of this machine (127.0.0.1, 0.0.0.0)") from None
    try:
        server.app = ModelServer(options, server.log)
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
        print(f"opdistill serve: batches of up to {options.max_batch_rows} rows and {options.max_batch_tokens} tokens, "
              f"gathered for up to {options.batch_wait_ms:g} ms", flush=True)
        print(f"opdistill serve: listening on http://{host}:{port}/v1", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("opdistill serve: stopped", file=sys.stderr, flush=True)
    finally:
        server.server_close()


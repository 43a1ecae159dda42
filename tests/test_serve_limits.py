"""`opdistill serve` bounded: connection caps, deadlines, the queue, per-request caps and cancellation, each on a real
server on 127.0.0.1 (in this process, the tiny random model) with real clients (httpx, raw sockets), and all of them at
once under a concurrent load in which every well-behaved request still gets its own answer.

Clients that must count as other machines connect from other loopback addresses (127.0.0.2, ...): Linux routes all of
127.0.0.0/8 to the loopback interface, so the server sees each as a client of its own. Every loop is bounded."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import httpx
import pytest
from serve_clients import read_until_closed

KEY_ENV, KEY = "OPD_LIMITS_TEST_KEY", "limits-key-7c2d"
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextmanager
def running(tiny_model: Path, **options: Any) -> Iterator[SimpleNamespace]:
    """A server of the tiny model in this process, with `options`, shut down afterwards."""
    from opdistill.serve import ServeOptions, make_server

    instance = make_server(ServeOptions(model=str(tiny_model), port=0, precision="fp32", model_name="tiny", **options))
    threading.Thread(target=instance.serve_forever, daemon=True).start()
    port = instance.server_address[1]
    try:
        yield SimpleNamespace(instance=instance, port=port, url=f"http://127.0.0.1:{port}")
    finally:
        instance.shutdown()
        instance.server_close()


@pytest.fixture(scope="module")
def keyed(tiny_model: Path) -> Iterator[SimpleNamespace]:
    """The default limits, with an API key."""
    os.environ[KEY_ENV] = KEY
    with running(tiny_model, api_key_env=KEY_ENV) as server:
        yield server


@pytest.fixture(scope="module")
def limited(tiny_model: Path) -> Iterator[SimpleNamespace]:
    """Six connections, two per client, a 2-second request deadline and at most 8 new tokens."""
    with running(tiny_model, max_connections=6, max_connections_per_client=2, request_timeout=2.0, max_new_tokens=8) as server:
        yield server


@pytest.fixture(scope="module")
def bounded(tiny_model: Path) -> Iterator[SimpleNamespace]:
    """A queue of 4 rows, 4 prompts per request, a 2.5-second compute deadline; a batch waits 6 s for rows to join it, so
    a queued row stays queued (observably) until it is answered, given up, or past its deadline."""
    with running(tiny_model, max_queue=4, max_prompts_per_request=4, batch_wait_ms=6000, compute_timeout=2.5) as server:
        yield server


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def raw_reply(sock: socket.socket) -> tuple[bytes, Any]:
    """(status line and headers, lower-cased; the JSON body) of what the server sends until it closes the connection."""
    head, _, body = read_until_closed(sock).partition(b"\r\n\r\n")
    return head.lower(), json.loads(body) if body else None


def request_bytes(path: str, body: dict[str, Any], key: str | None = None) -> bytes:
    data = json.dumps({"model": "tiny", **body}).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            ).encode() + data


def stats(server: SimpleNamespace) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/stats", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b"" or closed_by_server(sock)  # drain what was sent, then see the end
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True
    finally:
        sock.setblocking(True)


def scoring(prompt: list[int], k: int = 1) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": k, "temperature": 0}


# ---------------------------------------------------------------- connections: slow clients cost a socket, not the service


def test_forty_clients_trickling_header_bytes_do_not_stop_an_authorised_request(keyed: SimpleNamespace) -> None:
    tricklers = [connect(keyed.port) for _ in range(40)]
    try:
        for sock in tricklers:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Trickle: ")
        with httpx.Client(base_url=keyed.url, headers=AUTH, timeout=10) as client:
            for _ in range(3):  # while every trickler sends one more header byte per round
                for sock in tricklers:
                    sock.sendall(b"a")
                started = time.monotonic()
                assert client.get("/v1/models").status_code == 200
                reply = client.post("/v1/completions", json={"model": "tiny", **scoring([1, 40, 85])})
                assert reply.status_code == 200, reply.text
                assert time.monotonic() - started < 5
                time.sleep(0.2)
        assert not any(closed_by_server(sock) for sock in tricklers)  # still within their 60 s to send a request
    finally:
        for sock in tricklers:
            sock.close()


def test_a_client_past_its_connection_cap_gets_503_and_other_clients_are_served(limited: SimpleNamespace) -> None:
    held = [connect(limited.port, "127.0.0.2") for _ in range(2)]
    try:
        time.sleep(0.2)
        with connect(limited.port, "127.0.0.2") as third:  # refused at once, before anything of it is read
            third.sendall(request_bytes("/v1/completions", scoring([1, 2])))  # sent anyway: it must not reset the reply
            head, body = raw_reply(third)
        assert head.startswith(b"http/1.1 503 ") and b"retry-after: 1" in head and b"content-type: application/json" in head
        assert body["error"]["code"] == 503 and "--max-connections-per-client" in body["error"]["message"]
        transport = httpx.HTTPTransport(local_address="127.0.0.3")
        with httpx.Client(transport=transport, timeout=10) as other:
            assert other.get(f"{limited.url}/v1/models").status_code == 200
    finally:
        for sock in held:
            sock.close()


def test_connections_past_the_server_cap_get_503_and_a_freed_one_serves_again(limited: SimpleNamespace) -> None:
    # Six held by three clients (two each, their own cap): the server's cap of six.
    assert wait_until(lambda: len(limited.instance.uvicorn.server_state.connections) == 0)  # earlier tests' are gone
    held = [connect(limited.port, f"127.0.0.{2 + i // 2}") for i in range(6)]
    try:
        time.sleep(0.2)
        with connect(limited.port, "127.0.0.9") as seventh:
            head, body = raw_reply(seventh)
        assert head.startswith(b"http/1.1 503 ") and b"retry-after: 1" in head
        assert "--max-connections)" in body["error"]["message"], body
    finally:
        for sock in held:
            sock.close()
    transport = httpx.HTTPTransport(local_address="127.0.0.9")
    with httpx.Client(transport=transport, timeout=10) as client:
        assert wait_until(lambda: client.get(f"{limited.url}/v1/models").status_code == 200)


def test_a_client_trickling_bytes_is_cut_off_at_the_request_deadline(limited: SimpleNamespace) -> None:
    with connect(limited.port) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n")
        closed_after = None
        for _ in range(20):  # one byte every 0.5 s: each read succeeds long before a per-read timeout would fire
            try:
                sock.sendall(b"{")
            except OSError:  # reset or broken pipe: the server shut the connection
                closed_after = time.monotonic() - started
                break
            time.sleep(0.5)
            if closed_by_server(sock):
                closed_after = time.monotonic() - started
                break
        assert closed_after is not None and 1.5 < closed_after < 4.5, closed_after
    # An idle connection (nothing sent at all) is closed at the same deadline.
    with connect(limited.port) as idle:
        assert wait_until(lambda: closed_by_server(idle), 4.5)


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",  # not a request line
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n{}{}",  # two framings
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -4\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000,  # an unfinished header past 16 KiB
])
def test_a_malformed_request_gets_the_json_error_shape(limited: SimpleNamespace, raw: bytes) -> None:
    with connect(limited.port) as sock:
        sock.sendall(raw)
        head, body = raw_reply(sock)
    assert head.startswith(b"http/1.1 400 ") and b"content-type: application/json" in head and b"connection: close" in head
    assert body["error"]["type"] == "BadRequestError" and body["error"]["code"] == 400 and "HTTP/1.1" in body["error"]["message"]


def test_max_new_tokens_caps_requests_and_the_chat_default(limited: SimpleNamespace) -> None:
    user = [{"role": "user", "content": "Tell me a long story."}]
    with httpx.Client(base_url=f"{limited.url}/v1", timeout=30) as client:
        reply = client.post("/chat/completions", json={"model": "tiny", "messages": user, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 8, reply.text  # not the whole context
        for path, body, field in (("/completions", {"prompt": [1, 2], "max_tokens": 9}, "max_tokens"),
                                  ("/chat/completions", {"messages": user, "max_completion_tokens": 9}, "max_completion_tokens")):
            reply = client.post(path, json={"model": "tiny", **body})
            error = reply.json()["error"]
            assert reply.status_code == 400 and error["param"] == field and "--max-new-tokens" in error["message"], reply.text


# ---------------------------------------------------------------- the queue, the deadline, cancellation


def test_a_request_with_too_many_prompts_gets_400(bounded: SimpleNamespace) -> None:
    reply = httpx.post(f"{bounded.url}/v1/completions", json={"prompt": [[1, 2]] * 5, "max_tokens": 0}, timeout=10)
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "prompt" and "--max-prompts-per-request" in error["message"]


def test_a_full_queue_answers_429_with_retry_after_at_once(bounded: SimpleNamespace) -> None:
    before, first = stats(bounded), dict[str, Any]()

    def fill() -> None:  # four rows: the whole queue, waiting for a batch that never fills
        reply = httpx.post(f"{bounded.url}/v1/completions", json={"prompt": [[1, 2, i] for i in range(3, 7)], "max_tokens": 1,
                                                                   "prompt_logprobs": 1}, timeout=30)
        first.update(status=reply.status_code, body=reply.json())

    thread = threading.Thread(target=fill)
    thread.start()
    try:
        assert wait_until(lambda: stats(bounded)["queued_rows"] == 4)
        started = time.monotonic()
        reply = httpx.post(f"{bounded.url}/v1/completions", json=scoring([1, 2, 3]), timeout=10)
        assert reply.status_code == 429 and reply.headers["retry-after"] == "1" and time.monotonic() - started < 2.0
        error = reply.json()["error"]
        assert error["type"] == "RateLimitError" and error["code"] == 429 and "--max-queue" in error["message"]
    finally:
        thread.join(timeout=30)
    assert first["status"] == 504  # the filler itself waited past its deadline (next test)
    after = stats(bounded)
    assert after["refused_rows"] - before["refused_rows"] == 1 and after["queued_rows"] == 0


def test_a_request_past_its_compute_timeout_gets_504_and_its_rows_leave_the_queue(bounded: SimpleNamespace) -> None:
    before, started = stats(bounded), time.monotonic()
    reply = httpx.post(f"{bounded.url}/v1/completions", json={"prompt": [[1, 2], [3, 4]], "max_tokens": 4}, timeout=30)
    elapsed = time.monotonic() - started
    error = reply.json()["error"]
    assert reply.status_code == 504 and error["type"] == "TimeoutError" and "--compute-timeout" in error["message"], reply.text
    assert 2.4 < elapsed < 5.5, elapsed  # its deadline, not the batch's 6 s window
    after = stats(bounded)
    assert after["queued_rows"] == 0 and after["cancelled_rows"] - before["cancelled_rows"] == 2
    assert after["rows"] == before["rows"] and after["batches"] == before["batches"]  # never reached the model


def test_a_client_that_leaves_takes_its_rows_out_of_the_queue(bounded: SimpleNamespace) -> None:
    before = stats(bounded)
    with connect(bounded.port) as sock:
        sock.sendall(request_bytes("/v1/completions", {"prompt": [[1, 2], [3, 4], [5, 6]], "max_tokens": 1, "prompt_logprobs": 2}))
        assert wait_until(lambda: stats(bounded)["queued_rows"] == 3)
    left = time.monotonic()
    assert wait_until(lambda: stats(bounded)["queued_rows"] == 0, 1.5)  # at once: its deadline is 2.5 s away
    assert time.monotonic() - left < 1.5
    after = stats(bounded)
    assert after["cancelled_rows"] - before["cancelled_rows"] == 3 and after["rows"] == before["rows"]


def test_a_client_that_leaves_a_long_generation_frees_the_model(keyed: SimpleNamespace) -> None:
    before = stats(keyed)
    with connect(keyed.port) as sock:  # ~1000 decode steps: seconds on this model, ~2 ms to stop
        sock.sendall(request_bytes("/v1/completions", {"prompt": [1, 40, 85, 91], "max_tokens": 1000, "temperature": 0}, KEY))
        assert wait_until(lambda: (s := stats(keyed))["batches"] == before["batches"] + 1 and s["queued_rows"] == 0)
    assert wait_until(lambda: stats(keyed)["abandoned_batches"] == before["abandoned_batches"] + 1)
    after = stats(keyed)
    assert after["rows"] == before["rows"] and after["cancelled_rows"] - before["cancelled_rows"] == 1  # it never finished
    started = time.monotonic()
    reply = httpx.post(f"{keyed.url}/v1/completions", headers=AUTH, json=scoring([1, 2, 3]), timeout=10)
    assert reply.status_code == 200 and time.monotonic() - started < 2.0  # the model is free again


def test_the_batcher_bounds_its_queue_and_drops_what_is_given_up() -> None:
    """The batcher alone, with a runner whose pass asks abandoned() between its model calls, as generation does."""
    from opdistill.serve import Batcher, RequestError
    from opdistill.serve.batching import Abandoned, ScoreJob

    release, seen, logged = threading.Event(), list[int](), list[str]()

    class Runner:
        def run(self, jobs: list[ScoreJob], abandoned: Callable[[], bool]) -> list[int]:
            seen.append(len(jobs))
            while not abandoned():  # a long pass, one "model call" per 10 ms, until released
                if release.wait(0.01):
                    return [sum(job.ids) for job in jobs]
            raise Abandoned()

    batcher = Batcher(Runner(), max_rows=2, max_tokens=100, wait_seconds=0.0, log=logged.append, max_queue=3)
    try:
        running = batcher.submit([ScoreJob([1], 1), ScoreJob([2], 1)])  # a full batch: in the model at once
        assert wait_until(lambda: seen == [2])
        queued = batcher.submit([ScoreJob([3], 1), ScoreJob([4], 1), ScoreJob([5], 1)])  # the whole queue
        with pytest.raises(RequestError) as refused:
            batcher.submit([ScoreJob([6], 1)])
        assert refused.value.status == 429 and refused.value.retry_after == 1
        batcher.cancel(queued[:2])  # queued rows leave the queue at once
        assert batcher.report()["queued_rows"] == 1
        batcher.cancel(running)  # every row of the batch in the model given up: it stops at its next call
        assert wait_until(lambda: batcher.report()["abandoned_batches"] == 1)
        release.set()
        assert queued[2].future.result(timeout=10) == 5 and seen == [2, 1]  # the one row still wanted is answered
        report = batcher.report()
        assert (report["rows"], report["cancelled_rows"], report["refused_rows"], report["queued_rows"]) == (1, 4, 1, 0)
        assert "every row's request was given up" in logged[0]
    finally:
        batcher.close()


def test_the_new_options_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    from opdistill.cli import main

    for flags, words in ((["--max-queue", "8", "--max-prompts-per-request", "9"], "--max-prompts-per-request"),
                         (["--max-new-tokens", "0"], "--max-new-tokens"), (["--compute-timeout", "0"], "--compute-timeout"),
                         (["--max-connections-per-client", "0"], "--max-connections-per-client")):
        assert main(["serve", "unused", "--port", "0", *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and "fix:" in err, err


# ---------------------------------------------------------------- all of it at once: nothing lost for well-behaved clients


@pytest.fixture(scope="module")
def loaded(tiny_model: Path) -> Iterator[SimpleNamespace]:
    """Bounds small enough for the load below to pass each of them."""
    with running(tiny_model, max_queue=12, max_prompts_per_request=4, max_batch_rows=8, batch_wait_ms=20, max_new_tokens=32,
                 request_timeout=3.0, max_connections_per_client=16) as server:
        yield server


def well_behaved_requests(client: int) -> list[tuple[str, dict[str, Any]]]:
    """Six requests of one client: scoring (as a remote teacher sends), a seeded sample and a greedy chat, twice."""
    requests: list[tuple[str, dict[str, Any]]] = []
    for j in range(6):
        prompt = [1 + (17 * client + 5 * j + 3 * t) % 300 for t in range(4 + client + j)]
        if j % 3 == 0:
            requests.append(("/v1/completions", scoring(prompt, (client + j) % 4)))
        elif j % 3 == 1:
            requests.append(("/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": 1000 * client + j}))
        else:
            messages = [{"role": "user", "content": f"Client {client} asks question {j}."}]
            requests.append(("/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0}))
    return requests


def ask_politely(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """What a well-behaved client does: on 429 or 503 it waits for Retry-After, then asks again (a bounded number of times)."""
    for _ in range(60):
        reply = client.post(path, json={"model": "tiny", **body})
        if reply.status_code in (429, 503):
            time.sleep(float(reply.headers["retry-after"]))
            continue
        assert reply.status_code == 200, reply.text
        return reply.json()
    raise AssertionError(f"{path} was refused 60 times")


def same_answer(got: dict[str, Any], expected: dict[str, Any]) -> bool:
    """The same texts, ends and usage; prompt log-probs over the same tokens, within 1e-5 (batches may round otherwise)."""
    if got["usage"] != expected["usage"] or len(got["choices"]) != len(expected["choices"]):
        return False
    for a, b in zip(got["choices"], expected["choices"]):
        if {k: v for k, v in a.items() if k != "prompt_logprobs"} != {k: v for k, v in b.items() if k != "prompt_logprobs"}:
            return False
        for x, y in zip(a.get("prompt_logprobs") or [], b.get("prompt_logprobs") or [], strict=True):
            if (x is None) != (y is None) or (x and (x.keys() != y.keys() or any(
                    abs(x[t]["logprob"] - y[t]["logprob"]) > 1e-5 or x[t]["rank"] != y[t]["rank"] for t in x))):
                return False
    return True


def test_under_concurrent_load_the_limits_hold_and_well_behaved_clients_lose_nothing(loaded: SimpleNamespace) -> None:
    port, url = loaded.port, loaded.url
    answers: dict[tuple[int, int], dict[str, Any]] = {}
    flood_statuses: list[int] = []
    oversized_statuses: list[int] = []
    trickler_ends: list[str] = []
    failures: list[BaseException] = []
    start = threading.Barrier(8 + 3 + 2 + 1 + 1)

    def guarded(work: Callable[..., None]) -> Callable[..., None]:
        def run(*args: Any) -> None:
            try:
                start.wait(timeout=30)
                work(*args)
            except BaseException as err:  # noqa: BLE001 - reported by the test's thread below
                failures.append(err)
        return run

    def polite(client: int) -> None:  # eight well-behaved clients, one kept-alive connection each
        with httpx.Client(base_url=url, timeout=60) as http:
            for j, (path, body) in enumerate(well_behaved_requests(client)):
                answers[client, j] = ask_politely(http, path, body)

    def flood(number: int) -> None:  # three clients sending sampled 4-row generations back to back, never retrying
        transport = httpx.HTTPTransport(local_address="127.0.0.3")
        with httpx.Client(base_url=url, transport=transport, timeout=60) as http:
            for i in range(8):
                body = {"model": "tiny", "prompt": [[1 + (number * 31 + i * 7 + r) % 300] * 6 for r in range(4)], "max_tokens": 32,
                        "temperature": 1.0}
                flood_statuses.append(http.post("/v1/completions", json=body).status_code)

    def quit_early(number: int) -> None:  # two clients that send generations and hang up at once
        for i in range(5):
            with connect(port, "127.0.0.4") as sock:
                sock.sendall(request_bytes("/v1/completions", {"prompt": [[2 + number, 3 + i], [4, 5 + i]], "max_tokens": 32}))

    def oversized() -> None:  # one client sending more prompts than a request may hold
        transport = httpx.HTTPTransport(local_address="127.0.0.3")
        with httpx.Client(base_url=url, transport=transport, timeout=60) as http:
            for _ in range(3):
                oversized_statuses.append(http.post("/v1/completions", json={"prompt": [[1, 2]] * 5, "max_tokens": 0}).status_code)

    def trickle() -> None:  # twenty connections from one address (its cap: 16) trickling header bytes
        socks = [connect(port, "127.0.0.2") for _ in range(20)]
        try:
            for sock in socks:
                try:
                    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Trickle: ")
                except OSError:
                    pass
            open_ = list(socks)
            deadline = time.monotonic() + 8.0  # the server's request deadline is 3 s
            while open_ and time.monotonic() < deadline:
                time.sleep(0.3)
                for sock in list(open_):
                    sock.setblocking(False)
                    try:
                        data = sock.recv(65536)
                        trickler_ends.append("503" if data.startswith(b"HTTP/1.1 503 ") else "closed")
                        open_.remove(sock)
                        continue
                    except BlockingIOError:
                        pass
                    except OSError:
                        trickler_ends.append("closed")
                        open_.remove(sock)
                        continue
                    finally:
                        sock.setblocking(True)
                    try:
                        sock.sendall(b"a")
                    except OSError:
                        trickler_ends.append("closed")
                        open_.remove(sock)
            trickler_ends.extend("still open" for _ in open_)
        finally:
            for sock in socks:
                sock.close()

    threads = ([threading.Thread(target=guarded(polite), args=(i,)) for i in range(8)]
               + [threading.Thread(target=guarded(flood), args=(i,)) for i in range(3)]
               + [threading.Thread(target=guarded(quit_early), args=(i,)) for i in range(2)]
               + [threading.Thread(target=guarded(oversized)), threading.Thread(target=guarded(trickle))])
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads) and not failures, failures

    # Every well-behaved request was answered, with the answer it gets on the idle server afterwards.
    assert len(answers) == 8 * 6
    with httpx.Client(base_url=url, timeout=60) as http:
        for (client, j), got in sorted(answers.items()):
            path, body = well_behaved_requests(client)[j]
            assert same_answer(got, ask_politely(http, path, body)), (client, j)
    # The misbehaving got their refusals; the limits held.
    assert set(flood_statuses) <= {200, 429} and len(flood_statuses) == 24
    assert oversized_statuses == [400, 400, 400]
    assert len(trickler_ends) == 20 and trickler_ends.count("503") >= 4 and "still open" not in trickler_ends, trickler_ends
    after = stats(loaded)
    assert after["queued_rows"] == 0 and after["largest_batch"] <= 8

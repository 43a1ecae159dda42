"""A remote white-box teacher against a real `opdistill serve` on 127.0.0.1: same answers as the local teacher,
the same student, a durable cache across kill -9 and repeated runs (bounded in bytes, resumable from any kept
checkpoint), retried faults, a refused key, vLLM's -9999.0 read as -inf, and no Python 3.11-only asyncio.

Between client and server sits a small forwarding proxy (real HTTP both ways) that records every request body
and can fail a share of them with HTTP 500, as a flaky provider would."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from conftest import build_tiny_model
from opdistill.config import load_config
from opdistill.data import render_prompt
from opdistill.errors import OpdistillError
from opdistill.methods import train
from opdistill.models import load_model, load_tokenizer
from opdistill.serve import ServeOptions, make_server
from opdistill.teachers.logprob import LocalTeacher, TeacherRow
from opdistill.teachers.api import RetryPolicy
from opdistill.teachers import remote as remote_module
from opdistill.teachers.remote import RemoteTeacher, row_key

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "OPD_REMOTE_TEACHER_TEST_KEY"
KEY = "sk-remote-teacher-test-0123456789"
PROBE = 1  # the pre-flight check at the start of every train sends one prompt log-prob request


class Proxy(ThreadingHTTPServer):
    """Forwards every request to `target`; fails every `fault_every`-th POST with HTTP 500; records the forwarded bodies.

    `together`: each prompt log-prob request waits (up to 5 s) until that many are in flight, so `max_in_flight` shows
    whether a client sends rows together or one after another without timing anything. `stall_after`: the prompt
    log-prob requests past that many are held unanswered until `release()`, then dropped (HTTP 500, never forwarded)."""

    daemon_threads = True

    def __init__(self, target: str, fault_every: int = 0, together: int = 0, stall_after: int = 0) -> None:
        self.target, self.fault_every, self.together, self.stall_after = target, fault_every, together, stall_after
        self.bodies: list[bytes] = []
        self.posts = self.faults = self.scored = self.held = self.in_flight = self.max_in_flight = 0
        self.connections: set[int] = set()  # client ports: one per connection the client opened
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.released = threading.Event()
        super().__init__(("127.0.0.1", 0), ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def prompts(self) -> list[str]:
        """A digest of each forwarded completions prompt."""
        return [hashlib.sha256(json.dumps(json.loads(b)["prompt"]).encode()).hexdigest() for b in self.bodies if b"prompt_logprobs" in b]

    def release(self) -> None:
        self.stall_after = 0
        self.released.set()


class ProxyHandler(BaseHTTPRequestHandler):
    server: Proxy
    protocol_version = "HTTP/1.1"  # keep-alive, so reused connections show in `connections`

    def do_GET(self) -> None:
        self.forward(None)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        proxy, scoring = self.server, b"prompt_logprobs" in body
        with proxy.lock:
            proxy.connections.add(self.client_address[1])
            proxy.posts += 1
            fail = proxy.fault_every > 0 and proxy.posts % proxy.fault_every == 0
            proxy.faults += fail
            hold = scoring and not fail and proxy.stall_after > 0 and proxy.scored >= proxy.stall_after
            proxy.scored += scoring and not fail and not hold
            proxy.held += hold
        if hold:
            proxy.released.wait(300)
            self.reply(500, b'{"error": {"message": "held, then dropped"}}')
            return
        if fail:
            self.reply(500, b'{"error": {"message": "injected fault"}}')
            return
        with proxy.changed:
            proxy.bodies.append(body)
            proxy.in_flight += scoring
            proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
            proxy.changed.notify_all()
            if scoring and proxy.together:
                proxy.changed.wait_for(lambda: proxy.in_flight >= proxy.together, timeout=5)
        try:
            self.forward(body)
        finally:
            with proxy.changed:
                proxy.in_flight -= scoring

    def forward(self, body: bytes | None) -> None:
        request = urllib.request.Request(self.server.target + self.path, data=body, headers={k: v for k, v in self.headers.items()
                                                                                            if k.lower() in ("content-type", "authorization")})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                self.reply(response.status, response.read())
        except urllib.error.HTTPError as err:
            self.reply(err.code, err.read())

    def reply(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def running(server: ThreadingHTTPServer) -> ThreadingHTTPServer:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's tokenizer with other weights: a teacher the student differs from."""
    return build_tiny_model(tmp_path_factory.mktemp("remote_teacher") / "model", seed=7)


@pytest.fixture(scope="module")
def served(teacher: Path) -> Iterator[str]:
    """`opdistill serve` for the teacher (fp32, key required), in this process; yields its root URL."""
    os.environ[KEY_ENV] = KEY
    server = running(make_server(ServeOptions(model=str(teacher), port=0, precision="fp32", api_key_env=KEY_ENV, model_name="tiny")))
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def proxy(served: str) -> Iterator[Proxy]:
    server = running(Proxy(served))
    yield server
    server.shutdown()
    server.server_close()


def records(path: Path, count: int = 8) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Tell me fact number {i} about the sea."}) + "\n" for i in range(count)))
    return path


def overrides(student: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["method=opd", f"student={student}", f"data={data}", f"out_dir={out}", "max_steps=3", "batch_size=4", "micro_batch_size=2",
            "max_response_tokens=12", "precision=fp32", "top_k=5", "lr=1e-3", "seed=3", *extra]


def remote(url: str) -> list[str]:
    return [f"teacher_url={url}", "teacher_model=tiny", f"teacher_api_key_env={KEY_ENV}"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(str(path)).state_dict()


def test_remote_and_local_teachers_give_the_same_top_k_on_the_same_rows(teacher, proxy, tmp_path):
    tokenizer, model = load_tokenizer(str(teacher)), load_model(str(teacher)).eval()
    rows = [TeacherRow(render_prompt(tokenizer, [{"role": "user", "content": text}]), tokenizer(text, add_special_tokens=False)["input_ids"])
            for text in ("Why is the sea salty?", "Name a bird", "Write one short line about rain and wind")]
    local = LocalTeacher(model, tokenizer.pad_token_id).score(rows)
    answer = RemoteTeacher(proxy.url, "tiny", k=5, vocab=len(tokenizer), cache_path=tmp_path / "cache.jsonl", api_key_env=KEY_ENV).score(rows)
    expected = local.top_k(5)
    torch.testing.assert_close(answer.top_logprobs, expected.top_logprobs, rtol=0, atol=1e-5)
    assert torch.equal(answer.top_ids, expected.top_ids)
    targets = torch.tensor([t for row in rows for t in row.response])
    torch.testing.assert_close(answer.token_logprobs, local.sampled(targets), rtol=0, atol=1e-5)


def test_opd_with_a_served_teacher_trains_the_same_student_and_a_repeat_pays_nothing(tiny_model, teacher, proxy, tmp_path):
    data = records(tmp_path / "data.jsonl")
    train(load_config(None, overrides(tiny_model, data, tmp_path / "local", f"teacher={teacher}")))
    cache = tmp_path / "cache.jsonl"
    keep = (f"teacher_cache={cache}", "teacher_cache_keep=all")  # a repeat pays nothing only if the cache keeps every row
    train(load_config(None, overrides(tiny_model, data, tmp_path / "remote", *remote(proxy.url), *keep)))
    local, served = weights(tmp_path / "local" / "student"), weights(tmp_path / "remote" / "student")
    assert any(not torch.equal(local[name], weights(tiny_model)[name]) for name in local)  # the student did move
    for name in local:
        torch.testing.assert_close(served[name], local[name], rtol=0, atol=1e-5)
    scored = len(proxy.prompts())
    # One request per row, none twice, plus the pre-flight check's probe (the first record and a short reply).
    assert scored == 3 * 4 + PROBE and len(set(proxy.prompts())) == scored
    train(load_config(None, overrides(tiny_model, data, tmp_path / "again", *remote(proxy.url), *keep)))
    assert len(proxy.prompts()) == scored + PROBE  # the repeated run read every row from the cache
    again = weights(tmp_path / "again" / "student")
    assert all(torch.equal(again[name], served[name]) for name in served)


def test_a_server_failing_ten_percent_of_requests_gives_the_same_student(tiny_model, served, tmp_path):
    flaky = running(Proxy(served, fault_every=10))  # 10% of requests fail
    try:
        data = records(tmp_path / "data.jsonl", 32)
        extra = ("max_steps=8", "teacher_max_attempts=8")
        train(load_config(None, overrides(tiny_model, data, tmp_path / "flaky", *remote(flaky.url), *extra)))
        clean = running(Proxy(served))
        train(load_config(None, overrides(tiny_model, data, tmp_path / "clean", *remote(clean.url), *extra)))
        clean.shutdown()
    finally:
        flaky.shutdown()
    assert flaky.faults >= 3
    a, b = weights(tmp_path / "flaky" / "student"), weights(tmp_path / "clean" / "student")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_wrong_key_stops_the_run_with_a_clear_error_that_hides_the_key(tiny_model, served, tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_WRONG_KEY", "sk-wrong-key-should-not-leak")
    config = load_config(None, overrides(tiny_model, records(tmp_path / "data.jsonl"), tmp_path / "run", f"teacher_url={served}/v1",
                                         "teacher_model=tiny", "teacher_api_key_env=OPD_WRONG_KEY"))
    with pytest.raises(OpdistillError) as caught:
        train(config)
    text = f"{caught.value.message} {caught.value.fix}"
    assert "refused the credentials (HTTP 401)" in text and "OPD_WRONG_KEY" in text and "sk-wrong" not in text


def cache_lines(path: Path) -> list[dict[str, Any]]:
    """The committed rows of a teacher cache (a torn last line, or none at all, is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def test_kill_9_mid_run_and_resume_never_request_a_cached_row_twice(tiny_model, served, tmp_path):
    # The proxy answers the probe, two whole steps and two rows of the third step, and holds the other two: the run is
    # killed mid-step, after the checkpoint of step 2 (and its cache compaction), with two rows of step 2 paid for.
    proxy = running(Proxy(served, stall_after=PROBE + 2 * 4 + 2))
    data, out = records(tmp_path / "data.jsonl", 24), tmp_path / "run"
    command = [sys.executable, "-m", "opdistill", "train", *overrides(tiny_model, data, out, *remote(proxy.url)), "max_steps=6",
               "checkpoint_every=1", "max_response_tokens=24"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", KEY_ENV: KEY}
    cache = out / "teacher_cache.jsonl"
    try:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 180
        while (process.poll() is None and time.monotonic() < deadline
               and not (proxy.held >= 2 and sum(row["step"] == 2 for row in cache_lines(cache)) >= 2)):
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        before = len(proxy.prompts())
        resume_step = max(int(p.name.removeprefix("step-")) for p in (out / "checkpoints").glob("step-*"))
        held_rows = [row for row in cache_lines(cache) if row["step"] >= resume_step]
        assert resume_step == 2 and before == PROBE + 2 * 4 + 2 and len(held_rows) == 2
        proxy.release()
        finished = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        proxy.release()
        proxy.shutdown()
        proxy.server_close()
    assert finished.returncode == 0, finished.stderr[-2000:]
    # The resumed run asks exactly for the rows of steps 2..5 the cache lacked: never one it held.
    assert len(proxy.prompts()) - before == (6 - resume_step) * 4 - len(held_rows) + PROBE
    # Compacted at every checkpoint: after the last one (step 6) only the rows of step 5 stay, which a resume from the
    # older kept checkpoint (5) would ask for.
    assert sorted(row["step"] for row in cache_lines(cache)) == [5] * 4


def test_all_rows_of_a_step_are_in_flight_at_once_through_one_client(tiny_model, served, tmp_path):
    # micro_batch_size 1: the old design sent one micro-batch's row, waited, sent the next. The proxy holds each request
    # until 4 are in flight (or 5 s pass), so only a client that sends the step's 4 rows together reaches 4.
    proxy = running(Proxy(served, together=4))
    try:
        out = tmp_path / "run"
        train(load_config(None, overrides(tiny_model, records(tmp_path / "data.jsonl"), out, *remote(proxy.url), "micro_batch_size=1",
                                          "max_steps=2")))
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proxy.max_in_flight == 4 and len(proxy.prompts()) == 2 * 4 + PROBE
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"teacher_seconds"' in line]
    assert len(steps) == 2 and all(s["teacher_seconds"] > 0 for s in steps)


def test_one_client_serves_every_call_over_kept_alive_connections(teacher, proxy, tmp_path):
    tokenizer = load_tokenizer(str(teacher))
    remote_teacher = RemoteTeacher(proxy.url, "tiny", k=3, vocab=len(tokenizer), cache_path=tmp_path / "cache.jsonl",
                                   api_key_env=KEY_ENV, concurrency=2)
    try:
        for call in range(5):  # five calls of two new rows each
            remote_teacher.score([TeacherRow([1, 2 + call], [5, 6 + i]) for i in range(2)])
    finally:
        remote_teacher.close()
    assert len(proxy.prompts()) == remote_teacher.requests == 10
    assert len(proxy.connections) <= 2  # a client per call would have opened a connection per call at least (5)


def worst_line_bytes(tokens: int, k: int) -> int:
    """The widest cache line a row of `tokens` response tokens at `k` can take: 3-digit ids (the tiny vocabulary), the
    longest float repr, a 2-digit step."""
    worst = -1.2345678901234567e-05
    return len(json.dumps({"key": "0" * 64, "step": 23, "top_ids": [[383] * k] * tokens, "top_logprobs": [[worst] * k] * tokens,
                           "token_logprobs": [worst] * tokens})) + 1


def cache_metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"teacher_cache_rows"' in line]


def test_the_cache_stays_bounded_over_a_long_run(tiny_model, proxy, tmp_path):
    """24 steps of 4 rows, a checkpoint every 2 steps: the cache holds at most the rows of the 2 kept checkpoints' steps
    (4 steps), in memory and on disk, where keeping every row would hold 96."""
    out = tmp_path / "run"
    train(load_config(None, overrides(tiny_model, records(tmp_path / "data.jsonl", 32), out, *remote(proxy.url), "max_steps=24",
                                      "checkpoint_every=2", "keep_checkpoints=2", "max_response_tokens=8")))
    steps = cache_metrics(out)
    assert len(steps) == 24 and len(proxy.prompts()) == 24 * 4 + PROBE
    bound_rows, bound_bytes = 4 * 4, 4 * 4 * worst_line_bytes(8, 5)
    assert max(s["teacher_cache_rows"] for s in steps) == bound_rows  # reached (so measured), never passed
    assert all(s["teacher_cache_bytes"] <= bound_bytes for s in steps), (max(s["teacher_cache_bytes"] for s in steps), bound_bytes)
    # After the final checkpoint (24) the older kept one (22) may still be resumed from: its 2 steps of rows stay.
    assert sorted({row["step"] for row in cache_lines(out / "teacher_cache.jsonl")}) == [22, 23]


def test_the_cache_stays_flat_over_a_long_run_without_checkpoints(tiny_model, proxy, tmp_path):
    """checkpoint_every 0: no checkpoint compacts the cache until the end, so only its byte bound holds it (set here to
    about 2 steps of rows): disk never passes it, memory (an index of the rows on disk) stays as flat, and no row is
    asked twice."""
    bound = 2 * 4 * worst_line_bytes(8, 5)
    out = tmp_path / "run"
    train(load_config(None, overrides(tiny_model, records(tmp_path / "data.jsonl", 32), out, *remote(proxy.url), "max_steps=24",
                                      "checkpoint_every=0", "max_response_tokens=8", f"teacher_cache_max_bytes={bound}")))
    steps = cache_metrics(out)
    assert len(steps) == 24 and len(proxy.prompts()) == 24 * 4 + PROBE == len(set(proxy.prompts()))
    sizes, rows = [s["teacher_cache_bytes"] for s in steps], [s["teacher_cache_rows"] for s in steps]
    assert max(sizes) <= bound and max(sizes) > bound / 2  # never past the bound, and reached (so measured)
    assert max(rows) < 24 * 4 / 4  # it held a fraction of the run's 96 rows
    assert max(rows[12:]) <= bound // 100  # a line is over 100 bytes (its key alone is 64): rows <= bound / 100, flat
    assert cache_lines(out / "teacher_cache.jsonl") == []  # the final checkpoint (24) is the only one: no row can be asked again


def test_a_resume_from_the_older_kept_checkpoint_finds_its_rows(tiny_model, proxy, tmp_path):
    """Checkpoints at steps 2 and 4 are kept; with the newest deleted, the rerun resumes from step 2 and reads steps 2
    and 3 from the cache: it sends the server nothing but the pre-flight probe, and trains the same student."""
    out = tmp_path / "run"
    config = overrides(tiny_model, records(tmp_path / "data.jsonl", 16), out, *remote(proxy.url), "max_steps=4", "checkpoint_every=2",
                       "keep_checkpoints=2")
    train(load_config(None, config))
    first = weights(out / "student")
    assert [p.name for p in sorted((out / "checkpoints").glob("step-*"))] == ["step-000002", "step-000004"]
    assert sorted({row["step"] for row in cache_lines(out / "teacher_cache.jsonl")}) == [2, 3]
    shutil.rmtree(out / "checkpoints" / "step-000004")
    asked = len(proxy.prompts())
    train(load_config(None, config))
    assert len(proxy.prompts()) - asked == PROBE  # every row of steps 2 and 3 came from the cache
    again = weights(out / "student")
    assert all(torch.equal(again[name], first[name]) for name in first)


# ---------------------------------------------------------------- answers a retry cannot fix (issue 27 §4)


class Scripted(ThreadingHTTPServer):
    """A completions server whose answer to each prompt is `answer(prompt)` (a JSON text, NaN allowed); counts requests per prompt."""

    daemon_threads = True

    def __init__(self, answer: Any) -> None:
        self.answer, self.asked, self.lock = answer, {}, threading.Lock()
        super().__init__(("127.0.0.1", 0), ScriptedHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ScriptedHandler(BaseHTTPRequestHandler):
    server: Scripted

    def do_POST(self) -> None:
        prompt = tuple(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"])
        with self.server.lock:
            self.server.asked[prompt] = self.server.asked.get(prompt, 0) + 1
        payload = self.server.answer(list(prompt)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


GOOD, BAD = TeacherRow([1, 2], [5, 6]), TeacherRow([1, 3], [7, 8])  # the bad row's answer is broken at response token 1


def body_for(prompt: list[int], breakage: Any = None) -> str:
    """vLLM's answer with k = 2 (the prompt token and token 9 at each position); `breakage(entry)` edits the last entry."""
    entries: list[Any] = [None] + [{str(t): {"logprob": -1.0, "rank": 1, "decoded_token": "a"}, "9": {"logprob": -2.0, "rank": 2, "decoded_token": "b"}}
                                   for t in prompt[1:]]
    if breakage is not None:
        breakage(entries[-1], prompt[-1])
    return json.dumps({"choices": [{"index": 0, "text": "", "prompt_logprobs": entries}]})


@pytest.mark.parametrize("breakage, words, retried", [
    (lambda e, t: e[str(t)].pop("logprob"), "no numeric `logprob`", False),
    (lambda e, t: e[str(t)].update(logprob=None), "no numeric `logprob`", False),
    (lambda e, t: e.update({"x1": {"logprob": -3.0}}), "not an integer id", False),
    (lambda e, t: e[str(t)].update(logprob=float("nan")), "`logprob` nan", False),
    (lambda e, t: e.pop("9"), "fewer than k = 2", False),
    (lambda e, t: e.update({"9999": e.pop("9")}), "outside the student's 100-token vocabulary", False),
    (lambda e, t: e.clear(), "lacks the response token 8", False),
])
def test_a_broken_answer_is_one_clear_error_never_retried_nor_cached(tmp_path: Path, breakage: Any, words: str, retried: bool) -> None:
    server = running(Scripted(lambda prompt: body_for(prompt, breakage if prompt == BAD.prompt + BAD.response else None)))
    cache = tmp_path / "cache.jsonl"
    try:
        teacher = RemoteTeacher(server.url, "m", k=2, vocab=100, cache_path=cache, concurrency=1,
                                policy=RetryPolicy(max_attempts=3, base_delay=0.01))
        with pytest.raises(OpdistillError) as caught:
            teacher.score([GOOD, BAD])
        teacher.close()
    finally:
        server.shutdown()
        server.server_close()
    message = caught.value.message
    assert "row 1 of the batch, response token 1 (prompt_logprobs[3])" in message and words in message, message
    assert "not retried and nothing was cached" in caught.value.fix
    assert server.asked[tuple(BAD.prompt + BAD.response)] == 1  # the same answer would come back: asked once
    keys = [json.loads(line)["key"] for line in cache.read_text().splitlines()] if cache.exists() else []
    assert row_key(teacher.name, 2, BAD) not in keys and row_key(teacher.name, 2, GOOD) in keys  # the good row is kept


def test_a_body_that_may_come_back_right_is_retried_and_then_cached(tmp_path: Path) -> None:
    answers = iter([json.dumps({"choices": [{"prompt_logprobs": [None]}]})])  # cut short once, then whole
    server = running(Scripted(lambda prompt: next(answers, None) or body_for(prompt)))
    try:
        teacher = RemoteTeacher(server.url, "m", k=2, vocab=100, cache_path=tmp_path / "cache.jsonl",
                                policy=RetryPolicy(max_attempts=3, base_delay=0.01))
        scores = teacher.score([GOOD])
        teacher.close()
    finally:
        server.shutdown()
        server.server_close()
    assert server.asked[tuple(GOOD.prompt + GOOD.response)] == 2
    assert scores.top_ids.tolist() == [[5, 9], [6, 9]] and scores.token_logprobs.tolist() == [-1.0, -1.0]


def test_the_cache_file_stays_within_its_byte_bound_and_an_evicted_row_is_asked_again(tmp_path: Path) -> None:
    server = running(Scripted(body_for))
    rows = [TeacherRow([1, 10 + i], [5, 6]) for i in range(12)]  # equal-width lines: the same ids, a 1- or 2-digit step
    try:
        probe = RemoteTeacher(server.url, "m", k=2, vocab=100, cache_path=tmp_path / "probe.jsonl")
        probe.score([TeacherRow([1, 2], [5, 6])], step=10)
        line, bound = probe.cache_bytes(), 4 * probe.cache_bytes()  # room for 4 rows; past it, the newest 2 are kept
        probe.close()
        cache = tmp_path / "cache.jsonl"
        teacher = RemoteTeacher(server.url, "m", k=2, vocab=100, cache_path=cache, cache_max_bytes=bound)
        answers = []
        for step, row in enumerate(rows):
            answers.append(teacher.score([row], step=step))
            assert teacher.cache_bytes() == cache.stat().st_size <= bound and len(teacher.cached) <= 4
        assert teacher.cache_bytes() > line  # the bound was reached, not everything dropped
        kept = set(teacher.cached)
        teacher.close()
        reopened = RemoteTeacher(server.url, "m", k=2, vocab=100, cache_path=cache, cache_max_bytes=bound)
        assert set(reopened.cached) == kept and row_key(reopened.name, 2, rows[-1]) in kept
        again = reopened.score([rows[0], rows[-1]], step=12)  # rows[0] was let go: asked again; rows[-1] is read back
        reopened.close()
    finally:
        server.shutdown()
        server.server_close()
    assert server.asked[tuple(rows[0].prompt + rows[0].response)] == 2 and server.asked[tuple(rows[-1].prompt + rows[-1].response)] == 1
    assert torch.equal(again.token_logprobs, torch.cat([answers[0].token_logprobs, answers[-1].token_logprobs]))


def test_minus_9999_is_read_as_minus_infinity_and_the_cache_keeps_it(tmp_path: Path) -> None:
    """vLLM sends a ruled-out token's -inf as -9999.0 (JSON has no infinity): read as -inf, in the token log-probs and
    the top-k alike, written to the cache as -Infinity and read back from it as -inf. -9998.5 is a real log-prob."""
    def answer(prompt: list[int]) -> str:
        body = json.loads(body_for(prompt))
        entries = body["choices"][0]["prompt_logprobs"]
        entries[2]["9"]["logprob"] = -9998.5
        entries[3][str(prompt[3])]["logprob"] = -9999.0
        entries[3]["9"]["logprob"] = -1e30
        return json.dumps(body)

    server = running(Scripted(answer))
    cache = tmp_path / "cache.jsonl"
    try:
        first = RemoteTeacher(server.url, "m", k=2, vocab=100, cache_path=cache)
        fresh = first.score([GOOD])
        first.close()
        cached = RemoteTeacher(server.url, "m", k=2, vocab=100, cache_path=cache)
        read_back = cached.score([GOOD])
        cached.close()
    finally:
        server.shutdown()
        server.server_close()
    inf = float("-inf")
    for scores in (fresh, read_back):
        assert scores.token_logprobs.tolist() == [-1.0, inf]
        assert scores.top_logprobs.tolist() == [[-1.0, -9998.5], [inf, inf]] and scores.top_ids.tolist() == [[5, 9], [6, 9]]
    assert server.asked[tuple(GOOD.prompt + GOOD.response)] == 1  # the second teacher read the row from the cache
    assert "-Infinity" in cache.read_text() and "9999" not in cache.read_text().replace("-9998.5", "")


def test_scoring_needs_no_python_3_11_task_group_and_a_failure_cancels_the_rows_in_flight(tmp_path: Path, monkeypatch) -> None:
    """pyproject promises Python 3.10, which has neither asyncio.TaskGroup nor exception groups: with them taken away
    a batch still scores, and a row that fails stops the batch at once (the slow row beside it is cancelled, not
    awaited, left running or cached) with the same error as before."""
    slow, release = TeacherRow([1, 4], [5, 6]), threading.Event()

    def answer(prompt: list[int]) -> str:
        if prompt == slow.prompt + slow.response:
            release.wait(60)
        return body_for(prompt, (lambda e, t: e.clear()) if prompt == BAD.prompt + BAD.response else None)

    server = running(Scripted(answer))
    teacher = RemoteTeacher(server.url, "m", k=2, vocab=100, cache_path=tmp_path / "cache.jsonl", concurrency=2,
                            policy=RetryPolicy(max_attempts=1))
    try:
        with monkeypatch.context() as python310:
            python310.delattr(asyncio, "TaskGroup")
            # Gone for the client's module only (httpx's anyio uses the built-in ones on 3.11): an `except` naming one
            # would raise TypeError, as the name would be undefined on 3.10.
            for name in ("BaseExceptionGroup", "ExceptionGroup"):
                python310.setattr(remote_module, name, None, raising=False)
            scores = teacher.score([GOOD])
            started = time.monotonic()
            try:
                teacher.score([slow, BAD])
                caught = None
            except OpdistillError as err:
                caught = err
            waited = time.monotonic() - started
            assert teacher._session.loop is not None
            left = asyncio.all_tasks(teacher._session.loop)
    finally:
        release.set()
        teacher.close()
        server.shutdown()
        server.server_close()
    assert scores.top_ids.tolist() == [[5, 9], [6, 9]]
    assert caught is not None and "row 1 of the batch, response token 1 (prompt_logprobs[3]) lacks the response token 8" in caught.message
    assert waited < 30 and not left  # the slow row (held 60 s) was cancelled at the failure, and nothing is left running
    assert row_key(teacher.name, 2, slow) not in teacher.cached and row_key(teacher.name, 2, GOOD) in teacher.cached

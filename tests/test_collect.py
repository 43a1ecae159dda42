"""Teacher collection against a real OpenAI-compatible HTTP server on 127.0.0.1 with injected faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from opdistill.errors import OpdistillError
from opdistill.teachers.collect import CollectOptions, collect

sys.path.insert(0, str(Path(__file__).parent))
from openai_stub_server import start_server  # noqa: E402


def write_prompts(path: Path, count: int) -> Path:
    with open(path, "w") as handle:
        for i in range(count):
            handle.write(json.dumps({"prompt": f"Question number {i}: what is {i} plus {i}?", "id": i}) + "\n")
    return path


def stats(server) -> dict:
    return httpx.get(f"http://127.0.0.1:{server.server_address[1]}/stats").json()


def options(server, prompts: Path, out: Path, **kw) -> CollectOptions:
    base = dict(prompts=str(prompts), out=str(out), teacher_model="stub-model",
                teacher_url=f"http://127.0.0.1:{server.server_address[1]}/v1", progress=False)
    base.update(kw)
    return CollectOptions(**base)


def stored(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture
def server_factory():
    servers = []

    def make(**kwargs):
        server, state = start_server(**kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def test_every_fault_kind_is_retried_and_retry_after_is_honoured(tmp_path, server_factory):
    faults = ["429", "500", "503", "timeout", "malformed", "reset", "truncated"]
    server = server_factory(script=faults, retry_after="1", timeout_sleep=2.0)
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    started = time.monotonic()
    summary = collect(options(server, prompts, tmp_path / "out.jsonl", concurrency=1, timeout=0.5, max_attempts=10,
                              retry_base_delay=0.02))
    elapsed = time.monotonic() - started
    assert summary.stored == 3 and summary.failed == 0
    # The server sees each scripted fault once plus 3 successes. The client counts attempts, which can
    # include one that died on a pooled connection the server had already closed (never received there).
    assert stats(server)["requests"] == 3 + len(faults) and stats(server)["succeeded"] == 3
    assert summary.requests >= 3 + len(faults) and summary.retries == summary.requests - 3
    assert elapsed >= 1.0, "the 429's Retry-After: 1 must delay the retry by at least a second"
    rows = stored(tmp_path / "out.jsonl")
    assert len({r["meta"]["key"] for r in rows}) == 3
    assert rows[0]["meta"]["attempts"] >= len(faults) + 1  # the first prompt ate every fault
    assert set(summary.errors) >= {"http 429", "http 500", "http 503", "timeout", "malformed body", "connection"}


def test_200_prompts_at_10_percent_failures_then_rerun_sends_nothing(tmp_path, server_factory):
    server = server_factory(fault_rate=0.1, fault_kinds=["429", "500", "malformed", "reset"], retry_after="0", seed=1)
    prompts = write_prompts(tmp_path / "p.jsonl", 200)
    out = tmp_path / "out.jsonl"
    summary = collect(options(server, prompts, out, concurrency=16))
    assert summary.stored == 200 and summary.failed == 0
    rows = stored(out)
    assert len(rows) == 200 and len({r["meta"]["key"] for r in rows}) == 200
    # every attempt the server received was sent by the client (the client may count a few more: attempts
    # that died on a pooled connection the server had closed), and exactly 200 were answered with a 200
    assert summary.retries > 0 and stats(server)["requests"] <= summary.requests and stats(server)["succeeded"] == 200
    assert summary.prompt_tokens > 0 and summary.completion_tokens > 0
    before = stats(server)["requests"]
    again = collect(options(server, prompts, out, concurrency=16))
    assert again.already_stored == 200 and again.stored == 0 and again.requests == 0
    assert stats(server)["requests"] == before
    # output records carry what the issue asks for
    row = rows[0]
    assert set(row) == {"messages", "response", "teacher", "meta"} and row["teacher"] == "stub-model"
    assert row["meta"]["sampling"]["temperature"] == 0.8 and "id" in row["meta"]


def test_retry_budget_then_failure_is_recorded_and_the_run_goes_on(tmp_path, server_factory):
    server = server_factory(always_fail_substring="number 3:", retry_after="0")
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    out = tmp_path / "out.jsonl"
    summary = collect(options(server, prompts, out, concurrency=2, max_attempts=3))
    assert summary.stored == 5 and summary.failed == 1
    assert summary.requests == 5 + 3, "the failing prompt uses exactly its budget of 3 attempts"
    failures = stored(Path(str(out) + ".failures.jsonl"))
    assert len(failures) == 1 and failures[0]["attempts"] == 3 and failures[0]["reason"] == "http 500"


def test_n_samples_per_prompt_and_privileged_system_seen_by_teacher_only(tmp_path, server_factory):
    server = server_factory()
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    out = tmp_path / "out.jsonl"
    summary = collect(options(server, prompts, out, n=3, system="Always respond in French."))
    assert summary.stored == 12
    rows = stored(out)
    assert sorted(r["meta"]["sample_index"] for r in rows) == sorted([0, 1, 2] * 4)
    assert all(r["response"].startswith("Réponse") for r in rows), "the teacher saw the system prompt"
    assert all(all(m["role"] != "system" for m in r["messages"]) for r in rows), "the student-side record has no privileged prompt"
    assert all(r["meta"]["teacher_system"] == "Always respond in French." for r in rows)


def test_auth_failure_stops_with_a_clear_error(tmp_path, server_factory):
    server = server_factory(status_always=401)
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    with pytest.raises(OpdistillError, match="refused the credentials"):
        collect(options(server, prompts, tmp_path / "out.jsonl"))


def test_api_key_is_sent_but_never_written(tmp_path, server_factory, monkeypatch):
    secret = "sk-test-DO-NOT-LEAK-0123456789"
    server = server_factory(expected_key=secret, script=["500"])
    monkeypatch.setenv("MY_TEACHER_KEY", secret)
    prompts = write_prompts(tmp_path / "p.jsonl", 5)
    out_dir = tmp_path / "run"
    out = out_dir / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "opdistill", "collect", "--prompts", str(prompts), "--out", str(out),
                           "--teacher-model", "stub", "--teacher-url", f"http://127.0.0.1:{server.server_address[1]}/v1",
                           "--api-key-env", "MY_TEACHER_KEY"], capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert stats(server)["auth_ok"] == 6 and stats(server)["auth_bad"] == 0
    assert secret not in proc.stdout + proc.stderr
    for path in out_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_torn_last_line_is_repaired_on_resume(tmp_path, server_factory):
    server = server_factory()
    prompts = write_prompts(tmp_path / "p.jsonl", 5)
    out = tmp_path / "out.jsonl"
    collect(options(server, prompts, out))
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 25])  # a crash mid-write of the last record
    summary = collect(options(server, prompts, out))
    assert summary.already_stored == 4 and summary.stored == 1
    assert len(stored(out)) == 5


@pytest.mark.parametrize("fault_rate", [0.0, 0.1])
def test_kill_9_mid_run_then_rerun_completes_without_duplicates(tmp_path, fault_rate):
    """A real collector process is SIGKILLed mid-run; the rerun finishes with every prompt once and
    at most `concurrency` responses paid for twice (the ones in flight at the kill). With a server that
    fails 10% of requests, retries add requests, but successful (paid) responses stay within the bound."""
    port_file = tmp_path / "port"
    server_proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "openai_stub_server.py"), "--port-file",
                                    str(port_file), "--latency", "0.02", "--max-seconds", "300", "--fault-rate", str(fault_rate),
                                    "--fault-kinds", "429,500,malformed,reset", "--retry-after", "0"])
    try:
        for _ in range(100):
            if port_file.exists() and port_file.read_text():
                break
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port_file.read_text()}"
        prompts = write_prompts(tmp_path / "p.jsonl", 200)
        out = tmp_path / "out.jsonl"
        concurrency = 8
        cmd = [sys.executable, "-m", "opdistill", "collect", "--prompts", str(prompts), "--out", str(out), "--teacher-model",
               "stub", "--teacher-url", url + "/v1", "--concurrency", str(concurrency), "--no-progress"]
        victim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= 60:
                break
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        partial = out.read_bytes().count(b"\n")
        assert 60 <= partial < 200, "the kill must land mid-run"
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        rows = stored(out)
        assert len(rows) == 200 and len({r["meta"]["key"] for r in rows}) == 200
        served = httpx.get(url + "/stats").json()
        assert served["succeeded"] <= 200 + concurrency
        if fault_rate == 0:
            assert served["requests"] <= 200 + concurrency
        else:
            assert sum(served["faults"].values()) > 0
    finally:
        server_proc.kill()
        server_proc.wait()


# ---------------------------------------------------------------- an unreachable teacher: refused, unresolved or timed out


def unreachable_options(url: str, prompts: Path, out: Path, **kw) -> CollectOptions:
    return CollectOptions(prompts=str(prompts), out=str(out), teacher_model="stub-model", teacher_url=url, progress=False,
                          max_attempts=1, concurrency=1, **kw)


def test_a_refused_connection_is_named_with_its_address(tmp_path):
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    summary = collect(unreachable_options(f"http://127.0.0.1:{port}/v1", write_prompts(tmp_path / "p.jsonl", 2), tmp_path / "out.jsonl"))
    assert summary.failed == 2 and summary.errors == {"connection": 2}
    assert f"refused by 127.0.0.1:{port}" in summary.first_failure and "server started" in summary.first_failure
    assert any(line.startswith("first failure: connection: refused") for line in summary.lines())
    failures = [json.loads(line) for line in (tmp_path / "out.jsonl.failures.jsonl").read_text().splitlines()]
    assert all("refused" in row["reason"] for row in failures)


def test_an_unresolvable_host_is_named_as_a_dns_failure(tmp_path):
    # .invalid never resolves (RFC 6761), with or without a network
    summary = collect(unreachable_options("http://no-such-teacher.invalid/v1", write_prompts(tmp_path / "p.jsonl", 1), tmp_path / "out.jsonl"))
    assert summary.errors == {"connection": 1}
    assert "cannot resolve host 'no-such-teacher.invalid'" in summary.first_failure and "DNS" in summary.first_failure


def test_a_server_that_never_answers_is_named_as_timed_out(server_factory, tmp_path):
    server = server_factory(script=["timeout"], timeout_sleep=2.0)
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    summary = collect(options(server, prompts, tmp_path / "out.jsonl", max_attempts=1, concurrency=1, timeout=0.3))
    assert summary.errors == {"timeout": 1}
    assert f"127.0.0.1:{server.server_address[1]} sent no answer within 0.3 s (timed out" in summary.first_failure

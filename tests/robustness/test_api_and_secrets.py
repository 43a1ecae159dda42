"""The teacher API under load (1,000 prompts at concurrency 32 against a server with latency, 429s with
Retry-After, 500s, resets and truncated bodies), and the API key never written anywhere a run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from opdistill.teachers.collect import CollectOptions, collect

from conftest import build_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openai_stub_server import start_server  # noqa: E402

SECRET = "sk-robustness-NEVER-WRITE-ME-4242"


def write_prompts(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Load test prompt {i}"}) + "\n" for i in range(count)))
    return path


def test_1000_prompts_at_concurrency_32_with_faults(tmp_path):
    server, state = start_server(latency=0.01, fault_rate=0.15, fault_kinds=["429", "500", "503", "reset", "truncated", "malformed"],
                                 retry_after="0.05", seed=3)
    try:
        out = tmp_path / "store.jsonl"
        options = CollectOptions(prompts=str(write_prompts(tmp_path / "p.jsonl", 1000)), out=str(out), teacher_model="stub",
                                 teacher_url=f"http://127.0.0.1:{server.server_address[1]}/v1", concurrency=32, max_attempts=6,
                                 retry_base_delay=0.02, progress=False)
        summary = collect(options)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        keys = [row["meta"]["key"] for row in rows]
        # every success stored exactly once; retries and faults reported; no request beyond its budget of 6
        assert summary.stored == len(rows) == len(set(keys)) == 1000 - summary.failed
        assert summary.retries > 50 and sum(summary.errors.values()) >= summary.retries
        assert max(row["meta"]["attempts"] for row in rows) <= 6
        failures = [json.loads(line) for line in Path(str(out) + ".failures.jsonl").read_text().splitlines()]
        assert len(failures) == summary.failed and all(f["attempts"] <= 6 for f in failures)
        assert max(state.succeeded_by_prompt.values()) == 1
        # a rerun asks only for what failed, and then every prompt is stored once
        again = collect(options)
        keys = [json.loads(line)["meta"]["key"] for line in out.read_text().splitlines()]
        assert again.already_stored == 1000 - summary.failed and len(keys) == len(set(keys)) == 1000 - again.failed
    finally:
        server.shutdown()
        server.server_close()


def test_the_api_key_appears_in_no_file_log_or_message(tmp_path):
    """Collect, train on what was collected, evaluate with a judge: every byte written and printed is searched."""
    server, state = start_server(expected_key=SECRET, script=["500", "429"], retry_after="0")
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    env = {**os.environ, "MY_KEY": SECRET, "OPENAI_API_KEY": SECRET, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    model = build_tiny_model(tmp_path / "model")
    runs = tmp_path / "runs"
    commands = [
        ["collect", "--prompts", str(write_prompts(tmp_path / "p.jsonl", 8)), "--out", str(runs / "teacher.jsonl"), "--teacher-model", "stub",
         "--teacher-url", url, "--api-key-env", "MY_KEY", "--no-progress"],
        ["train", f"student={model}", f"data={runs / 'teacher.jsonl'}", f"out_dir={runs / 'train'}", "max_steps=2", "batch_size=4",
         "micro_batch_size=4", "precision=fp32", "max_response_tokens=8"],
        ["eval", "--model", f"base={model}", "--model", f"trained={runs / 'train' / 'student'}", "--prompts", str(runs / "teacher.jsonl"),
         "--out", str(runs / "eval"), "--judge-url", url, "--judge-model", "stub", "--judge-api-key-env", "MY_KEY", "--judge-reference", "teacher",
         "--pairwise", "trained:base", "--max-new-tokens", "8", "--no-embeddings", "--no-progress"],
        ["collect", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(runs / "denied.jsonl"), "--teacher-model", "stub",
         "--teacher-url", f"http://127.0.0.1:{server.server_address[1]}/v1", "--api-key-env", "MY_KEY", "--no-progress"],
    ]
    try:
        outputs = []
        for number, command in enumerate(commands):
            if number == 3:  # an auth failure: its error message must not echo the key either
                state.status_always = 401
            done = subprocess.run([sys.executable, "-m", "opdistill", *command], env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == (2 if number == 3 else 0), done.stderr[-3000:]
            outputs.append(done.stdout + done.stderr)
        assert state.auth_ok > 0 and state.auth_bad == 0  # the key was really used
    finally:
        server.shutdown()
        server.server_close()
    for text in outputs:
        assert SECRET not in text
    written = [path for path in runs.rglob("*") if path.is_file()]
    assert len(written) > 20
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path

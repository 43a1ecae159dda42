"""Faults: SIGTERM and Ctrl-C (SIGINT) during collection, training and evaluation commit what was done and exit
130, and a rerun continues; kill -9 at random moments (10 trials per command) never corrupts a store or a
checkpoint, and the rerun ends exactly where an uninterrupted run ends. Real processes, a real HTTP server,
real files; docs/robustness.md counts the trials."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from safetensors.torch import load_file

from opdistill.data import load_records

from conftest import SELFINSTRUCT, build_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openai_stub_server import start_server  # noqa: E402

TRIALS = 10
HELDOUT = len(load_records("builtin:heldout"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def launch(args: list[str], log: Path) -> subprocess.Popen:
    handle = open(log, "ab")
    # A shell starts background jobs with SIGINT ignored, and Python then never installs its Ctrl-C handler; restore
    # the default so that the SIGINT tests test opdistill, not how pytest was launched.
    return subprocess.Popen([sys.executable, "-m", "opdistill", *args], env=ENV, stdout=handle, stderr=handle,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(args: list[str], log: Path) -> None:
    process = launch(args, log)
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the command ended before the point where the test interrupts it"
        assert time.monotonic() < deadline, "timed out waiting for progress"
        time.sleep(0.05)


def line_count(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def store_keys(path: Path) -> list[str]:
    """Every committed line parses (a torn last line is allowed: the store cuts it off on reopen)."""
    keys = []
    data = path.read_bytes() if path.exists() else b""
    complete = data[: data.rfind(b"\n") + 1]
    for line in complete.splitlines():
        row = json.loads(line)
        keys.append(row["meta"]["key"] if "meta" in row else row["key"])
    return keys


# ---------------------------------------------------------------- the three commands


@pytest.fixture
def api():
    server, state = start_server(latency=0.02)
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    server.shutdown()
    server.server_close()


def collect_args(url: str, prompts: Path, out: Path) -> list[str]:
    return ["collect", "--prompts", str(prompts), "--out", str(out), "--teacher-model", "stub", "--teacher-url", url,
            "--concurrency", "4", "--no-progress"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question number {i}?"}) + "\n" for i in range(200)))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def train_args(model: Path, out: Path) -> list[str]:
    values = {"student": str(model), "data": f"{SELFINSTRUCT}[:64]", "out_dir": str(out), "lr": "1e-3", "precision": "fp32",
              "max_response_tokens": 16, "seed": 5, "max_steps": 200, "batch_size": 4, "micro_batch_size": 4,
              "checkpoint_every": 1, "keep_checkpoints": 2}
    return ["train", *[f"{k}={v}" for k, v in values.items()]]


def eval_args(model: Path, out: Path, prompts: str = "builtin:heldout") -> list[str]:
    return ["eval", "--model", f"a={model}", "--model", f"b={model}", "--system", "b=Be brief.", "--prompts", prompts,
            "--out", str(out), "--max-new-tokens", "24", "--temperature", "1.0", "--batch-size", "4", "--no-embeddings", "--no-progress"]


def generations(out: Path) -> dict[str, str]:
    return {row["key"]: row["response"] for row in map(json.loads, (out / "generations.jsonl").read_text().splitlines())}


def weights(out: Path) -> dict:
    return load_file(str(out / "student" / "model.safetensors"))


# ---------------------------------------------------------------- SIGTERM and Ctrl-C


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_collection_stops_cleanly_and_resumes(sig, api, prompts, tmp_path, monkeypatch):
    url, state = api
    monkeypatch.setattr(state, "latency", 0.2)  # slow replies, so the signal lands mid-collection even when a loaded machine polls late
    out, log = tmp_path / "store.jsonl", tmp_path / "log"
    process = launch(collect_args(url, prompts, out), log)
    wait_until(lambda: line_count(out) >= 20, process)
    process.send_signal(sig)
    assert process.wait(timeout=60) == 130, log.read_text()
    assert "every response received so far is stored" in log.read_text()
    kept = store_keys(out)
    assert len(kept) == len(set(kept)) >= 20
    finish(collect_args(url, prompts, out), log)
    keys = store_keys(out)
    assert len(keys) == len(set(keys)) == 200 and set(kept) <= set(keys)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_training_checkpoints_on_a_signal_and_resumes(sig, model, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    process = launch(train_args(model, out), log)
    wait_until(lambda: (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*/trainer_state.json")), process)
    process.send_signal(sig)
    assert process.wait(timeout=120) == 130, log.read_text()[-2000:]
    assert "rerun the same command to resume" in log.read_text()
    finish(train_args(model, out), log)
    assert "resumed from step" in log.read_text() and json.loads((out / "summary.json").read_text())["steps"] == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_evaluation_stops_cleanly_and_resumes(sig, model, tmp_path):
    out, log = tmp_path / "eval", tmp_path / "log"
    process = launch(eval_args(model, out), log)
    wait_until(lambda: line_count(out / "generations.jsonl") >= 8, process)
    process.send_signal(sig)
    assert process.wait(timeout=60) == 130, log.read_text()[-2000:]
    kept = store_keys(out / "generations.jsonl")
    finish(eval_args(model, out), log)
    keys = store_keys(out / "generations.jsonl")
    assert len(keys) == len(set(keys)) == 2 * HELDOUT and set(kept) <= set(keys)
    assert (out / "metrics.json").is_file() and (out / "report.html").is_file()


# ---------------------------------------------------------------- kill -9 at random moments


def kill_trials(args: list[str], log: Path, rng: random.Random, progress: Callable[[], int], advance: tuple[int, int],
                check: Callable[[], None]) -> int:
    """Start the command TRIALS times, each continuing from what the last one left. Each is killed with SIGKILL
    at a random moment: once its progress (stored lines, checkpointed steps) has advanced by a random amount
    in `advance`, plus up to 0.2 s. The state on disk is checked after every kill; returns the kills."""
    killed = 0
    for _ in range(TRIALS):
        target = progress() + rng.randint(*advance)
        process = launch(args, log)
        deadline = time.monotonic() + 120
        while process.poll() is None and progress() < target and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))
        if process.poll() is None:
            process.kill()
            killed += 1
        process.wait(timeout=60)
        check()
    return killed


def test_kill_9_during_collection(api, prompts, tmp_path):
    url, state = api
    out, log = tmp_path / "store.jsonl", tmp_path / "log"

    def check() -> None:
        keys = store_keys(out)
        assert len(keys) == len(set(keys)), "a response was stored twice"

    killed = kill_trials(collect_args(url, prompts, out), log, random.Random(1), lambda: line_count(out), (5, 15), check)
    assert killed == TRIALS
    finish(collect_args(url, prompts, out), log)
    keys = store_keys(out)
    assert len(keys) == len(set(keys)) == 200


def checkpointed_steps(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")] if (out / "checkpoints").is_dir() else []
    return max(steps, default=0)


def test_kill_9_during_training_resumes_to_the_same_weights(model, tmp_path):
    finish(train_args(model, tmp_path / "straight"), tmp_path / "straight.log")
    out, log = tmp_path / "run", tmp_path / "log"

    def check() -> None:
        for checkpoint in (out / "checkpoints").glob("step-*") if (out / "checkpoints").is_dir() else []:
            # a checkpoint directory exists only once complete (written to .tmp-*, then renamed)
            assert (checkpoint / "trainer_state.json").is_file() and load_file(str(checkpoint / "model.safetensors"))

    killed = kill_trials(train_args(model, out), log, random.Random(2), lambda: checkpointed_steps(out), (2, 6), check)
    assert killed == TRIALS
    finish(train_args(model, out), log)
    straight, resumed = weights(tmp_path / "straight"), weights(out)
    assert all((straight[k] == resumed[k]).all() for k in straight), "resumed training differs from the uninterrupted run"


def test_kill_9_during_evaluation_gives_the_uninterrupted_generations(model, tmp_path):
    args = lambda out: eval_args(model, out, "builtin:all")  # noqa: E731  (all built-in prompts: room for 10 kills)
    finish(args(tmp_path / "straight"), tmp_path / "straight.log")
    out, log = tmp_path / "eval", tmp_path / "log"

    def check() -> None:
        keys = store_keys(out / "generations.jsonl")
        assert len(keys) == len(set(keys))

    killed = kill_trials(args(out), log, random.Random(3), lambda: line_count(out / "generations.jsonl"), (4, 12), check)
    assert killed == TRIALS
    finish(args(out), log)
    assert generations(out) == generations(tmp_path / "straight")


# ---------------------------------------------------------------- a full disk


def small_disk(path: Path, size: str) -> Callable[[], None]:
    """A real full disk: a tmpfs of `size` mounted at `path` (the suite runs as root, as CI does)."""
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, f"mounting a tmpfs needs root: {done.stderr}"
    return lambda: subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_during_checkpointing_is_reported_and_the_last_checkpoint_stays_valid(model, tmp_path):
    disk = tmp_path / "disk"
    unmount = small_disk(disk, "1000k")  # room for 2 checkpoints of ~420 KB, not the 3rd one being written
    try:
        out, log = disk / "run", tmp_path / "log"
        process = launch(train_args(model, out), log)
        code = process.wait(timeout=300)
        text = log.read_text()
        assert code == 2 and "Traceback" not in text, text[-3000:]
        assert "writing checkpoint" in text and "is the disk full" in text and "the previous checkpoint is intact" in text
        checkpoints = sorted((out / "checkpoints").glob("step-*"))
        assert checkpoints and not list((out / "checkpoints").glob(".tmp-*")), "a partial checkpoint was left behind"
        latest = checkpoints[-1]
        assert (latest / "trainer_state.json").is_file() and load_file(str(latest / "model.safetensors"))
        moved = tmp_path / "run"
        shutil.copytree(out, moved)
    finally:
        unmount()
    # The run continues from that checkpoint on a disk with room, to the same weights as a run never interrupted.
    finish(train_args(model, moved), tmp_path / "log2")
    finish(train_args(model, tmp_path / "straight"), tmp_path / "straight.log")
    straight, resumed = weights(tmp_path / "straight"), weights(moved)
    assert all((straight[k] == resumed[k]).all() for k in straight)

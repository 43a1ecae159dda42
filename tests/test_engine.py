"""The shared engine: token-mean under accumulation, exact resume after kill -9 / SIGTERM, schedule, data order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdistill.config import load_config
from opdistill.data import collate, load_records, tokenize_records
from opdistill.data import StepOrder
from opdistill.engine import lr_lambda
from opdistill.errors import CheckpointError
from opdistill.methods import train
from opdistill.methods.seqkd import response_nll_sum, response_tokens
from opdistill.models import load_model, load_tokenizer

from conftest import build_tiny_model


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student" / "model.safetensors"))


def seqkd_overrides(model: Path, data: Path, out: Path, **extra) -> list[str]:
    values = {"student": str(model), "data": f"{data}[:48]", "out_dir": str(out), "lr": "1e-3", "precision": "fp32",
              "max_response_tokens": 48, "seed": 3, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def test_one_batch_of_8_equals_two_accumulated_micro_batches_of_4(tiny_model, selfinstruct, tmp_path):
    common = dict(max_steps=1, batch_size=8, max_grad_norm=0, warmup_ratio=0, checkpoint_every=0)
    whole = train(load_config(None, seqkd_overrides(tiny_model, selfinstruct, tmp_path / "a", micro_batch_size=8, **common)))
    accumulated = train(load_config(None, seqkd_overrides(tiny_model, selfinstruct, tmp_path / "b", micro_batch_size=4, **common)))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-6, msg=name)
    assert whole["steps"] == accumulated["steps"] == 1

    # The test has teeth: averaging each micro-batch on its own (the peer bug) gives a different update,
    # because the two halves have different numbers of response tokens.
    config = load_config(None, seqkd_overrides(tiny_model, selfinstruct, tmp_path / "c", micro_batch_size=4, **common))
    tokenizer = load_tokenizer(str(tiny_model))
    examples, _ = tokenize_records(tokenizer, load_records(config.data, require_response=True), 2048, 48, "truncate")
    picked = [examples[i] for i in StepOrder(len(examples), 8, config.seed).indices(0)]
    halves = [collate(picked[:4], tokenizer.pad_token_id), collate(picked[4:], tokenizer.pad_token_id)]
    counts = [response_tokens(h) for h in halves]
    assert counts[0] != counts[1]
    model = load_model(str(tiny_model))
    naive = sum(response_nll_sum(model, h) / response_tokens(h) for h in halves) / 2
    naive.backward()
    naive_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    (sum(response_nll_sum(model, h) for h in halves) / sum(counts)).backward()
    assert not torch.allclose(naive_grad, model.model.embed_tokens.weight.grad, atol=1e-6)


def cli_train(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "opdistill", "train", *overrides]


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists():
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} did not appear (process exit code {proc.poll()})")


RESUME = dict(max_steps=12, batch_size=4, micro_batch_size=2, checkpoint_every=2, keep_checkpoints=2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, selfinstruct) -> Path:
    out = tmp_path_factory.mktemp("resume") / "straight"
    subprocess.run(cli_train(seqkd_overrides(tiny_model, selfinstruct, out, **RESUME)), check=True, capture_output=True, timeout=300)
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs after resume"


def kill_9_then_resume(cmd: list[str], out: Path, step: int, seconds: float = 300) -> None:
    """Start the training command `cmd` (run directory `out`), SIGKILL it once the checkpoint of `step` is complete,
    then rerun it: the rerun must resume and finish. The killed run's stderr goes to `out`.killed.log beside `out`,
    and its tail into the failure when the checkpoint never appears."""
    log = out.with_name(out.name + ".killed.log")
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for(out / "checkpoints" / f"step-{step:06d}" / "trainer_state.json", proc, seconds)
    except AssertionError as err:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{err}; its stderr ends:\n{log.read_text(errors='replace')[-3000:]}") from None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "student").exists(), "the run must be killed before it finishes"
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stderr


def test_kill_9_then_resume_gives_bitwise_the_same_weights(uninterrupted, tiny_model, selfinstruct, tmp_path):
    out = tmp_path / "killed"
    kill_9_then_resume(cli_train(seqkd_overrides(tiny_model, selfinstruct, out, **RESUME)), out, step=2)
    assert_same_weights(uninterrupted, out)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert steps == list(range(1, 13)), "every step is logged exactly once across the kill"


def test_sigterm_saves_a_checkpoint_and_the_rerun_continues(uninterrupted, tiny_model, selfinstruct, tmp_path):
    out = tmp_path / "term"
    cmd = cli_train(seqkd_overrides(tiny_model, selfinstruct, out, **RESUME))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoints" / "step-000002" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "rerun the same command to resume" in stderr and "Traceback" not in stderr
    state = json.loads(sorted((out / "checkpoints").glob("step-*/trainer_state.json"))[-1].read_text())
    assert 2 <= state["step"] < 12
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    assert_same_weights(uninterrupted, out)


def test_resume_with_a_different_architecture_is_a_clear_error(selfinstruct, tmp_path):
    small = build_tiny_model(tmp_path / "small", hidden=32)
    wider = build_tiny_model(tmp_path / "wider", hidden=48)
    out = tmp_path / "run"
    train(load_config(None, seqkd_overrides(small, selfinstruct, out, max_steps=2, batch_size=4, micro_batch_size=4, checkpoint_every=1)))
    with pytest.raises(CheckpointError, match="cannot resume"):
        train(load_config(None, seqkd_overrides(wider, selfinstruct, out, max_steps=4, batch_size=4, micro_batch_size=4)))


def test_seqkd_lowers_held_out_nll_and_saves_a_loadable_student(tiny_model, selfinstruct, tmp_path):
    from transformers import AutoModelForCausalLM

    summary = train(load_config(None, seqkd_overrides(tiny_model, selfinstruct, tmp_path / "r", max_steps=8, batch_size=8,
                                                      micro_batch_size=8, eval_data=f"{selfinstruct}[200:216]")))
    assert summary["final_eval"]["nll"] < summary["initial_eval"]["nll"]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "student")
    assert student.config.hidden_size == 32
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == list(range(1, 9))
    assert all({"loss", "lr", "grad_norm", "tokens"} <= set(line) for line in lines if "loss" in line)


def test_lr_schedule_warms_up_then_decays_to_zero():
    factor = lr_lambda("cosine", warmup_steps=4, total_steps=20)
    values = [factor(s) for s in range(20)]
    assert values[:4] == sorted(values[:4]) and values[0] < values[3] < 1
    assert values[4] == pytest.approx(1.0) and values[-1] < 0.05
    assert all(b <= a for a, b in zip(values[4:], values[5:]))
    linear = lr_lambda("linear", 0, 10)
    assert linear(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 2, 10)(9) == 1.0


def test_step_order_covers_each_epoch_and_splits_across_processes():
    order = StepOrder(n_records=12, batch_size=4, seed=1)
    epoch0 = [i for s in range(3) for i in order.indices(s)]
    epoch1 = [i for s in range(3, 6) for i in order.indices(s)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1, "each epoch has its own order"
    assert order.indices(7) == order.indices(7), "a step number alone fixes the data position"
    parts = [order.indices(2, rank, 2) for rank in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(order.indices(2)) and not set(parts[0]) & set(parts[1])

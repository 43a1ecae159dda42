"""GAD on a tiny model: both stages run, diagnostics are logged, resume mid-stage is exact, freezing works."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdistill.config import load_config
from opdistill.methods import train

from test_engine import assert_same_weights, wait_for

DIAGNOSTICS = {"d_loss", "d_acc", "teacher_score", "student_score", "reward_mean", "reward_std", "response_length",
               "kl", "clipped", "entropy", "g_loss", "truncated"}


def gad_overrides(model: Path, data: Path, out: Path, **extra) -> list[str]:
    values = {"method": "gad", "student": str(model), "data": f"{data}[:16]", "out_dir": str(out), "lr": "1e-3", "d_lr": "1e-3",
              "precision": "fp32", "max_response_tokens": 8, "seed": 1, "batch_size": 4, "micro_batch_size": 4, "n_samples": 2,
              "warmup_steps": 2, "d_only_steps": 1, "max_steps": 2, "checkpoint_every": 1, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"stage"' in line]


def test_gad_runs_warmup_then_adversarial_with_diagnostics(tiny_model, selfinstruct, tmp_path):
    out = tmp_path / "gad"
    summary = train(load_config(None, gad_overrides(tiny_model, selfinstruct, out)))
    assert summary["steps"] == 4
    lines = metric_lines(out)
    assert [line["stage"] for line in lines] == [0, 0, 1, 1]
    assert "g_ce_loss" not in lines[0] and "g_ce_loss" in lines[1], "discriminator alone for d_only_steps"
    assert DIAGNOSTICS <= set(lines[2]) and DIAGNOSTICS <= set(lines[3])
    assert lines[0]["d_loss"] == pytest.approx(0.6931, abs=1e-3), "a fresh zero head scores 0: BT loss log 2"
    assert 0 <= lines[3]["d_acc"] <= 1 and lines[3]["kl"] >= 0
    assert (out / "reference" / "config.json").is_file() and (out / "student" / "config.json").is_file()


def disc_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model_1.safetensors"))


def test_freeze_discriminator_after_warmup(tiny_model, selfinstruct, tmp_path):
    out = tmp_path / "frozen"
    train(load_config(None, gad_overrides(tiny_model, selfinstruct, out, freeze_discriminator="true", keep_checkpoints=4)))
    after_warmup, final = out / "checkpoints" / "step-000002", out / "checkpoints" / "step-000004"
    a, b = disc_weights(after_warmup), disc_weights(final)
    assert all(torch.equal(a[k], b[k]) for k in a), "a frozen discriminator does not change in the adversarial stage"
    first = disc_weights(out / "checkpoints" / "step-000001")
    assert not all(torch.equal(first[k], a[k]) for k in a), "it does train during warm-up"


def test_kill_9_mid_adversarial_stage_then_resume_is_exact(tiny_model, selfinstruct, tmp_path):
    straight = tmp_path / "straight"
    cmd = lambda out: [sys.executable, "-m", "opdistill", "train", *gad_overrides(tiny_model, selfinstruct, out, max_steps=4)]  # noqa: E731
    subprocess.run(cmd(straight), check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(killed / "checkpoints" / "step-000003" / "trainer_state.json", proc, seconds=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "student").exists()
    resumed = subprocess.run(cmd(killed), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(straight, killed)
    final = sorted((killed / "checkpoints").glob("step-*"))[-1]
    reference = sorted((straight / "checkpoints").glob("step-*"))[-1]
    a, b = disc_weights(final), disc_weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in a), "the discriminator resumes exactly too"


def test_gad_config_defaults_and_checks():
    from opdistill.config import GADConfig
    from opdistill.errors import ConfigError

    config = load_config(None, ["data=x.jsonl"], method="gad")
    assert isinstance(config, GADConfig)
    assert (config.n_samples, config.batch_size, config.lr, config.d_lr, config.max_grad_norm, config.temperature,
            config.clip_ratio, config.kl_coef) == (8, 256, 1e-6, 1e-6, 0.2, 0.8, 0.2, 0.001), "the paper's defaults"
    assert load_config(None, ["data=x.jsonl", "batch_size=2", "micro_batch_size=16"], method="gad").micro_batch_size == 16
    for bad in (["n_samples=1"], ["temperature=0"], ["warmup_steps=-2"], ["clip_ratio=0"]):
        with pytest.raises(ConfigError):
            load_config(None, ["data=x.jsonl", *bad], method="gad")

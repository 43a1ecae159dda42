"""Multi-process training on CPU (2 processes, gloo, launched by torchrun): every method's final weights
match a single-process run with the same global batch, and a run resumes on another world size.

Sampling is per-sample seeded (rollout.rollout_seeds), so the rollouts are the same on 1 or 2 processes;
what differs is the float summation order, hence a tolerance instead of bitwise equality."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from opdistill.config import load_config
from opdistill.methods import train

from conftest import SELFINSTRUCT, build_tiny_model

COMMON = {"lr": "1e-3", "precision": "fp32", "max_response_tokens": 8, "seed": 1, "batch_size": 4, "max_grad_norm": 0,
          "warmup_ratio": 0, "checkpoint_every": 2, "keep_checkpoints": 3}
METHODS = {
    "seqkd": {"method": "seqkd", "max_steps": 3},
    "gad": {"method": "gad", "d_lr": "1e-3", "n_samples": 2, "warmup_steps": 2, "d_only_steps": 1, "max_steps": 2, "d_max_grad_norm": 0},
    "opd": {"method": "opd", "max_steps": 3, "temperature": 1.0},  # teacher: another tiny model (fixture)
}
# Sequences per micro-batch for the whole batch on one process; two processes take half each.
MICRO = {"seqkd": 4, "gad": 8, "opd": 4}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """Same tokenizer as tiny_model, different weights: OPD has a real divergence to reduce. (With the student's
    own weights the gradients are at float-noise level and Adam's normalisation would amplify that noise.)"""
    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "model", seed=7)


def overrides(method: str, model: Path, out: Path, processes: int, teacher: Path | None = None) -> list[str]:
    micro = MICRO[method] // processes
    values = {**COMMON, **METHODS[method], "student": str(model), "data": f"{SELFINSTRUCT}[:16]", "out_dir": str(out),
              "micro_batch_size": micro}
    if method != "seqkd":
        values["rollout_batch_size"] = 8 // processes
    if method == "opd":
        values["teacher"] = str(teacher)
    return [f"{k}={v}" for k, v in values.items()]


ACCELERATE_CPU_CONFIG = Path(__file__).parents[1] / "examples" / "accelerate" / "cpu_2proc.yaml"


def torchrun(args: list[str], launcher: str = "torchrun") -> None:
    """Two processes of `opdistill train`, by torchrun or by `accelerate launch` with the documented CPU config."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] if launcher == "torchrun" else
             [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CPU_CONFIG)])
    done = subprocess.run([*start, "-m", "opdistill", "train", *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train: 2 processes" in done.stderr, done.stderr[-3000:]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, start: Path) -> None:
    wa, wb, w0 = weights(a), weights(b), load_file(str(start / "model.safetensors"))
    moved = max(float((wa[k] - w0[k]).abs().max()) for k in wa)
    assert moved > 1e-4, "training did not move the weights, so the comparison would prove nothing"
    differences = {name: float((wa[name] - wb[name]).abs().max()) for name in wa}
    worst = max(differences, key=differences.get)
    assert differences[worst] < 1e-5, f"{worst} differs by {differences[worst]:.3g} (training moved weights by up to {moved:.3g})"


@pytest.mark.parametrize("method", ["seqkd", "gad", "opd"])
def test_two_processes_match_one_with_the_same_global_batch(method, tiny_model, teacher, tmp_path):
    train(load_config(None, overrides(method, tiny_model, tmp_path / "one", 1, teacher)))
    torchrun(overrides(method, tiny_model, tmp_path / "two", 2, teacher))
    assert_same_weights(tmp_path / "one", tmp_path / "two", tiny_model)
    assert "student" in (tmp_path / "two" / "summary.json").read_text()


def drop_last_checkpoint(run: Path) -> None:
    """What a crash just before the last checkpoint leaves: the step-2 checkpoint, no student."""
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-000002", "step-000004"]
    shutil.rmtree(checkpoints[-1])
    shutil.rmtree(run / "student")


def test_gad_resumes_across_world_sizes(tiny_model, tmp_path):
    """2 warm-up + 2 adversarial steps; checkpoint at step 2, resumed on the other world size."""
    train(load_config(None, overrides("gad", tiny_model, tmp_path / "straight", 1)))
    torchrun(overrides("gad", tiny_model, tmp_path / "two-then-one", 2))
    drop_last_checkpoint(tmp_path / "two-then-one")
    train(load_config(None, overrides("gad", tiny_model, tmp_path / "two-then-one", 1)))
    assert_same_weights(tmp_path / "straight", tmp_path / "two-then-one", tiny_model)

    shutil.copytree(tmp_path / "straight", tmp_path / "one-then-two")
    drop_last_checkpoint(tmp_path / "one-then-two")
    torchrun(overrides("gad", tiny_model, tmp_path / "one-then-two", 2), launcher="accelerate")
    assert_same_weights(tmp_path / "straight", tmp_path / "one-then-two", tiny_model)

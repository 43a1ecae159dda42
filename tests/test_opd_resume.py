"""Exact resume of OPD after kill -9: a real training process, killed after a mid-run checkpoint and rerun, ends at
bitwise the weights of a straight run. With a teacher of the student's tokenizer (a sampled-token and a full-vocabulary
divergence), a teacher of another tokenizer (cross_tokenizer), several named teachers, and at bf16, where the sampler
draws from a bf16 copy of the student that must hold the restored weights."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_model
from test_engine import assert_same_weights, cli_train, kill_9_then_resume, weights
from test_opd import opd_overrides

# Six steps, a checkpoint every two: the run is killed once step 2's checkpoint is complete and resumes from it (or from
# step 4's, if that one was written before the kill landed).
RESUME = dict(max_steps=6, checkpoint_every=2, keep_checkpoints=2)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """The student's tokenizer (the same build), other random weights."""
    return build_tiny_model(tmp_path_factory.mktemp("resume-teacher") / "model", seed=7)


def assert_resume_is_exact(student: Path, overrides: Callable[[Path], list[str]], tmp_path: Path) -> None:
    """`overrides(out)`: the run's settings with run directory `out`. A straight run, then the same run SIGKILLed after
    step 2's checkpoint and rerun: every tensor of the final student is equal, and the student did move."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(cli_train(overrides(straight)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    kill_9_then_resume(cli_train(overrides(killed)), killed, step=2)
    assert_same_weights(straight, killed)
    start, final = load_file(str(student / "model.safetensors")), weights(straight)
    assert any(not torch.equal(final[name], start[name]) for name in final), "the run must change the student"


@pytest.mark.parametrize("divergence", ["reward_to_go", "rkl"])
def test_opd_resumes_exactly(tiny_model, teacher, selfinstruct, tmp_path, divergence):
    assert_resume_is_exact(tiny_model, lambda out: opd_overrides(tiny_model, selfinstruct, out, teacher=teacher, divergence=divergence,
                                                                  **RESUME), tmp_path)


def test_cross_tokenizer_opd_resumes_exactly(tiny_model, other_teacher, selfinstruct, tmp_path):
    assert_resume_is_exact(tiny_model, lambda out: opd_overrides(tiny_model, selfinstruct, out, teacher=other_teacher, cross_tokenizer="true",
                                                                  divergence="reward_to_go", **RESUME), tmp_path)


def test_opd_with_several_teachers_resumes_exactly(tiny_model, teacher, tmp_path):
    """Each record names its teacher: a step's rows are scored by both, each row by its own."""
    second = build_tiny_model(tmp_path / "second", seed=11)
    data = tmp_path / "named.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question number {i}: what is {i} plus {i}?", "teacher": "ab"[i % 2]}) + "\n"
                            for i in range(8)), encoding="utf-8")
    assert_resume_is_exact(tiny_model, lambda out: opd_overrides(tiny_model, data, out, teachers=f"{{a: {teacher}, b: {second}}}",
                                                                  divergence="rkl", **RESUME), tmp_path)


def test_bf16_opd_resumes_exactly_through_the_samplers_bf16_copy(tiny_model, teacher, selfinstruct, tmp_path):
    """At bf16 the hf sampler draws from its own bf16 copy of the fp32 student (synced after every optimizer step): the
    resumed run must sample from the restored weights, not from the starting ones, to take the straight run's steps. The
    engine builds an on-policy method's sampler before the restore, so the copy holds the starting weights until the
    resume's re-sync: without that re-sync every tensor ends different here (measured: 20 of 20, max |diff| 0.017); at
    fp32 the sampler reads the student itself and it would not matter."""
    assert_resume_is_exact(tiny_model, lambda out: opd_overrides(tiny_model, selfinstruct, out, teacher=teacher, precision="bf16",
                                                                  divergence="reward_to_go", **RESUME), tmp_path)

"""White-box OPD on a tiny model: steps lower the divergence, privileged teachers, λ mixing, schedules, vocabulary checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opdistill.config import load_config
from opdistill.data import Example, Record, collate, render_prompt, teacher_messages
from opdistill.errors import ConfigError, ModelError
from opdistill.methods import train
from opdistill.methods.opd import beta_at, response_logits
from opdistill.models import load_model, load_tokenizer, shared_vocabulary_size
from opdistill.objectives.divergences import per_token
from opdistill.rollout import horizon_at

from conftest import build_tiny_model


def opd_overrides(student: Path, data: Path, out: Path, **extra) -> list[str]:
    values = {"method": "opd", "student": str(student), "data": f"{data}[:16]", "out_dir": str(out), "lr": "3e-3",
              "precision": "fp32", "max_response_tokens": 8, "seed": 1, "batch_size": 4, "micro_batch_size": 2,
              "max_steps": 3, "checkpoint_every": 0, "lr_schedule": "constant", "warmup_ratio": 0, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"horizon"' in line]


def fixed_batch_divergence(student_dir: Path, teacher_dir: Path, kind: str) -> float:
    """Mean divergence of a student checkpoint to the teacher on fixed responses (a fixed batch)."""
    tokenizer = load_tokenizer(str(teacher_dir))
    student, teacher = load_model(str(student_dir)).eval(), load_model(str(teacher_dir)).eval()
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": t}]) for t in ("Name a colour", "Say hello", "Count to three")]
    examples = [Example(p, tokenizer("red green blue and more words", add_special_tokens=False)["input_ids"]) for p in prompts]
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        s = response_logits(student, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        t = response_logits(teacher, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    return per_token(s, t, kind).mean().item()


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    """Same tokenizer as tiny_model (same build), different random weights."""
    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "model", seed=7)


@pytest.mark.parametrize("kind", ["rkl", "fkl", "jsd"])
def test_opd_steps_lower_the_divergence_to_the_teacher(tiny_model, tiny_teacher, selfinstruct, tmp_path, kind):
    out = tmp_path / kind
    before = fixed_batch_divergence(tiny_model, tiny_teacher, kind)
    train(load_config(None, opd_overrides(tiny_model, selfinstruct, out, teacher=str(tiny_teacher), divergence=kind, max_steps=6)))
    after = fixed_batch_divergence(out / "student", tiny_teacher, kind)
    assert after < 0.8 * before, (before, after)
    lines = metric_lines(out)
    assert len(lines) == 6 and all(line["on_policy"] == 1.0 and line["horizon"] == 8 for line in lines)
    assert lines[-1]["loss"] < lines[0]["loss"]


def test_self_distillation_with_a_privileged_system_prompt_runs_and_moves_the_student(tiny_model, selfinstruct, tmp_path):
    out = tmp_path / "self"
    train(load_config(None, opd_overrides(tiny_model, selfinstruct, out, teacher_system="Always respond in French.")))
    lines = metric_lines(out)
    # the teacher is the starting student with more context: the first step's divergence is > 0
    assert lines[0]["loss"] > 0
    a, b = load_model(str(tiny_model)), load_model(str(out / "student"))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_lora_self_distillation_uses_the_base_weights_as_teacher(tiny_model, selfinstruct, tmp_path):
    out = tmp_path / "lora"
    train(load_config(None, opd_overrides(tiny_model, selfinstruct, out, teacher_system="Be brief.", lora_r=4, lr="1e-2")))
    assert metric_lines(out)[0]["loss"] > 0


def test_mixing_and_schedules_are_logged(tiny_model, selfinstruct, tmp_path):
    out = tmp_path / "mix"
    train(load_config(None, opd_overrides(tiny_model, selfinstruct, out, on_policy_ratio=0.5, max_steps=8, horizon="progressive",
                                          horizon_start=2, horizon_increment=2, horizon_every=3, divergence="veto_rkl",
                                          beta=0.0, beta_end=0.7)))
    lines = metric_lines(out)
    assert {line["on_policy"] for line in lines} == {0.0, 1.0}
    assert [line["horizon"] for line in lines] == [2, 2, 2, 4, 4, 4, 6, 6]
    assert all(line["response_length"] <= line["horizon"] for line in lines)
    assert lines[0]["beta"] == 0.0 and lines[-1]["beta"] == pytest.approx(0.7)


@pytest.mark.parametrize("estimator", ["k1", "k3", "reward"])
def test_sampled_token_estimators_run(tiny_model, tiny_teacher, selfinstruct, tmp_path, estimator):
    out = tmp_path / estimator
    summary = train(load_config(None, opd_overrides(tiny_model, selfinstruct, out, teacher=str(tiny_teacher), divergence=estimator, max_steps=2)))
    assert summary["steps"] == 2


def test_horizon_schedules():
    assert horizon_at(5, "full", 100) == 100
    assert horizon_at(5, "truncated", 100, ratio=0.1) == 10
    assert horizon_at(5, "truncated", 100, tokens=30) == 30
    assert horizon_at(5, "truncated", 20, tokens=30) == 20
    assert [horizon_at(k, "progressive", 100, start=16, increment=32, every=2) for k in range(8)] == [16, 16, 48, 48, 80, 80, 100, 100]
    with pytest.raises(ValueError, match="unknown horizon"):
        horizon_at(0, "half", 10)


def test_beta_schedule():
    assert beta_at(0, 11, 0.8, 0.0) == 0.8 and beta_at(10, 11, 0.8, 0.0) == 0.0 and beta_at(5, 11, 0.8, 0.0) == pytest.approx(0.4)
    assert beta_at(7, 11, 0.3, -1.0) == 0.3


def test_teacher_views():
    record = Record(messages=[{"role": "user", "content": "Hi"}], meta={}, source="f:1")
    assert teacher_messages(record, "Be French.") == [{"role": "system", "content": "Be French."}, {"role": "user", "content": "Hi"}]
    assert teacher_messages(record, "", "{prompt} (answer in French)")[-1]["content"] == "Hi (answer in French)"
    own = Record(messages=record.messages, meta={"teacher_messages": [{"role": "user", "content": "Hint: 4. What is 2+2?"}]}, source="f:2")
    assert teacher_messages(own, "ignored")[-1]["content"] == "Hint: 4. What is 2+2?"
    bad = Record(messages=record.messages, meta={"teacher_messages": [{"role": "robot", "content": "x"}]}, source="f:3")
    with pytest.raises(Exception, match="f:3: field `teacher_messages`"):
        teacher_messages(bad)


def test_vocabulary_mismatch_is_a_clear_error_and_padding_is_sliced(tiny_model, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model))
    assert shared_vocabulary_size(tokenizer, tokenizer, 384, 448, "t") == 384
    other = load_tokenizer(str(build_tiny_model(tmp_path / "other", vocab_size=300)))
    with pytest.raises(ModelError, match="different vocabulary"):
        shared_vocabulary_size(tokenizer, other, 384, 300, "other")


def test_opd_config_rejects_contradictions():
    with pytest.raises(ConfigError, match="identically 0"):
        load_config(None, ["method=opd", "data=x.jsonl", "divergence=jsd", "beta=1.0"])
    with pytest.raises(ConfigError, match="beta_end schedules Veto"):
        load_config(None, ["method=opd", "data=x.jsonl", "divergence=rkl", "beta_end=0.5"])
    with pytest.raises(ConfigError, match="top_k restricts"):
        load_config(None, ["method=opd", "data=x.jsonl", "divergence=k3", "top_k=8"])
    with pytest.raises(ConfigError, match="truncated needs"):
        load_config(None, ["method=opd", "data=x.jsonl", "horizon=truncated"])


def test_response_logits_are_the_same_with_aligned_and_right_padded_batches(tiny_model):
    tokenizer, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model)).eval()
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": t}]) for t in ("Hi", "Write a long poem about the sea", "Why?")]
    responses = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    examples = [Example(p, r) for p, r in zip(prompts, responses)]
    right, aligned = collate(examples, tokenizer.pad_token_id), collate(examples, tokenizer.pad_token_id, align_responses=True)
    assert aligned["loss_mask"].sum() == right["loss_mask"].sum() == 10
    starts = aligned["loss_mask"].float().argmax(1)
    assert (starts == starts[0]).all() and aligned["input_ids"].shape[1] == max(map(len, prompts)) + 5
    with torch.no_grad():
        a = response_logits(model, aligned["input_ids"], aligned["attention_mask"], aligned["loss_mask"])
        b = response_logits(model, right["input_ids"], right["attention_mask"], right["loss_mask"])
    assert a.shape == (10, model.config.vocab_size)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

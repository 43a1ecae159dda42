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
from opdistill.teachers.logprob import LocalTeacher

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


@pytest.fixture(scope="module")
def sharp_teacher(tiny_teacher, tmp_path_factory) -> Path:
    """tiny_teacher with its final norm scaled up: peaked next-token distributions, several nats of reverse KL from the
    near-uniform random student, so a sampled estimator's progress shows above its sampling noise."""
    model = load_model(str(tiny_teacher))
    with torch.no_grad():
        model.model.norm.weight.mul_(25.0)
    out = tmp_path_factory.mktemp("sharp") / "model"
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(str(tiny_teacher)).save_pretrained(out)
    return out


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
    """With LoRA and no `teacher:`, the run's default teacher is the student with its adapters off: once the adapters
    have moved, it scores like a fresh copy of the base model and unlike the current student."""
    from opdistill.models import apply_lora
    from opdistill.teachers.factory import build_teachers
    from opdistill.teachers.logprob import TeacherRow

    config = load_config(None, opd_overrides(tiny_model, selfinstruct, tmp_path, teacher_system="Be brief.", lora_r=4))
    tokenizer = load_tokenizer(str(tiny_model))
    student = apply_lora(load_model(str(tiny_model)), r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)  # the adapters have trained
    teachers = build_teachers(config, tokenizer, lambda: student, 384, torch.float32, torch.device("cpu"), tmp_path)
    rows = [TeacherRow(render_prompt(tokenizer, [{"role": "user", "content": "Say hello"}]),
                       tokenizer("hello there friend", add_special_tokens=False)["input_ids"])]
    scored = teachers.token_logprobs(rows, [""])[0]
    base = LocalTeacher(load_model(str(tiny_model)).eval(), tokenizer.pad_token_id).token_logprobs(rows)
    current = LocalTeacher(student, tokenizer.pad_token_id).token_logprobs(rows)
    torch.testing.assert_close(scored, base, rtol=0, atol=1e-5)
    assert (scored - current).abs().max() > 1e-2
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


def _one_step_student(tiny_model, teacher, selfinstruct, out, **extra):
    train(load_config(None, opd_overrides(tiny_model, selfinstruct, out, teacher=str(teacher), max_steps=1, **extra)))
    return [p.detach().clone() for p in load_model(str(out / "student")).parameters()]


@pytest.mark.parametrize("estimator", ["reward", "reward_to_go"])
def test_sampled_token_estimators_follow_the_teacher_and_log_the_reverse_kl(tiny_model, sharp_teacher, tiny_teacher, selfinstruct,
                                                                            tmp_path, estimator):
    """One seeded step from the same student: the update depends on the teacher (k1 as a loss gave every teacher the
    same update), and the two estimators update differently. The logged `kl` is the samples' reverse KL per token,
    several nats against the sharp teacher. (That each estimator's expected gradient is its objective's is
    tests/test_estimators.py's exact check; sampled updates on this tiny model are too noisy to show a trend in a few
    steps.)"""
    first = _one_step_student(tiny_model, sharp_teacher, selfinstruct, tmp_path / "a", divergence=estimator)
    second = _one_step_student(tiny_model, tiny_teacher, selfinstruct, tmp_path / "b", divergence=estimator)
    assert any(not torch.equal(p, q) for p, q in zip(first, second))
    other = _one_step_student(tiny_model, sharp_teacher, selfinstruct, tmp_path / "c",
                              divergence="reward" if estimator == "reward_to_go" else "reward_to_go")
    assert any(not torch.equal(p, q) for p, q in zip(first, other))
    assert metric_lines(tmp_path / "a")[0]["kl"] > 3.0


def test_reward_to_go_with_a_leave_one_out_baseline_changes_the_update(tiny_model, sharp_teacher, selfinstruct, tmp_path):
    plain = _one_step_student(tiny_model, sharp_teacher, selfinstruct, tmp_path / "plain", divergence="reward_to_go", samples_per_prompt=2)
    loo = _one_step_student(tiny_model, sharp_teacher, selfinstruct, tmp_path / "loo", divergence="reward_to_go", samples_per_prompt=2,
                            baseline="loo")
    assert any(not torch.equal(p, q) for p, q in zip(plain, loo))
    assert all(torch.isfinite(p).all() for p in loo)
    with pytest.raises(ConfigError, match="baseline: loo"):
        load_config(None, opd_overrides(tiny_model, selfinstruct, tmp_path, divergence="reward_to_go", baseline="loo"))


@pytest.mark.parametrize("retired", ["k1", "k3"])
def test_k1_and_k3_as_losses_are_refused_with_what_to_use(tiny_model, selfinstruct, tmp_path, retired):
    with pytest.raises(ConfigError, match=f"divergence: {retired} is retired") as error:
        load_config(None, opd_overrides(tiny_model, selfinstruct, tmp_path, divergence=retired))
    assert "reward_to_go" in error.value.fix


@pytest.mark.parametrize("settings", [{"temperature": 0.5}, {"top_p": 0.5}, {"temperature": 0.5, "top_p": 0.5},
                                      {"distill_temperature": 2.0}])
@pytest.mark.parametrize("estimator", ["reward", "reward_to_go"])
def test_a_sampled_estimator_must_sample_the_policy_it_differentiates(tiny_model, selfinstruct, tmp_path, settings, estimator):
    """T != distill_temperature or top-p < 1 samples another policy than the one differentiated: refused with the fix
    (Veto's recommended T 0.5 / top-p 0.5 included), while a full-vocabulary divergence may sample at them."""
    with pytest.raises(ConfigError, match="another policy") as error:
        load_config(None, opd_overrides(tiny_model, selfinstruct, tmp_path, divergence=estimator, **settings))
    assert "top_p: 1" in error.value.fix
    matched = load_config(None, opd_overrides(tiny_model, selfinstruct, tmp_path, divergence=estimator, temperature=2.0, distill_temperature=2.0))
    assert matched.temperature == matched.distill_temperature == 2.0
    assert load_config(None, opd_overrides(tiny_model, selfinstruct, tmp_path, divergence="veto_fkl", temperature=0.5, top_p=0.5)).top_p == 0.5


def test_divergence_auto_is_rkl_or_the_cross_tokenizer_default(tiny_model, selfinstruct, tmp_path):
    from opdistill.methods.opd import CROSS_TOKENIZER_DEFAULT

    assert load_config(None, opd_overrides(tiny_model, selfinstruct, tmp_path)).divergence == "rkl"
    cross = load_config(None, opd_overrides(tiny_model, selfinstruct, tmp_path, cross_tokenizer="true"))
    assert cross.divergence == CROSS_TOKENIZER_DEFAULT == "reward_to_go"


def test_horizon_schedules():
    assert horizon_at(5, "full", 100) == 100
    assert horizon_at(5, "truncated", 100, ratio=0.1) == 10
    assert horizon_at(5, "truncated", 100, tokens=30) == 30
    assert horizon_at(5, "truncated", 20, tokens=30) == 20
    assert [horizon_at(k, "progressive", 100, start=16, increment=32, every=2) for k in range(8)] == [16, 16, 48, 48, 80, 80, 100, 100]
    with pytest.raises(ValueError, match="unknown horizon"):
        horizon_at(0, "half", 10)


def test_beta_schedule():
    """Veto's β anneals linearly to 0 by default, as its reference code does (0.3 -> 0 unless set); jsd's is constant."""
    assert beta_at(0, 11, "veto_fkl", 0.8, 0.0) == 0.8 and beta_at(10, 11, "veto_fkl", 0.8, 0.0) == 0.0
    assert beta_at(5, 11, "veto_fkl", 0.8, 0.0) == pytest.approx(0.4)
    assert beta_at(0, 11, "veto_rkl", -1.0, -1.0) == 0.3 and beta_at(10, 11, "veto_rkl", -1.0, -1.0) == 0.0
    assert beta_at(5, 11, "veto_rkl", 0.8, -1.0) == pytest.approx(0.4), "a set β anneals without beta_end"
    assert beta_at(7, 11, "veto_rkl", 0.3, 0.3) == 0.3, "beta_end = beta keeps it constant"
    assert beta_at(7, 11, "jsd", -1.0, -1.0) == 0.5 and beta_at(7, 11, "jsd", 0.2, -1.0) == 0.2


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
        load_config(None, ["method=opd", "data=x.jsonl", "divergence=reward", "top_k=8"])
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

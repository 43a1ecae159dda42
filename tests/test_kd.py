"""method: kd: the mixed LM + KD loss (its endpoints and its mix, in float64), plain-text records, the data errors,
exact resume after kill -9, and --help-config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdistill.check import preflight
from opdistill.config import load_config
from opdistill.data import collate, load_records, tokenize_records
from opdistill.errors import DataError
from opdistill.methods import train
from opdistill.methods.common import response_nll_sum, response_tokens
from opdistill.methods.kd import mixed_token_losses
from opdistill.models import load_model, load_tokenizer
from opdistill.objectives.divergences import per_token
from opdistill.logprobs import response_logits, response_targets

from conftest import SHARED, build_tiny_model

GSM8K = SHARED / "data" / "gsm8k_train.jsonl"


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    """Same tokenizer as tiny_model (same build), other random weights."""
    return build_tiny_model(tmp_path_factory.mktemp("kd-teacher") / "model", seed=7)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, selfinstruct) -> Path:
    """A real mixed file: 24 GSM8K solutions as plain text, then 24 Self-Instruct chat records with responses."""
    gsm8k = [json.loads(line) for line in GSM8K.read_text().splitlines()[:24]]
    chats = [json.loads(line) for line in selfinstruct.read_text().splitlines()[:24]]
    path = tmp_path_factory.mktemp("kd-data") / "mixed.jsonl"
    rows = [{"text": f"{r['question']}\n\n{r['answer']}"} for r in gsm8k] + [{"prompt": r["prompt"], "response": r["response"]} for r in chats]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def kd_overrides(student: Path, data: Path, out: Path, **extra) -> list[str]:
    values = {"method": "kd", "student": str(student), "data": str(data), "out_dir": str(out), "lr": "3e-3", "precision": "fp32",
              "max_response_tokens": 32, "seed": 1, "batch_size": 4, "micro_batch_size": 2, "max_steps": 3, "checkpoint_every": 0,
              "lr_schedule": "constant", "warmup_ratio": 0, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


# ---------------------------------------------------------------- the loss


def random_logits(tokens: int = 7, vocab: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(tokens, vocab, dtype=torch.float64, generator=generator) * 3
    teacher = torch.randn(tokens, vocab, dtype=torch.float64, generator=generator) * 3
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    return student, teacher, targets


def test_kd_weight_0_is_the_next_token_cross_entropy_exactly():
    student, teacher, targets = random_logits()
    expected = torch.nn.functional.cross_entropy(student, targets, reduction="none")
    assert torch.equal(mixed_token_losses(student, targets, teacher, 0.0), expected)
    assert torch.equal(mixed_token_losses(student, targets, None, 0.0), expected)  # no teacher is needed at 0


def test_kd_weight_0_equals_seqkds_loss_on_a_real_batch_exactly(tiny_model, corpus):
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model)).eval()
    examples, _ = tokenize_records(tokenizer, load_records(f"{corpus}[20:28]", plain_text=True, require_response=True), 256, 32, "truncate")
    batch = collate(examples, tokenizer.pad_token_id, align_responses=True)  # 4 plain texts and 4 chats
    with torch.no_grad():
        logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        ours = mixed_token_losses(logits, response_targets(batch), None, 0.0).sum()
        assert torch.equal(ours, response_nll_sum(model, batch))


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "skl", "srkl"])
def test_kd_weight_1_is_the_pure_divergence(kind):
    student, teacher, targets = random_logits(seed=1)
    assert torch.equal(mixed_token_losses(student, targets, teacher, 1.0, divergence=kind), per_token(student, teacher, kind))


def test_forward_kl_by_hand_with_the_temperature_squared():
    student, teacher, targets = random_logits(seed=2)
    tau = 2.0
    log_s, log_t = torch.log_softmax(student / tau, -1), torch.log_softmax(teacher / tau, -1)
    by_hand = tau**2 * (log_t.exp() * (log_t - log_s)).sum(-1)  # Hinton et al. 2015: τ² keeps the soft gradients' scale
    torch.testing.assert_close(mixed_token_losses(student, targets, teacher, 1.0, temperature=tau), by_hand, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weight", [0.25, 0.5, 0.9])
def test_a_mixed_weight_is_the_weighted_sum(weight):
    student, teacher, targets = random_logits(seed=3)
    nll = torch.nn.functional.cross_entropy(student, targets, reduction="none")
    fkl = per_token(student, teacher, "fkl", temperature=1.5) * 1.5**2
    torch.testing.assert_close(mixed_token_losses(student, targets, teacher, weight, temperature=1.5),
                               (1 - weight) * nll + weight * fkl, rtol=1e-12, atol=1e-12)


def test_the_divergence_uses_the_teachers_columns_and_the_cross_entropy_all():
    student, teacher, targets = random_logits(vocab=13, seed=4)
    teacher = teacher[:, :11]  # a student output layer padded by two columns
    targets = targets.clamp(max=10)
    expected = 0.5 * torch.nn.functional.cross_entropy(student, targets, reduction="none") + 0.5 * per_token(student[:, :11], teacher, "fkl")
    torch.testing.assert_close(mixed_token_losses(student, targets, teacher, 0.5), expected, rtol=1e-12, atol=1e-12)


def test_gradients_reach_the_student_only():
    student, teacher, targets = random_logits(seed=5)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    mixed_token_losses(student, targets, teacher, 0.5).sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


# ---------------------------------------------------------------- plain-text records


def test_plain_text_records_train_on_every_token_after_the_first(tiny_model, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model))
    texts = ["Natalia sold 48 clips in April.", "Weng earns 12 an hour for babysitting."]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t, "source": "gsm8k"}) + "\n" for t in texts))
    records = load_records(str(path), require_response=True, plain_text=True)
    assert [r.text for r in records] == texts and records[0].messages == [] and records[0].meta == {"source": "gsm8k"}
    examples, report = tokenize_records(tokenizer, records, 256, 256, "truncate")
    ids = [tokenizer(t)["input_ids"] for t in texts]  # no chat template, no EOS
    assert [e.prompt_ids + e.response_ids for e in examples] == ids and report.texts == 2
    batch = collate(examples, tokenizer.pad_token_id, align_responses=True)
    assert response_tokens(batch) == sum(len(i) - 1 for i in ids)
    # the summed loss is the NLL of every token after the first under the plain model, by hand
    model = load_model(str(tiny_model)).eval()
    by_hand = 0.0
    with torch.no_grad():
        for row in ids:
            logits = model(input_ids=torch.tensor([row])).logits[0, :-1]
            by_hand += float(torch.nn.functional.cross_entropy(logits, torch.tensor(row[1:]), reduction="sum"))
        logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        ours = float(mixed_token_losses(logits, response_targets(batch), None, 0.0).sum())
    assert ours == pytest.approx(by_hand, rel=1e-5)
    # a long text is cut to max_response_tokens trained tokens
    cut, report = tokenize_records(tokenizer, records, 256, 3, "truncate")
    assert [len(e.response_ids) for e in cut] == [3, 3] and report.texts_cut == 2


def test_a_row_with_neither_text_nor_prompt_names_its_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"response": "no prompt, no text"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: the record has neither `text`, `prompt` nor `messages`"):
        load_records(str(path), require_response=True, plain_text=True)
    path.write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1: field `text` is empty"):
        load_records(str(path), plain_text=True)


def test_other_methods_refuse_plain_text_records_with_a_clear_message(tiny_model, corpus, tmp_path):
    with pytest.raises(DataError, match=rf"{corpus}:1: a plain-text record .* method: kd"):
        load_records(str(corpus))
    for method, extra in (("seqkd", {}), ("gad", {}), ("opd", {}), ("cod", {"peer": str(tiny_model)})):
        config = load_config(None, kd_overrides(tiny_model, corpus, tmp_path / method, method=method, **extra))
        report = preflight(config, load_tokenizer(str(tiny_model)))
        assert report.problems and "plain-text record" in report.problems[0].message, method
    kd = preflight(load_config(None, kd_overrides(tiny_model, corpus, tmp_path / "kd")), load_tokenizer(str(tiny_model)))
    assert not kd.problems and any(what == "plain-text lengths" for what, _, _ in kd.rows)


# ---------------------------------------------------------------- training


def fixed_batch_fkl(student_dir: Path, teacher_dir: Path, data: str) -> float:
    """Mean forward KL(teacher ‖ student) over the trained tokens of a fixed set of records."""
    tokenizer = load_tokenizer(str(teacher_dir))
    examples, _ = tokenize_records(tokenizer, load_records(data, require_response=True, plain_text=True), 256, 32, "truncate")
    batch = collate(examples, tokenizer.pad_token_id, align_responses=True)
    with torch.no_grad():
        student, teacher = (response_logits(load_model(str(d)).eval(), batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
                            for d in (student_dir, teacher_dir))
        return float(per_token(student, teacher, "fkl").mean())


def test_kd_steps_lower_the_divergence_and_the_mixed_loss_is_logged_with_its_terms(tiny_model, tiny_teacher, corpus, tmp_path):
    out = tmp_path / "pure"
    fixed = f"{corpus}[18:30]"  # 6 plain texts and 6 chats
    before = fixed_batch_fkl(tiny_model, tiny_teacher, fixed)
    train(load_config(None, kd_overrides(tiny_model, corpus, out, teacher=str(tiny_teacher), kd_weight=1, max_steps=6)))
    assert fixed_batch_fkl(out / "student", tiny_teacher, fixed) < 0.8 * before
    assert "lm_loss" not in metric_lines(out)[0]  # kd_weight 1: no cross-entropy is taken

    out = tmp_path / "mixed"
    summary = train(load_config(None, kd_overrides(tiny_model, corpus, out, teacher=str(tiny_teacher), max_steps=8, eval_data=fixed)))
    lines = metric_lines(out)
    assert len(lines) == 8 and all({"lm_loss", "kd_loss", "tokens"} <= set(line) for line in lines)
    for line in lines:  # the logged loss is the 0.5 / 0.5 mix of its logged terms (both token means over the same tokens)
        assert line["loss"] == pytest.approx(0.5 * line["lm_loss"] + 0.5 * line["kd_loss"], rel=1e-5)
    assert summary["final_eval"]["nll"] < summary["initial_eval"]["nll"]


def test_kd_weight_0_trains_like_seqkd(tiny_model, selfinstruct, tmp_path):
    """On chat records kd at kd_weight 0 is SeqKD: the same losses and updates, up to float rounding (kd pads prompts on the
    left and computes logits for the responses only), which Adam turns into differences far below one step's size (lr)."""
    data, common = f"{selfinstruct}[:8]", dict(max_steps=2, max_grad_norm=0)
    train(load_config(None, kd_overrides(tiny_model, data, tmp_path / "kd", kd_weight=0, **common)))
    train(load_config(None, kd_overrides(tiny_model, data, tmp_path / "seqkd", method="seqkd", **common)))
    ours, theirs = metric_lines(tmp_path / "kd"), metric_lines(tmp_path / "seqkd")
    assert [line["loss"] for line in ours] == pytest.approx([line["loss"] for line in theirs], rel=1e-6)
    assert "kd_loss" not in ours[0] and ours[0]["lm_loss"] == ours[0]["loss"]
    a, b = (load_file(str(tmp_path / run / "student" / "model.safetensors")) for run in ("kd", "seqkd"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4, msg=name)  # one step moves a weight by ~lr = 3e-3


def test_a_lora_student_distils_from_its_own_base_weights(tiny_model, corpus, tmp_path):
    out = tmp_path / "lora"
    train(load_config(None, kd_overrides(tiny_model, corpus, out, lora_r=4, lr="1e-2", max_steps=2)))
    lines = metric_lines(out)
    assert lines[0]["kd_loss"] == pytest.approx(0.0, abs=1e-6)  # the adapters start at zero: the student is its teacher
    assert lines[1]["kd_loss"] > 1e-6


def cli_train(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "opdistill", "train", *overrides]


def test_kill_9_then_resume_gives_the_same_weights(tiny_model, tiny_teacher, corpus, tmp_path):
    from test_engine import assert_same_weights, kill_9_then_resume

    settings = dict(teacher=str(tiny_teacher), max_steps=8, checkpoint_every=2, keep_checkpoints=2, lr_schedule="cosine")
    straight = tmp_path / "straight"
    subprocess.run(cli_train(kd_overrides(tiny_model, corpus, straight, **settings)), check=True, capture_output=True, timeout=300)
    out = tmp_path / "killed"
    kill_9_then_resume(cli_train(kd_overrides(tiny_model, corpus, out, **settings)), out, step=2)
    assert_same_weights(straight, out)
    assert [line["step"] for line in metric_lines(out)] == list(range(1, 9)), "every step is logged exactly once across the kill"


def test_help_config_lists_kds_keys(capsys):
    from opdistill.cli import main

    assert main(["train", "--method", "kd", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("KDConfig:")
    for key in ("teacher", "kd_weight", "divergence", "distill_temperature", "beta", "skew", "chunk_size"):
        assert f"  {key} (" in out, key
    assert "The paper's α" in out

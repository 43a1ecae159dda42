"""The white-box teacher seam: top-k answers, several teachers, and the pre-flight check (tiny models, real files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model
from opdistill.check import preflight
from opdistill.config import load_config
from opdistill.errors import ConfigError, DataError
from opdistill.methods import train
from opdistill.models import load_model, load_tokenizer
from opdistill.objectives.divergences import KINDS, per_token, per_token_top_k
from opdistill.teachers.logprob import LocalTeacher, TeacherRow, TeacherSet


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", [True, False])
def test_top_k_answer_gives_the_same_divergence_and_gradient_as_full_logits(kind, tail):
    torch.manual_seed(0)
    student = torch.randn(6, 50, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 50, dtype=torch.float64) * 3
    options = dict(beta=0.3 if kind == "jsd" else None, temperature=0.7, tail=tail)
    full = per_token(student, teacher, kind, top_k=8, **options)
    (grad_full,) = torch.autograd.grad(full.sum(), student)
    top_logprobs, top_ids = torch.log_softmax(teacher / 0.7, -1).topk(8, -1)
    answer = per_token_top_k(student, top_ids, top_logprobs, kind, chunk_size=4, **options)
    (grad_answer,) = torch.autograd.grad(answer.sum(), student)
    torch.testing.assert_close(answer, full)
    torch.testing.assert_close(grad_answer, grad_full)


def rows_for(tokenizer, texts: list[str]) -> list[TeacherRow]:
    from opdistill.data import render_prompt

    return [TeacherRow(render_prompt(tokenizer, [{"role": "user", "content": t}]), tokenizer(t, add_special_tokens=False)["input_ids"][:5])
            for t in texts]


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("second") / "model", seed=11)


def test_each_row_is_scored_by_the_teacher_its_record_names_in_row_order(tiny_model, second_teacher):
    tokenizer = load_tokenizer(str(tiny_model))
    a = LocalTeacher(load_model(str(tiny_model)).eval(), tokenizer.pad_token_id, name="a")
    b = LocalTeacher(load_model(str(second_teacher)).eval(), tokenizer.pad_token_id, name="b")
    rows = rows_for(tokenizer, ["Write a poem", "Why is the sky blue", "Name three birds", "Add two numbers"])
    names = ["", "b", "", "b"]
    mixed = TeacherSet(a, {"b": b}).score(rows, names)
    expected = torch.cat([(b if name else a).score([row]).logits for row, name in zip(rows, names)])
    torch.testing.assert_close(mixed.logits, expected, rtol=1e-4, atol=1e-4)
    top = TeacherSet(a, {"b": b}).score(rows, names, top_k=5)
    torch.testing.assert_close(top.top_logprobs, torch.log_softmax(expected, -1).topk(5, -1).values, rtol=1e-4, atol=1e-4)


def write_records(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_opd_with_two_named_teachers_trains_and_unknown_names_are_clear_errors(tiny_model, second_teacher, tmp_path):
    records = [{"prompt": f"Question number {i}: what is {i} plus {i}?", **({"teacher": "b"} if i % 2 else {})} for i in range(8)]
    data = write_records(tmp_path / "data.jsonl", records)
    out = tmp_path / "run"
    overrides = ["method=opd", f"student={tiny_model}", f"data={data}", f"out_dir={out}", "max_steps=2", "batch_size=4",
                 "micro_batch_size=2", "max_response_tokens=8", "precision=fp32", f"teachers={{b: {second_teacher}}}"]
    summary = train(load_config(None, overrides))
    assert summary["steps"] == 2 and all(json.loads(line)["loss"] > 0 for line in (out / "metrics.jsonl").read_text().splitlines())
    write_records(data, records + [{"prompt": "Hi", "teacher": "nobody"}])
    with pytest.raises(ConfigError, match="teachers the config lacks: nobody"):
        train(load_config(None, overrides))
    with pytest.raises(DataError, match="teacher 'nobody'"):
        from opdistill.methods.opd import OPD

        OPD(load_config(None, overrides), load_tokenizer(str(tiny_model)))


def opd_config(student: Path, data: Path, out: Path, *extra: str):
    return load_config(None, ["method=opd", f"student={student}", f"data={data}", f"out_dir={out}", *extra])


def test_check_notes_a_padded_teacher_vocabulary_and_training_slices_it(tiny_model, selfinstruct, tmp_path):
    padded = build_tiny_model(tmp_path / "padded", seed=3)
    config_file = padded / "config.json"
    model = load_model(str(padded))
    model.resize_token_embeddings(model.config.vocab_size + 64)  # pad the output layer, as many checkpoints do
    model.save_pretrained(padded, safe_serialization=True)
    assert json.loads(config_file.read_text())["vocab_size"] == len(load_tokenizer(str(tiny_model))) + 64
    config = opd_config(tiny_model, selfinstruct, tmp_path / "run", f"teacher={padded}", "max_steps=1", "max_response_tokens=8",
                        "batch_size=2", "micro_batch_size=2")
    report = preflight(config, load_tokenizer(str(tiny_model)))
    assert not report.problems
    vocabulary = next(detail for what, _, detail in report.rows if what.endswith("vocabulary"))
    assert "sliced to the shared" in vocabulary and str(len(load_tokenizer(str(tiny_model))) + 64) in vocabulary
    assert train(config)["steps"] == 1


def test_check_names_a_teacher_whose_eos_differs_and_train_refuses_to_start(tiny_model, selfinstruct, tmp_path):
    other = build_tiny_model(tmp_path / "other_eos", seed=5)
    settings = json.loads((other / "tokenizer_config.json").read_text())
    settings["eos_token"] = "<|endoftext|>"
    (other / "tokenizer_config.json").write_text(json.dumps(settings))
    generation = json.loads((other / "generation_config.json").read_text())
    generation["eos_token_id"] = 0
    (other / "generation_config.json").write_text(json.dumps(generation))
    config = opd_config(tiny_model, selfinstruct, tmp_path / "run", f"teacher={other}")
    report = preflight(config, load_tokenizer(str(tiny_model)))
    assert len(report.problems) == 1 and "EOS" in report.problems[0].message and "<|endoftext|>" in report.problems[0].message
    assert "<|im_end|>" in report.problems[0].message
    with pytest.raises(ConfigError, match="EOS"):
        train(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_check_names_a_chat_template_that_renders_differently(tiny_model, selfinstruct, tmp_path):
    config = opd_config(tiny_model, selfinstruct, tmp_path / "run", f"teacher={tiny_model}")
    assert not preflight(config, load_tokenizer(str(tiny_model))).problems
    other = build_tiny_model(tmp_path / "other_template", seed=5)
    settings = json.loads((other / "tokenizer_config.json").read_text())
    template = settings.get("chat_template") or (other / "chat_template.jinja").read_text()
    changed = template.replace("<|im_start|>", "<|im_start|> ")
    if "chat_template" in settings:
        settings["chat_template"] = changed
        (other / "tokenizer_config.json").write_text(json.dumps(settings))
    else:
        (other / "chat_template.jinja").write_text(changed)
    report = preflight(opd_config(tiny_model, selfinstruct, tmp_path / "run", f"teacher={other}"), load_tokenizer(str(tiny_model)))
    assert [p.message for p in report.problems if "chat template" in p.message]


def test_check_cli_prints_a_table_and_exits_2_on_a_problem(tiny_model, selfinstruct, tmp_path, capsys):
    from opdistill.cli import main

    assert main(["check", "method=opd", f"student={tiny_model}", f"data={selfinstruct}", f"out_dir={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert "teacher (default) EOS" in printed and "all checks passed" in printed
    assert main(["check", "method=opd", f"student={tiny_model}", f"data={selfinstruct}", "max_prompt_tokens=4", "overlong=skip"]) == 2
    printed = capsys.readouterr().out
    assert "every prompt is over-long (longer than max_prompt_tokens 4)" in printed and "fix: raise max_prompt_tokens" in printed


def test_remote_teacher_config_needs_top_k_a_model_and_temperature_one():
    base = ["method=opd", "data=x.jsonl", "teacher_url=http://127.0.0.1:9/v1"]
    with pytest.raises(ConfigError, match="names no model"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="set top_k"):
        load_config(None, base + ["teacher_model=m"])
    with pytest.raises(ConfigError, match="temperature 1"):
        load_config(None, base + ["teacher_model=m", "top_k=5", "distill_temperature=0.5"])
    with pytest.raises(ConfigError, match="both teacher and teacher_url"):
        load_config(None, base + ["teacher_model=m", "top_k=5", "teacher=x"])
    with pytest.raises(ConfigError, match="names no model"):
        load_config(None, ["method=opd", "data=x.jsonl", "teachers={a: 'http://h/v1'}"])
    assert load_config(None, base + ["teacher_model=m", "divergence=reward"]).has_remote_teacher()

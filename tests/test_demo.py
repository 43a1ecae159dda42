"""The demo pipeline end to end on a tiny model (the real demo runs SmolLM2: docs/demo.md has its numbers)."""

from __future__ import annotations

import json
import re

import pytest

from opdistill.config import build_config
from opdistill.demo import BASE_ROW, DEMO_METHODS, MATCHED_ROW, TEACHER_ROW, DemoOptions, run_demo, train_config
from opdistill.registry import METHODS
from opdistill.report import RunData, render_report


@pytest.mark.parametrize("method", sorted(DEMO_METHODS))
def test_the_demo_configs_are_valid(method, tmp_path):
    """Every method of the demo's table is a registry method whose config the demo builds validly."""
    assert method in METHODS
    opts = DemoOptions(out=str(tmp_path), method=method)
    config = build_config(train_config(opts, tmp_path / "teacher.jsonl", tmp_path), where="demo")
    assert config.method == method
    assert config.batch_size == (opts.opd_batch_size if method == "opd" else opts.batch_size)


def test_gad_demo_on_a_tiny_model_writes_metrics_generations_report_and_student(tiny_model, tmp_path, capsys):
    opts = DemoOptions(out=str(tmp_path / "demo"), model=str(tiny_model), train_prompts=8, heldout_prompts=4, max_new_tokens=8,
                       unfinished="keep", batch_size=2, warmup_steps=3, d_only_steps=1, gad_steps=2, n_samples=2, discriminator_layers=1)
    metrics = run_demo(opts)
    out = tmp_path / "demo"
    rows = [TEACHER_ROW, BASE_ROW, "student after warm-up (SeqKD only)", MATCHED_ROW, "student after GAD"]
    models = metrics["sets"]["heldout"]["models"]
    assert list(models) == rows and metrics["teacher"] == TEACHER_ROW and metrics["models"][TEACHER_ROW]["system"] == opts.system
    assert json.loads((out / "metrics.json").read_text())["sets"]["heldout"]["models"].keys() == set(rows)
    for row in rows:  # the demo's evaluation is `opdistill eval`'s: task check, teacher log-prob, overlap with the teacher
        assert {"french_share", "teacher_logprob", "distinct_2", "eos_rate"} <= set(models[row])
        assert (TEACHER_ROW in models[row]["vs"]) == (row != TEACHER_ROW)
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 4 * len(rows) and {g["model"] for g in generations} == set(rows)
    assert (out / "student" / "config.json").is_file() and (out / "student" / "model.safetensors").is_file()
    history = [json.loads(line) for line in (out / "gad" / "metrics.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in history] == [0.0, 0.0, 0.0, 1.0, 1.0]
    # The matched SeqKD row: GAD's generator updates (2 warm-up cross-entropy steps + 2 adversarial) on the same texts.
    matched = [json.loads(line) for line in (out / "seqkd-matched" / "metrics.jsonl").read_text().splitlines() if '"step_seconds"' in line]
    assert len(matched) == sum("g_ce_loss" in h for h in history) + 2 == 4
    assert metrics["stage_seconds"].keys() == {"collect", "train", "evaluate"}
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # the headline bar chart and the training curves
    for row in rows:
        assert row in page
    printed = capsys.readouterr().out
    assert "French share" in printed and TEACHER_ROW in printed


def test_the_report_shows_only_the_curves_it_has_and_escapes_text():
    metrics = {"task": "t", "headline": "french_share", "teacher": TEACHER_ROW,
               "sets": {"s": {"prompts": 1, "references": [], "models": {BASE_ROW: {"french_share": 0.0}, TEACHER_ROW: {"french_share": 0.7}}}}}
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    generations = [{"set": "s", "index": 0, "model": m, "prompt": "<script>alert(1)</script>", "response": r}
                   for m, r in [(TEACHER_ROW, "Bonjour"), (BASE_ROW, "Hello")]]
    page = render_report([RunData("run", metrics, history, {"lr": 1e-5}, generations)])
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count("data:image/png;base64,") == 2
    assert page.index(f"{TEACHER_ROW} (reference)") < page.index(BASE_ROW)  # the teacher is the first, reference row
    assert re.search(r"<th>french share</th>", page)
    # no history and no headline: tables only
    bare = render_report([RunData("bare", {"sets": {"s": {"models": {"m": {"mean_words": 1.0}}}}})])
    assert "data:image/png" not in bare and "<td>m</td>" in bare


def test_opd_demo_on_a_tiny_model_needs_no_teacher_text(tiny_model, tmp_path):
    opts = DemoOptions(out=str(tmp_path / "opd"), method="opd", model=str(tiny_model), train_prompts=8, heldout_prompts=4,
                       max_new_tokens=6, opd_steps=2, opd_batch_size=2, horizon_tokens=4)
    metrics = run_demo(opts)
    assert list(metrics["sets"]["heldout"]["models"]) == [TEACHER_ROW, BASE_ROW, "student after OPD"]
    assert not (tmp_path / "opd" / "teacher.jsonl").exists()
    history = [json.loads(line) for line in (tmp_path / "opd" / "opd" / "metrics.jsonl").read_text().splitlines()]
    assert [h["horizon"] for h in history if "horizon" in h] == [4, 4]
    assert (tmp_path / "opd" / "report.html").is_file()


def test_a_demo_whose_teacher_answers_were_all_cut_says_which_flags_to_change(tiny_model, tmp_path):
    from opdistill.errors import NothingToTrainOn

    # 2 tokens: the tiny model ends none of its answers, and the demo drops unfinished ones by default.
    opts = DemoOptions(out=str(tmp_path / "cut"), model=str(tiny_model), train_prompts=4, heldout_prompts=2, max_new_tokens=2,
                       batch_size=2, warmup_steps=2, d_only_steps=1, gad_steps=1, n_samples=2, discriminator_layers=1)
    with pytest.raises(NothingToTrainOn, match="no record is left to train on") as raised:
        run_demo(opts)
    assert "--max-new-tokens (now 2)" in raised.value.fix and "--unfinished keep" in raised.value.fix
    assert "max_response_tokens" not in raised.value.fix  # a config key the demo's user never sets

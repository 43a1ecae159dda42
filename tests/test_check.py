"""The pre-flight check's per-method hooks (`needs_responses`, `preflight` on the config class the registry names):
GAD's data must hold responses, cod's records their `domain` and its peer the student's vocabulary, a method added
to the registry gets its own checks; a missing example data file names the script that builds it; a teacher that
cannot be reached is named refused / unresolved / timed out. Tiny models and real files."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import build_tiny_model
from opdistill.check import CheckReport, preflight
from opdistill.cli import main
from opdistill.config import RunConfig, load_config, opt
from opdistill.data import Record
from opdistill.errors import ConfigError
from opdistill.methods import train
from opdistill.models import load_tokenizer
from opdistill.registry import METHODS, MethodEntry

REPO = Path(__file__).resolve().parents[1]


def write_records(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def prompts(n: int, **extra: Any) -> list[dict]:
    return [{"prompt": f"Question number {i}: what is {i} plus {i}?", **extra} for i in range(n)]


def failures(report: CheckReport) -> list[str]:
    return [what for what, status, _ in report.rows if status == "error"]


# ---------------------------------------------------------------- gad: prompts only is caught before training


def test_gad_on_prompts_only_fails_the_check_and_train_stops_before_loading_weights(tiny_model, tmp_path, capsys):
    data = write_records(tmp_path / "prompts.jsonl", prompts(4))
    overrides = ["method=gad", f"student={tiny_model}", f"data={data}", f"out_dir={tmp_path / 'run'}", "batch_size=2", "n_samples=2",
                 "max_steps=1", "precision=fp32"]
    report = preflight(load_config(None, overrides), load_tokenizer(str(tiny_model)))
    assert failures(report) == ["data"]
    assert f"{data}:1" in report.problems[0].message and "`response`" in report.problems[0].message
    assert main(["check", *overrides]) == 2
    assert "`response`" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="`response`"):
        train(load_config(None, overrides))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # The same records with responses pass; OPD on-policy (and cod) need none.
    with_responses = write_records(tmp_path / "pairs.jsonl", [{**row, "response": "Twice it."} for row in prompts(4)])
    assert not preflight(load_config(None, overrides + [f"data={with_responses}"]), load_tokenizer(str(tiny_model))).problems
    opd = ["method=opd", f"student={tiny_model}", f"data={data}", f"out_dir={tmp_path / 'opd'}"]
    assert not preflight(load_config(None, opd), load_tokenizer(str(tiny_model))).problems
    assert failures(preflight(load_config(None, opd + ["on_policy_ratio=0.5"]), load_tokenizer(str(tiny_model)))) == ["data"]


# ---------------------------------------------------------------- cod: the domain field and the peer's vocabulary


def cod_config(student: Path, peer: Path, data: Path, out: Path, *extra: str) -> RunConfig:
    return load_config(None, ["method=cod", f"student={student}", f"peer={peer}", f"data={data}", f"out_dir={out}", "batch_size=2",
                              "peer_a_domain=x", "peer_b_domain=y", *extra])


def test_cod_check_passes_a_good_run_and_names_bad_domains(tiny_model, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model))
    good = write_records(tmp_path / "good.jsonl", [{**row, "domain": "xy"[i % 2]} for i, row in enumerate(prompts(6))])
    report = preflight(cod_config(tiny_model, tiny_model, good, tmp_path / "run"), tokenizer)
    assert not report.problems
    assert {"domains", "peer B vocabulary", "peer B EOS", "peer B chat template"} <= {what for what, _, _ in report.rows}

    bad = write_records(tmp_path / "bad.jsonl", [{"prompt": "Hi", "domain": "x"}, {"prompt": "Hello"}, {"prompt": "Yo", "domain": "z"}])
    report = preflight(cod_config(tiny_model, tiny_model, bad, tmp_path / "run"), tokenizer)
    assert failures(report) == ["domains"]
    message, fix = report.problems[0].message, report.problems[0].fix
    assert f"{bad}:2: `domain` is None" in message and f"{bad}:3: `domain` is 'z'" in message and f"{bad}:1" not in message
    assert "'x'" in fix and "'y'" in fix and "peer_a_domain" in fix

    # Every record has a domain, but a step draws batch_size records of one domain and "y" has only one.
    few = write_records(tmp_path / "few.jsonl", [{**row, "domain": "x" if i else "y"} for i, row in enumerate(prompts(6))])
    report = preflight(cod_config(tiny_model, tiny_model, few, tmp_path / "run"), tokenizer)
    assert failures(report) == ["domains"] and "'y' (1)" in report.problems[0].message and "batch_size 2" in report.problems[0].message


def test_cod_check_names_a_peer_with_another_vocabulary(tiny_model, tmp_path):
    other = build_tiny_model(tmp_path / "other_vocab", vocab_size=300, seed=2)
    data = write_records(tmp_path / "data.jsonl", [{**row, "domain": "xy"[i % 2]} for i, row in enumerate(prompts(4))])
    report = preflight(cod_config(tiny_model, other, data, tmp_path / "run"), load_tokenizer(str(tiny_model)))
    assert failures(report) == ["peer B vocabulary"]
    assert str(other) in report.problems[0].message and "different vocabulary" in report.problems[0].message


# ---------------------------------------------------------------- a method added to the registry brings its own checks


@dataclass
class PromptsOnlyConfig(RunConfig):
    """A method for this test: trains on prompts alone and wants at least 3 records."""

    method: str = opt("prompts_only", "Training method.")

    def needs_responses(self) -> bool:
        return False

    def preflight(self, report: CheckReport, tokenizer: Any, records: list[Record]) -> None:
        if len(records) < 3:
            report.fail("record count", f"{len(records)} records, fewer than 3", "add records")
        else:
            report.ok("record count", f"{len(records)} records")


def test_a_method_added_to_the_registry_gets_its_own_checks(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "prompts_only", MethodEntry(__name__, "PromptsOnlyConfig", "", "a test method"))
    data = write_records(tmp_path / "prompts.jsonl", prompts(2))
    config = load_config(None, ["method=prompts_only", f"student={tiny_model}", f"data={data}"])
    assert isinstance(config, PromptsOnlyConfig)
    report = preflight(config, load_tokenizer(str(tiny_model)))
    assert failures(report) == ["record count"]  # prompts without responses were accepted: needs_responses said so
    write_records(data, prompts(3))
    report = preflight(config, load_tokenizer(str(tiny_model)))
    assert not report.problems and ("record count", "ok", "3 records") in report.rows


# ---------------------------------------------------------------- the examples' data files name the script that builds them


@pytest.mark.parametrize("example, script", [("examples/cod.yaml", "examples/cod/make_domains.py"),
                                             ("examples/ccopd.yaml", "examples/ccopd/make_sharded.py")])
def test_a_missing_example_data_file_names_the_script_that_builds_it(example, script, tiny_model, tmp_path, capsys):
    config = load_config(REPO / example)
    assert script in config.data_built_by and (REPO / script).is_file()
    missing = tmp_path / "not_built_yet.jsonl"  # not the example's own path: a user may have built that one
    config = load_config(REPO / example, [f"data={missing}[:180]"])
    report = preflight(config, load_tokenizer(str(tiny_model)))
    assert failures(report) == ["data"]
    assert str(missing) in report.problems[0].message and f"run `{config.data_built_by}` first" in report.problems[0].fix
    assert main(["check", str(REPO / example), f"data={missing}", f"student={tiny_model}"]) == 2
    assert script in capsys.readouterr().out
    # Without the note the error is the plain one.
    plain = preflight(load_config(None, [f"student={tiny_model}", f"data={missing}"]), load_tokenizer(str(tiny_model)))
    assert "does not exist" in plain.problems[0].message and "run `" not in plain.problems[0].fix


# ---------------------------------------------------------------- an unreachable teacher: which way it failed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_check_says_a_remote_teacher_refused_the_connection(tiny_model, tmp_path):
    data = write_records(tmp_path / "prompts.jsonl", prompts(2))
    port = free_port()  # bound and closed again: nothing listens there
    config = load_config(None, ["method=opd", f"student={tiny_model}", f"data={data}", f"teacher_url=http://127.0.0.1:{port}/v1",
                                "teacher_model=t", "top_k=4", "teacher_max_attempts=1"])
    report = preflight(config, load_tokenizer(str(tiny_model)))
    assert failures(report) == ["teacher (default)"]
    assert f"refused by 127.0.0.1:{port}" in report.problems[0].message


def test_gad_refuses_rollouts_longer_than_the_collected_teacher_texts(tiny_model, tmp_path):
    """collect --max-tokens 256 and GAD's max_response_tokens 1536 used to be matched by hand."""
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}], "response": f"Answer {i}.", "teacher": "api",
             "meta": {"sampling": {"temperature": 0.8, "top_p": 1.0, "max_tokens": 256}, "finish_reason": "stop"}} for i in range(4)]
    data = write_records(tmp_path / "teacher.jsonl", rows)
    tokenizer = load_tokenizer(str(tiny_model))
    long = load_config(None, ["method=gad", f"student={tiny_model}", f"data={data}", "batch_size=2", "max_response_tokens=1536"])
    report = preflight(long, tokenizer)
    assert failures(report) == ["response limit"]
    assert "max_response_tokens=256" in report.problems[0].fix and "6.0x" in report.problems[0].message
    matched = load_config(None, ["method=gad", f"student={tiny_model}", f"data={data}", "batch_size=2", "max_response_tokens=256"])
    assert failures(preflight(matched, tokenizer)) == []

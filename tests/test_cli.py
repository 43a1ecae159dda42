"""The `opdistill` command as a user runs it: help texts, and clean errors (exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "opdistill", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=timeout)


def test_top_level_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("collect", "train", "demo"):
        assert command in result.stdout


def test_no_command_is_a_usage_error() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "usage" in result.stderr.lower()
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command, options", [
    ("collect", ["--prompts", "--out", "--teacher-model", "--teacher-url", "--api-key-env", "--system", "--n",
                 "--temperature", "--top-p", "--max-tokens", "--concurrency", "--max-attempts", "--timeout"]),
    ("train", ["config", "overrides", "--method", "--help-config"]),
    ("demo", ["--out", "--method", "--system", "--train-prompts", "--warmup-steps", "--gad-steps", "--seqkd-steps", "--opd-steps",
              "--divergence", "--max-new-tokens", "--lr", "--seed"]),
])
def test_subcommand_help(command: str, options: list[str]) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"opdistill {command}" in result.stdout
    for option in options:
        assert option in result.stdout, option


def test_help_config_lists_fields() -> None:
    result = run_cli("train", "--help-config")
    assert result.returncode == 0, result.stderr
    for key in ("micro_batch_size", "batch_size", "lr", "data", "student", "overlong", "lora_r", "chat_template"):
        assert f"  {key} (" in result.stdout, key


@pytest.mark.parametrize("command_line, config_class, own_key", [
    (["{config}"], "GADConfig", "n_samples"),               # the config file's method
    (["{config}", "method=opd"], "OPDConfig", "divergence"),  # a method= override wins over the file
    (["{config}", "--method", "cod"], "CoDConfig", "peer"),   # --method wins over both
    (["method=seqkd"], "SeqKDConfig", "micro_batch_size"),
])
def test_help_config_lists_the_keys_of_the_method_the_command_line_names(command_line, config_class, own_key, tmp_path, capsys) -> None:
    from opdistill.cli import main

    config = tmp_path / "gad.yaml"
    config.write_text("method: gad\ndata: d.jsonl\n", encoding="utf-8")
    assert main(["train", *[part.format(config=config) for part in command_line], "--help-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{config_class}:") and f"  {own_key} (" in out
    if config_class != "GADConfig":
        assert "  n_samples (" not in out


def test_help_config_names_an_unknown_method(tmp_path, capsys) -> None:
    from opdistill.cli import main

    config = tmp_path / "run.yaml"
    config.write_text("method: gda\n", encoding="utf-8")
    assert main(["train", str(config), "--help-config"]) == 2
    err = capsys.readouterr().err
    assert f"{config}: unknown method 'gda'" in err and "seqkd, gad, opd, cod" in err


def test_top_level_help_lists_every_registered_method() -> None:
    from opdistill.cli import build_parser
    from opdistill.registry import METHODS

    train_help = next(a for a in build_parser()._subparsers._group_actions[0]._choices_actions if a.dest == "train").help
    assert all(name in train_help for name in METHODS) and "method: seqkd" not in train_help


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert "error" in result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_train_unknown_key(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("data: d.jsonl\nmicro_batch_sise: 4\n", encoding="utf-8")
    assert_clean_error(run_cli("train", str(config)), str(config), "micro_batch_sise", "micro_batch_size")


def test_train_unknown_override_key(tmp_path: Path) -> None:
    assert_clean_error(run_cli("train", "data=d.jsonl", "learning_rat=1e-5"), "learning_rat")


def test_train_invalid_yaml(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("data: d.jsonl\nlr: [1\n", encoding="utf-8")
    result = run_cli("train", str(config))
    assert_clean_error(result, f"{config}:")


def test_train_missing_config_file(tmp_path: Path) -> None:
    assert_clean_error(run_cli("train", str(tmp_path / "nope.yaml")), "nope.yaml")


def train_config(tmp_path: Path, tiny_model: Path, data: Path) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"student: {tiny_model}\ndata: {data}\nout_dir: {tmp_path / 'out'}\nmax_steps: 1\nbatch_size: 2\n"
        "micro_batch_size: 1\nprecision: fp32\nmax_prompt_tokens: 64\nmax_response_tokens: 16\n",
        encoding="utf-8",
    )
    return config


def test_train_missing_data_file(tmp_path: Path, tiny_model: Path) -> None:
    missing = tmp_path / "no_such_data.jsonl"
    config = train_config(tmp_path, tiny_model, missing)
    assert_clean_error(run_cli("train", str(config)), str(missing), "does not exist")
    assert not (tmp_path / "out" / "student").exists()


def test_train_broken_jsonl_line(tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"prompt": "fine", "response": "ok"}) + "\n"
        + '{"prompt": "broken", "response": \n'
        + json.dumps({"prompt": "fine too", "response": "ok"}) + "\n"
        + json.dumps({"prompt": 3, "response": "ok"}) + "\n",
        encoding="utf-8",
    )
    config = train_config(tmp_path, tiny_model, data)
    result = run_cli("train", str(config))
    assert_clean_error(result, f"{data}:2", f"{data}:4", "prompt")
    assert f"{data}:1" not in result.stderr and f"{data}:3" not in result.stderr
    assert not (tmp_path / "out" / "student").exists()


def test_train_missing_response(tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "no teacher answer yet"}) + "\n", encoding="utf-8")
    config = train_config(tmp_path, tiny_model, data)
    assert_clean_error(run_cli("train", str(config)), f"{data}:1", "response")


def test_train_bad_student_path(tmp_path: Path) -> None:
    not_a_model = tmp_path / "folder"
    not_a_model.mkdir()
    result = run_cli("train", f"student={not_a_model}", "data=builtin:train")
    assert_clean_error(result, str(not_a_model), "is not a model")

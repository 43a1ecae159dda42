"""Bad input, clear error: every malformed prompt file, config, model and checkpoint below makes the CLI exit 2
with one readable message that names the file / line / field, plus a `fix:` line, and no traceback.

Each case builds its bad input in a temp dir, runs `opdistill ...` (in process, through cli.main) and checks
the message. docs/robustness.md counts them."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from opdistill.cli import main

from conftest import build_tiny_model

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass
class Case:
    name: str
    build: Callable[[Path, Path], list[str]]  # (tmp dir, tiny model) -> argv
    needles: tuple[str, ...]  # all must appear in stderr ({tmp} is replaced by the temp dir)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def lines(*rows: object) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def collect_with(prompts: str | bytes) -> Callable[[Path, Path], list[str]]:
    """`opdistill collect` on a prompt file (it validates the whole file before any request)."""
    def build(tmp: Path, model: Path) -> list[str]:
        data = write(tmp / "prompts.jsonl", prompts)
        return ["collect", "--prompts", str(data), "--out", str(tmp / "out.jsonl"), "--teacher-model", "m",
                "--teacher-url", "http://127.0.0.1:9/v1", "--no-progress"]
    return build


def train_with(data: str | bytes | None = None, suffix: str = ".jsonl", **overrides: object) -> Callable[[Path, Path], list[str]]:
    """`opdistill train` on the tiny model with a data file (or overrides only)."""
    def build(tmp: Path, model: Path) -> list[str]:
        values = {"student": str(model), "out_dir": str(tmp / "run"), "max_steps": 1, "batch_size": 2, "micro_batch_size": 1,
                  "precision": "fp32", "max_response_tokens": 8}
        if data is not None:
            values["data"] = str(write(tmp / f"data{suffix}", data))
        values.update({k: str(v).replace("{tmp}", str(tmp)).replace("{model}", str(model)) for k, v in overrides.items()})
        return ["train", *[f"{k}={v}" for k, v in values.items()]]
    return build


GOOD = {"prompt": "Say hi.", "response": "Hi."}


def config_file(text: str) -> Callable[[Path, Path], list[str]]:
    def build(tmp: Path, model: Path) -> list[str]:
        return ["train", str(write(tmp / "run.yaml", text.replace("{model}", str(model))))]
    return build


def model_dir_without_template(tmp: Path, model: Path) -> list[str]:
    bare = tmp / "bare"
    shutil.copytree(model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    return train_with(lines(GOOD, GOOD), student=str(bare))(tmp, model)


def vocabulary_mismatch(tmp: Path, model: Path) -> list[str]:
    other = build_tiny_model(tmp / "other", vocab_size=300)
    return train_with(lines(GOOD, GOOD), method="opd", teacher=str(other))(tmp, model)


def pickle_only_model(tmp: Path, model: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    pickled = tmp / "pickled"
    shutil.copytree(model, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    return train_with(lines(GOOD, GOOD), student=str(pickled))(tmp, model)


def truncated_student_weights(tmp: Path, model: Path) -> list[str]:
    broken = tmp / "broken"
    shutil.copytree(model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ["eval", "--model", str(broken), "--prompts", "builtin:heldout[:1]", "--out", str(tmp / "e"), "--no-progress", "--no-embeddings"]


def truncated_checkpoint(tmp: Path, model: Path) -> list[str]:
    argv = train_with(lines(GOOD, GOOD, GOOD, GOOD), checkpoint_every=1)(tmp, model)
    assert main(argv) == 0
    checkpoint = sorted((tmp / "run" / "checkpoints").iterdir())[-1] / "model.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    shutil.rmtree(tmp / "run" / "student")
    return [*argv[:-0 or None], "max_steps=2"]


def other_architecture_on_resume(tmp: Path, model: Path) -> list[str]:
    argv = train_with(lines(GOOD, GOOD), checkpoint_every=1)(tmp, model)
    assert main(argv) == 0
    wider = build_tiny_model(tmp / "wider", hidden=48)
    return train_with(lines(GOOD, GOOD), student=str(wider), max_steps=2)(tmp, model)


CASES = [
    # ---- prompt files
    Case("broken JSON line", collect_with(lines(GOOD, '{"prompt": "x",')), ("prompts.jsonl:2", "not valid JSON")),
    Case("prompt is a number", collect_with(lines({"prompt": 3})), ("prompts.jsonl:1", "`prompt` must be a string")),
    Case("empty messages", collect_with(lines({"messages": []})), ("prompts.jsonl:1", "`messages` is empty")),
    Case("messages not a list", collect_with(lines({"messages": "hi"})), ("prompts.jsonl:1", "`messages` must be a list")),
    Case("unknown role", collect_with(lines({"messages": [{"role": "bot", "content": "hi"}]})), ("prompts.jsonl:1", "messages[0].role is 'bot'")),
    Case("empty user content", collect_with(lines({"messages": [{"role": "user", "content": "  "}]})), ("prompts.jsonl:1", "messages[0].content is empty")),
    Case("content not a string", collect_with(lines({"messages": [{"role": "user", "content": ["a"]}]})), ("messages[0].content must be a string",)),
    Case("system message not first", collect_with(lines({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                                                       {"role": "user", "content": "c"}]})), ("messages[1]", "may only come first")),
    Case("conversation ends with the assistant", collect_with(lines({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                                                   {"role": "assistant", "content": "c"}]})), ("must end with a user turn",)),
    Case("neither prompt nor messages", collect_with(lines({"question": "hi"})), ("prompts.jsonl:1", "neither `messages` nor `prompt`")),
    Case("empty prompt", collect_with(lines({"prompt": ""})), ("prompts.jsonl:1", "`prompt` is empty")),
    Case("row is not an object", collect_with(lines(["a", "b"])), ("prompts.jsonl:1", "must be a JSON object")),
    Case("system and system message", collect_with(lines({"system": "s", "messages": [{"role": "system", "content": "t"}, {"role": "user", "content": "u"}]})),
         ("both `system` and a system message",)),
    Case("response is not a string", collect_with(lines({"prompt": "a", "response": 5})), ("`response` must be a string",)),
    Case("binary garbage", collect_with(b"\x00\xff\xfe garbage \x89PNG\r\n"), ("prompts.jsonl:1", "not UTF-8")),
    Case("absurdly nested JSON", collect_with("[" * 100_000 + "]" * 100_000 + "\n"), ("prompts.jsonl:1", "not usable JSON")),
    Case("empty file", collect_with(""), ("no records",)),
    Case("20 bad lines reported together", collect_with(lines(*[{"prompt": i} for i in range(25)])), ("25 bad record(s)", "and 5 more")),
    Case("missing prompt file", lambda tmp, m: ["collect", "--prompts", str(tmp / "nope.jsonl"), "--out", str(tmp / "o.jsonl"), "--teacher-model", "m"],
         ("nope.jsonl does not exist",)),
    Case("unknown built-in set", lambda tmp, m: ["collect", "--prompts", "builtin:test", "--out", str(tmp / "o.jsonl"), "--teacher-model", "m"],
         ("unknown built-in prompt set",)),
    Case("corrupt Parquet", train_with(b"PAR1 this is not parquet", suffix=".parquet"), ("data.parquet", "not a readable Parquet file")),
    Case("response missing where training needs it", train_with(lines({"prompt": "a"}, {"prompt": "b"})), ("data.jsonl:1", "no `response`")),
    Case("every record over-long with overlong=skip", train_with(lines(GOOD, GOOD), max_prompt_tokens=2, overlong="skip"), ("over-long",)),
    Case("MT-Bench turns empty", lambda tmp, m: ["eval", "--model", str(m), "--out", str(tmp / "e"), "--prompts",
                                                  str(write(tmp / "q.jsonl", lines({"question_id": 1, "turns": []})))], ("q.jsonl:1", "`turns`")),
    # ---- configs
    Case("unknown config key", train_with(lines(GOOD, GOOD), learning_rat="1e-5"), ("learning_rat", "did you mean")),
    Case("wrong type", train_with(lines(GOOD, GOOD), batch_size="eight"), ("batch_size",)),
    Case("non-finite lr", train_with(lines(GOOD, GOOD), lr="nan"), ("lr",)),
    Case("batch not a multiple of micro-batch", train_with(lines(GOOD, GOOD), batch_size=3, micro_batch_size=2), ("multiple of micro_batch_size",)),
    Case("train_mask with LoRA", train_with(lines(GOOD, GOOD), train_mask="random:0.1", lora_r=4, weight_decay=0), ("train_mask", "lora_r")),
    Case("invalid YAML", config_file("student: {model}\nlr: [1\n"), ("run.yaml:",)),
    Case("YAML is a list", config_file("- a\n- b\n"), ("run.yaml",)),
    Case("unknown method", config_file("method: magic\nstudent: {model}\n"), ("magic",)),
    Case("missing model", train_with(lines(GOOD, GOOD), student="{tmp}/no_model_here"), ("no_model_here",)),
    Case("GAD with one sample per prompt", train_with(lines(GOOD, GOOD), method="gad", n_samples=1), ("n_samples",)),
    # ---- models
    Case("path that is not a model", train_with(lines(GOOD, GOOD), student="{tmp}"), ("is not a model", "config.json")),
    Case("tokenizer without chat template", model_dir_without_template, ("chat template",)),
    Case("white-box vocabulary mismatch", vocabulary_mismatch, ("vocabular",)),
    Case("pickle-only weights", pickle_only_model, ("allow_pickle",)),
    Case("truncated weights file", truncated_student_weights, ("broken",)),
    # ---- checkpoints
    Case("truncated checkpoint on resume", truncated_checkpoint, ("cannot resume", "step-")),
    Case("other architecture on resume", other_architecture_on_resume, ("cannot resume",)),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_clear_error(case: Case, model: Path, tmp_path: Path, capsys) -> None:
    argv = case.build(tmp_path, model)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert "Traceback" not in err
    assert sum(line.startswith("opdistill ") and "error:" in line for line in err.splitlines()) == 1, err
    assert "fix:" in err, err
    for needle in case.needles:
        assert needle in err, (needle, err)


DOCS = Path(__file__).resolve().parents[2] / "docs" / "robustness.md"
# The rows of docs/robustness.md's table that count this file's cases (one per `# ----` group of CASES).
DOC_ROWS = ("Malformed prompt files", "Bad configs", "Bad models", "Bad checkpoints")


def test_there_are_at_least_30_cases():
    # At least 30 different cases, and exactly as many as docs/robustness.md claims: a copied case (same name,
    # so pytest would tell it apart only by a suffix), a case that checks no text, or a count in the docs that
    # no longer matches the list fails here.
    names = [case.name for case in CASES]
    assert len(set(names)) == len(names), sorted(name for name in names if names.count(name) > 1)
    assert [case.name for case in CASES if not case.needles] == []
    counted: dict[str, int] = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        for row in DOC_ROWS:
            if cells[0].startswith(f"{row}:"):
                counted[row] = int(cells[1])
    assert set(counted) == set(DOC_ROWS), f"{DOCS} lacks the rows {set(DOC_ROWS) - set(counted)}"
    assert sum(counted.values()) == len(CASES), (counted, len(CASES))
    assert len(CASES) >= 30


def test_non_finite_losses_skip_steps_then_stop_the_run(model: Path, tmp_path: Path, capsys) -> None:
    """lr 1e30 blows the weights up after the first step: every later loss is NaN/inf. Each such step is skipped
    with a warning, and 5 in a row stop the run with an error (engine.MAX_BAD_STEPS)."""
    argv = train_with(lines(*[GOOD] * 8), lr="1e30", max_grad_norm=0, max_steps=20)(tmp_path, model)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("skipping the step") == 5 and "5 non-finite losses in a row" in err and "fix:" in err
    assert not (tmp_path / "run" / "student").exists()

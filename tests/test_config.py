"""Config: YAML + key=value overrides, type checks, suggestions for unknown keys, validation, help."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from opdistill.config import RunConfig, config_help, load_config, parse_overrides
from opdistill.methods.seqkd import SeqKDConfig
from opdistill.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(*args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return info.value


def test_yaml_plus_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "data: train.jsonl\nlr: 2.0e-5\nbatch_size: 16\nmicro_batch_size: 4\nmax_steps: 10\nresume: false\n")
    config = load_config(path, ["max_steps=20", "out_dir=runs/x"])
    assert isinstance(config, SeqKDConfig) and config.method == "seqkd"
    assert config.data == "train.jsonl"
    assert config.lr == 2e-5
    assert config.batch_size == 16 and config.micro_batch_size == 4
    assert config.max_steps == 20  # override wins over the file
    assert config.out_dir == "runs/x"
    assert config.resume is False
    # untouched fields keep their defaults
    assert config.seed == RunConfig().seed and config.overlong == "truncate"


def test_overrides_only() -> None:
    config = load_config(None, ["data=builtin:train", "batch_size=4", "micro_batch_size=2", "resume=false", "lora_r=8"])
    assert config.data == "builtin:train"
    assert (config.batch_size, config.micro_batch_size, config.resume, config.lora_r) == (4, 2, False, 8)


def test_exponent_strings_become_floats(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-5 (no dot) as a string; float fields must still accept it.
    config = load_config(None, ["data=d.jsonl", "lr=1e-5", "weight_decay=1E-2", "epochs=2"])
    assert config.lr == 1e-5 and isinstance(config.lr, float)
    assert config.weight_decay == 0.01
    assert config.epochs == 2.0 and isinstance(config.epochs, float)
    from_file = load_config(write(tmp_path, "data: d.jsonl\nlr: 3e-4\nwarmup_ratio: 0\n"))
    assert from_file.lr == 3e-4 and isinstance(from_file.lr, float)
    assert from_file.warmup_ratio == 0.0 and isinstance(from_file.warmup_ratio, float)


def test_parse_overrides() -> None:
    assert parse_overrides(["lr=1e-5", "resume=true", "batch_size=8", "data=a=b.jsonl", "chat_template="]) == {
        "lr": "1e-5", "resume": True, "batch_size": 8, "data": "a=b.jsonl", "chat_template": "",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


def test_data_override_with_slice() -> None:
    assert load_config(None, ["data=prompts.jsonl[0:100]"]).data == "prompts.jsonl[0:100]"


def test_string_override_keeps_its_text() -> None:
    # Paths and names that look like numbers must reach str fields unchanged (YAML would turn 010 into 8).
    config = load_config(None, ["data=d.jsonl", "out_dir=010", "student=1.10"])
    assert config.out_dir == "010"
    assert config.student == "1.10"


@pytest.mark.parametrize("key, suggestion", [("micro_batch_sise", "micro_batch_size"), ("batchsize", "batch_size"),
                                             ("lora_rank", "lora_r"), ("sead", "seed")])
def test_unknown_key_suggests_nearest(tmp_path: Path, key: str, suggestion: str) -> None:
    err = config_error(write(tmp_path, f"data: d.jsonl\n{key}: 1\n"))
    assert f"`{key}`" in str(err)
    assert "run.yaml" in str(err)
    assert err.fix is not None and f"`{suggestion}`" in err.fix
    # the same through an override
    err = config_error(None, ["data=d.jsonl", f"{key}=1"])
    assert f"`{key}`" in str(err) and f"`{suggestion}`" in (err.fix or "")


def test_unknown_key_without_close_match() -> None:
    err = config_error(None, ["data=d.jsonl", "zzzzqqq=1"])
    assert "`zzzzqqq`" in str(err)
    assert "--help-config" in (err.fix or "")


def test_learning_rat_is_unknown() -> None:
    err = config_error(None, ["data=d.jsonl", "learning_rat=1e-5"])
    assert "`learning_rat`" in str(err)
    assert err.fix  # some suggestion or a pointer to --help-config


@pytest.mark.parametrize("text, field", [
    ('batch_size: "eight"', "batch_size"),
    ('resume: "yes"', "resume"),
    ("resume: 1", "resume"),
    ("lr: fast", "lr"),
    ("max_steps: 2.5", "max_steps"),
    ("seed: true", "seed"),
    ("student: [a, b]", "student"),
    ("epochs: null", "epochs"),
])
def test_wrong_type_names_field(tmp_path: Path, text: str, field: str) -> None:
    err = config_error(write(tmp_path, f"data: d.jsonl\n{text}\n"))
    assert f"`{field}`" in str(err)
    assert "run.yaml" in str(err)


def test_wrong_type_in_override_names_field() -> None:
    err = config_error(None, ["data=d.jsonl", "batch_size=eight"])
    assert "`batch_size`" in str(err)


def test_batch_not_multiple_of_micro_batch() -> None:
    err = config_error(None, ["data=d.jsonl", "batch_size=10", "micro_batch_size=4"])
    assert "batch_size 10" in str(err) and "micro_batch_size 4" in str(err)
    assert load_config(None, ["data=d.jsonl", "batch_size=12", "micro_batch_size=4"]).batch_size == 12


@pytest.mark.parametrize("method, extra", [("seqkd", []), ("opd", []), ("cod", ["peer=p"])])
def test_a_micro_batch_larger_than_the_batch_is_the_batch(method: str, extra: list[str]) -> None:
    base = ["data=d.jsonl", f"method={method}", *extra]
    config = load_config(None, base + ["batch_size=2"])  # micro_batch_size keeps its default 8
    assert (config.batch_size, config.micro_batch_size) == (2, 2)
    assert load_config(None, base + ["batch_size=3", "micro_batch_size=5"]).micro_batch_size == 3
    assert load_config(None, base + ["batch_size=16"]).micro_batch_size == 8  # dividing sizes are kept as given
    err = config_error(None, base + ["batch_size=6", "micro_batch_size=4"])  # smaller but not a divisor: still refused
    assert "`micro_batch_size`" in str(err) and "batch_size 6" in str(err) and "1, 2, 3, 6" in (err.fix or "")


def test_gad_micro_batches_count_sequences_and_any_batch_size_is_accepted() -> None:
    # GAD splits batch_size x n_samples sequences into micro-batches of micro_batch_size: nothing to divide.
    config = load_config(None, ["data=d.jsonl", "method=gad", "batch_size=2"])
    assert (config.batch_size, config.micro_batch_size) == (2, 8)


def test_training_with_batch_size_2_alone_runs(tiny_model: Path, selfinstruct: Path, tmp_path: Path) -> None:
    from opdistill.methods import train

    config = load_config(None, [f"student={tiny_model}", f"data={selfinstruct}[:4]", f"out_dir={tmp_path}", "batch_size=2", "max_steps=2",
                                "max_response_tokens=8", "precision=fp32"])
    assert train(config)["steps"] == 2
    assert "micro_batch_size: 2" in (tmp_path / "config.yaml").read_text()  # the run records the size it used


def test_empty_data_is_an_error(tmp_path: Path) -> None:
    assert "`data`" in str(config_error(None, []))
    assert "`data`" in str(config_error(write(tmp_path, "lr: 1.0e-5\n")))
    assert "`data`" in str(config_error(None, ["data="]))


RANGE_FIX = ConfigError.default_fix  # a range error has nothing more specific to say than the default fix


@pytest.mark.parametrize("override, message, fix", [
    ("batch_size=0", "config field `batch_size` must be >= 1, got 0", RANGE_FIX),
    ("micro_batch_size=-1", "config field `micro_batch_size` must be >= 1, got -1", RANGE_FIX),
    ("max_steps=-5", "config field `max_steps` must be >= 0, got -5", RANGE_FIX),
    ("lr=0", "config field `lr` must be > 0, got 0.0", RANGE_FIX),
    ("lr=-1e-5", "config field `lr` must be > 0, got -1e-05", RANGE_FIX),
    ("warmup_ratio=1.5", "config field `warmup_ratio` must be in [0, 1), got 1.5", RANGE_FIX),
    ("overlong=ignore", "config field `overlong` is 'ignore'", "use one of: truncate, skip"),
    ("precision=fp16", "config field `precision` is 'fp16'", "use one of: auto, bf16, fp32"),
    ("lr_schedule=step", "config field `lr_schedule` is 'step'", "use one of: cosine, linear, constant"),
])
def test_out_of_range_values(override: str, message: str, fix: str) -> None:
    # The whole message, not a substring: it must name the field, the allowed range (or the choices) and the
    # rejected value, so a validation that stopped running, or named another field, fails here.
    err = config_error(None, ["data=d.jsonl", override])
    assert (err.message, err.fix) == (message, fix)


@pytest.mark.parametrize("value", ["nan", "inf", ".nan", ".inf"])
def test_non_finite_learning_rate_is_an_error(value: str) -> None:
    err = config_error(None, ["data=d.jsonl", f"lr={value}"])
    assert "lr" in str(err)


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "data: d.jsonl\nlr: 1.0e-5\nbatch_size: [8\nseed: 1\n")
    err = config_error(path)
    assert str(path) in str(err)
    line = int(str(err).split(f"{path}:")[1].split(":")[0])
    assert line in (3, 4)
    path = write(tmp_path, "data: d.jsonl\n  lr: 1\n bad: : :\n", "bad2.yaml")
    err = config_error(path)
    assert f"{path}:" in str(err)


def test_yaml_not_a_mapping_or_missing(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "- a\n- b\n"))
    assert "run.yaml" in str(err) and "mapping" in str(err)
    missing = tmp_path / "nope.yaml"
    assert str(missing) in str(config_error(missing))
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage\x81")
    assert str(binary) in str(config_error(binary))


def test_unknown_method(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "method: magic\ndata: d.jsonl\n"))
    assert "magic" in str(err) and "seqkd" in (err.fix or "")
    err = config_error(None, ["data=d.jsonl"], method="magic")
    assert "magic" in str(err)


def test_non_string_method_is_a_config_error(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "method: [seqkd]\ndata: d.jsonl\n"))
    assert "method" in str(err)


def test_method_argument_overrides_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "data: d.jsonl\n"), [], method="seqkd")
    assert config.method == "seqkd"


def test_empty_yaml_file_uses_overrides(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), ["data=d.jsonl"])
    assert config.data == "d.jsonl"


def test_config_help_lists_every_field() -> None:
    text = config_help()
    for f in dataclasses.fields(SeqKDConfig):
        assert f"  {f.name} (" in text, f.name
        assert f.metadata["help"] in text
    assert "micro_batch_size" in text and "default 8" in text
    assert len([line for line in text.splitlines() if line.startswith("  ")]) == len(dataclasses.fields(SeqKDConfig))


@pytest.mark.parametrize("method, key, suggestion", [
    ("opd", "lmbda", "on_policy_ratio"), ("gad", "num_generations", "n_samples"), ("gad", "beta", "kl_coef"),
    ("gad", "epsilon", "clip_ratio"), ("gad", "max_new_tokens", "max_response_tokens"), ("opd", "max_completion_length", "max_response_tokens"),
    ("gad", "kl_loss_coef", "kl_coef"), ("seqkd", "train_batch_size", "batch_size"), ("opd", "teacher_model_name_or_path", "teacher")])
def test_names_from_trl_and_verl_suggest_our_key(method: str, key: str, suggestion: str) -> None:
    err = config_error(None, ["data=d.jsonl", f"{key}=1"], method=method)
    assert f"`{key}`" in str(err) and f"`{suggestion}`" in (err.fix or "")


def test_beta_is_opds_own_key_and_not_suggested_where_kl_coef_does_not_exist() -> None:
    assert load_config(None, ["data=d.jsonl", "divergence=jsd", "beta=0.3"], method="opd").beta == 0.3
    err = config_error(None, ["data=d.jsonl", "beta=0.1"], method="seqkd")
    assert "kl_coef" not in (err.fix or "")


@pytest.mark.parametrize("estimator", ["reward", "reward_to_go"])
def test_sampled_token_estimators_need_the_students_own_samples(estimator: str) -> None:
    err = config_error(None, ["data=d.jsonl", f"divergence={estimator}", "on_policy_ratio=0.5"], method="opd")
    assert "sampled-token estimator" in str(err) and "on_policy_ratio" in (err.fix or "")
    assert load_config(None, ["data=d.jsonl", f"divergence={estimator}"], method="opd").on_policy_ratio == 1.0


def test_the_registry_is_the_one_list_of_methods():
    """Config classes, method classes and the CLI's choices all come from registry.METHODS."""
    from opdistill.cli import build_parser
    from opdistill.methods.common import Method
    from opdistill.registry import METHODS

    for name, entry in METHODS.items():
        config_class, method_class = entry.config(), entry.method()
        assert issubclass(config_class, RunConfig) and issubclass(method_class, Method)
        assert config_class.__dataclass_fields__["method"].default == name
        assert load_config(None, [f"method={name}", "data=x.jsonl", "peer=p"] if name == "cod" else [f"method={name}", "data=x.jsonl"]).method == name
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    method_option = next(a for a in train_parser._actions if a.dest == "method")
    assert list(method_option.choices) == list(METHODS)


def test_every_example_config_is_valid():
    """The example configs users copy: each one loads and passes its method's checks (data files are not read)."""
    from opdistill.config import load_config

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
    assert any(p.name == "gad_paper_gpu.yaml" for p in examples)
    for path in examples:
        config = load_config(str(path), [])
        from opdistill.registry import METHODS

        assert config.method in METHODS, path
    paper = load_config(str(examples[[p.name for p in examples].index("gad_paper_gpu.yaml")]), [])
    assert (paper.lr, paper.d_lr, paper.batch_size, paper.n_samples, paper.temperature, paper.max_response_tokens) == (1e-6, 1e-6, 256, 8, 0.8, 1536)

"""benchmarks/quality.py cannot rot: every size's training configs pass opdistill's own validation (`--plan`), and the
compute matching its docstring promises holds in every size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark's modules import each other as siblings

from quality_runs import FAMILIES, SIZES, training_configs  # noqa: E402


def plan_args(out: Path) -> object:
    import argparse

    return argparse.Namespace(precision="auto", whitebox_tuning="lora", teacher_system="brief", out=out, data_dir=ROOT.parent / "shared" / "data")


@pytest.mark.parametrize("size_name", sorted(SIZES))
def test_every_size_matches_generator_updates_across_the_black_box_rows(size_name: str, tmp_path: Path) -> None:
    size = SIZES[size_name]
    configs = training_configs(size, plan_args(tmp_path), tmp_path)
    seqkd, gad, xtok = configs["blackbox-seqkd"], configs["blackbox-gad"], configs["blackbox-opd-xtok"]
    gad_updates = (gad["warmup_steps"] - gad["d_only_steps"]) + gad["max_steps"]  # warm-up cross-entropy + adversarial
    assert seqkd["max_steps"] == gad_updates == xtok["max_steps"]
    assert seqkd["batch_size"] == gad["batch_size"] == xtok["batch_size"]
    assert configs["whitebox-seqkd"]["max_steps"] == configs["whitebox-opd"]["max_steps"]
    assert {stage for rows in FAMILIES.values() for stage in rows.values()} <= set(configs)
    assert xtok["cross_tokenizer"] is True and configs["whitebox-opd"]["divergence"] == "rkl"


def test_plan_validates_every_training_config_without_loading_a_model(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--out", str(tmp_path / "q"), "--size", "full",
                           "--plan", "--gad-variant", "long:warmup_steps=16"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ["collect", "blackbox-seqkd", "blackbox-gad", "blackbox-opd-xtok", "blackbox-gad-long", "eval-blackbox",
                  "collect-gsm8k", "whitebox-seqkd", "whitebox-opd", "eval-whitebox", "report"]:
        assert f"stage {stage}" in done.stderr
    assert not (tmp_path / "q").exists()  # a plan writes nothing


def test_plan_refuses_a_variant_that_sets_the_matched_step_count(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--out", str(tmp_path), "--size", "smoke",
                           "--plan", "--gad-variant", "x:max_steps=3"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "max_steps follows from the warm-up" in done.stderr


def test_a_finished_stage_is_skipped_when_rerun_with_the_same_settings(tmp_path: Path) -> None:
    """The settings key goes through JSON in done.json: a tuple in it must still match on the rerun (it did not, and
    a rerun redid the teacher's texts and everything after them)."""
    from quality_stages import Stages

    calls = []

    def work(directory: Path) -> dict:
        calls.append(directory)
        return {"made": True}

    key = {"limits": (16, 48), "system": None}
    Stages(tmp_path).run("collect", key, [], work)
    Stages(tmp_path).run("collect", key, [], work)
    assert len(calls) == 1 and Stages(tmp_path).info("collect") == {"made": True}
    Stages(tmp_path).run("collect", {**key, "limits": (16, 64)}, [], work)  # new settings: redone
    assert len(calls) == 2


def test_an_interrupted_stage_starts_over_when_its_input_was_redone_meanwhile(tmp_path: Path) -> None:
    """A training stage cut off mid-run resumes its own partial output, unless the stage it reads (the teacher's texts)
    was redone in between: then its partial run came from the old texts and is wiped (it used to resume them)."""
    import pytest
    from quality_stages import Stages

    def collect(directory: Path) -> dict:
        (directory / "texts.txt").write_text(str(len(list(tmp_path.glob("*/done.json")))))
        return {}

    def interrupted(directory: Path) -> dict:
        (directory / "partial").write_text("trained on the first texts")
        raise KeyboardInterrupt

    seen = []

    def train(directory: Path) -> dict:
        seen.append((directory / "partial").exists())
        return {}

    Stages(tmp_path).run("collect", {"n": 1}, [], collect)
    with pytest.raises(KeyboardInterrupt):
        Stages(tmp_path).run("train", {"steps": 2}, ["collect"], interrupted)
    Stages(tmp_path).run("train", {"steps": 2}, ["collect"], train)  # same inputs: resumes its partial output
    assert seen == [True]
    with pytest.raises(KeyboardInterrupt):
        Stages(tmp_path).run("train", {"steps": 3}, ["collect"], interrupted)
    Stages(tmp_path).run("collect", {"n": 2}, [], collect)  # the input is redone while train is unfinished
    Stages(tmp_path).run("train", {"steps": 3}, ["collect"], train)
    assert seen == [True, False]


def test_results_describe_a_family_of_an_earlier_invocation_by_what_its_stages_recorded(tmp_path: Path) -> None:
    """Run --only blackbox with one teacher system, then --only whitebox with full tuning and another system: the
    results' settings must still give the black-box family's own system prompt and precision."""
    import argparse

    from quality_runs import recorded_settings
    from quality_stages import Stages

    stages = Stages(tmp_path)
    stages.run("collect", {"limits": [16, 48], "system": "Be brief.", "precision": "fp32"}, [], lambda directory: {})
    configs = training_configs(SIZES["smoke"], plan_args(tmp_path), tmp_path)
    stages.run("collect-gsm8k", {"limits": [8, 160], "system": "Solve it.", "precision": "bf16"}, [], lambda directory: {})
    stages.run("whitebox-opd", configs["whitebox-opd"], ["collect-gsm8k"], lambda directory: {})
    later = argparse.Namespace(teacher_system="Another prompt.", whitebox_tuning="full", precision="auto")
    settings = recorded_settings(stages, ["blackbox", "whitebox"], later)
    assert settings["teacher_system"] == "Be brief."
    assert settings["whitebox_tuning"] == "lora"  # plan_args trained it with LoRA, whatever this invocation says
    assert settings["precision"] == {"blackbox": "fp32", "whitebox": "bf16"}
    # A family that never ran in this directory takes this invocation's flags.
    assert recorded_settings(Stages(tmp_path / "empty"), ["blackbox"], later)["teacher_system"] == "Another prompt."

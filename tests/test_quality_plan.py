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

    return argparse.Namespace(precision="auto", whitebox_tuning="lora", teacher_system="brief", out=out, seed=0,
                              data_dir=ROOT.parent / "shared" / "data")


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


def test_plan_with_tune_lists_the_declared_sweeps_before_the_held_out_evaluation(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--out", str(tmp_path / "q"), "--size", "cpu",
                           "--only", "blackbox", "--plan", "--tune"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    order = [line.split()[2].rstrip(":") for line in done.stderr.splitlines() if line.startswith("quality: stage ")]
    sweep = ["blackbox-gad-warmup-epoch", "blackbox-gad-kl-0.05", "blackbox-gad-dlr-2e-5", "blackbox-gad-samples-8",
             "blackbox-opd-xtok-per-token"]
    assert order == ["collect", "blackbox-seqkd", "blackbox-gad", "blackbox-opd-xtok", *sweep, "tune", "eval-blackbox", "report"]
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--out", str(tmp_path / "q"), "--size", "full",
                              "--only", "blackbox", "--plan", "--tune"], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "size full declares no sweep" in refused.stderr


def test_plan_refuses_a_variant_that_sets_the_matched_step_count(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--out", str(tmp_path), "--size", "smoke",
                           "--plan", "--gad-variant", "x:max_steps=3"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "max_steps is fixed by the size" in done.stderr


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


def test_the_cpu_size_gives_the_students_every_ifeval_item_and_the_teacher_row_only_the_first_few(tmp_path: Path) -> None:
    from quality_runs import eval_options, eval_rows

    size = SIZES["cpu"]
    rows = eval_rows("blackbox", tmp_path)
    ifeval, teacher_part, vicuna = eval_options("blackbox", size, plan_args(tmp_path), rows, tmp_path)
    assert ifeval.suites == ["ifeval"] and not ifeval.teacher and not any(m.startswith("teacher=") for m in ifeval.models)
    assert len(ifeval.models) == 4  # base, SeqKD, GAD, cross-tokenizer OPD
    assert teacher_part.suites == [f"ifeval[:{size.teacher_items}]"] and teacher_part.teacher == "teacher"
    assert teacher_part.systems == ["teacher=brief"] and len(teacher_part.models) == 5
    assert vicuna.pairwise == list(size.vicuna_pairs) and not vicuna.teacher and len(vicuna.models) == 4
    students, teacher = eval_options("whitebox", size, plan_args(tmp_path), eval_rows("whitebox", tmp_path), tmp_path)
    assert students.suites == ["gsm8k[:500]", "math500[:100]", "humaneval[:40]"] and not students.teacher
    assert teacher.suites == ["gsm8k[:48]", "math500[:48]", "humaneval[:40]"] and Path(teacher.out).name == "suites-teacher"
    # Every other size keeps one IFEval part with the teacher and judges each student against it.
    parts = eval_options("blackbox", SIZES["compact"], plan_args(tmp_path), rows, tmp_path)
    assert len(parts) == 2 and parts[0].teacher == "teacher" and parts[1].pairwise[0].endswith(":teacher")


def metrics_file(folder: Path, set_name: str, labels: list[str], answers: dict[str, list[str]]) -> None:
    import json

    folder.mkdir(parents=True)
    score = {"accuracy": 0.5, "ci_low": 0.2, "ci_high": 0.8, "n": 2, "passed": 1}  # as opdistill eval writes an IFEval summary
    suite = {**score, **{kind: dict(score) for kind in ("prompt_loose", "instruction_strict", "instruction_loose")}}
    models = {label: {"mean_tokens": 10.0, "eos_rate": 1.0, "repetition_4": 0.0, "suite": suite} for label in labels}
    result = {"prompts": 2, "models": models, "suite": "ifeval", "pairwise": [],
              "paired": [{"x": "smollm2-seqkd", "y": "smollm2-base", "n": 2, "both": 0, "x_only": 1, "y_only": 0, "neither": 1,
                          "difference": 0.5, "p_value": 1.0}]}
    (folder / "metrics.json").write_text(json.dumps({"sets": {set_name: result}}))
    lines = [{"set": set_name, "index": i, "model": label, "prompt": f"prompt {i}", "response": text,
              "finished": True, "tokens": 1} for label, texts in answers.items() for i, text in enumerate(texts)]
    (folder / "generations.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_set_evaluated_in_two_parts_is_kept_twice_with_its_own_answers_and_sameness(tmp_path: Path) -> None:
    """IFEval's student part and its teacher part both name their set `ifeval`: the second must not replace the first,
    and the rows alike are counted from each part's own answers (identical, or one a prefix of the other)."""
    from quality_results import results_markdown, suite_table
    from quality_runs import family_tables, read_metrics

    students = ["smollm2-base", "smollm2-seqkd"]
    metrics_file(tmp_path / "ifeval", "ifeval", students, {"smollm2-base": ["a b", "c"], "smollm2-seqkd": ["a b", "c d"]})
    metrics_file(tmp_path / "ifeval-teacher", "ifeval", ["teacher", *students],
                 {"teacher": ["x", "c"], "smollm2-base": ["a b", "c"], "smollm2-seqkd": ["a", "y"]})
    merged = read_metrics(tmp_path)
    assert set(merged["sets"]) == {"ifeval", "ifeval (ifeval-teacher)"}
    tables = family_tables(merged, ["teacher", *students])
    assert list(tables["ifeval"]["rows"]) == students  # no teacher row where the part had none
    assert tables["ifeval"]["sameness"] == [{"x": "smollm2-base", "y": "smollm2-seqkd", "items": 2, "identical": 1, "prefix": 1}]
    alike = {(p["x"], p["y"]): (p["identical"], p["prefix"]) for p in tables["ifeval (ifeval-teacher)"]["sameness"]}
    assert alike == {("teacher", "smollm2-base"): (1, 0), ("teacher", "smollm2-seqkd"): (0, 0), ("smollm2-base", "smollm2-seqkd"): (0, 1)}
    # The paired tests compare the trained rows with the base, with or without a teacher row first.
    assert "| smollm2-seqkd vs smollm2-base | 2 | 1 / 0 | +0.500 | 1 |" in suite_table(tables["ifeval"])
    assert "| smollm2-seqkd vs smollm2-base | 2 | 1 / 0 | +0.500 | 1 |" in suite_table(tables["ifeval (ifeval-teacher)"])
    assert results_markdown  # imported: the module renders (the full report is exercised by the smoke run)


def test_the_gad_signal_table_reads_the_adversarial_steps_by_quarter() -> None:
    from quality_results import gad_signal_lines

    steps = [{"d_acc": 0.5 + 0.1 * (i // 2), "student_score": float(i), "teacher_score": 1.0, "response_length": 40.0 - i} for i in range(8)]
    lines = gad_signal_lines({"blackbox-gad": {"adversarial_steps": steps}, "blackbox-seqkd": {}})
    assert lines[0].startswith("**blackbox-gad**: 8 adversarial steps")
    assert "| 1–2 | 0.50 | 0.500 | 1.000 | 39.5 |" in lines and "| 7–8 | 0.80 | 6.500 | 1.000 | 33.5 |" in lines
    assert not any("blackbox-seqkd" in line for line in lines)


def test_report_now_writes_interim_tables_from_the_parts_finished_so_far(tmp_path: Path) -> None:
    import quality

    students = ["smollm2-base", "smollm2-seqkd", "smollm2-gad", "smollm2-opd-xtok"]
    metrics_file(tmp_path / "eval-blackbox" / "ifeval", "ifeval", students, {label: ["a", "b"] for label in students})
    quality.main(["--out", str(tmp_path), "--size", "cpu", "--only", "blackbox", "--report-now"])
    markdown = (tmp_path / "results.md").read_text()
    assert "**Interim**" in markdown and "**ifeval** (2 items)" in markdown
    assert "| smollm2-base / smollm2-seqkd | 2 | 2 | 0 |" in markdown  # every answer alike in this fake part


def test_the_tuning_split_is_in_distribution_and_no_student_or_held_out_set_has_it() -> None:
    import json

    from quality_runs import DATA_DIR, VICUNA_QUESTIONS, train_prompts, tuning_prompts

    from opdistill.evaluate.suites import load_suite

    size = SIZES["cpu"]
    tuning = [row["prompt"] for row in tuning_prompts(size, DATA_DIR)]
    trained = {row["prompt"] for row in train_prompts(size.train_prompts, DATA_DIR)}
    assert len(tuning) == size.tune_prompts == len(set(tuning)) and not trained & set(tuning)
    origins = {row["origin"].split(":")[0] for row in tuning_prompts(size, DATA_DIR)}
    assert origins == {"self-instruct", "builtin-train"}  # the training prompts' two sources, interleaved
    held_out = {item.prompt for item in load_suite("ifeval", data_dir=str(DATA_DIR))[1]}
    held_out |= {json.loads(line)["text"] for line in (DATA_DIR / VICUNA_QUESTIONS).read_text().splitlines() if line.strip()}
    assert not held_out & set(tuning)


def test_every_declared_variant_keeps_generator_updates_and_prompts_matched(tmp_path: Path) -> None:
    from quality_runs import sweep_configs

    for name in ("cpu", "smoke"):
        size = SIZES[name]
        configs = training_configs(size, plan_args(tmp_path), tmp_path)
        sweep = sweep_configs(name, size, configs)
        assert len(sweep) == len(size.gad_sweep) + len(size.opd_sweep) >= 2
        for stage, config in sweep.items():
            updates = config["max_steps"] + (config["warmup_steps"] - config["d_only_steps"] if config["method"] == "gad" else 0)
            assert updates == configs["blackbox-seqkd"]["max_steps"] and config["batch_size"] == size.blackbox_batch
            samples = config.get("n_samples", 1)  # OPD: one sample per prompt, as its default
            assert config["rollout_batch_size"] == size.blackbox_batch * samples
    cpu = sweep_configs("cpu", SIZES["cpu"], training_configs(SIZES["cpu"], plan_args(tmp_path), tmp_path))
    assert cpu["blackbox-gad-warmup-epoch"]["max_steps"] == 18 and cpu["blackbox-gad-samples-8"]["rollout_batch_size"] == 32
    assert cpu["blackbox-gad-kl-0.05"]["kl_coef"] == 0.05 and float(cpu["blackbox-gad-dlr-2e-5"]["d_lr"]) == 2e-5  # as train reads it
    per_token = cpu["blackbox-opd-xtok-per-token"]
    assert per_token["divergence"] == "reward" and per_token["cross_tokenizer"] is True and per_token["max_steps"] == 40
    with pytest.raises(SystemExit, match="declares no sweep"):
        sweep_configs("gpu", SIZES["gpu"], {})
    from quality_runs import opd_variant
    with pytest.raises(SystemExit, match="rollout_batch_size is fixed by the size"):
        opd_variant("x:rollout_batch_size=8", cpu["blackbox-opd-xtok-per-token"])


def test_the_tuning_rule_picks_per_method_the_row_the_teacher_finds_likeliest_never_seqkd() -> None:
    from quality_runs import choose

    rows = {"teacher": {"teacher_logprob": -0.2}, "smollm2-seqkd": {"teacher_logprob": -0.9}, "smollm2-gad": {"teacher_logprob": -1.3},
            "smollm2-gad-kl-0.05": {"teacher_logprob": -1.1}, "smollm2-gad-x": {"teacher_logprob": None},
            "smollm2-opd-xtok": {"teacher_logprob": -1.0}, "smollm2-opd-xtok-per-token": {"teacher_logprob": -1.2}}
    assert choose(rows) == {"smollm2-gad": "smollm2-gad-kl-0.05", "smollm2-opd-xtok": "smollm2-opd-xtok"}
    rows["smollm2-gad"]["teacher_logprob"] = -1.0
    assert choose(rows)["smollm2-gad"] == "smollm2-gad"  # the default can win: then no new held-out row


def test_the_tuning_stage_scores_every_row_on_the_tuning_split_only_and_chooses(tiny_model: Path, tmp_path: Path) -> None:
    """A real `opdistill eval` of tiny models in place of the benchmark's: the teacher's own weights as one GAD
    variant must be the one the teacher finds likeliest."""
    import argparse
    import json
    from dataclasses import replace

    from quality_runs import DATA_DIR, tune_stage, tuning_prompts

    import torch
    from transformers import AutoModelForCausalLM

    from opdistill.models import load_tokenizer, resolve_model

    # A random tiny model answers in whitespace (nothing to score), so the real SmolLM2 is the teacher, and a copy
    # of it with noise in every weight is a worse GAD row.
    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"), dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(0.2 * weight.std() * torch.randn_like(weight))
    model.save_pretrained(tmp_path / "noisy")
    load_tokenizer("smollm2-135m-instruct").save_pretrained(tmp_path / "noisy")
    noisy = str(tmp_path / "noisy")
    rows = {"teacher": "smollm2-135m-instruct", "smollm2-seqkd": noisy, "smollm2-gad": noisy, "smollm2-gad-kl": str(tiny_model),
            "smollm2-gad-same": "smollm2-135m-instruct"}
    size = replace(SIZES["smoke"], train_tokens=12)
    args = argparse.Namespace(teacher_system="", precision="fp32", data_dir=DATA_DIR)
    info = tune_stage(size, args, rows)(tmp_path / "tune")
    assert info["choices"] == {"smollm2-gad": "smollm2-gad-same"} and set(info["rows"]) == set(rows)
    assert info["rows"]["smollm2-gad-same"]["teacher_logprob"] > info["rows"]["smollm2-gad"]["teacher_logprob"]
    answered = [json.loads(line) for line in (tmp_path / "tune" / "eval" / "generations.jsonl").read_text().splitlines()]
    assert {row["set"] for row in answered} == {"tune"} and len(answered) == len(rows) * size.tune_prompts
    assert {row["prompt"] for row in answered} <= {p["prompt"] for p in tuning_prompts(size, DATA_DIR)}


def test_a_finished_sweeps_choice_is_a_held_out_row_in_every_later_invocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import quality
    from quality_results import tuning_lines
    from quality_runs import TUNE_STAGE, tuning_results
    from quality_stages import Stages

    monkeypatch.setitem(FAMILIES, "blackbox", dict(FAMILIES["blackbox"]))  # adopting a choice registers a row
    stages = Stages(tmp_path)
    stages.run("blackbox-gad", {"kl_coef": 0.001, "d_lr": 2e-4}, [], lambda d: {"generator_updates": 40})
    stages.run("blackbox-gad-kl", {"kl_coef": 0.05, "d_lr": 2e-4}, [], lambda d: {"generator_updates": 40, "seconds_per_update": 41.0})
    stages.run("blackbox-opd-xtok", {"divergence": "reward_to_go"}, [], lambda d: {"generator_updates": 40})
    stages.run("blackbox-opd-xtok-per-token", {"divergence": "reward"}, [], lambda d: {"generator_updates": 40, "seconds_per_update": 26.0})
    row = {"teacher_logprob": -1.0, "mean_tokens": 50.0, "eos_rate": 1.0, "repetition_4": 0.0, "f1_1": 0.3, "rouge_l": 0.2}
    labels = ["smollm2-seqkd", "smollm2-gad", "smollm2-gad-kl", "smollm2-opd-xtok", "smollm2-opd-xtok-per-token"]
    choices = {"smollm2-gad": "smollm2-gad-kl", "smollm2-opd-xtok": "smollm2-opd-xtok"}  # OPD's default won
    stages.run(TUNE_STAGE, {}, [], lambda d: {"prompts": 64, "rows": {label: row for label in labels}, "choices": choices, "rule": "r"})
    size = quality.adopt_tuned_choices(stages, SIZES["cpu"])
    assert FAMILIES["blackbox"]["smollm2-gad-tuned"] == "blackbox-gad-kl" and "smollm2-opd-xtok-tuned" not in FAMILIES["blackbox"]
    assert size.vicuna_pairs == (*SIZES["cpu"].vicuna_pairs, "smollm2-gad-tuned:smollm2-seqkd")
    assert quality.adopt_tuned_choices(stages, size) == size  # main adopts before the run and again after tuning
    tuning = tuning_results(stages)
    assert tuning["changed"] == {"blackbox-gad-kl": {"kl_coef": 0.05}, "blackbox-opd-xtok-per-token": {"divergence": "reward"}}
    lines = tuning_lines(tuning)
    assert "smollm2-gad: **smollm2-gad-kl**; smollm2-opd-xtok: **smollm2-opd-xtok**" in lines[2]
    assert "| blackbox-gad-kl | kl_coef=0.05 | 40 | 41.0 |" in lines and "| blackbox-opd-xtok-per-token | divergence=reward | 40 | 26.0 |" in lines
    defaults = {"smollm2-gad": "smollm2-gad", "smollm2-opd-xtok": "smollm2-opd-xtok"}
    stages.run(TUNE_STAGE, {"again": True}, [], lambda d: {"prompts": 64, "rows": {}, "choices": defaults, "rule": "r"})
    again = quality.adopt_tuned_choices(stages, size)  # chosen anew: the default won, the old choice leaves
    assert "smollm2-gad-tuned" not in FAMILIES["blackbox"] and again.vicuna_pairs == SIZES["cpu"].vicuna_pairs


def fake_seed_run(out: Path, seed: int, passes: dict[str, list[bool]], suite: str = "ifeval", tuned: dict | None = None) -> Path:
    import json

    (out / "blackbox-seqkd").mkdir(parents=True)
    (out / "blackbox-seqkd" / "done.json").write_text(json.dumps({"key": {"seed": seed}, "finished": 1.0}))
    field = {"ifeval": "key", "gsm8k": "index"}[suite]  # as each suite's scores.jsonl names its items
    for row, items in passes.items():
        folder = out / "eval-blackbox" / "part" / "suites" / suite / row
        folder.mkdir(parents=True)
        (folder / "scores.jsonl").write_text("".join(json.dumps({field: 1000 + i, "passed": p}) + "\n" for i, p in enumerate(items)))
    if tuned:
        (out / "tuned.json").write_text(json.dumps({"choices": tuned}))
    return out


def test_seeds_pool_over_items_with_per_seed_and_over_seed_paired_tests(tmp_path: Path) -> None:
    from quality_seeds import markdown, pool

    base = [True, False, False, False]
    first = fake_seed_run(tmp_path / "s0", 0, {"smollm2-base": base, "smollm2-seqkd": [True, True, False, False],
                                                "smollm2-gad": [True, True, True, False]})
    second = fake_seed_run(tmp_path / "s1", 1, {"smollm2-base": base, "smollm2-seqkd": [False, False, False, False],
                                                 "smollm2-gad": [True, True, True, True], "smollm2-opd-xtok": [True] * 4})
    results = pool([first, second])
    table = results["sets"]["ifeval (blackbox/part)"]
    assert list(table["rows"]) == ["smollm2-base", "smollm2-seqkd", "smollm2-gad"]  # OPD is in one run only
    gad = table["rows"]["smollm2-gad"]
    assert gad["pooled"]["accuracy"] == 0.875 and gad["pooled"]["n"] == 4 and gad["seed_range"] == [0.75, 1.0]
    versus = {(p["x"], p["y"]): p for p in table["paired"]}
    assert set(versus) == {("smollm2-seqkd", "smollm2-base"), ("smollm2-gad", "smollm2-base"), ("smollm2-gad", "smollm2-seqkd")}
    over = versus[("smollm2-gad", "smollm2-seqkd")]["pooled"]
    assert (over["x_more"], over["y_more"], over["p_value"]) == (4, 0, 0.125)  # four items, not eight (seed, item) pairs
    assert versus[("smollm2-gad", "smollm2-seqkd")]["per_seed"]["1"]["x_only"] == 4
    assert "| smollm2-gad | 0.750 | 1.000 | 0.875" in markdown(results)
    with pytest.raises(SystemExit, match="share a seed"):
        pool([first, first])


def test_seeds_read_each_suites_item_ids_and_leave_out_a_row_tuned_differently(tmp_path: Path) -> None:
    from quality_seeds import pool

    rows = {"qwen0.5b-base": [True, False], "qwen0.5b-seqkd": [True, True], "smollm2-gad-tuned": [False, True]}
    first = fake_seed_run(tmp_path / "s0", 0, rows, "gsm8k", tuned={"smollm2-gad": "smollm2-gad-kl-0.05"})
    second = fake_seed_run(tmp_path / "s1", 1, rows, "gsm8k", tuned={"smollm2-gad": "smollm2-gad-samples-8"})
    results = pool([first, second])
    assert results["left_out"] == ["smollm2-gad-tuned"]
    assert list(results["sets"]["gsm8k (blackbox/part)"]["rows"]) == ["qwen0.5b-base", "qwen0.5b-seqkd"]


def test_reuse_from_copies_only_the_keyed_stores_and_keeps_what_a_run_has(tmp_path: Path) -> None:
    from quality_runs import reuse_stores

    source, out = tmp_path / "seed0", tmp_path / "seed1"
    for name in ("collect/teacher.jsonl", "collect/train.jsonl", "eval-blackbox/ifeval/generations.jsonl",
                 "eval-blackbox/vicuna/judge.jsonl", "eval-blackbox/ifeval/suites/ifeval/smollm2-base/scores.jsonl"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("from seed 0\n")
    (out / "eval-blackbox" / "vicuna").mkdir(parents=True)
    (out / "eval-blackbox" / "vicuna" / "judge.jsonl").write_text("its own\n")
    assert reuse_stores(source, out) == 2
    assert (out / "collect" / "teacher.jsonl").read_text() == "from seed 0\n"
    assert (out / "eval-blackbox" / "ifeval" / "generations.jsonl").is_file()
    assert not (out / "collect" / "train.jsonl").exists()  # built from the texts by the collect stage itself
    assert not (out / "eval-blackbox" / "ifeval" / "suites").exists()  # scores follow from the answers
    assert (out / "eval-blackbox" / "vicuna" / "judge.jsonl").read_text() == "its own\n"
    with pytest.raises(SystemExit, match="not a quality run directory"):
        reuse_stores(tmp_path / "nothing", out)


def test_rerunning_a_finished_tuned_run_skips_every_stage_and_reports_the_tuned_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented way to resume is to rerun the command: once the sweep has chosen, the tuned row's stage is in
    the family (it crashed: its config lives in the sweep, not in the size's training configs)."""
    import quality
    from quality_runs import DATA_DIR, TEACHER, TUNE_STAGE, eval_rows, eval_settings, sweep_configs, tuning_rows
    from quality_stages import Stages

    monkeypatch.setitem(FAMILIES, "blackbox", dict(FAMILIES["blackbox"]))
    out = tmp_path.resolve()
    args = quality.parse_args(["--out", str(out), "--size", "cpu", "--only", "blackbox"])
    size = SIZES["cpu"]
    configs = training_configs(size, args, out)
    sweep = sweep_configs("cpu", size, configs)
    stages = Stages(out)
    done = lambda directory: {}  # noqa: E731 - each stage as a finished run leaves it
    stages.run("collect", {"limits": [size.train_prompts, size.train_tokens], "teacher": TEACHER, "precision": "auto",
                           "system": args.teacher_system}, [], done)
    def trained(directory: Path) -> dict:  # what the report reads of a training run
        (directory / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5, "step_seconds": 1.0}\n')
        return {}

    for stage in [*FAMILIES["blackbox"].values(), *sweep]:
        stages.run(stage, configs.get(stage) or sweep[stage], ["collect"], trained)
    stages.run(TUNE_STAGE, {"rows": tuning_rows(out, sweep)}, [], lambda d: {"prompts": 64, "rows": {}, "rule": "r",
               "choices": {"smollm2-gad": "smollm2-gad-kl-0.05", "smollm2-opd-xtok": "smollm2-opd-xtok"}})
    tuned = quality.adopt_tuned_choices(stages, size)
    rows = eval_rows("blackbox", out)
    assert rows["smollm2-gad-tuned"] == str(out / "blackbox-gad-kl-0.05" / "student")
    students = [label for label in rows if label != "teacher"]
    metrics_file(out / "eval-blackbox" / "ifeval", "ifeval", students, {label: ["a", "b"] for label in students})
    stages.run("eval-blackbox", {"rows": rows, "size": eval_settings("blackbox", tuned), "system": args.teacher_system,
                                 "precision": "auto"}, list(FAMILIES["blackbox"].values()), done)
    FAMILIES["blackbox"].pop("smollm2-gad-tuned")  # as a new invocation starts: the declared rows only
    quality.main(["--out", str(out), "--size", "cpu", "--only", "blackbox", "--data-dir", str(DATA_DIR)])
    markdown = (out / "results.md").read_text()
    assert "| smollm2-gad-tuned |" in markdown and "**Interim**" not in markdown
    assert not (out / "blackbox-gad-kl-0.05" / "checkpoints").exists()  # nothing was trained again


def test_tuned_from_trains_the_other_runs_choice_with_this_runs_seed_and_texts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import quality
    from quality_runs import TUNE_STAGE, sweep_configs
    from quality_stages import Stages

    monkeypatch.setitem(FAMILIES, "blackbox", dict(FAMILIES["blackbox"]))
    size = SIZES["cpu"]
    source, here = tmp_path / "seed0", tmp_path / "seed1"
    theirs = training_configs(size, plan_args(source), source)
    chosen = sweep_configs("cpu", size, theirs)["blackbox-gad-warmup-epoch"]
    stages = Stages(source)
    stages.run("blackbox-gad", theirs["blackbox-gad"], [], lambda d: {})
    stages.run("blackbox-gad-warmup-epoch", chosen, [], lambda d: {})
    choices = {"smollm2-gad": "smollm2-gad-warmup-epoch", "smollm2-opd-xtok": "smollm2-opd-xtok"}
    stages.run(TUNE_STAGE, {}, [], lambda d: {"rows": {}, "choices": choices, "rule": "r", "prompts": 64})
    args = plan_args(here)
    args.seed = 1
    ours = training_configs(size, args, here)
    assert quality.take_tuned_choices(source, ours) == choices
    taken = ours["blackbox-gad-warmup-epoch"]
    assert taken["seed"] == 1 and taken["data"] == str(here / "collect" / "train.jsonl")
    assert (taken["warmup_steps"], taken["d_only_steps"], taken["max_steps"]) == (24, 2, 18)
    here.mkdir()
    (here / quality.TAKEN_CHOICES).write_text(json.dumps({"choices": choices}))
    tuned = quality.adopt_tuned_choices(Stages(here), size)
    assert FAMILIES["blackbox"]["smollm2-gad-tuned"] == "blackbox-gad-warmup-epoch" and "smollm2-opd-xtok-tuned" not in FAMILIES["blackbox"]
    assert tuned.vicuna_pairs[-1] == "smollm2-gad-tuned:smollm2-seqkd"
    with pytest.raises(SystemExit, match="has not chosen yet"):
        quality.take_tuned_choices(tmp_path / "nothing", ours)

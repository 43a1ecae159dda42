"""Program-checked suites: answer extraction, intervals and paired tests, `opdistill score` and `eval --suite`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from opdistill.cli import main
from opdistill.errors import OpdistillError
from opdistill.evaluate.answers import gsm8k_correct, gsm8k_extract, math_correct, math_equal, normalize_math
from opdistill.evaluate.stats import mcnemar_exact, paired_comparison, paired_over_seeds, rate_over_seeds, wilson_interval
from opdistill.evaluate.suites import SUITES, load_suite

from conftest import SHARED

DATA = SHARED / "data"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- answers


@pytest.mark.parametrize("response, expected", [
    ("She makes 9 * 2 = $18 a day.\n#### 18", "18"),
    ("The answer is $1,080.00.", "1080"),
    ("Total: 3 + 4 = 7 apples, so \\boxed{7}.", "7"),
    ("First 12, then 15, finally 20", "20"),
    ("The answer is: -3.5 degrees", "-3.5"),
    ("#### 1,234", "1234"),
])
def test_gsm8k_extraction_is_tolerant_of_formats(response, expected):
    assert str(gsm8k_extract(response).normalize()) == str(type(gsm8k_extract(response))(expected).normalize())


def test_gsm8k_stated_answer_wins_over_a_later_number():
    solution = "Some work.\n#### 18"
    # (correct, the extracted answer): the stated 18 is taken, not the later 3; a wrong stated number is still
    # reported; a response without a number extracts nothing and is wrong.
    assert gsm8k_correct("The answer is 18. (I checked 3 times.)", solution) == (True, "18")
    assert gsm8k_correct("#### 17", solution) == (False, "17")
    assert gsm8k_correct("no number here", solution) == (False, None)


def test_every_gsm8k_reference_solution_scores_correct_and_a_changed_number_does_not():
    rows = [json.loads(line) for line in (DATA / "gsm8k_test.jsonl").read_text().splitlines()]
    assert all(gsm8k_correct(r["answer"], r["answer"])[0] for r in rows)
    wrong = [r["answer"].rsplit("####", 1)[0] + "#### 100000007" for r in rows[:50]]
    assert not any(gsm8k_correct(w, r["answer"])[0] for w, r in zip(wrong, rows))


@pytest.mark.parametrize("found, gold", [
    ("\\dfrac{14}{3}", "\\frac{14}{3}"), ("14/3", "\\frac{14}{3}"), ("0.5", "\\frac12"), ("90", "90^\\circ"),
    ("x = 5", "x=5"), ("Evelyn", "\\text{Evelyn}"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("11\\sqrt{2}", "11\\sqrt2"), ("1,000", "1000"), ("-\\frac{1}{2}", "-0.5"),
])
def test_math_answers_equal_after_normalisation(found, gold):
    assert math_equal(found, gold)


@pytest.mark.parametrize("found, gold", [("1,-2", "-2,1"), ("\\sqrt{8}", "2\\sqrt{2}"), ("\\frac{14}{3}", "\\frac{14}{5}"), ("3", "-3")])
def test_math_answers_that_differ_or_that_this_cannot_check_do_not_match(found, gold):
    assert not math_equal(found, gold)  # the docstring lists what is not checked: reordering, symbolic equality


def test_every_math500_solution_matches_its_own_answer():
    rows = [json.loads(line) for line in (DATA / "math500_test.jsonl").read_text().splitlines()]
    assert len(rows) == 500
    assert all(math_correct(r["solution"], r["answer"])[0] for r in rows)
    assert all(math_correct(f"Thus $\\boxed{{{r['answer']}}}$.", r["answer"])[0] for r in rows)
    assert normalize_math("\\boxed{\\text{(C)}}") == "(c)"


# ---------------------------------------------------------------- intervals and paired tests


def test_wilson_interval_known_values_and_edges():
    low, high = wilson_interval(5, 10)
    assert math.isclose(low, 0.2366, abs_tol=1e-4) and math.isclose(high, 0.7634, abs_tol=1e-4)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and 0.15 < high < 0.17  # not a point at 0 successes
    assert wilson_interval(0, 0) == (None, None)


def test_mcnemar_exact_p_values():
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    result = paired_comparison([True, True, False, False, True], [True, False, False, True, False])
    assert (result["both"], result["x_only"], result["y_only"], result["neither"]) == (1, 2, 1, 1)
    assert result["difference"] == pytest.approx(0.2)
    with pytest.raises(ValueError):
        paired_comparison([True], [True, False])


def test_over_seeds_the_item_is_the_unit_and_repeating_a_run_adds_no_evidence():
    one = [[True, True, True, False, False, False]]
    x = [[True, True, True, True, False, True]]
    # Three copies of the same two runs: the same shares, interval and p as one copy (pooling (seed, item) pairs as
    # independent would give McNemar(6, 0) = 1/32 instead of McNemar(2, 0) = 1/2).
    assert paired_over_seeds(x * 3, one * 3) == {**paired_over_seeds(x, one), "seeds": 3}
    assert rate_over_seeds(one * 3)["ci_low"] == rate_over_seeds(one)["ci_low"]
    versus = paired_over_seeds(x * 3, one * 3)
    assert (versus["x_more"], versus["y_more"], versus["p_value"]) == (2, 0, 0.5)
    assert versus["difference"] == pytest.approx(2 / 6)
    # Item shares: an item X passes in 2 of 3 seeds and Y in 1 counts for X; 1 of 3 against 1 of 3 is a tie.
    split = paired_over_seeds([[True, False], [True, True], [False, False]], [[True, False], [False, False], [False, True]])
    assert (split["x_more"], split["y_more"]) == (1, 0) and split["difference"] == pytest.approx((2 / 3 - 1 / 3) / 2)
    rate = rate_over_seeds([[True, False], [True, True]])  # item shares 1 and 1/2
    assert rate["accuracy"] == pytest.approx(0.75)
    assert rate["ci_low"] == pytest.approx(0.75 - 1.959963984540054 * math.sqrt(0.125 / 2))
    with pytest.raises(ValueError):
        rate_over_seeds([[True], [True, False]])


# ---------------------------------------------------------------- opdistill score


def score(tmp_path: Path, suite: str, rows: list[dict], name: str, *extra: str) -> dict:
    responses = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    out = tmp_path / name
    assert main(["score", "--suite", suite, "--responses", str(responses), "--out", str(out), "--data-dir", str(DATA), *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_score_gsm8k_writes_rows_and_summary_and_a_paired_test(tmp_path, capsys):
    rows = [json.loads(line) for line in (DATA / "gsm8k_test.jsonl").read_text().splitlines()[:12]]
    good = [{"index": i, "response": r["answer"]} for i, r in enumerate(rows)]
    half = [{"index": i, "response": r["answer"] if i % 2 else "#### -1"} for i, r in enumerate(rows)]
    summary = score(tmp_path, "gsm8k", good, "good")
    assert (summary["suite"], summary["n"], summary["passed"], summary["accuracy"]) == ("gsm8k", 12, 12, 1.0)
    assert 0.7 < summary["ci_low"] < 1.0 and summary["ci_high"] == 1.0
    scored = [json.loads(line) for line in (tmp_path / "good" / "scores.jsonl").read_text().splitlines()]
    assert [s["index"] for s in scored] == list(range(12)) and all(s["passed"] for s in scored)
    summary = score(tmp_path, "gsm8k", half, "half", "--against", str(tmp_path / "good"))
    assert summary["passed"] == 6
    assert summary["paired"]["x_only"] == 0 and summary["paired"]["y_only"] == 6
    assert summary["paired"]["p_value"] == pytest.approx(2 / 64)
    assert "McNemar p = 0.0312" in capsys.readouterr().out


def test_score_math500_by_unique_id(tmp_path):
    rows = [json.loads(line) for line in (DATA / "math500_test.jsonl").read_text().splitlines()[:6]]
    answers = [{"unique_id": r["unique_id"], "response": f"\\boxed{{{r['answer']}}}" if i < 4 else "I do not know."} for i, r in enumerate(rows)]
    summary = score(tmp_path, "math500", answers, "m")
    assert (summary["n"], summary["passed"], summary["items_in_suite"]) == (6, 4, 500)


@pytest.mark.parametrize("rows, message", [
    ([{"response": "x"}], "no `index` field"),
    ([{"index": 99999, "response": "x"}], "is not an item of suite gsm8k"),
    ([{"index": 0, "response": "x"}, {"index": 0, "response": "y"}], "answered twice"),
    ([{"index": 0, "response": 5}], "field `response` must be a str"),
    ([{"index": True, "response": "x"}], "is not an item"),
])
def test_bad_response_files_name_the_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(OpdistillError, match=message) as caught:
        from opdistill.evaluate.suites import score_file

        score_file("gsm8k", str(path), str(tmp_path / "out"), data_dir=str(DATA))
    assert "r.jsonl:" in str(caught.value)


def test_a_missing_data_folder_says_how_to_give_it(tmp_path, monkeypatch):
    monkeypatch.delenv("OPDISTILL_DATA", raising=False)
    with pytest.raises(OpdistillError, match="--data-dir"):
        load_suite("gsm8k")
    with pytest.raises(OpdistillError, match="gsm8k_test.jsonl"):
        load_suite("gsm8k", data_dir=str(tmp_path))
    monkeypatch.setenv("OPDISTILL_DATA", str(DATA))
    assert len(load_suite("gsm8k")[1]) == 1319
    assert set(SUITES) == {"ifeval", "gsm8k", "math500", "humaneval"}


# ---------------------------------------------------------------- opdistill eval --suite


def test_eval_suite_generates_scores_and_pairs_two_models(tiny_model, tmp_path):
    from opdistill.evaluate.run import EvalOptions, metrics_lines, run_eval

    metrics = run_eval(EvalOptions(models=[f"a={tiny_model}", f"b={tiny_model}"], prompts=[], suites=["gsm8k[0:3]", "math500[:2]"],
                                   data_dir=str(DATA), out=str(tmp_path / "ev"), max_new_tokens=8, embeddings=False, progress=False))
    result = metrics["sets"]["gsm8k"]
    assert result["prompts"] == 3 and result["suite"] == "gsm8k"
    for label in ("a", "b"):
        assert result["models"][label]["suite"]["n"] == 3
        rows = (tmp_path / "ev" / "suites" / "gsm8k" / label / "scores.jsonl").read_text().splitlines()
        assert [json.loads(r)["index"] for r in rows] == [0, 1, 2]
    # the same weights answer identically, so the paired test sees no discordant item
    assert result["paired"] == [{"x": "a", "y": "b", "n": 3, "both": result["paired"][0]["both"], "x_only": 0, "y_only": 0,
                                 "neither": 3 - result["paired"][0]["both"], "difference": 0.0, "p_value": 1.0, "test": "mcnemar_exact"}]
    assert metrics["sets"]["math500"]["models"]["a"]["suite"]["n"] == 2
    assert any("McNemar p = 1" in line for line in metrics_lines(metrics))
    from opdistill.report import write_report

    page = write_report([tmp_path / "ev"]).read_text(encoding="utf-8")
    assert "Suite <code>gsm8k</code>" in page and "Paired tests on the same items" in page and "95% interval" in page


def test_score_humaneval_runs_chat_answers_in_the_sandbox(tmp_path):
    import gzip

    problems = [json.loads(line) for line in gzip.open(DATA / "HumanEval.jsonl.gz", "rt").read().splitlines()[:3]]
    whole = problems[0]["prompt"] + problems[0]["canonical_solution"]
    answers = [{"task_id": problems[0]["task_id"], "response": f"Here is the function:\n```python\n{whole}```\nIt works."},
               {"task_id": problems[1]["task_id"], "response": problems[1]["canonical_solution"]},
               {"task_id": problems[2]["task_id"], "response": "```python\nimport os\nprint(os.environ)\n```"}]
    summary = score(tmp_path, "humaneval", answers, "he")
    assert (summary["n"], summary["passed"]) == (3, 2)
    rows = [json.loads(line) for line in (tmp_path / "he" / "scores.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in rows] == [True, True, False] and rows[2]["status"] in {"failed", "error"}


def test_score_ifeval_writes_instruction_results_in_record_order(tmp_path):
    rows = [json.loads(line) for line in (DATA / "ifeval_input_data.jsonl").read_text().splitlines()]
    lowercase = next(r for r in rows if r["instruction_id_list"] == ["change_case:english_lowercase"])
    answers = [{"key": lowercase["key"], "response": "all of this answer is written in lowercase letters only."},
               {"key": rows[0]["key"], "response": "Too short."}]
    summary = score(tmp_path, "ifeval", answers, "if")
    assert summary["n"] == 2 and summary["passed"] == 1 and summary["instruction_strict"]["n"] == 1 + len(rows[0]["instruction_id_list"])
    scored = [json.loads(line) for line in (tmp_path / "if" / "scores.jsonl").read_text().splitlines()]
    assert scored[0] == {"key": lowercase["key"], "passed": True, "passed_loose": True,
                         "instructions": [{"id": "change_case:english_lowercase", "strict": True, "loose": True}]}
    assert [i["id"] for i in scored[1]["instructions"]] == rows[0]["instruction_id_list"]


def test_vicuna_questions_are_a_prompt_set_and_gpt35_answers_join_as_a_reference():
    from opdistill.evaluate.prompts import join_answer_file, load_eval_set

    questions = load_eval_set(f"vicuna={DATA / 'vicuna80_questions.jsonl'}")
    assert questions.name == "vicuna" and len(questions.records) == 80
    assert questions.records[0].messages == [{"role": "user", "content": "How can I improve my time management skills?"}]
    assert join_answer_file(questions, DATA / "vicuna80_answers_gpt-3.5.jsonl") == 80
    assert questions.reference_names == ["gpt-3.5-turbo:20230327"]
    assert questions.references[0]["gpt-3.5-turbo:20230327"].startswith("Here are some tips")

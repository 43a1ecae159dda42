"""A judge whose error is measured: logit verdicts, the length-controlled win rate, the calibration set (issue 25 §2)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from opdistill.evaluate.calibration import (
    KINDS, REFUSAL, build_calibration_set, calibration_accuracy, first_half, item_score, looped, wrong_final_answer,
)
from opdistill.evaluate.judge import (
    JudgeCache, LocalJudge, Verdict, judge_pair_probabilities, pair_messages, pair_requests, pairwise_summary, probability_key,
)
from opdistill.evaluate.judge_stats import (
    fit_logistic, length_controlled_win_rate, length_feature, probability_outcomes, probability_summary, verdict_probability,
    verdict_prompt_ids, verdict_token_ids,
)

from conftest import SHARED, build_tiny_model

sys.path.insert(0, str(Path(__file__).parent))
from openai_stub_server import length_score  # noqa: E402

DATA = SHARED / "data"


# ---------------------------------------------------------------- pure statistics (float64, hand-computed)


def test_length_feature_is_scaled_by_the_sample_std_but_not_centred():
    # d = 1, -1, 3: mean 1, sample variance (0 + 4 + 4) / 2 = 4, sd 2
    assert length_feature(np.array([11, 9, 13]), np.array([10, 10, 10])) == pytest.approx(np.tanh([0.5, -0.5, 1.5]))
    assert not length_feature(np.array([30, 40]), np.array([10, 20])).any()  # a constant difference: no feature


def test_logistic_fit_recovers_its_coefficients_and_the_raw_mean_without_a_feature():
    feature = np.linspace(-1, 1, 41)
    outcomes = 1 / (1 + np.exp(-(0.3 - 1.5 * feature)))  # continuous outcomes exactly on the model
    assert fit_logistic(feature, outcomes, ridge=0.0) == pytest.approx((0.3, -1.5), abs=1e-8)
    y = np.array([1.0, 0.0, 0.5, 1.0, 0.25])
    b0, b1 = fit_logistic(np.zeros(5), y)
    assert b1 == 0.0 and 1 / (1 + math.exp(-b0)) == pytest.approx(y.mean(), abs=1e-12)  # the intercept is never shrunk


def skewed_lengths(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X longer in about three prompts of four, so a length-loving judge gives X far more than half."""
    rng = np.random.default_rng(seed)
    length_y = rng.integers(100, 400, n)
    return length_y + rng.integers(-80, 240, n), length_y


def test_length_controlled_win_rate_removes_what_length_explains():
    length_x, length_y = skewed_lengths()
    feature = length_feature(length_x, length_y)
    explained = list(1 / (1 + np.exp(-2.0 * feature)))  # the judge's preference is the length alone
    result = length_controlled_win_rate(explained, list(length_x), list(length_y))
    assert result["win_rate"] > 0.7 and result["lc_win_rate"] == pytest.approx(0.5, abs=0.02)  # the ridge keeps ~1 point
    assert length_controlled_win_rate(explained, list(length_x), list(length_y), ridge=0.0)["lc_win_rate"] == pytest.approx(0.5, abs=1e-9)
    assert result["length_coef"] > 1.5 and result["lc_ci_high"] < 0.55 < result["win_rate"]  # noiseless: a narrow interval

    # No length effect: every length pair comes with the same outcomes (1, 1, ½, 0), so they are uncorrelated exactly.
    outcomes = [1.0, 1.0, 0.5, 0.0] * 10
    repeated_x, repeated_y = [x for x in length_x[:10] for _ in range(4)], [y for y in length_y[:10] for _ in range(4)]
    result = length_controlled_win_rate(outcomes, repeated_x, repeated_y)
    assert result["length_coef"] == pytest.approx(0.0, abs=1e-9) and result["lc_win_rate"] == pytest.approx(0.625, abs=1e-9)
    # Random outcomes correlate with length by chance at n = 40: the LC rate moves, within its bootstrap interval.
    rng = np.random.default_rng(1)
    unrelated = list(rng.choice([0.0, 0.5, 1.0], size=40, p=[0.2, 0.2, 0.6]))
    result = length_controlled_win_rate(unrelated, list(length_x), list(length_y))
    assert result["lc_ci_low"] < result["win_rate"] < result["lc_ci_high"]

    # A judge that always picks the longer answer separates the data: the ridge keeps b1 finite and the LC rate
    # moves toward ½ without reaching it (documented in judge_stats).
    longer = list((length_x > length_y).astype(float))
    result = length_controlled_win_rate(longer, list(length_x), list(length_y))
    assert 0.5 < result["lc_win_rate"] < result["win_rate"] - 0.05 and math.isfinite(result["length_coef"])


def test_length_controlled_win_rate_degenerate_inputs():
    assert length_controlled_win_rate([1.0, 0.0, 0.5, 1.0], [30, 40, 50, 60], [10, 20, 30, 40])["lc_win_rate"] == pytest.approx(0.625)
    assert length_controlled_win_rate([1.0, 1.0], [5, 50], [10, 10])["lc_win_rate"] == 1.0
    assert length_controlled_win_rate([], [], [])["lc_win_rate"] is None
    with pytest.raises(ValueError):
        length_controlled_win_rate([1.2], [1], [1])
    first = length_controlled_win_rate([1.0, 0.0, 1.0, 0.5, 0.0], [9, 3, 8, 5, 2], [4, 4, 4, 4, 4])
    assert first == length_controlled_win_rate([1.0, 0.0, 1.0, 0.5, 0.0], [9, 3, 8, 5, 2], [4, 4, 4, 4, 4])  # seeded bootstrap


def test_order_averaged_probabilities_and_their_summary():
    assert verdict_probability(0.0, 0.0) == 0.5
    assert verdict_probability(math.log(3), 0.0) == pytest.approx(0.75)
    assert verdict_probability(1000.0, 0.0) == 1.0 and verdict_probability(0.0, 1000.0) == 0.0
    p_first = [0.9, 0.6, 0.2, 0.7]  # P(A): X first for prompts 0 and 1, then Y first
    assert probability_outcomes(p_first) == pytest.approx([(0.9 + 0.8) / 2, (0.6 + 0.3) / 2])
    summary = probability_summary(p_first)
    # prompt 0: X preferred in both orders (a win); prompt 1: the judge picks A both times (a tie)
    assert (summary["wins"], summary["ties"], summary["losses"], summary["order_consistency"]) == (1, 1, 0, 0.5)
    assert summary["win_rate"] == pytest.approx(0.65) and summary["unparsed"] == summary["failed"] == 0
    assert summary["sign_p"] == 1.0  # one win, no loss: P(|Binomial(1, 1/2) - 1/2| >= 1/2) = 1
    decisive = probability_summary([0.9] * 9 + [0.1] * 9)  # X preferred in both orders on all nine prompts
    assert decisive["wins"] == 9 and decisive["sign_p"] == pytest.approx(2 / 2 ** 9)
    with_lengths = probability_summary(p_first, ([10, 20], [5, 30]))
    assert {"lc_win_rate", "lc_ci_low", "lc_ci_high", "length_coef"} <= set(with_lengths)


def test_pairwise_summary_adds_the_length_controlled_rate_over_judged_prompts_only():
    verdict = lambda v: Verdict(f"Verdict: {v}", v, 1)  # noqa: E731
    verdicts = [verdict("A"), verdict("B"), None, Verdict("?", None, 3), verdict("B"), verdict("A"), verdict("B"), verdict("A")]
    summary = pairwise_summary(verdicts, ([50, 10, 99, 99], [10, 50, 1, 1]))
    assert (summary["n"], summary["failed"], summary["unparsed"]) == (2, 1, 1)
    assert summary["win_rate"] == 0.5 and summary["lc_win_rate"] is not None
    assert "lc_win_rate" not in pairwise_summary(verdicts)


# ---------------------------------------------------------------- logit verdicts on a real (tiny, random) local model


def short_requests() -> list[list[dict[str, str]]]:
    questions = ["What is two plus two?", "Name a colour.", "Say hello in a friendly and complete sentence, please."]
    x = ["Four.", "Blue, like the sky on a clear day.", "Hello there, it is nice to meet you!"]
    y = ["Five, I think.", "Table.", "Hi."]
    return pair_requests(questions, x, y)


def test_verdict_tokens_are_every_spelling_of_a_and_b(tiny_model):
    tokenizer = LocalJudge(str(tiny_model), precision="fp32").teacher.tokenizer
    ids_a, ids_b = verdict_token_ids(tokenizer)
    assert all(tokenizer.decode([i]).strip() == "A" for i in ids_a) and all(tokenizer.decode([i]).strip() == "B" for i in ids_b)
    for spelling in ("A", " A"):
        encoded = tokenizer(spelling, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            assert encoded[0] in ids_a
    assert tokenizer.decode(verdict_prompt_ids(tokenizer, pair_messages("q", "a", "b"))).endswith("<|im_start|>assistant\nVerdict:")


def test_logit_verdicts_match_an_unpadded_forward_pass_and_any_batch_size(tiny_model):
    requests = short_requests()
    judge = LocalJudge(str(tiny_model), precision="fp32", batch_size=4)
    batched = judge.pair_probabilities(requests)
    assert judge.forward_passes == 2 and all(0.0 < p < 1.0 for p in batched)
    assert LocalJudge(str(tiny_model), precision="fp32", batch_size=1).pair_probabilities(requests) == pytest.approx(batched, abs=1e-5)
    assert judge.pair_probabilities(requests) == batched  # deterministic

    # The same probability from a plain forward pass over one unpadded prompt, computed here from its definition.
    tokenizer, model = judge.teacher.tokenizer, judge.teacher.sampler.policy
    ids_a, ids_b = verdict_token_ids(tokenizer)
    with torch.no_grad():
        logits = model(torch.tensor([verdict_prompt_ids(tokenizer, requests[2])])).logits[0, -1].double()
    mass_a, mass_b = torch.logsumexp(logits[ids_a], 0), torch.logsumexp(logits[ids_b], 0)
    assert batched[2] == pytest.approx(float(torch.exp(mass_a) / (torch.exp(mass_a) + torch.exp(mass_b))), abs=1e-5)

    summary = probability_summary(batched)
    assert summary["n"] == 3 and 0.0 < summary["win_rate"] < 1.0 and summary["method"] == "logit"


def test_logit_verdicts_are_cached_so_a_rerun_does_no_forward_pass(tiny_model, tmp_path):
    requests = short_requests()
    judge = LocalJudge(str(tiny_model), precision="fp32", batch_size=4)
    cache = JudgeCache(tmp_path / "judge.jsonl")
    first = judge_pair_probabilities(judge, cache, requests + requests[:2], progress=False)  # two duplicates: asked once
    cache.close()
    assert judge.forward_passes == 2 and first[6:] == first[:2]
    rows = [json.loads(line) for line in (tmp_path / "judge.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(row["kind"] == "pair_logit" and 0 < row["p_first"] < 1 for row in rows)

    cache = JudgeCache(tmp_path / "judge.jsonl")  # the rerun: a fresh cache read from the file
    again = judge_pair_probabilities(judge, cache, requests, progress=False)
    cache.close()
    assert judge.forward_passes == 2 and again == first[:6]


# ---------------------------------------------------------------- the calibration set


def test_degradations():
    assert wrong_final_answer("She has 3+4 = 7 apples.\n#### 7", 2) == "She has 3+4 = 9 apples.\n#### 9"
    assert wrong_final_answer("It costs 1,000 + 1,125 = 2,125\n#### 2,125", 1) == "It costs 1,000 + 1,125 = 2,126\n#### 2,126"
    assert wrong_final_answer("He had 170, gave 153, so 17 are left.\n#### 17", 1) == "He had 170, gave 153, so 18 are left.\n#### 18"
    assert wrong_final_answer("No mention in the steps.\n#### 5", 3) == "No mention in the steps.\n#### 8"
    assert wrong_final_answer("The answer is a half.\n#### 0.5", 1) is None
    assert first_half("one two three four five six") == "one two three"
    assert looped("The sky is blue. Grass is green and the sea is wide.") == "The sky is blue. The sky is blue. The sky is blue. The sky is blue."
    assert item_score(0.75) == 1.0 and item_score(0.5) == 0.5 and item_score(0.25) == 0.0


def test_calibration_set_is_deterministic_and_every_degradation_differs():
    items = build_calibration_set(DATA, n_per_kind=4, seed=0)
    assert [item.kind for item in items] == [kind for kind in KINDS for _ in range(4)]
    assert items == build_calibration_set(DATA, n_per_kind=4, seed=0)
    assert items != build_calibration_set(DATA, n_per_kind=4, seed=1)
    assert all(item.good != item.bad and item.question and item.good.strip() for item in items)
    smaller = build_calibration_set(DATA, n_per_kind=2, seed=0)
    assert all(item in items for item in smaller)  # a larger set extends a smaller one

    dataset = {json.dumps(row["question"]): row["answer"] for row in map(json.loads, (DATA / "gsm8k_test.jsonl").open())}
    final = lambda text: int(re.search(r"####\s*(-?[\d,]+)\s*$", text)[1].replace(",", ""))  # noqa: E731
    for item in items:
        if item.kind == "gsm8k_wrong_answer":
            assert final(item.good) == final(dataset[json.dumps(item.question)]) != final(item.bad)
            assert "<<" not in item.good and item.bad.count("\n") == item.good.count("\n")
        elif item.kind.startswith("humaneval"):
            assert item.good.startswith("```python\n") and item.bad.split('"""')[:2] == item.good.split('"""')[:2]
        elif item.kind == "truncated":
            assert item.good.startswith(item.bad) and len(item.bad) <= len(item.good) / 2
        elif item.kind == "looped":
            assert len(item.bad) >= len(item.good)
        elif item.kind == "refusal":
            assert item.bad == REFUSAL
    off_topic = [item for item in items if item.kind == "off_topic"]
    assert all(a.bad == b.good for a, b in zip(off_topic, off_topic[1:]))  # each is the next question's answer


# ---------------------------------------------------------------- its accuracy, over real HTTP and with a local judge


def test_calibration_accuracy_of_an_http_judge_that_prefers_longer_answers(judge_server, tmp_path):
    from opdistill.evaluate.judge import ApiJudge

    url, state = judge_server()  # the stub's rule: 1 + words // 3 points, capped at 10; the higher score wins
    items = build_calibration_set(DATA, n_per_kind=3, seed=0)
    cache = JudgeCache(tmp_path / "judge.jsonl")
    result = calibration_accuracy(ApiJudge(url, "stub", None), items, cache, progress=False)
    cache.close()

    # By hand: the rule is order-independent, so an item scores 1, ½ or 0 as the good answer scores more, the same or less.
    def expected(chosen):
        scores = [1.0 if length_score(i.good) > length_score(i.bad) else 0.5 if length_score(i.good) == length_score(i.bad) else 0.0
                  for i in chosen]
        return sum(scores) / len(scores)

    assert result["method"] == "text" and (result["n"], result["unparsed"], result["failed"]) == (21, 0, 0)
    assert result["accuracy"] == pytest.approx(expected(items))
    for kind in KINDS:
        assert result["per_kind"][kind]["accuracy"] == pytest.approx(expected([i for i in items if i.kind == kind]))
    assert result["per_kind"]["refusal"]["accuracy"] == 1.0  # 30+ words beat seven
    assert result["per_kind"]["looped"]["accuracy"] <= 0.5  # never shorter: a length-loving judge cannot win these
    assert result["order_consistency"] == 1.0 and result["flag"] == (result["accuracy"] < 0.8)
    assert result["ci_low"] < result["accuracy"] < result["ci_high"] or result["accuracy"] in (0.0, 1.0)

    asked = state.requests
    cache = JudgeCache(tmp_path / "judge.jsonl")
    assert calibration_accuracy(ApiJudge(url, "stub", None), items, cache, progress=False) == result
    cache.close()
    assert state.requests == asked  # the rerun is served from judge.jsonl


def test_a_position_biased_or_mute_http_judge_is_flagged(judge_server, tmp_path):
    from opdistill.evaluate.judge import ApiJudge

    items = build_calibration_set(DATA, n_per_kind=1, seed=0)
    url, _ = judge_server(judge_mode="first")  # always "Verdict: A": every item a tie
    cache = JudgeCache(tmp_path / "first.jsonl")
    result = calibration_accuracy(ApiJudge(url, "stub", None), items, cache, progress=False)
    assert (result["accuracy"], result["ties"], result["order_consistency"], result["flag"]) == (0.5, 7, 0.0, True)
    # Wilson interval of 3.5 of 7, by hand: centre ½, half 1.96·sqrt(0.25/7 + 1.96²/196) / (1 + 1.96²/7)
    half = 1.96 * math.sqrt(0.25 / 7 + 1.96 ** 2 / 196) / (1 + 1.96 ** 2 / 7)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-4)

    url, _ = judge_server(judge_mode="garbage")  # never parses: every item wrong, none dropped
    cache = JudgeCache(tmp_path / "garbage.jsonl")
    result = calibration_accuracy(ApiJudge(url, "stub", None), items, cache, retries=0, progress=False)
    assert (result["n"], result["accuracy"], result["unparsed"], result["flag"]) == (7, 0.0, 7, True)


def test_calibration_accuracy_of_a_local_logit_judge(tiny_model, tmp_path):
    items = [item for item in build_calibration_set(DATA, n_per_kind=1, seed=0) if len(item.good) < 2000]
    judge = LocalJudge(str(tiny_model), precision="fp32", batch_size=8)
    cache = JudgeCache(tmp_path / "judge.jsonl")
    result = calibration_accuracy(judge, items, cache, progress=False)
    passes = judge.forward_passes
    assert result["method"] == "logit" and result["n"] == len(items) and result["unparsed"] == result["failed"] == 0
    assert set(result["per_kind"]) == {item.kind for item in items}
    assert calibration_accuracy(judge, items, cache, progress=False) == result and judge.forward_passes == passes
    cache.close()

    # The reference, from the judge's own uncached P(A) of both orders: an item scores 1 when the order-averaged
    # preference for the good answer is above 1/2, 1/2 at an exact tie, else 0 (the module docstring's rules).
    n = len(items)
    p_first = judge.pair_probabilities(pair_requests([i.question for i in items], [i.good for i in items], [i.bad for i in items]))
    preference = [(good_first + 1.0 - bad_first) / 2 for good_first, bad_first in zip(p_first[:n], p_first[n:])]
    scores = [1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in preference]
    consistent = [(good_first > 0.5) == (bad_first < 0.5) for good_first, bad_first in zip(p_first[:n], p_first[n:])]
    assert result["accuracy"] == pytest.approx(sum(scores) / n, abs=1e-12)
    assert result["mean_preference"] == pytest.approx(sum(preference) / n, abs=1e-12)
    assert result["order_consistency"] == pytest.approx(sum(consistent) / n, abs=1e-12)
    for kind, summary in result["per_kind"].items():
        mine = [i for i, item in enumerate(items) if item.kind == kind]
        assert summary["accuracy"] == pytest.approx(sum(scores[i] for i in mine) / len(mine), abs=1e-12), kind
    with pytest.raises(ValueError):
        calibration_accuracy(judge, items, cache, method="coin")


def test_eval_with_a_logit_judge_reports_lc_win_rate_and_calibration(tiny_model, tmp_path):
    """`opdistill eval --judge-local M --judge-logits --pairwise` end to end: the logit verdicts, the length-controlled
    win rate beside the raw one, and the judge's calibration accuracy in metrics.json and in the printed lines."""
    from opdistill.evaluate.run import EvalOptions, metrics_lines, run_eval

    # s is another random model: the same model on both sides samples the same answers (the same seeded streams),
    # and identical answers make every outcome exactly 1/2 whatever the judge computes.
    other = build_tiny_model(tmp_path / "other", seed=1)
    out = tmp_path / "eval"
    options = dict(models=[f"t={tiny_model}", f"s={other}"], systems=["t=Be brief."], prompts=["builtin:heldout[:4]"],
                   out=str(out), max_new_tokens=6, temperature=1.0, judge_local=str(tiny_model), judge_logits=True,
                   judge_calibration=1, data_dir=str(DATA), pairwise=["s:t"], embeddings=False, progress=False)
    metrics = run_eval(EvalOptions(**options))
    pair = metrics["sets"]["heldout"]["pairwise"][0]
    assert pair["method"] == "logit" and pair["n"] == 4 and pair["unparsed"] == 0

    # The reference, from what the run left on disk: the answers (generations.jsonl) and the judge's P(A) of both
    # orders (judge.jsonl). Per prompt s's order-averaged preference; the win rate is their mean, and the
    # length-controlled one is those outcomes fitted against the answers' lengths in characters.
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    by_label = {label: {row["index"]: row for row in rows if row["model"] == label} for label in ("s", "t")}
    order = sorted(by_label["s"])
    questions = [by_label["s"][i]["prompt"] for i in order]
    answers_s, answers_t = [by_label["s"][i]["response"] for i in order], [by_label["t"][i]["response"] for i in order]
    assert answers_s != answers_t
    stored = {row["key"]: row["p_first"] for row in map(json.loads, (out / "judge.jsonl").read_text().splitlines())
              if row.get("kind") == "pair_logit"}
    p_first = [stored[probability_key(metrics["judge"]["name"], m)] for m in pair_requests(questions, answers_s, answers_t)]
    outcomes = [(s_first + 1.0 - t_first) / 2 for s_first, t_first in zip(p_first[:4], p_first[4:])]
    expected = length_controlled_win_rate(outcomes, [len(a) for a in answers_s], [len(a) for a in answers_t])
    assert pair["win_rate"] == pytest.approx(sum(outcomes) / 4, abs=1e-12)
    for key in ("lc_win_rate", "lc_ci_low", "lc_ci_high", "length_coef"):
        assert pair[key] == pytest.approx(expected[key], abs=1e-12), key
    calibration = metrics["judge"]["calibration"]
    assert calibration["method"] == "logit" and calibration["n"] == 7 and calibration["flag"] is True  # a random model
    assert set(calibration["per_kind"]) == {"gsm8k_wrong_answer", "humaneval_other_solution", "humaneval_stub", "truncated",
                                            "looped", "off_topic", "refusal"}
    lines = metrics_lines(metrics)
    assert any(line.startswith("judge calibration (logit)") and "UNDER 80%" in line for line in lines)
    judged = (out / "judge.jsonl").read_text()
    again = run_eval(EvalOptions(**options))  # every verdict and calibration probability comes from judge.jsonl
    assert (out / "judge.jsonl").read_text() == judged
    assert again["judge"]["calibration"]["accuracy"] == calibration["accuracy"]

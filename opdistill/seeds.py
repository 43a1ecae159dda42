"""Seed mixing: one function turns (run seed, step, index, ...) into an independent-looking seed.

Everything that must give the same random numbers on any number of processes and after a resume (data
order, rollout streams, GKD's on-policy coin, random masks) derives its seed here from what identifies it.
"""

from __future__ import annotations

MULTIPLIER = 1_000_003  # a prime: (a, b) -> a * M + b keeps small tuples distinct


def mix_seed(*parts: int) -> int:
    """A non-negative 63-bit seed from integer parts, in order: mix_seed(a, b) == (a * M + b) % 2**63."""
    value = 0
    for part in parts:
        value = value * MULTIPLIER + part
    return value % 2**63

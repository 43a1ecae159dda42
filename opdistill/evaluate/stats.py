"""Intervals and paired tests for pass/fail suites (pure functions, no I/O).

- `wilson_interval`: the 95% Wilson score interval of a binomial proportion (Wilson 1927). Unlike mean ± 1.96·se
  it stays inside [0, 1] and does not collapse to a point at 0 or n successes, which matters at the small n a CPU
  evaluation affords.
- `mcnemar_exact`: McNemar's test for two models scored on the same items (McNemar 1947), in its exact form: under
  the null hypothesis that both models pass equally often, each discordant item (one passes, the other fails) is a
  fair coin, so the two-sided p-value is twice the binomial tail of the smaller discordant count (capped at 1). The
  exact form is valid at any count; the chi-square approximation is not at the few discordant items small suites give.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | tuple[None, None]:
    """(low, high) of the Wilson score interval for `successes` of `n`; (None, None) when n is 0."""
    if n <= 0:
        return None, None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, n: int) -> dict[str, Any]:
    """A pass rate with its 95% Wilson interval, as reports show it."""
    low, high = wilson_interval(successes, n)
    return {"n": n, "passed": successes, "accuracy": successes / n if n else None, "ci_low": low, "ci_high": high}


def binomial_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), summed exactly in integers (no float underflow at large n)."""
    return sum(math.comb(n, i) for i in range(0, k + 1)) / 2 ** n


def mcnemar_exact(x_only: int, y_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (X passes and Y fails, and the reverse)."""
    discordant = x_only + y_only
    if discordant == 0:
        return 1.0
    return min(1.0, 2 * binomial_tail(min(x_only, y_only), discordant))


def paired_comparison(passed_x: Sequence[bool], passed_y: Sequence[bool]) -> dict[str, Any]:
    """Two models on the same items, in the same order: the 2x2 table, the accuracy difference X - Y and McNemar's p."""
    if len(passed_x) != len(passed_y):
        raise ValueError(f"paired rows must score the same items: {len(passed_x)} against {len(passed_y)}")
    n = len(passed_x)
    both = sum(1 for a, b in zip(passed_x, passed_y) if a and b)
    x_only = sum(1 for a, b in zip(passed_x, passed_y) if a and not b)
    y_only = sum(1 for a, b in zip(passed_x, passed_y) if b and not a)
    return {"n": n, "both": both, "x_only": x_only, "y_only": y_only, "neither": n - both - x_only - y_only,
            "difference": (x_only - y_only) / n if n else None, "p_value": mcnemar_exact(x_only, y_only), "test": "mcnemar_exact"}

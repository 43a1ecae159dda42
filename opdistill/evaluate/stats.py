"""Intervals and paired tests for pass/fail suites (pure functions, no I/O).

- `wilson_interval`: the 95% Wilson score interval of a binomial proportion (Wilson 1927). Unlike mean ± 1.96·se
  it stays inside [0, 1] and does not collapse to a point at 0 or n successes, which matters at the small n a CPU
  evaluation affords.
- `mcnemar_exact`: McNemar's test for two models scored on the same items (McNemar 1947), in its exact form: under
  the null hypothesis that both models pass equally often, each discordant item (one passes, the other fails) is a
  fair coin, so the two-sided p-value is twice the binomial tail of the smaller discordant count (capped at 1). The
  exact form is valid at any count; the chi-square approximation is not at the few discordant items small suites give.
- `rate_over_seeds`, `paired_over_seeds`: the same questions for runs of several training seeds on the same items.
  The item is the unit: an item's outcomes in different seeds are not independent (the same question, and for an
  untrained row the same answer), so pooling (seed, item) pairs as if they were would shrink intervals and p-values
  by about the square root of the seeds with no new evidence. Each item's pass share over the seeds is one
  observation: the rate's interval is the normal one over items, and the paired test is the exact sign test of the
  items on which X passed in more seeds than Y against those on which Y did (ties dropped).
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


def item_shares(passed: Sequence[Sequence[bool]]) -> list[float]:
    """passed[seed][item] -> each item's pass share over the seeds."""
    if not passed or len({len(run) for run in passed}) != 1:
        raise ValueError("every seed must score the same items, in the same order")
    return [sum(run[i] for run in passed) / len(passed) for i in range(len(passed[0]))]


def rate_over_seeds(passed: Sequence[Sequence[bool]]) -> dict[str, Any]:
    """The pass rate over seeds and items, with its 95% interval over items (mean ± 1.96·s/√n of the item shares)."""
    shares = item_shares(passed)
    n = len(shares)
    mean = sum(shares) / n if n else None
    if n < 2 or mean is None:
        return {"n": n, "seeds": len(passed), "accuracy": mean, "ci_low": None, "ci_high": None}
    half = Z95 * math.sqrt(sum((x - mean) ** 2 for x in shares) / (n - 1) / n)
    return {"n": n, "seeds": len(passed), "accuracy": mean, "ci_low": max(0.0, mean - half), "ci_high": min(1.0, mean + half)}


def paired_over_seeds(passed_x: Sequence[Sequence[bool]], passed_y: Sequence[Sequence[bool]]) -> dict[str, Any]:
    """X against Y over seeds, items the unit: the difference of their rates, the items X passed in more seeds than
    Y (`x_more`) and the reverse, and the exact sign test of the two counts."""
    x, y = item_shares(passed_x), item_shares(passed_y)
    if len(x) != len(y):
        raise ValueError(f"paired rows must score the same items: {len(x)} against {len(y)}")
    x_more, y_more = sum(a > b for a, b in zip(x, y)), sum(b > a for a, b in zip(x, y))
    return {"n": len(x), "seeds": len(passed_x), "difference": (sum(x) - sum(y)) / len(x) if x else None,
            "x_more": x_more, "y_more": y_more, "p_value": mcnemar_exact(x_more, y_more), "test": "sign_over_items"}

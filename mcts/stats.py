"""The statistics every comparison here reports: a 95% interval and a paired test.

Accuracy is a proportion over problems: its interval is Wilson's (sane at 0 and 1 and for
small n). Two methods run on the SAME problems are compared pairwise: the exact McNemar
test uses only the problems where they disagree, which is what a difference rests on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n (NaN, NaN for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def mcnemar_p(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value of paired outcomes a vs b (same problems, same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes must have equal length, got {len(a)} and {len(b)}")
    n01 = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    n10 = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def discordant(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int]:
    """(a right and b wrong, b right and a wrong): the pairs McNemar's test counts."""
    return (
        sum(1 for x, y in zip(a, b, strict=True) if x and not y),
        sum(1 for x, y in zip(a, b, strict=True) if y and not x),
    )

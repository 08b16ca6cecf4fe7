"""Answer votes shared by the algorithms that pick by agreement."""

from __future__ import annotations

from collections.abc import Iterable


def vote(entries: Iterable[tuple[int, str | None, float]]) -> int | None:
    """Pick a node by weighted vote over answers.

    entries: (node, answer, weight). The answer with the largest total weight wins (None
    answers never win); the returned node is that answer's heaviest entry. Ties go to the
    answer seen first, so results are deterministic.
    """
    totals: dict[str, float] = {}
    best: dict[str, tuple[float, int]] = {}
    order: list[str] = []
    for node, ans, w in entries:
        if ans is None:
            continue
        if ans not in totals:
            totals[ans] = 0.0
            order.append(ans)
        totals[ans] += w
        if ans not in best or w > best[ans][0]:
            best[ans] = (w, node)
    if not totals:
        return None
    win = max(order, key=lambda a: (totals[a], -order.index(a)))
    return best[win][1]

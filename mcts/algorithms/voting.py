"""Answer votes shared by the algorithms that pick by agreement.

Votes count answers, not strings: "4", "4.0" and "4.00" are one answer. Answers are grouped
into equivalence classes in two passes: `normalize_answer` keys first (exact numbers in
canonical form, else whitespace/case-folded text), then math-verify equivalence between the
classes' first members (time-bounded per comparison and per vote; a comparison that times
out or errs keeps the two classes apart, and the vote goes on).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from mcts.answers import answers_equivalent, normalize_answer, parse_number

VERIFY_TIMEOUT = 2.0
"""Seconds one math-verify comparison may take before the two answers count as different."""
VOTE_BUDGET = 10.0
"""Seconds of math-verify comparisons one vote may spend; past it, classes stop merging."""


def answer_classes(
    answers: Sequence[str | None],
    timeout: float = VERIFY_TIMEOUT,
    budget: float = VOTE_BUDGET,
) -> list[int | None]:
    """Equivalence-class index of each answer (None stays None), in order of first sight."""
    key_class: dict[str, int] = {}
    reps: list[str] = []  # the first raw answer of each class
    rep_num: list[bool] = []  # whether that representative is a plain number
    out: list[int | None] = []
    deadline = time.monotonic() + budget
    for ans in answers:
        key = normalize_answer(ans)
        if key is None or ans is None:
            out.append(None)
            continue
        cls = key_class.get(key)
        if cls is None:
            is_num = parse_number(ans) is not None
            for c, rep in enumerate(reps):
                # Two plain numbers with different keys differ exactly: no need to ask.
                if is_num and rep_num[c]:
                    continue
                if time.monotonic() > deadline:
                    break
                if answers_equivalent(ans, rep, timeout=timeout):
                    cls = c
                    break
            if cls is None:
                cls = len(reps)
                reps.append(ans)
                rep_num.append(is_num)
            key_class[key] = cls
        out.append(cls)
    return out


def vote(entries: Iterable[tuple[int, str | None, float]]) -> int | None:
    """Pick a node by weighted vote over answer classes.

    entries: (node, answer, weight). The class with the largest total weight wins (None
    answers never win); the returned node is that class's heaviest entry. Ties go to the
    class seen first, so results are deterministic.
    """
    items = list(entries)
    classes = answer_classes([a for _, a, _ in items])
    totals: dict[int, float] = {}
    best: dict[int, tuple[float, int]] = {}
    for (node, _, w), c in zip(items, classes, strict=True):
        if c is None:
            continue
        totals[c] = totals.get(c, 0.0) + w
        if c not in best or w > best[c][0]:
            best[c] = (w, node)
    if not totals:
        return None
    win = max(totals, key=lambda c: (totals[c], -c))
    return best[win][1]

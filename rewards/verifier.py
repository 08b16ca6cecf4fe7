"""Outcome verifier: extract the final answer and check it (task scorer or math-verify).

It knows nothing about partial solutions, so non-terminal items get `nonterminal_score`
(0.5 = "no information" by default); pair it with a step-level reward through
`rewards.mix.TerminalSwitch` to score both. Costs no model tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from mcts.answers import VerifyStats, extract_answer, score_answer
from mcts.types import Problem, ScoreItem
from rewards.base import finite_scores, item_problem, missing_references, validate_items

__all__ = ["OutcomeVerifier"]


class OutcomeVerifier:
    """Score = the task's own score of the extracted answer (1/0 for math-verify equivalence)."""

    name = "verifier"
    requires_reference = True

    def __init__(
        self,
        extract: str = "auto",
        timeout: float = 5.0,
        nonterminal_score: float = 0.5,
        score_nonterminal: bool = False,
    ) -> None:
        """extract: mode for `mcts.answers.extract_answer`; timeout: seconds per comparison;
        score_nonterminal: verify non-terminal items too (e.g. benchmarks on full solutions)."""
        extract_answer("", extract)  # raises ValueError now, at config time, on a bad mode
        if not timeout > 0:
            raise ValueError(f"verifier.timeout must be > 0 seconds, got {timeout}")
        if not 0.0 <= nonterminal_score <= 1.0:
            raise ValueError(
                f"verifier.nonterminal_score must be in [0, 1], got {nonterminal_score}"
            )
        self.extract = extract
        self.timeout = float(timeout)
        self.nonterminal_score = float(nonterminal_score)
        self.score_nonterminal = bool(score_nonterminal)
        self.stats = VerifyStats()
        self.last_answers: list[str | None] = []

    def check_problems(self, problems: Iterable[Problem]) -> None:
        """Fail at setup, not mid-search, when some problem cannot be verified."""
        missing = missing_references(problems)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(
                f"reward 'verifier' needs a reference answer or task scorer, but {len(missing)} "
                f"problem(s) have neither ({shown}); use a task with answers or a reward "
                "that needs none (judge, prm)"
            )

    def score(self, items: Sequence[ScoreItem]) -> np.ndarray:
        validate_items(items, self.name)
        out = np.full(len(items), self.nonterminal_score, dtype=np.float64)
        self.last_answers = [None] * len(items)
        memo: dict[tuple[str | None, str, str | None, str], float] = {}
        for i, it in enumerate(items):
            if not (it.terminal or self.score_nonterminal):
                continue
            problem = item_problem(it, i, self.name)
            answer = extract_answer("\n\n".join(it.steps), self.extract)
            self.last_answers[i] = answer
            key = (answer, problem.id, problem.answer, problem.task)
            if key not in memo:
                memo[key] = score_answer(answer, problem, self.timeout, self.stats)
            out[i] = memo[key]
        return finite_scores(out, self.name, len(items))

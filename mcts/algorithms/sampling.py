"""Best-of-N and self-consistency: independent full solutions, then one pick.

Every wave asks each live problem for `samples_per_wave` more complete solutions until its
token budget is spent. Each solution is split at the delimiter into a chain of step nodes
under the root, so traces and pairs come out in the same shape as from MCTS.

Picks (search.bon_aggregation):
  orm_max        the solution whose final step the reward scores highest
  prm_max        the solution whose per-step scores, folded by search.prm_aggregation
                 (last | min | mean | prod), are highest
  weighted_vote  the answer with the largest summed final-step score
  vote           the most frequent answer (self-consistency; no reward calls at all)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mcts.algorithms.base import Children, Expansion
from mcts.algorithms.voting import vote
from mcts.config import SearchConfig

if TYPE_CHECKING:
    from mcts.state import BatchState

_FOLD = {
    "last": lambda x: x[-1],
    "min": np.min,
    "mean": np.mean,
    "prod": np.prod,
}


class SamplingPolicy:
    def __init__(self, cfg: SearchConfig) -> None:
        self.cfg = cfg
        self.name = cfg.algorithm
        self.agg = "vote" if cfg.algorithm == "self_consistency" else cfg.bon_aggregation

    slots_per_tree = 1  # one request (samples_per_wave samples) per live problem per wave

    def start(self, state: BatchState) -> None:
        pass

    def needs_score(self, terminal: bool) -> bool:
        if self.agg == "vote":
            return False
        if self.agg == "prm_max":
            return True
        return terminal

    def propose(self, state: BatchState) -> list[Expansion]:
        return [
            Expansion(
                int(t), 0, self.cfg.samples_per_wave, self.cfg.solution_max_tokens, to_end=True
            )
            for t in np.flatnonzero(state.live)
        ]

    def after_wave(self, state: BatchState, children: list[Children]) -> None:
        pass  # solutions wait in state.pending and join the tree when it retires

    def done(self, state: BatchState, tree: int) -> bool:
        return False  # sample until the budget is spent

    def select(self, state: BatchState, tree: int) -> int:
        return self._pick(state, tree, self.agg)

    def alternatives(self, state: BatchState, tree: int) -> dict[str, int]:
        """The pick of every aggregation the scores of this run allow, from the SAME samples.

        Samples depend only on (seed, problem, sample index), so these are exactly what a
        separate run with that aggregation would choose; comparing them costs no tokens.
        prm_max needs every step scored (a prm_max run); orm_max and weighted_vote need
        final-step scores; vote needs none.
        """
        aggs = {
            "prm_max": ["prm_max", "orm_max", "weighted_vote", "vote"],
            "orm_max": ["orm_max", "weighted_vote", "vote"],
            "weighted_vote": ["orm_max", "weighted_vote", "vote"],
            "vote": ["vote"],
        }[self.agg]
        return {a: self._pick(state, tree, a) for a in aggs}

    def _pick(self, state: BatchState, tree: int, agg: str) -> int:
        from mcts.targets import terminal_answers

        f = state.forest
        size = int(f.size[tree])
        terms = np.flatnonzero(f.terminal[tree, :size])
        if len(terms) == 0:
            return 0
        counts = np.array([state.nodes[tree][int(n)].count for n in terms], dtype=np.float64)
        final = np.nan_to_num(f.reward[tree, terms], nan=0.0)
        if agg == "orm_max":
            return int(terms[int(np.argmax(final))])
        if agg == "prm_max":
            fold = _FOLD[self.cfg.prm_aggregation]
            folded = []
            for n in terms:
                path = f.path_to_root(tree, int(n))[1:]
                folded.append(float(fold(np.nan_to_num(f.reward[tree, path], nan=0.0))))
            return int(terms[int(np.argmax(folded))])
        answers = terminal_answers(state, tree)
        weights = counts if agg == "vote" else counts * final
        pick = vote(
            (int(n), answers[int(n)], float(w)) for n, w in zip(terms, weights, strict=True)
        )
        return int(terms[0]) if pick is None else pick

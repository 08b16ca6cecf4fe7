"""MCTS over reasoning steps (and the ReST-MCTS* variant).

Each wave: PUCT/UCT selection with virtual loss picks `leaves_per_tree` distinct OPEN leaves
per live tree; each asks the model for K candidate next steps; every new child is scored
by the reward and backed up once with that score (so a child starts with one visit, and a
terminal child's value enters its ancestors' statistics exactly once, when it is created).

Terminal (finished) leaves never take a selection slot: when a descent ends on one, the
pick is held in flight for the rest of the wave (so that leaf is blocked, like any picked
leaf) and the tree selects again, until it has `leaves_per_tree` open leaves or none is
left. A terminal is never backed up again, so visits count expansions only and "max
visits" answer selection measures where the search spent its tokens, not free re-visits
of a solved leaf. (Held terminals carry virtual loss on their path until the wave's end,
exactly as a second in-flight pick would: it steers the re-selection away from the
solved branch within that wave only.)

Answer (search.answer_selection): "value" (default) = the terminal with the highest Q (a
terminal's Q is its own score), ties to more visits; "vote" = reward-weighted vote over the
terminals' answer classes; "visits" = the most-visited path, finished by the best terminal
below its deepest node that has one. Why "value" and not AlphaZero's visits by default:
with solved leaves never re-visited, visits count expansions, and once a branch is solved
its open leaves run out and the search spends its next tokens ELSEWHERE, so visits drift
away from solved branches (measured on tests/fakes.py's planted world: visits 1/8 right,
value 6/8, vote 6/8).

Priors (search.prior): "logprob" (default) is a softmax over the DISTINCT sibling steps of
their mean token logprob / prior_temperature. Identical samples are merged into one node
and do not raise its prior: the logprob already is the model's probability of the step, and
the merge count is a noisy estimate of the same distribution, so adding log(count) would
count sampling frequency twice. "count" is Sampled MuZero's empirical prior (count / K,
the unbiased policy estimate when the K steps are sampled from the policy itself);
"uniform" gives every sibling 1/K.

rest_mcts: the same loop, reward-guided as in ReST-MCTS*: UCT on the process reward's
values, the answer picked by max value, and ReST-MCTS* per-step value targets
(value_target "auto" resolves to "rest").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mcts.algorithms.base import Children, Expansion
from mcts.algorithms.voting import vote
from mcts.config import SearchConfig
from mcts.state import request_seed

if TYPE_CHECKING:
    from mcts.state import BatchState


class MCTSPolicy:
    def __init__(self, cfg: SearchConfig) -> None:
        self.cfg = cfg
        self.name = cfg.algorithm
        self.rest = cfg.algorithm == "rest_mcts"
        self.rule = "uct" if self.rest else cfg.rule
        self.selection = "value" if self.rest else cfg.answer_selection
        self.fpu: str | float = cfg.fpu if cfg.fpu == "parent" else float(cfg.fpu)
        self.noised: set[int] = set()

    def start(self, state: BatchState) -> None:
        self.noised.clear()

    def needs_score(self, terminal: bool) -> bool:
        return True

    def propose(self, state: BatchState) -> list[Expansion]:
        cfg, f = self.cfg, state.forest
        # Leaves abandoned last wave (budget fit, empty generations, held terminals).
        f.clear_virtual_loss()
        want = np.where(state.live, cfg.leaves_per_tree, 0).astype(np.int64)
        picks_t: list[np.ndarray] = []
        picks_n: list[np.ndarray] = []
        # Each round every tree still short of open leaves selects again; the terminals it
        # hit stay in flight (blocked). A round either yields a new distinct leaf for a tree
        # or shows it has none left, so the loop ends after at most (terminals + 1) rounds.
        while want.any():
            trees, nodes = f.select(
                want,
                rule=self.rule,
                c_puct=cfg.c_puct,
                c_base=cfg.c_base,
                c_init=cfg.c_init,
                fpu=self.fpu,
                active=want > 0,
            )
            term = f.terminal[trees, nodes]
            picks_t.append(trees[~term])
            picks_n.append(nodes[~term])
            returned = np.bincount(trees, minlength=want.size)
            opened = np.bincount(trees[~term], minlength=want.size)
            exhausted = returned < want
            want = np.where(exhausted, 0, want - opened)
            if not term.any():
                break
        trees = np.concatenate(picks_t) if picks_t else np.empty(0, np.int64)
        nodes = np.concatenate(picks_n) if picks_n else np.empty(0, np.int64)
        order = np.argsort(trees, kind="stable")
        return [
            Expansion(int(t), int(n), cfg.n_children, cfg.step_max_tokens)
            for t, n in zip(trees[order], nodes[order], strict=True)
        ]

    @property
    def slots_per_tree(self) -> int:
        """Requests a live tree should contribute to every wave (wave fill's denominator)."""
        return self.cfg.leaves_per_tree

    def after_wave(self, state: BatchState, children: list[Children]) -> None:
        f = state.forest
        f.clear_virtual_loss()  # held terminals, leaves dropped by the budget fit
        heads = [(c.expansion.tree, h) for c in children for h in c.tails]
        if heads:
            tr = np.array([h[0] for h in heads], dtype=np.int64)
            nd = np.array([h[1] for h in heads], dtype=np.int64)
            vals = np.nan_to_num(f.reward[tr, nd], nan=0.0)
            f.backup(tr, nd, vals)
        if self.cfg.dirichlet_alpha > 0:
            # Each root's noise comes from its own problem's seed, so it does not depend on
            # which problems share the batch (or the Ray worker).
            for c in children:
                t = c.expansion.tree
                if c.expansion.node == 0 and t not in self.noised:
                    rng = np.random.default_rng(
                        request_seed(self.cfg.seed, state.problems[t].id, 0, -1)
                    )
                    f.add_dirichlet_noise(
                        np.array([t]), self.cfg.dirichlet_alpha, self.cfg.dirichlet_eps, rng
                    )
                    self.noised.add(t)

    def done(self, state: BatchState, tree: int) -> bool:
        f = state.forest
        size = int(f.size[tree])
        open_leaves = (f.n_children[tree, :size] == 0) & ~f.terminal[tree, :size]
        return not open_leaves.any()

    @staticmethod
    def _best_terminal(f, tree: int, terms: np.ndarray) -> int:
        """Highest Q (a terminal's Q is its own score), ties to more visits then lower id."""
        q = np.nan_to_num(f.q(tree, terms), nan=-1.0)
        return int(terms[np.lexsort((-f.visits[tree, terms], -q))[0]])

    def select(self, state: BatchState, tree: int) -> int:
        f = state.forest
        size = int(f.size[tree])
        terms = np.flatnonzero(f.terminal[tree, :size])
        if self.selection == "visits":
            path = f.best_path(tree, by="visits")
            end = int(path[-1])
            if f.terminal[tree, end] or len(terms) == 0:
                return end
            # The most-visited path ends on an open leaf (terminals are never re-visited, so
            # visits count expansions): finish it with the best terminal below its deepest
            # node that has one.
            below = {int(n): set(f.path_to_root(tree, int(n)).tolist()) for n in terms}
            for node in path[::-1]:
                cands = np.array([n for n in terms if int(node) in below[int(n)]])
                if len(cands):
                    return self._best_terminal(f, tree, cands)
        if len(terms) == 0:
            return int(f.best_path(tree, by="value")[-1])
        if self.selection == "value":
            return self._best_terminal(f, tree, terms)
        # reward-weighted vote over the terminal answers
        from mcts.targets import terminal_answers

        answers = terminal_answers(state, tree)
        r = np.nan_to_num(f.reward[tree, terms], nan=0.0)
        counts = [state.nodes[tree][int(n)].count for n in terms]
        pick = vote(
            (int(n), answers[int(n)], float(w) * c)
            for n, w, c in zip(terms, r, counts, strict=True)
        )
        return int(terms[0]) if pick is None else pick

"""MCTS over reasoning steps (and the ReST-MCTS* variant).

Each wave: PUCT/UCT selection with virtual loss picks `leaves_per_tree` distinct leaves per
live tree; each non-terminal leaf asks the model for K candidate next steps; every new child
is scored by the reward and backed up once with that score (so a child starts with one
visit). A selected terminal leaf backs up its own score again instead of spending tokens.
Priors are a softmax over siblings of the steps' mean token logprob (plus log of how many
samples merged into the step).

rest_mcts: the same loop, reward-guided as in ReST-MCTS*: UCT on the process reward's
values, the answer picked by max value, and ReST-MCTS* per-step value targets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mcts.algorithms.base import Children, Expansion
from mcts.algorithms.voting import vote
from mcts.config import SearchConfig

if TYPE_CHECKING:
    from mcts.search import BatchState


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
        trees, nodes = f.select(
            cfg.leaves_per_tree,
            rule=self.rule,
            c_puct=cfg.c_puct,
            c_base=cfg.c_base,
            c_init=cfg.c_init,
            fpu=self.fpu,
            active=state.live,
        )
        term = f.terminal[trees, nodes]
        if term.any():
            # Re-visiting a finished solution costs no tokens: back up its score again.
            tt, tn = trees[term], nodes[term]
            vals = np.nan_to_num(f.reward[tt, tn], nan=0.0)
            f.backup(tt, tn, vals)
        return [
            Expansion(int(t), int(n), cfg.n_children, cfg.step_max_tokens)
            for t, n in zip(trees[~term], nodes[~term], strict=True)
        ]

    def after_wave(self, state: BatchState, children: list[Children]) -> None:
        f = state.forest
        f.clear_virtual_loss()  # leaves dropped by the budget fit or with no children
        heads = [(c.expansion.tree, h) for c in children for h in c.tails]
        if heads:
            tr = np.array([h[0] for h in heads], dtype=np.int64)
            nd = np.array([h[1] for h in heads], dtype=np.int64)
            vals = np.nan_to_num(f.reward[tr, nd], nan=0.0)
            f.backup(tr, nd, vals)
        if self.cfg.dirichlet_alpha > 0:
            # Each root's noise comes from its own problem's seed, so it does not depend on
            # which problems share the batch (or the Ray worker).
            from mcts.search import _seed

            for c in children:
                t = c.expansion.tree
                if c.expansion.node == 0 and t not in self.noised:
                    rng = np.random.default_rng(_seed(self.cfg.seed, state.problems[t].id, 0, -1))
                    f.add_dirichlet_noise(
                        np.array([t]), self.cfg.dirichlet_alpha, self.cfg.dirichlet_eps, rng
                    )
                    self.noised.add(t)

    def done(self, state: BatchState, tree: int) -> bool:
        f = state.forest
        size = int(f.size[tree])
        open_leaves = (f.n_children[tree, :size] == 0) & ~f.terminal[tree, :size]
        return not open_leaves.any()

    def select(self, state: BatchState, tree: int) -> int:
        f = state.forest
        size = int(f.size[tree])
        terms = np.flatnonzero(f.terminal[tree, :size])
        if self.selection == "visits":
            path = f.best_path(tree, by="visits")
            return int(path[-1])
        if len(terms) == 0:
            return int(f.best_path(tree, by="value")[-1])
        if self.selection == "value":
            q = f.q(tree, terms)
            q = np.nan_to_num(q, nan=-1.0)
            return int(terms[np.lexsort((-f.visits[tree, terms], -q))[0]])
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

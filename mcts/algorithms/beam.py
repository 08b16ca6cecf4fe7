"""Step-level beam search and DVTS (diverse verifier tree search).

beam: the root is expanded into beam_width x beam_expansions candidate first steps; the
      beam_width best by reward are kept. Each wave every open beam asks for
      beam_expansions next steps and the beam_width best non-terminal children survive.
      Terminal children leave the beam as finished solutions.
dvts: the same, but the candidates are dealt round-robin into beam_width independent
      subtrees that each keep only their single best child (search-and-learn's DVTS:
      N / M subtrees, each a greedy beam of width 1 with M expansions), which keeps the
      subtrees apart and the answers diverse.
The pick: the finished solution with the highest final-step score; if none finished within
the budget, the best-scored open beam.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mcts.algorithms.base import Children, Expansion
from mcts.config import SearchConfig

if TYPE_CHECKING:
    from mcts.search import BatchState


class BeamPolicy:
    def __init__(self, cfg: SearchConfig) -> None:
        self.cfg = cfg
        self.name = cfg.algorithm
        self.dvts = cfg.algorithm == "dvts"
        self.groups = cfg.beam_width if self.dvts else 1
        self.keep = 1 if self.dvts else cfg.beam_width

    def start(self, state: BatchState) -> None:
        n = len(state.problems)
        # beams[tree][group] -> open node ids; None before the root is expanded
        state.policy_state["beams"] = [None] * n

    def needs_score(self, terminal: bool) -> bool:
        return True

    def propose(self, state: BatchState) -> list[Expansion]:
        cfg = self.cfg
        out = []
        for t in np.flatnonzero(state.live):
            t = int(t)
            beams = state.policy_state["beams"][t]
            if beams is None:
                out.append(
                    Expansion(t, 0, cfg.beam_width * cfg.beam_expansions, cfg.step_max_tokens)
                )
                continue
            for g, nodes in enumerate(beams):
                for node in nodes:
                    out.append(
                        Expansion(t, node, cfg.beam_expansions, cfg.step_max_tokens, group=g)
                    )
        return out

    def after_wave(self, state: BatchState, children: list[Children]) -> None:
        f = state.forest
        new: dict[int, list[list[int]]] = {}
        for c in children:
            t = c.expansion.tree
            beams = state.policy_state["beams"][t]
            groups = new.setdefault(t, [[] for _ in range(self.groups)])
            for i, node in enumerate(c.heads):
                g = i % self.groups if beams is None else c.expansion.group
                groups[g].append(int(node))
        for t, groups in new.items():
            kept = []
            for nodes in groups:
                if nodes:
                    nd = np.array(nodes, dtype=np.int64)
                    tr = np.full(len(nd), t, dtype=np.int64)
                    f.backup(tr, nd, np.nan_to_num(f.reward[tr, nd], nan=0.0))
                open_ = [n for n in nodes if not f.terminal[t, n]]
                r = np.nan_to_num(f.reward[t, open_], nan=0.0) if open_ else np.empty(0)
                order = np.argsort(-r, kind="stable")[: self.keep]
                kept.append([open_[i] for i in order])
            state.policy_state["beams"][t] = kept  # beams that produced nothing are gone

    def done(self, state: BatchState, tree: int) -> bool:
        beams = state.policy_state["beams"][tree]
        return beams is not None and not any(beams)

    def select(self, state: BatchState, tree: int) -> int:
        f = state.forest
        size = int(f.size[tree])
        terms = np.flatnonzero(f.terminal[tree, :size])
        if len(terms):
            r = np.nan_to_num(f.reward[tree, terms], nan=0.0)
            return int(terms[int(np.argmax(r))])
        beams = state.policy_state["beams"][tree] or []
        open_ = [n for g in beams for n in g]
        if not open_:
            return 0
        r = np.nan_to_num(f.reward[tree, open_], nan=0.0)
        return int(open_[int(np.argmax(r))])

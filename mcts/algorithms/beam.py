"""Step-level beam search and DVTS (diverse verifier tree search), as in search-and-learn.

Parameters as there: N = search.n_beams candidate steps per tree per step, M =
search.beam_width.

beam: the root is sampled N times; the N/M best open (non-terminal) candidates by reward
      are kept. Each step the kept beams together ask for N next steps: with N/M beams each
      gets M; when fewer are left (some finished, or too few open candidates), the N
      samples are shared among the survivors (search-and-learn duplicates active beams up
      to N), so the step keeps its width. Candidates that finish leave as solutions.
dvts: N/M independent subtrees: the root's N samples are dealt round-robin into N/M
      groups of M; each subtree keeps its single best open child and asks for M next steps
      from it (a greedy beam of width 1), which keeps the subtrees apart and the answers
      diverse. A subtree with no open child left is finished.
Differences from search-and-learn, on purpose: budgets are tokens (search.token_budget), so
when a step's worst case no longer fits, every beam gets fewer samples (the search's fair
share) instead of later beams none; finished candidates are always kept as solutions
(also those of a DVTS subtree that were not its best child: they cost nothing more).
The effective width (beams whose request was issued per step, mean over a tree's steps
after the first)
is reported per problem as `beams_per_wave`.

The pick (search.beam_selection): "max" = the finished solution with the highest final-step
score; "weighted_vote" = the answer class with the largest summed final-step score (DVTS's
default: a vote over the subtrees' solutions). With nothing finished within the budget,
the best-scored open beam.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mcts.algorithms.base import Children, Expansion
from mcts.algorithms.voting import vote
from mcts.config import SearchConfig

if TYPE_CHECKING:
    from mcts.state import BatchState


class BeamPolicy:
    def __init__(self, cfg: SearchConfig) -> None:
        self.cfg = cfg
        self.name = cfg.algorithm
        self.dvts = cfg.algorithm == "dvts"
        n_kept = cfg.n_beams // cfg.beam_width
        self.groups = n_kept if self.dvts else 1
        self.keep = 1 if self.dvts else n_kept
        self.slots_per_tree = n_kept

    def start(self, state: BatchState) -> None:
        n = len(state.problems)
        # beams[tree][group] -> open node ids; None before the root is expanded
        state.policy_state["beams"] = [None] * n
        state.policy_state["width"] = [[] for _ in range(n)]  # open beams asking, per step

    def needs_score(self, terminal: bool) -> bool:
        return True

    def propose(self, state: BatchState) -> list[Expansion]:
        cfg = self.cfg
        out = []
        for t in np.flatnonzero(state.live):
            t = int(t)
            beams = state.policy_state["beams"][t]
            if beams is None:
                out.append(Expansion(t, 0, cfg.n_beams, cfg.step_max_tokens))
                continue
            asking = [(g, node) for g, nodes in enumerate(beams) for node in nodes]
            if not asking:
                continue
            if self.dvts:
                share = [cfg.beam_width] * len(asking)
            else:  # N samples shared by the survivors, the best-ranked first
                base, extra = divmod(cfg.n_beams, len(asking))
                share = [base + (i < extra) for i in range(len(asking))]
            for (g, node), n in zip(asking, share, strict=True):
                out.append(Expansion(t, node, n, cfg.step_max_tokens, group=g))
        return out

    def after_wave(self, state: BatchState, children: list[Children]) -> None:
        f = state.forest
        new: dict[int, list[list[int]]] = {}
        issued: dict[int, int] = {}  # beams whose request survived the budget fit
        for c in children:
            t = c.expansion.tree
            beams = state.policy_state["beams"][t]
            if beams is not None:
                issued[t] = issued.get(t, 0) + 1
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
            state.policy_state["beams"][t] = kept
        for t, k in issued.items():
            state.policy_state["width"][t].append(k)

    def done(self, state: BatchState, tree: int) -> bool:
        beams = state.policy_state["beams"][tree]
        return beams is not None and not any(beams)

    def figures(self, state: BatchState, tree: int) -> dict[str, float | None]:
        """Per-problem figures for the results row: the effective beam width."""
        w = state.policy_state["width"][tree]
        return {"beams_per_wave": float(np.mean(w)) if w else None}

    def select(self, state: BatchState, tree: int) -> int:
        f = state.forest
        size = int(f.size[tree])
        terms = np.flatnonzero(f.terminal[tree, :size])
        if len(terms):
            r = np.nan_to_num(f.reward[tree, terms], nan=0.0)
            if self.cfg.beam_pick == "weighted_vote":
                from mcts.targets import terminal_answers

                answers = terminal_answers(state, tree)
                counts = [state.nodes[tree][int(n)].count for n in terms]
                pick = vote(
                    (int(n), answers[int(n)], float(w) * c)
                    for n, w, c in zip(terms, r, counts, strict=True)
                )
                if pick is not None:
                    return pick
            return int(terms[int(np.argmax(r))])
        beams = state.policy_state["beams"][tree] or []
        open_ = [n for g in beams for n in g]
        if not open_:
            return 0
        r = np.nan_to_num(f.reward[tree, open_], nan=0.0)
        return int(open_[int(np.argmax(r))])

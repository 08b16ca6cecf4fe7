"""From a searched tree to training signal: answers, correctness, per-step value targets.

Correctness here uses the reference answer. That is legitimate for value targets and for
scoring the ONE selected answer after the search; it never feeds back into the search.

Value targets (per node, NaN where the node has no terminal descendant):
  "mc"   the fraction of the node's terminal descendants (weighted by merged-sample count)
         whose answer is correct: a Monte-Carlo estimate that the step leads to a correct
         answer, read off the tree's own samples.
  "rest" the ReST-MCTS* form: top-down, v_root = 0 and
         v_child = max(v_parent + (1 - v_parent) / (m + 1) * (1 - 2 r), 0)
         where m is the mean number of steps left to the child's terminal descendants and
         r = 0 if some terminal below the child is correct, else 1. Steps on a correct path
         rise to 1 at its end; steps from which nothing correct was found sink to 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np

from mcts.answers import extract_answer, is_correct

if TYPE_CHECKING:
    from mcts.config import SearchConfig
    from mcts.search import BatchState


def terminal_answers(state: BatchState, t: int) -> dict[int, str | None]:
    """Extracted answer of every terminal node of tree `t`."""
    f = state.forest
    size = int(f.size[t])
    out = {}
    for node in np.flatnonzero(f.terminal[t, :size]):
        node = int(node)
        out[node] = extract_answer(state.solution_text(t, node), state.cfg.answer_mode)
    return out


def annotate_tree(
    state: BatchState, t: int, selected: int, cfg: SearchConfig
) -> tuple[nx.DiGraph, dict[str, Any]]:
    f = state.forest
    p = state.problems[t]
    size = int(f.size[t])
    answers = terminal_answers(state, t)
    verdict: dict[str | None, bool] = {}

    def check(ans: str | None) -> bool:
        if ans not in verdict:
            verdict[ans] = bool(ans is not None and is_correct(ans, p))
        return verdict[ans]

    correct_of = {node: check(a) for node, a in answers.items()}
    sel_answer = answers.get(selected)
    if selected not in answers:
        sel_answer = extract_answer(state.solution_text(t, selected), cfg.answer_mode)
    sel_correct = check(sel_answer)

    parent = f.parent[t, :size]
    depth = f.depth[t, :size].astype(np.int64)
    count = np.array(
        [state.nodes[t][i].count if i in state.nodes[t] else 1 for i in range(size)],
        dtype=np.float64,
    )
    # Bottom-up sums over terminal descendants (children always have larger ids).
    n_term = np.zeros(size)
    n_good = np.zeros(size)
    depth_sum = np.zeros(size)
    for node, ok in correct_of.items():
        n_term[node] += count[node]
        n_good[node] += count[node] * ok
        depth_sum[node] += count[node] * depth[node]
    for node in range(size - 1, 0, -1):
        par = int(parent[node])
        n_term[par] += n_term[node]
        n_good[par] += n_good[node]
        depth_sum[par] += depth_sum[node]
    with np.errstate(invalid="ignore", divide="ignore"):
        mc = np.where(n_term > 0, n_good / n_term, np.nan)
        steps_left = np.where(n_term > 0, depth_sum / n_term - depth, np.nan)
    if cfg.value_target == "rest":
        target = np.full(size, np.nan)
        target[0] = 0.0
        for node in range(1, size):
            if n_term[node] == 0:
                continue
            vp = target[int(parent[node])]
            vp = 0.0 if np.isnan(vp) else vp
            r = 0.0 if n_good[node] > 0 else 1.0
            target[node] = max(vp + (1 - vp) / (steps_left[node] + 1) * (1 - 2 * r), 0.0)
    else:
        target = mc

    on_path = set(int(x) for x in f.path_to_root(t, selected))
    g = f.to_networkx(t)
    g.graph.update(
        problem_id=p.id, question=p.question, reference=p.answer, algorithm=cfg.algorithm
    )
    visits = f.visits[t, :size]
    vsum = f.value_sum[t, :size]
    for node in range(size):
        nd = state.nodes[t].get(node)
        v = int(visits[node])
        g.add_node(
            node,
            text=nd.text if nd else "",
            depth=int(depth[node]),
            visits=v,
            q=float(vsum[node] / v) if v > 0 else float("nan"),
            reward=float(f.reward[t, node]),
            prior=float(f.prior[t, node]),
            terminal=bool(f.terminal[t, node]),
            n_tokens=int(nd.n_tokens) if nd else 0,
            count=int(nd.count) if nd else 1,
            finish=nd.finish if nd else "",
            value_target=float(target[node]),
            answer=answers.get(node),
            correct=correct_of.get(node),
            selected=node in on_path,
        )
    # Candidates for pass@k: every terminal answer, plus the selected one when the pick is
    # a non-terminal leaf (budget ran out mid-solution), so pass@k >= accuracy always.
    k = int(sum(count[n] for n in answers)) + (selected not in answers)
    info = {
        "selected_answer": sel_answer,
        "correct": sel_correct,
        "pass_at_k": any(correct_of.values()) or sel_correct,
        "k": k,
    }
    return g, info

"""From a searched tree to training signal: answers, correctness, per-step value targets.

Correctness here uses the reference answer. That is legitimate for value targets and for
scoring the ONE selected answer after the search; it never feeds back into the search.

Value targets (per node, NaN where the node has no terminal descendant):
  "mc"   the fraction of the node's terminal descendants (weighted by merged-sample count)
         whose answer is correct: a Monte-Carlo estimate that the step leads to a correct
         answer, read off the tree's own samples.
  "rest" the ReST-MCTS* form (its eq. for v_k): top-down, v_root = 0 and
         v_child = max(v_parent + (1 - v_parent) / (m + 1) * (1 - 2 r), 0)
         where r = 0 if some terminal below the child is correct, else 1, and m is the
         MINIMUM number of steps from the child to a correct terminal below it (the paper's
         "steps still needed to reach the correct answer"); where nothing below is correct,
         m is the fewest steps to any terminal below (the length of the shortest rollout that
         shows the step fails). Steps on a correct path rise to 1 at its end; steps from
         which nothing correct was found sink towards 0.
Which one is in force: search.value_target ("auto": rest for rest_mcts, mc otherwise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np

from mcts.answers import extract_answer, is_correct

if TYPE_CHECKING:
    from mcts.config import SearchConfig
    from mcts.state import BatchState


def terminal_answers(state: BatchState, t: int) -> dict[int, str | None]:
    """Extracted answer of every terminal node of tree `t`."""
    f = state.forest
    size = int(f.size[t])
    out = {}
    for node in np.flatnonzero(f.terminal[t, :size]):
        node = int(node)
        out[node] = extract_answer(state.solution_text(t, node), state.cfg.answer_mode)
    return out


def rest_targets(
    parent: np.ndarray,
    depth: np.ndarray,
    n_term: np.ndarray,
    n_good: np.ndarray,
    near_any: np.ndarray,
    near_good: np.ndarray,
) -> np.ndarray:
    """ReST-MCTS* value targets top-down (module docstring); NaN where no terminal is below."""
    size = parent.shape[0]
    target = np.full(size, np.nan)
    target[0] = 0.0
    for node in range(1, size):
        if n_term[node] == 0:
            continue
        vp = target[int(parent[node])]
        vp = 0.0 if np.isnan(vp) else vp
        good = n_good[node] > 0
        r = 0.0 if good else 1.0
        m = (near_good[node] if good else near_any[node]) - depth[node]
        target[node] = max(vp + (1 - vp) / (m + 1) * (1 - 2 * r), 0.0)
    return target


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
    # Bottom-up over terminal descendants (children always have larger ids).
    n_term = np.zeros(size)
    n_good = np.zeros(size)
    near_any = np.full(size, np.inf)  # depth of the shallowest terminal below
    near_good = np.full(size, np.inf)  # depth of the shallowest correct terminal below
    for node, ok in correct_of.items():
        n_term[node] += count[node]
        n_good[node] += count[node] * ok
        near_any[node] = depth[node]
        if ok:
            near_good[node] = depth[node]
    for node in range(size - 1, 0, -1):
        par = int(parent[node])
        n_term[par] += n_term[node]
        n_good[par] += n_good[node]
        near_any[par] = min(near_any[par], near_any[node])
        near_good[par] = min(near_good[par], near_good[node])
    with np.errstate(invalid="ignore", divide="ignore"):
        mc = np.where(n_term > 0, n_good / n_term, np.nan)
    if cfg.target_kind == "rest":
        target = rest_targets(parent, depth, n_term, n_good, near_any, near_good)
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
        if nd is not None:  # the sampled tokens, where known (NodeData.token_attrs)
            g.nodes[node].update(nd.token_attrs())
    # Candidates for pass@k: every terminal answer, plus the selected one when the pick is
    # a non-terminal leaf (budget ran out mid-solution), so pass@k >= accuracy always.
    k = int(sum(count[n] for n in answers)) + (selected not in answers)
    # Finished solutions that hit the token cap rather than ending by themselves.
    truncated = int(
        sum(
            count[n]
            for n in answers
            if n in state.nodes[t] and state.nodes[t][n].finish == "length"
        )
    )
    info = {
        "truncated": truncated,
        "selected_answer": sel_answer,
        "correct": sel_correct,
        "pass_at_k": any(correct_of.values()) or sel_correct,
        "k": k,
    }
    return g, info

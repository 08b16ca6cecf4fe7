"""Training tables from searched trees: traces, DPO preference pairs, stepwise PRM data.

Plain-text layout shared by every table (no chat template applied, so any tokenizer or
chat format can be layered on later; `question` and `prefix_steps` columns keep the parts):

    prompt  = question + "\\n\\n" + "".join(step + "\\n\\n" for step in prefix_steps)
    chosen / rejected = the continuation: one step (kind "step") or the full solution,
                        steps joined by "\\n\\n" (kind "trajectory", prefix_steps empty)

so prompt + chosen is the document "question\\n\\nstep1\\n\\nstep2...".

A node's value is its value_target when set (not NaN), else its q (see trees.node_value).
Step pairs: two children of one parent (so they share the prefix exactly), both with a
finite value and at least `min_visits` visits, different texts, chosen value > rejected
value and gap >= margin. Trajectory pairs: a correct terminal solution vs an incorrect one
of the same problem; their chosen_value / rejected_value are the outcomes (1.0 / 0.0), so
gap = 1.0. stepwise labels: value >= label_threshold (0.5 by default) per step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

import networkx as nx
import pyarrow as pa

from mcts.export.trees import children, find_root, node_value, path_to, terminal_nodes

SEP = "\n\n"

TRACES_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("algorithm", pa.string()),
        ("question", pa.string()),
        ("reference", pa.string()),
        ("path_index", pa.int32()),
        ("node_ids", pa.list_(pa.int64())),
        ("steps", pa.list_(pa.string())),
        ("visits", pa.list_(pa.int64())),
        ("q", pa.list_(pa.float64())),
        ("reward", pa.list_(pa.float64())),
        ("value_target", pa.list_(pa.float64())),
        ("prior", pa.list_(pa.float64())),
        ("depth", pa.int32()),
        ("answer", pa.string()),
        ("correct", pa.bool_()),
        ("selected", pa.bool_()),
    ]
)

PAIRS_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("kind", pa.string()),
        ("gap", pa.float64()),
        ("chosen_value", pa.float64()),
        ("rejected_value", pa.float64()),
        ("problem_id", pa.string()),
        ("algorithm", pa.string()),
        ("question", pa.string()),
        ("prefix_steps", pa.list_(pa.string())),
        ("parent_node", pa.int64()),
        ("chosen_node", pa.int64()),
        ("rejected_node", pa.int64()),
    ]
)

STEPWISE_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("completions", pa.list_(pa.string())),
        ("labels", pa.list_(pa.bool_())),
        ("values", pa.list_(pa.float64())),
        ("problem_id", pa.string()),
        ("algorithm", pa.string()),
        ("correct", pa.bool_()),
        ("selected", pa.bool_()),
    ]
)


def make_prompt(question: str, prefix_steps: Iterable[str] = ()) -> str:
    """The plain-text prompt layout documented above."""
    return question + SEP + "".join(s + SEP for s in prefix_steps)


def _float(x: Any) -> float:
    if x is None or isinstance(x, bool):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _opt_bool(x: Any) -> bool | None:
    return None if x is None else bool(x)


def _meta(graph: nx.DiGraph, row: dict[str, Any] | None) -> tuple[str, str, str, str | None]:
    row = row or {}
    g = graph.graph
    pid = g.get("problem_id", row.get("id"))
    question = g.get("question", row.get("question"))
    if pid is None or question is None:
        raise ValueError(
            "a tree needs graph attributes problem_id and question (or its results row)"
        )
    algorithm = g.get("algorithm", row.get("algorithm")) or ""
    reference = g.get("reference", row.get("reference"))
    return str(pid), str(algorithm), str(question), None if reference is None else str(reference)


def trace_rows(graph: nx.DiGraph, row: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One record per root-to-terminal path of the tree."""
    pid, algo, question, ref = _meta(graph, row)
    root = find_root(graph)
    out = []
    for i, t in enumerate(terminal_nodes(graph)):
        p = path_to(graph, t, root)
        attrs = [graph.nodes[n] for n in p.nodes]
        out.append(
            {
                "problem_id": pid,
                "algorithm": algo,
                "question": question,
                "reference": ref,
                "path_index": i,
                "node_ids": [int(n) for n in p.nodes],
                "steps": list(p.steps),
                "visits": [int(a.get("visits", 0) or 0) for a in attrs],
                "q": [_float(a.get("q")) for a in attrs],
                "reward": [_float(a.get("reward")) for a in attrs],
                "value_target": [_float(a.get("value_target")) for a in attrs],
                "prior": [_float(a.get("prior")) for a in attrs],
                "depth": len(p.nodes),
                "answer": graph.nodes[t].get("answer"),
                "correct": _opt_bool(graph.nodes[t].get("correct")),
                "selected": bool(graph.nodes[t].get("selected", False)),
            }
        )
    return out


def step_pairs(
    graph: nx.DiGraph,
    margin: float,
    row: dict[str, Any] | None = None,
    *,
    min_visits: int = 1,
    max_pairs_per_node: int | None = None,
) -> list[dict[str, Any]]:
    """Sibling-step preference pairs whose values differ by at least `margin`."""
    pid, algo, question, _ = _meta(graph, row)
    root = find_root(graph)
    out = []
    for parent in sorted(graph.nodes):
        kids = children(graph, parent)
        if len(kids) < 2:
            continue
        scored = []
        for c in kids:
            a = graph.nodes[c]
            v = node_value(a)
            if math.isfinite(v) and int(a.get("visits", 0) or 0) >= min_visits:
                scored.append((c, v, str(a.get("text", ""))))
        cands = []
        for (ca, va, ta), (cb, vb, tb) in itertools.permutations(scored, 2):
            if va > vb and va - vb >= margin and ta != tb:
                cands.append((va - vb, ca, va, ta, cb, vb, tb))
        if not cands:
            continue
        cands.sort(key=lambda c: (-c[0], c[1], c[4]))
        if max_pairs_per_node is not None:
            cands = cands[:max_pairs_per_node]
        prefix = list(path_to(graph, parent, root).steps) if parent != root else []
        prompt = make_prompt(question, prefix)
        for gap, ca, va, ta, cb, vb, tb in cands:
            out.append(
                {
                    "prompt": prompt,
                    "chosen": ta,
                    "rejected": tb,
                    "kind": "step",
                    "gap": gap,
                    "chosen_value": va,
                    "rejected_value": vb,
                    "problem_id": pid,
                    "algorithm": algo,
                    "question": question,
                    "prefix_steps": prefix,
                    "parent_node": int(parent),
                    "chosen_node": int(ca),
                    "rejected_node": int(cb),
                }
            )
    return out


def trajectory_pairs(
    graph: nx.DiGraph, row: dict[str, Any] | None = None, *, max_pairs: int | None = 8
) -> list[dict[str, Any]]:
    """Correct-vs-incorrect full-solution pairs; highest-valued solutions of each side first."""
    pid, algo, question, _ = _meta(graph, row)
    root = find_root(graph)
    good: dict[str, tuple[float, Any]] = {}
    bad: dict[str, tuple[float, Any]] = {}
    for t in terminal_nodes(graph):
        c = graph.nodes[t].get("correct")
        if c is None:
            continue
        text = SEP.join(path_to(graph, t, root).steps)
        side = good if c else bad
        if text not in side:
            side[text] = (node_value(graph.nodes[t]), t)

    def ranked(side: dict[str, tuple[float, Any]]) -> list[tuple[str, Any]]:
        items = sorted(
            side.items(),
            key=lambda kv: (-kv[1][0] if math.isfinite(kv[1][0]) else math.inf, kv[1][1]),
        )
        return [(text, node) for text, (_, node) in items]

    g, b = ranked(good), ranked(bad)
    combos = sorted(
        itertools.product(range(len(g)), range(len(b))), key=lambda ij: (ij[0] + ij[1], ij[0])
    )
    if max_pairs is not None:
        combos = combos[:max_pairs]
    prompt = make_prompt(question)
    return [
        {
            "prompt": prompt,
            "chosen": g[i][0],
            "rejected": b[j][0],
            "kind": "trajectory",
            "gap": 1.0,
            "chosen_value": 1.0,
            "rejected_value": 0.0,
            "problem_id": pid,
            "algorithm": algo,
            "question": question,
            "prefix_steps": [],
            "parent_node": None,
            "chosen_node": int(g[i][1]),
            "rejected_node": int(b[j][1]),
        }
        for i, j in combos
    ]


def stepwise_rows(
    graph: nx.DiGraph, row: dict[str, Any] | None = None, *, label_threshold: float = 0.5
) -> tuple[list[dict[str, Any]], int]:
    """PRM rows (one per root-to-terminal path) and how many paths were skipped for lack of values."""
    pid, algo, question, _ = _meta(graph, row)
    root = find_root(graph)
    out, skipped = [], 0
    for t in terminal_nodes(graph):
        p = path_to(graph, t, root)
        values = [node_value(graph.nodes[n]) for n in p.nodes]
        if not values or not all(math.isfinite(v) for v in values):
            skipped += 1
            continue
        out.append(
            {
                "prompt": question,
                "completions": list(p.steps),
                "labels": [v >= label_threshold for v in values],
                "values": values,
                "problem_id": pid,
                "algorithm": algo,
                "correct": _opt_bool(graph.nodes[t].get("correct")),
                "selected": bool(graph.nodes[t].get("selected", False)),
            }
        )
    return out, skipped


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> a table with exactly `schema` (also when there are no rows)."""
    return pa.Table.from_pylist(rows, schema=schema)

"""A PNG drawing of one searched tree, readable at ~50 nodes.

Layout: leaves spread left to right in depth-first order, parents centred over their
children, depth downwards. Fill colour = q (grey where unvisited); terminal nodes get a
green (correct) / red (incorrect) / black (unchecked) ring; the selected path is drawn
thick. Uses the Agg canvas directly: no pyplot, so no global backend switch for callers.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any

import networkx as nx

from mcts.export.io import atomic_write
from mcts.export.trees import children, find_root


def tree_layout(graph: nx.DiGraph) -> dict[Any, tuple[float, float]]:
    """(x, y) per node: leaves at consecutive x, parents at their children's mean, y = -depth."""
    root = find_root(graph)
    pos: dict[Any, tuple[float, float]] = {}
    next_x = 0.0
    # iterative post-order so deep trees do not hit the recursion limit
    stack: list[tuple[Any, int, bool]] = [(root, 0, False)]
    while stack:
        node, depth, expanded = stack.pop()
        kids = children(graph, node)
        if not kids:
            pos[node] = (next_x, -float(depth))
            next_x += 1.0
        elif expanded:
            xs = [pos[c][0] for c in kids]
            pos[node] = ((min(xs) + max(xs)) / 2.0, -float(depth))
        else:
            stack.append((node, depth, True))
            for c in reversed(kids):
                stack.append((c, depth + 1, False))
    return pos


def draw_tree(
    graph: nx.DiGraph, path: str | os.PathLike[str], *, title: str | None = None, dpi: int = 120
) -> Path:
    """Draw `graph` (node attributes as in mcts.results) to a PNG at `path`, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if graph.number_of_nodes() == 0:
        raise ValueError("cannot draw an empty tree")
    pos = tree_layout(graph)
    n_leaves = sum(1 for n in graph if graph.out_degree(n) == 0)
    max_depth = int(max(-y for _, y in pos.values()))
    width = min(40.0, max(6.0, 0.45 * n_leaves + 2.0))
    height = min(24.0, max(3.5, 1.1 * (max_depth + 1) + 1.5))
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    sel = {n for n, s in graph.nodes(data="selected") if s}
    plain, chosen = [], []
    for u, v in graph.edges:
        seg = [pos[u], pos[v]]
        (chosen if u in sel and v in sel else plain).append(seg)
    ax.add_collection(LineCollection(plain, colors="#9a9a9a", linewidths=0.8, zorder=1))
    ax.add_collection(LineCollection(chosen, colors="#1f3fbf", linewidths=3.0, zorder=2))

    nodes = list(graph.nodes)
    xs = [pos[n][0] for n in nodes]
    ys = [pos[n][1] for n in nodes]
    qs = [graph.nodes[n].get("q") for n in nodes]
    q_ok = [
        isinstance(q, numbers.Real) and not isinstance(q, bool) and math.isfinite(q) for q in qs
    ]
    size = 260.0 if len(nodes) <= 80 else max(20.0, 260.0 * 80 / len(nodes))
    edge_c, edge_w = [], []
    for n in nodes:
        a = graph.nodes[n]
        if a.get("terminal"):
            c = a.get("correct")
            edge_c.append("#1a9e3f" if c is True else "#d62728" if c is False else "black")
            edge_w.append(2.5)
        else:
            edge_c.append("#555555")
            edge_w.append(0.6)
    grey = [i for i, ok in enumerate(q_ok) if not ok]
    col = [i for i, ok in enumerate(q_ok) if ok]
    if grey:
        ax.scatter(
            [xs[i] for i in grey],
            [ys[i] for i in grey],
            s=size,
            c="#dddddd",
            edgecolors=[edge_c[i] for i in grey],
            linewidths=[edge_w[i] for i in grey],
            zorder=3,
        )
    if col:
        sc = ax.scatter(
            [xs[i] for i in col],
            [ys[i] for i in col],
            s=size,
            c=[float(qs[i]) for i in col],
            cmap="viridis",
            vmin=0.0,
            vmax=1.0,
            edgecolors=[edge_c[i] for i in col],
            linewidths=[edge_w[i] for i in col],
            zorder=3,
        )
        fig.colorbar(sc, ax=ax, fraction=0.03, pad=0.01, label="Q (mean value)")
    if len(nodes) <= 80:
        for i, n in enumerate(nodes):
            v = graph.nodes[n].get("visits")
            if v is not None:
                dark = q_ok[i] and float(qs[i]) < 0.55  # viridis is dark below ~0.55
                ax.annotate(
                    str(v),
                    (xs[i], ys[i]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                    zorder=4,
                )
    handles = [
        Line2D(
            [],
            [],
            marker="o",
            ls="",
            mfc="white",
            mec="#1a9e3f",
            mew=2.5,
            ms=10,
            label="terminal, correct",
        ),
        Line2D(
            [],
            [],
            marker="o",
            ls="",
            mfc="white",
            mec="#d62728",
            mew=2.5,
            ms=10,
            label="terminal, incorrect",
        ),
        Line2D([], [], color="#1f3fbf", lw=3, label="selected path"),
        Line2D(
            [], [], marker="o", ls="", mfc="#dddddd", mec="#555555", ms=10, label="unvisited (no Q)"
        ),
    ]
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
    if title is None:
        g = graph.graph
        q = str(g.get("question", ""))
        title = f"{g.get('problem_id', '')} [{g.get('algorithm', '')}]  {q[:90] + ('...' if len(q) > 90 else '')}"
    ax.set_title(title, fontsize=10)
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(min(ys) - 0.6, 0.6)
    ax.set_yticks([-float(d) for d in range(max_depth + 1)])
    ax.set_yticklabels([str(d) for d in range(max_depth + 1)])
    ax.set_ylabel("depth (numbers in nodes: visits)")
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))

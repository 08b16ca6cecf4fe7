"""Searched trees on disk (networkx node-link JSON) and the walks the exporters share.

One file per finished problem, trees/<algorithm>/<id>.json, written atomically as the
problem finishes: on resume every export can be rebuilt for problems finished in earlier
runs. JSON is strict: NaN is stored as null and restored to NaN for the float attributes.

Sampled tokens (mcts.state.NodeData), present only where non-empty, so trees written before
they existed load as they are and read as "unknown":
  token_ids (list[int]) / token_logprobs (list[float]): a plain step's raw sampled tokens
    and the sampling policy's logprob of each (the node's `text` is the stripped step);
  sample_token_ids / sample_token_logprobs / sample_head (int): on the LAST node of a
    to_end sample's chain only, the whole sample's tokens and the node id of the chain's
    first node; the chain's pieces (split at the delimiter by characters) carry no
    per-step ids, since the tokens do not split at those cuts.
Logprobs are written rounded to 6 significant digits (a non-finite one becomes null).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from mcts.export.io import atomic_write, atomic_write_text, jsonable, safe_filename

FLOAT_ATTRS = ("q", "reward", "prior", "value_target")
TOKEN_LOGPROB_ATTRS = ("token_logprobs", "sample_token_logprobs")
TREES_DIR = "trees"


def tree_path(run_dir: str | os.PathLike[str], problem_id: str, algorithm: str = "") -> Path:
    """Where the tree of (problem, algorithm) lives under a run directory."""
    return (
        Path(run_dir)
        / TREES_DIR
        / safe_filename(algorithm or "default")
        / f"{safe_filename(problem_id)}.json"
    )


def features_path(run_dir: str | os.PathLike[str], problem_id: str, algorithm: str = "") -> Path:
    """Where the per-node hidden states of (problem, algorithm) live: beside its tree."""
    return tree_path(run_dir, problem_id, algorithm).with_suffix(".features.npy")


def save_features(features: np.ndarray, path: Path) -> Path:
    """(n_nodes, dim) float32, row = node id, NaN rows where a node has none; atomic."""
    arr = np.ascontiguousarray(features, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"features must be (n_nodes, dim), got shape {arr.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)

    return atomic_write(path, write)


def load_features(path: str | os.PathLike[str]) -> np.ndarray:
    """Read what save_features wrote (no pickles: the file is data, never code)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{path}: not a features file written by the search ({exc}); rerun the search "
            "for this problem (delete its results line) or remove the file"
        ) from exc
    if arr.ndim != 2:
        raise ValueError(f"{path}: features must be (n_nodes, dim), got shape {arr.shape}")
    return arr


def tree_to_json(graph: nx.DiGraph, **graph_attrs: Any) -> str:
    """Node-link JSON of `graph`; `graph_attrs` fill graph attributes the graph lacks."""
    data = nx.node_link_data(graph, edges="edges")
    for node in data["nodes"]:
        for k in TOKEN_LOGPROB_ATTRS:
            if node.get(k) is not None:
                node[k] = [_round6(x) for x in node[k]]
    for k, v in graph_attrs.items():
        data["graph"].setdefault(k, v)
    return json.dumps(jsonable(data, "tree"), ensure_ascii=False, allow_nan=False)


def _round6(x: Any) -> float | None:
    """A logprob at 6 significant digits (None where missing or not finite)."""
    if x is None:
        return None
    x = float(x)
    return float(f"{x:.6g}") if math.isfinite(x) else None


def save_tree(graph: nx.DiGraph, path: str | os.PathLike[str], **graph_attrs: Any) -> Path:
    """Write the tree atomically (a crash leaves the old file or the new one)."""
    return atomic_write_text(path, tree_to_json(graph, **graph_attrs))


def tree_from_json(text: str) -> nx.DiGraph:
    data = json.loads(text)
    g = nx.node_link_graph(data, directed=True, multigraph=False, edges="edges")
    for _, attrs in g.nodes(data=True):
        for k in FLOAT_ATTRS:
            if k in attrs and attrs[k] is None:
                attrs[k] = math.nan
    return g


def load_tree(path: str | os.PathLike[str]) -> nx.DiGraph:
    """Read a tree written by save_tree (NaN restored in q / reward / prior / value_target)."""
    with open(path, encoding="utf-8") as f:
        return tree_from_json(f.read())


def _finite(x: Any) -> bool:
    # numbers.Real covers numpy scalars (np.float32 is not a float subclass)
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def node_value(attrs: dict[str, Any], *, q_fallback: bool = True) -> float:
    """The value a node is judged by: value_target when set, else q (unless q_fallback is
    False: the training tables never mix the two scales), else NaN."""
    vt = attrs.get("value_target")
    if _finite(vt):
        return float(vt)
    q = attrs.get("q")
    return float(q) if q_fallback and _finite(q) else math.nan


def find_root(graph: nx.DiGraph) -> Any:
    roots = [n for n, d in graph.in_degree() if d == 0]
    name = graph.graph.get("problem_id", "?")
    if len(roots) != 1:
        raise ValueError(f"tree of problem {name!r} must have exactly one root, found {len(roots)}")
    bad = [n for n, d in graph.in_degree() if d > 1]
    if bad:
        raise ValueError(f"tree of problem {name!r} is not a tree: node {bad[0]!r} has 2+ parents")
    return roots[0]


def children(graph: nx.DiGraph, node: Any) -> list[Any]:
    """Children in a stable order (by node id), so exports are deterministic."""
    return sorted(graph.successors(node))


@dataclass(frozen=True)
class TreePath:
    """One root-to-node walk: node ids without the root, and their step texts."""

    nodes: tuple[Any, ...]
    steps: tuple[str, ...]


def path_to(graph: nx.DiGraph, node: Any, root: Any) -> TreePath:
    """The root-to-`node` path (root excluded)."""
    nodes = []
    cur = node
    while cur != root:
        nodes.append(cur)
        preds = list(graph.predecessors(cur))
        if not preds:
            raise ValueError(f"node {node!r} is not connected to the root")
        cur = preds[0]
    nodes.reverse()
    return TreePath(tuple(nodes), tuple(str(graph.nodes[n].get("text", "")) for n in nodes))


def terminal_nodes(graph: nx.DiGraph) -> list[Any]:
    """Terminal nodes (finished solutions), in node-id order."""
    return sorted(n for n, t in graph.nodes(data="terminal") if t)

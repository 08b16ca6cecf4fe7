"""Training rows for the value model, read off a searched TRAIN run directory.

One row per non-root node that has both a value target (the tree's own `value_target`
attribute, the same number traces.parquet exports) and the policy's hidden state at its
step's end (trees/<algo>/<id>.features.npy). The value target was computed from VERIFIED
terminal answers, i.e. with the reference: legitimate for TRAIN labels only, and every
label set says so (`label_source = "reference"`).

support = how many sampled terminal solutions lie below the node (merged samples counted),
the evidence behind its label: rows below `min_support` are dropped, and the rest are
weighted by it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from mcts.export.io import atomic_write, atomic_write_text
from mcts.export.results_log import ResultsLog
from mcts.export.trees import features_path, load_features, load_tree, tree_path
from mcts.improve.splits import question_key

LABEL_SOURCE = "reference"


@dataclass
class LabelSet:
    """Arrays aligned by row: features X, targets y, weights w, groups (the problem's
    question text: the unit of every train/validation split), problem ids, node ids."""

    X: np.ndarray
    y: np.ndarray
    weights: np.ndarray
    groups: np.ndarray
    problem_ids: np.ndarray
    nodes: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    # per row, the TRAIN run it came from (its directory name, e.g. "train" or
    # "train_best_of_n"); None: every row from meta["run_dir"]
    sources: np.ndarray | None = None

    def source_of_rows(self) -> np.ndarray:
        if self.sources is not None:
            return self.sources
        return np.full(len(self.y), Path(str(self.meta.get("run_dir", "train"))).name)

    @classmethod
    def concat(cls, parts: list[LabelSet]) -> LabelSet:
        """Rows of several TRAIN runs of the same problems in one set (meta: each run's)."""
        if len(parts) == 1:
            return parts[0]
        dims = {p.X.shape[1] for p in parts if len(p.y)}
        if len(dims) > 1:
            raise ValueError(f"label sets of different feature widths {sorted(dims)}")
        return cls(
            X=np.concatenate([p.X for p in parts]).astype(np.float32),
            y=np.concatenate([p.y for p in parts]),
            weights=np.concatenate([p.weights for p in parts]),
            groups=np.concatenate([p.groups for p in parts]).astype(str),
            problem_ids=np.concatenate([p.problem_ids for p in parts]).astype(str),
            nodes=np.concatenate([p.nodes for p in parts]).astype(np.int64),
            sources=np.concatenate([p.source_of_rows() for p in parts]).astype(str),
            meta={
                **parts[0].meta,
                "rows": int(sum(len(p.y) for p in parts)),
                "positive_rate": float(np.mean(np.concatenate([p.y for p in parts]) >= 0.5)),
                "runs": [p.meta for p in parts],
            },
        )

    def save(self, path: Path) -> Path:
        """One .npz (no pickles) and a .json beside it with the counts; both atomic."""

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    X=self.X,
                    y=self.y,
                    weights=self.weights,
                    groups=self.groups.astype(str),
                    problem_ids=self.problem_ids.astype(str),
                    nodes=self.nodes,
                    sources=self.source_of_rows().astype(str),
                )

        atomic_write(path, write)
        atomic_write_text(path.with_suffix(".json"), json.dumps(self.meta, indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> LabelSet:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("X", "y", "weights", "groups", "problem_ids", "nodes")}
                arrays["sources"] = z["sources"] if "sources" in z.files else None
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(
                f"{path}: not a label set written by mcts.improve ({exc}); delete it and rerun "
                "(it is rebuilt from the TRAIN run directory)"
            ) from exc
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        return cls(**arrays, meta=meta)


def _support(g: nx.DiGraph) -> dict[int, float]:
    """Merged-sample count of terminal solutions below (and at) each node."""
    out: dict[int, float] = {}
    for n in reversed(list(nx.topological_sort(g))):
        d = g.nodes[n]
        own = (
            float(d.get("count") or 1) if d.get("terminal") and d.get("correct") is not None else 0
        )
        out[n] = own + sum(out[c] for c in g.successors(n))
    return out


def label_rows(run_dir: str | Path, algorithm: str, *, min_support: int = 1) -> LabelSet:
    """The value-model rows of every finished problem of `algorithm` in `run_dir`."""
    run_dir = Path(run_dir)
    if min_support < 1:
        raise ValueError(f"min_support must be >= 1 terminal below a node, got {min_support}")
    log = ResultsLog(run_dir)
    X: list[np.ndarray] = []
    y: list[float] = []
    w: list[float] = []
    groups: list[str] = []
    pids: list[str] = []
    nodes: list[int] = []
    counts = {"problems": 0, "no_features": 0, "no_target": 0, "low_support": 0, "rows": 0}
    for row in log.rows():
        if row.get("algorithm") != algorithm:
            continue
        pid = str(row["id"])
        counts["problems"] += 1
        fp = features_path(run_dir, pid, algorithm)
        if not fp.exists():
            counts["no_features"] += 1
            continue
        g = load_tree(tree_path(run_dir, pid, algorithm))
        F = load_features(fp)
        # Rows are grouped by question text, not id: a small task space repeats questions
        # under other ids, and held-out rows must not share a question with training rows.
        group = question_key(str(row.get("question") or pid))
        sup = _support(g)
        for n, d in g.nodes(data=True):
            if n == 0:
                continue
            v = d.get("value_target")
            if v is None or not math.isfinite(float(v)):
                counts["no_target"] += 1
                continue
            if sup[n] < min_support:
                counts["low_support"] += 1
                continue
            if n >= F.shape[0] or not np.isfinite(F[n]).all():
                counts["no_features"] += 1
                continue
            X.append(F[n])
            y.append(float(v))
            w.append(sup[n])
            groups.append(group)
            pids.append(pid)
            nodes.append(int(n))
    counts["rows"] = len(y)
    dim = X[0].shape[0] if X else 0
    return LabelSet(
        X=np.stack(X).astype(np.float32) if X else np.zeros((0, dim), np.float32),
        y=np.asarray(y, dtype=np.float64),
        weights=np.asarray(w, dtype=np.float64),
        groups=np.asarray(groups, dtype=str),
        problem_ids=np.asarray(pids, dtype=str),
        nodes=np.asarray(nodes, dtype=np.int64),
        meta={
            "run_dir": str(run_dir),
            "algorithm": algorithm,
            "min_support": min_support,
            "label_source": LABEL_SOURCE,
            "positive_rate": float(np.mean(np.asarray(y) >= 0.5)) if y else float("nan"),
            **counts,
        },
    )

"""A run directory: what is written while the search runs and what is built at the end.

    <run_dir>/results.jsonl          one line per finished problem (ResultsLog.append)
    <run_dir>/trees/<algo>/<id>.json its tree, node-link JSON (written before the line)
    <run_dir>/traces.parquet         \\
    <run_dir>/pairs_dpo.parquet       } built by write_exports from results.jsonl + trees
    <run_dir>/stepwise.parquet       /
    <run_dir>/tree.png               one tree drawn

The tree is saved before its results line, so a line always has its tree; a tree without
a line (crash in between) is ignored and overwritten when the problem is redone. Exports
are rebuilt from ALL lines, so a resumed run exports earlier runs' problems too.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mcts.export import tables
from mcts.export.draw import draw_tree
from mcts.export.io import atomic_write, check_writable
from mcts.export.results_log import RESULTS, ResultsLog
from mcts.export.trees import load_tree, tree_path

TRACES = "traces.parquet"
PAIRS = "pairs_dpo.parquet"
STEPWISE = "stepwise.parquet"
TREE_PNG = "tree.png"


def _write_parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> Path:
    table = tables.to_table(rows, schema)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_exports(
    run_dir: str | os.PathLike[str],
    margin: float = 0.1,
    *,
    min_visits: int = 1,
    min_support: int = 1,
    max_step_pairs_per_node: int | None = None,
    max_trajectory_pairs: int | None = 8,
    label_threshold: float = 0.5,
    draw: bool | str = True,
) -> dict[str, Any]:
    """Rebuild traces / pairs / stepwise Parquet (and tree.png) from results.jsonl + trees/.

    margin: least value gap of a step pair (>= 0). min_support: least support of each side
    of a step pair (merged samples of checked terminal solutions at or below it; >= 0).
    Pairs compare value targets only (mcts.export.tables). draw: True draws the first
    finished problem's tree, a problem id draws that one, False draws none.
    Returns the paths written (results, traces, pairs_dpo, stepwise, tree_png or None),
    "counts" (problems, traces, step_pairs, trajectory_pairs, stepwise,
    stepwise_skipped_paths, and dropped_step_pairs / dropped_trajectory_pairs: candidate
    pairs left out per reason, tables.DROP_REASONS) and "missing_trees" (ids whose tree
    file is absent).
    """
    if (
        isinstance(margin, bool)
        or not isinstance(margin, (int, float))
        or not math.isfinite(margin)
        or margin < 0
    ):
        raise ValueError(
            f"margin must be a finite number >= 0 (value units, e.g. 0.1), got {margin!r}"
        )
    if not 0.0 <= label_threshold <= 1.0:
        raise ValueError(f"label_threshold must be in [0, 1], got {label_threshold!r}")
    if min_visits < 0:
        raise ValueError(f"min_visits must be >= 0, got {min_visits!r}")
    if isinstance(min_support, bool) or not isinstance(min_support, int) or min_support < 0:
        raise ValueError(f"min_support must be an int >= 0, got {min_support!r}")
    run = check_writable(run_dir)
    log = ResultsLog(run)
    traces: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    stepwise: list[dict[str, Any]] = []
    missing: list[str] = []
    skipped_paths = 0
    n_step = n_traj = 0
    drop_step: Counter = Counter()
    drop_traj: Counter = Counter()
    drawn: tuple[Any, str] | None = None
    for row in log.rows():
        tp = tree_path(run, str(row["id"]), str(row.get("algorithm") or ""))
        if not tp.exists():
            missing.append(str(row["id"]))
            continue
        g = load_tree(tp)
        traces += tables.trace_rows(g, row)
        sp = tables.step_pairs(
            g,
            margin,
            row,
            min_visits=min_visits,
            min_support=min_support,
            max_pairs_per_node=max_step_pairs_per_node,
            dropped=drop_step,
        )
        tpairs = tables.trajectory_pairs(
            g, row, max_pairs=max_trajectory_pairs, margin=margin, dropped=drop_traj
        )
        n_step += len(sp)
        n_traj += len(tpairs)
        pairs += sp + tpairs
        sw, sk = tables.stepwise_rows(g, row, label_threshold=label_threshold)
        stepwise += sw
        skipped_paths += sk
        if drawn is None and draw is not False and (draw is True or draw == str(row["id"])):
            drawn = (g, str(row["id"]))
    if missing:
        warnings.warn(
            f"{len(missing)} finished problem(s) have no tree file (e.g. {missing[0]!r}); "
            "they are left out of the Parquet exports",
            stacklevel=2,
        )
    out: dict[str, Any] = {
        "results": run / RESULTS,
        "traces": _write_parquet(run / TRACES, traces, tables.TRACES_SCHEMA),
        "pairs_dpo": _write_parquet(run / PAIRS, pairs, tables.PAIRS_SCHEMA),
        "stepwise": _write_parquet(run / STEPWISE, stepwise, tables.STEPWISE_SCHEMA),
        "tree_png": None,
        "counts": {
            "problems": len(log),
            "traces": len(traces),
            "step_pairs": n_step,
            "trajectory_pairs": n_traj,
            "stepwise": len(stepwise),
            "stepwise_skipped_paths": skipped_paths,
            "dropped_step_pairs": {k: drop_step[k] for k in tables.DROP_REASONS},
            "dropped_trajectory_pairs": {k: drop_traj[k] for k in tables.DROP_REASONS},
        },
        "missing_trees": missing,
    }
    if isinstance(draw, str) and drawn is None:
        raise ValueError(f"draw={draw!r}: no finished problem with that id in {run / RESULTS}")
    if drawn is not None:
        out["tree_png"] = draw_tree(drawn[0], run / TREE_PNG)
    return out

"""Outputs of a run: crash-safe results log, tree files, Parquet training tables, a tree PNG.

Typical use (the search loop does this):

    check_writable(run_dir)                   # fails fast, before any model loads
    log = ResultsLog(run_dir)                 # reads results.jsonl, repairs a torn last line
    todo = [p for p in problems if p.id not in log.done_ids()]
    for result in search(...):                # each ProblemResult as it finishes
        log.append(result)                    # tree JSON (atomic) then results line (fsync)
    write_exports(run_dir, margin=0.2)        # traces / pairs_dpo / stepwise .parquet + tree.png
"""

from mcts.export.draw import draw_tree, tree_layout
from mcts.export.io import OutputDirError, atomic_write, check_writable, safe_filename
from mcts.export.results_log import ResultsLog
from mcts.export.run_dir import write_exports
from mcts.export.tables import (
    PAIRS_SCHEMA,
    STEPWISE_SCHEMA,
    TRACES_SCHEMA,
    make_prompt,
    step_pairs,
    stepwise_rows,
    trace_rows,
    trajectory_pairs,
)
from mcts.export.trees import load_tree, node_value, save_tree, tree_path

__all__ = [
    "OutputDirError",
    "PAIRS_SCHEMA",
    "ResultsLog",
    "STEPWISE_SCHEMA",
    "TRACES_SCHEMA",
    "atomic_write",
    "check_writable",
    "draw_tree",
    "load_tree",
    "make_prompt",
    "node_value",
    "safe_filename",
    "save_tree",
    "step_pairs",
    "stepwise_rows",
    "trace_rows",
    "trajectory_pairs",
    "tree_layout",
    "tree_path",
    "write_exports",
]

"""Outputs of a run: crash-safe results log, tree files, Parquet training tables, a tree PNG.

Typical use (the search loop does this; `RunOutputs` is the one object it needs):

    out = RunOutputs(run_dir)                 # fails fast if run_dir is not writable
    todo = [p for p in problems if p.id not in out.done_ids(algorithm)]
    for result in search(...):                # each ProblemResult as it finishes
        out.add(result)                       # tree JSON (atomic) then results line (fsync)
    out.export(margin=0.1)                    # traces / pairs_dpo / stepwise .parquet + tree.png
"""

from mcts.export.draw import draw_tree, tree_layout
from mcts.export.io import OutputDirError, atomic_write, check_writable, safe_filename
from mcts.export.results_log import ResultsLog
from mcts.export.run_dir import RunOutputs, write_exports
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
    "RunOutputs",
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

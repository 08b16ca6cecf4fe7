"""Outputs of a run: crash-safe results log, tree files, Parquet training tables, a tree PNG.

Typical use (the search loop does this):

    check_writable(run_dir)                   # fails fast, before any model loads
    with hold_run_dir(run_dir):               # one writer per run dir (<run_dir>/.lock)
        log = ResultsLog(run_dir)             # reads results.jsonl, repairs a torn last line
        fp = run_fingerprint(cfg, task_cfg, model_identities(generator, reward))
        check_resume(log, fp, problems)       # another experiment's dir: stop, name the keys
        todo = [p for p in problems if p.id not in log.done_ids(cfg.algorithm)]
        for result in search(...):            # each ProblemResult as it finishes
            log.append(result, extra=fp.row_fields())  # tree JSON (atomic), line (fsync)
        write_exports(run_dir, margin=0.2)    # traces / pairs_dpo / stepwise .parquet + tree.png
"""

from mcts.export.draw import draw_tree, tree_layout
from mcts.export.fingerprint import (
    Fingerprint,
    RunDirMismatchError,
    check_resume,
    model_identities,
    run_fingerprint,
)
from mcts.export.io import (
    OutputDirError,
    atomic_write,
    atomic_write_text,
    check_writable,
    safe_filename,
)
from mcts.export.lock import RunDirBusyError, hold_run_dir
from mcts.export.results_log import ResultsLog, ResultsLogChangedError
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
    "Fingerprint",
    "OutputDirError",
    "PAIRS_SCHEMA",
    "ResultsLog",
    "ResultsLogChangedError",
    "RunDirBusyError",
    "RunDirMismatchError",
    "STEPWISE_SCHEMA",
    "TRACES_SCHEMA",
    "atomic_write",
    "atomic_write_text",
    "check_resume",
    "check_writable",
    "draw_tree",
    "hold_run_dir",
    "load_tree",
    "make_prompt",
    "model_identities",
    "node_value",
    "run_fingerprint",
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

"""`python -m mcts.report RUN_DIR [-o OUT.html]`: write the run's report.html.

A directory without results.jsonl but with run directories below it (a self-improvement
loop's output) gets a report in each plus an index.html. Bad input (not a run directory,
no results yet, a cut results line) is one line on stderr and exit code 2, no traceback;
a partial report (trees missing) is written and the missing ids are named on stderr.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from mcts.report import ReportError, ReportWarning, write_index, write_report
from mcts.report.data import RESULTS, check_run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mcts.report",
        description="Write a self-contained HTML report of a search run (opens offline).",
    )
    ap.add_argument("run_dir", help="a run directory (holding results.jsonl), or a loop's output")
    ap.add_argument("-o", "--out", help="output file (default: RUN_DIR/report.html)")
    args = ap.parse_args(argv)
    root = Path(args.run_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            nested = (
                root.is_dir()
                and not (root / RESULTS).exists()
                and any(p.is_file() for p in root.rglob(RESULTS))
            )
            if nested and args.out is None:
                path = write_index(root)
            else:
                check_run_dir(root)  # the clear error first, before anything is written
                path = write_report(root, args.out)
        except ReportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: {root}: cannot write the report: {exc}", file=sys.stderr)
            return 2
    for w in caught:
        if issubclass(w.category, ReportWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

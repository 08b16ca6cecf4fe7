"""results.jsonl: one JSON line per finished problem, appended, flushed and fsync'd.

Given a ProblemResult, the log first saves its tree (trees/<algorithm>/<id>.json, atomic)
and then appends its line, so every line has its tree and the exports can be rebuilt for
all problems on resume; a tree without a line (crash in between) is simply redone.

The log is the run's ledger: `done_ids()` is what a rerun skips. A crash can only tear the
LAST line (lines are written whole, in order); that line is ignored and truncated away
before the next append, so the problem is simply redone. Any other bad line is corruption
and raises.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from mcts.export.io import dumps_line
from mcts.export.trees import features_path, save_features, save_tree, tree_path
from mcts.results import ProblemResult

RESULTS = "results.jsonl"


class ResultsLogChangedError(RuntimeError):
    """results.jsonl was written by someone else while this log held it."""


def _key(row: dict[str, Any]) -> tuple[str, str]:
    return (str(row["id"]), str(row.get("algorithm") or ""))


class ResultsLog:
    """Append-only, crash-tolerant JSONL of result rows, keyed by (problem id, algorithm).

    `path` is a run directory (the log is <dir>/results.jsonl, trees go to <dir>/trees/)
    or a file path ending in .jsonl (trees go next to it).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        if p.suffix == ".jsonl" and not p.is_dir():
            self.path, self.run_dir = p, p.parent
        else:
            self.path, self.run_dir = p / RESULTS, p
        self._rows: list[dict[str, Any]] = []
        self._keys: set[tuple[str, str]] = set()
        self._good_end = 0  # byte offset just past the last intact line
        self._size = 0  # the file's size as this log last saw it (torn tail included)
        self.torn = False  # a torn last line was found (and will be truncated on append)
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        self._size = len(data)
        pos, lineno = 0, 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            lineno += 1
            if nl < 0:  # unterminated tail: an interrupted append
                self.torn = True
                break
            line = data[pos:nl]
            if line.strip():
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict) or "id" not in row:
                        raise ValueError("not a result record")
                except ValueError as e:
                    if data[nl + 1 :].strip():
                        raise ValueError(
                            f"{self.path}:{lineno}: corrupt results line ({e}); only a torn "
                            "last line is repaired automatically: fix or remove this line"
                        ) from e
                    self.torn = True
                    break
                k = _key(row)
                if k in self._keys:
                    warnings.warn(
                        f"{self.path}:{lineno}: duplicate result for {k}; keeping the first",
                        stacklevel=3,
                    )
                else:
                    self._keys.add(k)
                    self._rows.append(row)
            pos = nl + 1
            self._good_end = pos

    def done_ids(self, algorithm: str | None = None) -> set[str]:
        """Ids of finished problems (of one algorithm when given)."""
        return {i for i, a in self._keys if algorithm is None or a == algorithm}

    def rows(self) -> list[dict[str, Any]]:
        """The intact records, in file order."""
        return [dict(r) for r in self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def append(
        self, item: ProblemResult | dict[str, Any], extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Persist one finished problem durably (flush + fsync) before returning its row.

        A ProblemResult also gets its tree saved first; a plain dict is just logged.
        `extra`: fields added to the row (the run's fingerprint, see mcts.export.fingerprint).
        Refuses to write if the file changed on disk since this log read it (another process
        appended: truncating a torn tail then would destroy its lines).
        """
        result = item if isinstance(item, ProblemResult) else None
        row = item.row() if result is not None else item
        if extra and isinstance(row, dict):
            row = {**row, **extra}
        if not isinstance(row, dict) or "id" not in row:
            raise ValueError(
                "append() takes a ProblemResult or a dict with an 'id' field (ProblemResult.row())"
            )
        k = _key(row)
        line = (dumps_line(row) + "\n").encode("utf-8")
        with self._lock:
            if k in self._keys:
                raise ValueError(
                    f"problem {k[0]!r} (algorithm {k[1]!r}) is already in {self.path}; "
                    "skip the ids in done_ids() when resuming"
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if result is not None:
                save_tree(
                    result.tree,
                    tree_path(self.run_dir, result.problem.id, result.algorithm),
                    problem_id=result.problem.id,
                    question=result.problem.question,
                    reference=result.problem.answer,
                    algorithm=result.algorithm,
                )
                if result.features is not None:  # the policy's hidden state per node
                    save_features(
                        result.features,
                        features_path(self.run_dir, result.problem.id, result.algorithm),
                    )
            size = self.path.stat().st_size if self.path.exists() else 0
            if size != self._size:
                raise ResultsLogChangedError(
                    f"{self.path} changed on disk since it was read ({self._size} -> {size} "
                    "bytes): another process is writing this run directory. Nothing was "
                    "appended; give each run its own directory"
                )
            if size > self._good_end:
                os.truncate(self.path, self._good_end)  # drop a torn tail before appending
                self._size = self._good_end
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(line)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            except BaseException:
                self._size = os.fstat(fd).st_size  # a partial line: a torn tail to repair
                self.torn = self._size > self._good_end
                raise
            finally:
                os.close(fd)
            self._good_end += len(line)
            self._size = self._good_end
            self.torn = False
            self._keys.add(k)
            self._rows.append(json.loads(line))
        return row

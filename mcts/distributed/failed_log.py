"""failed.jsonl: the problems a sharded run gave up on (poisoned), one JSON line each.

Appended like results.jsonl (one whole line per write, O_APPEND, fsync), so a crash loses at
most the line being written. A torn last line is skipped when read, and the next append
starts on a fresh line so it never glues onto the fragment. A rerun reads the ids to skip
them (distributed.retry_failed=true tries them again).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mcts.export.io import dumps_line

FAILED = "failed.jsonl"


class FailedLog:
    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / FAILED

    def append(self, row: dict[str, Any]) -> None:
        """Persist one poisoned problem durably before returning."""
        if "id" not in row:
            raise ValueError("a failed.jsonl row needs an 'id'")
        line = (dumps_line(row) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a torn tail stays on its own (skipped) line
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn line from a crash mid-append
            if isinstance(row, dict) and "id" in row:
                out.append(row)
        return out

    def ids(self, algorithm: str | None = None) -> set[str]:
        return {
            str(r["id"])
            for r in self.rows()
            if algorithm is None or r.get("algorithm") in (None, algorithm)
        }

"""Crash-safe file primitives: atomic replace, fsync'd appends, strict JSON, safe names.

A crash must leave either the old file or the new one, never half of one: final files are
written to a temporary sibling, fsync'd, then os.replace'd over the target.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


class OutputDirError(OSError):
    """The run directory cannot be created or written."""


def check_writable(run_dir: str | os.PathLike[str]) -> Path:
    """Create `run_dir` if needed and prove a file can be written there; call before any search."""
    p = Path(run_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-check-", dir=p)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputDirError(
            f"output directory {str(p)!r} is not writable ({e.strerror or e}); "
            "choose another run directory (hydra.run.dir=... or the run_dir argument)"
        ) from e
    return p


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` then fsync and os.replace tmp over `path` (same directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, w)


def jsonable(obj: Any, where: str = "value") -> Any:
    """Plain JSON values: numpy scalars/arrays unwrapped, NaN/inf -> None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist(), where)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"{where} of type {type(obj).__name__} cannot be written as JSON")


def dumps_line(record: dict[str, Any]) -> str:
    """One strict-JSON line (no NaN tokens, so any JSON reader can load it)."""
    return json.dumps(jsonable(record, "record"), ensure_ascii=False, allow_nan=False)


_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_filename(name: str, max_len: int = 120) -> str:
    """A file name for an id: unsafe characters -> '_', plus a short hash when anything changed."""
    if not isinstance(name, str) or not name:
        raise ValueError("a file name needs a non-empty string id")
    safe = _SAFE.sub("_", name)
    if safe != name or len(safe) > max_len or safe in {".", ".."}:
        digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:10]
        safe = f"{safe[:max_len]}-{digest}"
    return safe

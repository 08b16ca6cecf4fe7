"""One writer per run directory: an exclusive flock on `<run_dir>/.lock` for the whole run.

results.jsonl is append-only and repairs a torn last line by truncating it; two processes
appending to the same log would truncate each other's lines. So the process that writes a
run directory (the library `search(run_dir=...)`, the Hydra app, the Ray driver) holds the
lock from before its first read of the log to its last write, and a second run on the same
directory fails at once, naming the holder.

The lock is re-entrant within one thread (the Hydra app holds it and calls `search()`, which
takes it again); another thread of the same process is refused like another process.
The kernel drops an flock when its process dies, so a crashed run never leaves a stale lock;
the `.lock` file itself stays (it only says who held it last).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

LOCK = ".lock"


class RunDirBusyError(RuntimeError):
    """Another run holds the run directory."""


_guard = threading.Lock()
_held: dict[str, tuple[int, int, int]] = {}  # real path -> (fd, owner thread id, depth)


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another run"
    return f"another run (pid {info['pid']} on {info.get('host', '?')}, since {info.get('since', '?')})"


@contextlib.contextmanager
def hold_run_dir(run_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold `run_dir`'s exclusive lock for the duration of the `with` block.

    Raises RunDirBusyError at once (no waiting) if another process, or another thread of
    this one, holds it.
    """
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(d)
    me = threading.get_ident()
    with _guard:
        held = _held.get(key)
        if held is not None:
            fd, owner, depth = held
            if owner != me:
                raise RunDirBusyError(
                    f"run directory {str(d)!r} is in use by another search in this process "
                    f"(pid {os.getpid()}); one run directory takes one run at a time"
                )
            _held[key] = (fd, owner, depth + 1)
        else:
            fd = os.open(Path(key) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                who = _holder(fd)
                os.close(fd)
                raise RunDirBusyError(
                    f"run directory {str(d)!r} is in use by {who}: two runs appending to one "
                    "results.jsonl would corrupt it. Wait for it to finish, or choose another "
                    "run directory (hydra.run.dir=... or the run_dir argument)"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
            _held[key] = (fd, me, 1)
    try:
        yield d
    finally:
        with _guard:
            fd, owner, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, owner, depth - 1)
            else:
                del _held[key]
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                finally:
                    os.close(fd)

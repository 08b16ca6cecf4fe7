"""Headless chromium for the report's checks: the DOM after scripts ran, and screenshots.

The tests and benchmarks/report_size.py render the page in a real browser because the
report is a program (lazy trees, a #problem=<id>&node=<n> fragment): what matters is the
DOM the scripts leave, which only a browser produces. Debian's `chromium` (`make browser`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


class BrowserMissingError(RuntimeError):
    """No chromium on PATH."""


def find_chromium() -> str:
    """The chromium executable, or BrowserMissingError saying how to install it."""
    for name in (os.environ.get("MCTS_CHROMIUM", ""), "chromium", "chromium-browser"):
        path = shutil.which(name) if name else None
        if path:
            return path
    raise BrowserMissingError(
        "chromium is not installed: `make browser` installs it (Debian: apt-get install "
        "chromium); set MCTS_SKIP_BROWSER=1 to skip the browser tests"
    )


def file_url(path: str | os.PathLike[str], fragment: str = "") -> str:
    """file:// URL of a local file, with an optional #fragment."""
    url = Path(path).resolve().as_uri()
    return f"{url}#{fragment}" if fragment else url


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="mcts-chromium-") as profile:
        cmd = [find_chromium(), *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )


def dump_dom(url: str, *, virtual_time_ms: int | None = 5000, timeout: float = 120.0) -> str:
    """The serialized DOM after the page loaded and its scripts ran."""
    args = ["--dump-dom", url]
    if virtual_time_ms is not None:
        args.insert(0, f"--virtual-time-budget={virtual_time_ms}")
    res = _run(args, timeout)
    if res.returncode != 0 or not res.stdout:
        raise RuntimeError(
            f"chromium --dump-dom {url} failed ({res.returncode}): {res.stderr[-2000:]}"
        )
    return res.stdout


def screenshot(
    url: str,
    out: str | os.PathLike[str],
    *,
    size: tuple[int, int] = (1200, 800),
    timeout: float = 120.0,
) -> Path:
    """A PNG of the page at `size` (width, height) pixels."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    res = _run(
        [
            "--virtual-time-budget=5000",
            f"--window-size={size[0]},{size[1]}",
            f"--screenshot={out}",
            url,
        ],
        timeout,
    )
    if res.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"chromium --screenshot {url} failed ({res.returncode}): {res.stderr[-2000:]}"
        )
    return out

"""Write one section of benchmarks/RESULTS.md in place, leaving the other sections alone."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Replace the `## title` section (up to the next `## `) with `body`, or append it."""
    section = f"## {title}\n\n{body.strip()}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    # The whole heading line: "## Budget curves" must not match "## Budget curves, engine 1".
    start = text.find(f"## {title}\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)

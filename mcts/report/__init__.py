"""A run report to look at: one self-contained static HTML file per run directory.

    write_report(run_dir)          -> <run_dir>/report.html (summary, problem table, trees)
    write_index(root)              -> a report per run dir below root + <root>/index.html
    python -m mcts.report RUN_DIR  the same from the shell (exit 2 on bad input)

The page needs nothing but a browser: no server, no CDN, scripts and styles inline. Model
text is untrusted: it travels only as JSON inside <script type="application/json"> blocks
with `<`, `>`, `&`, U+2028 and U+2029 escaped, and the page inserts it with textContent.
"""

from __future__ import annotations

import html
import json
import os
import re
import urllib.parse
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

from mcts.export.io import atomic_write
from mcts.report.data import RESULTS, ReportData, ReportError, check_run_dir, gather

REPORT = "report.html"
INDEX = "index.html"
_SLOT = re.compile(r"<!--@(DATA|TREES)@-->")
_ESC = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_ESC_RE = re.compile("[<>&\u2028\u2029]")


class ReportWarning(UserWarning):
    """The report is partial (trees missing) or could not be written."""


def script_json(obj: Any) -> str:
    """JSON safe inside <script>: no `</script>`, `<!--` or line separators can survive."""
    s = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return _ESC_RE.sub(lambda m: _ESC[m.group(0)], s)


def _template() -> str:
    return resources.files("mcts.report").joinpath("template.html").read_text(encoding="utf-8")


def render(data: ReportData) -> str:
    """The page's HTML: the template with the data and one lazy JSON blob per tree."""
    blobs = "\n".join(
        f'<script type="application/json" id="tree-{i}">{script_json(t)}</script>'
        for i, t in enumerate(data.trees)
        if t is not None
    )
    parts = {"DATA": script_json(data.page_data()), "TREES": blobs}
    return _SLOT.sub(lambda m: parts[m.group(1)], _template())


def write_report(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    summary: dict[str, Any] | None = None,
) -> Path:
    """Write the run's report (default <run_dir>/report.html, atomically) and return its path.

    `summary`: the search's summary when the directory has no summary.json (mcts.improve).
    Raises ReportError naming the path for a directory that cannot be reported on; warns
    (ReportWarning) when some problems lack a tree, and the page says which.
    """
    data = gather(run_dir, summary)
    if data.missing:
        ids = ", ".join(m["id"] for m in data.missing[:20])
        more = f" and {len(data.missing) - 20} more" if len(data.missing) > 20 else ""
        warnings.warn(
            f"{data.run_dir}: partial report: {len(data.missing)} problem(s) lack a tree: "
            f"{ids}{more}",
            ReportWarning,
            stacklevel=2,
        )
    path = Path(out) if out is not None else data.run_dir / REPORT
    return _write_page(path, render(data))


def _write_page(path: Path, text: str) -> Path:
    """Atomic, and readable by others (a page to share or serve), unlike mkstemp's 0600."""

    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)

    return atomic_write(path, w)


def write_report_safely(
    run_dir: str | os.PathLike[str], *, summary: dict[str, Any] | None = None
) -> Path | None:
    """write_report for the end of a run: a failure warns and returns None, the run stays."""
    try:
        return write_report(run_dir, summary=summary)
    except Exception as exc:  # noqa: BLE001 - the report is a view; never lose the run
        warnings.warn(f"{run_dir}: run report not written: {exc}", ReportWarning, stacklevel=2)
        return None


def run_dirs(root: str | os.PathLike[str]) -> list[Path]:
    """Run directories (with a results.jsonl) at or below `root`, sorted."""
    r = Path(root)
    return sorted(p.parent for p in r.rglob(RESULTS) if p.is_file())


def _index_html(root: Path, entries: list[dict[str, Any]]) -> str:
    """The index page: plain HTML (every text escaped), the loop's own report inline."""
    import base64

    e = html.escape
    rows = []
    for x in entries:
        rel = x["dir"].relative_to(root).as_posix() or "."
        # relative links, so the tree of files can be moved or copied as a whole
        href = e(urllib.parse.quote(f"{rel}/{REPORT}"))
        link = f'<a href="{href}">{e(rel)}</a>' if x.get("report") else e(rel)
        rows.append(
            f"<tr><td>{link}</td><td>{e(x.get('algorithm', ''))}</td>"
            f"<td class=n>{x.get('n', '')}</td><td class=n>{e(x.get('accuracy', ''))}</td>"
            f"<td class=n>{e(x.get('pass_at_k', ''))}</td><td>{e(x.get('error', ''))}</td></tr>"
        )
    extra = []
    png = root / "report.png"
    if png.is_file():
        b64 = base64.b64encode(png.read_bytes()).decode("ascii")
        extra.append(
            f'<h2>Loop report</h2><img alt="report.png" src="data:image/png;base64,{b64}">'
        )
    md = root / "report.md"
    if md.is_file():
        extra.append(f"<pre>{e(md.read_text(encoding='utf-8', errors='replace'))}</pre>")
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>Run reports: {e(root.name)}</title><style>"
        "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}"
        "table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:4px 10px;"
        "text-align:left}td.n{text-align:right}img{max-width:100%}"
        "pre{background:#f6f6f6;padding:8px;overflow:auto}</style></head><body>"
        f"<h1>Run reports under {e(str(root))}</h1>"
        "<p>Accuracy is the selected answer's; pass@k (any terminal correct) is not an "
        "accuracy.</p><table><thead><tr><th>run directory</th><th>algorithm</th>"
        "<th>problems</th><th>accuracy</th><th>pass@k</th><th>note</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
        + "".join(extra)
        + "</body></html>"
    )


def write_index(root: str | os.PathLike[str], *, reports: bool = True) -> Path:
    """Write (when `reports`) a report in every run directory below `root`, then
    <root>/index.html linking them. A run dir that cannot be reported is listed with why."""
    from mcts.report.data import summary_items

    r = Path(root)
    if not r.is_dir():
        raise ReportError(f"{r}: no such directory")
    entries: list[dict[str, Any]] = []
    for d in run_dirs(r):
        x: dict[str, Any] = {"dir": d}
        try:
            _, rows = check_run_dir(d)
            items, _ = summary_items(rows, None)
            card = {i["label"]: i["value"] for i in items}
            x.update(
                n=len(rows),
                algorithm=", ".join(sorted({str(w.get("algorithm") or "") for w in rows})),
                accuracy=card["accuracy (selected answer)"],
                pass_at_k=card["pass@k (any terminal correct)"],
            )
            if reports:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ReportWarning)
                    write_report(d)
                x["report"] = True
                if caught:
                    x["error"] = "partial: some problems lack a tree"
            else:
                x["report"] = (d / REPORT).is_file()
        except (ReportError, OSError) as exc:
            x["error"] = str(exc)
            x["report"] = (d / REPORT).is_file()
        entries.append(x)
    if not entries:
        raise ReportError(f"{r}: no run directories below it (no {RESULTS} found)")
    return _write_page(r / INDEX, _index_html(r, entries))


def write_index_safely(root: str | os.PathLike[str], *, reports: bool = False) -> Path | None:
    """write_index for the end of the loop: a failure warns and returns None."""
    try:
        return write_index(root, reports=reports)
    except Exception as exc:  # noqa: BLE001 - the index is a view; never lose the loop
        warnings.warn(f"{root}: report index not written: {exc}", ReportWarning, stacklevel=2)
        return None


__all__ = [
    "INDEX",
    "REPORT",
    "ReportError",
    "ReportWarning",
    "render",
    "run_dirs",
    "script_json",
    "write_index",
    "write_index_safely",
    "write_report",
    "write_report_safely",
]

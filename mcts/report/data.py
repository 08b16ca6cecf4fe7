"""What the run report shows, gathered from a run directory (read-only, never the lock).

Everything the page needs is computed here and handed to the template as plain JSON: the
summary figures as ready-formatted strings (so the page, the CLI and the tests agree on
them), one compact row per problem for the table, and one compact columnar tree per problem
(parsed by the page only when that problem is opened, so 1,000 trees cost little at load).
"""

from __future__ import annotations

import base64
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcts.export.results_log import RESULTS, ResultsLog
from mcts.export.trees import TREES_DIR, tree_path
from mcts.stats import wilson

SUMMARY = "summary.json"
# Files whose presence says "this is a run directory" even before its first result.
RUN_MARKERS = (RESULTS, SUMMARY, TREES_DIR, ".lock", ".hydra")
# PNG plots of budget curves / loop reports that a run directory may hold (tree.png is the
# static drawing the interactive trees replace).
PLOT_MAX_BYTES = 8 * 1024 * 1024

# Node flags in the compact tree (one int per node).
TERMINAL, CORRECT, INCORRECT, SELECTED = 1, 2, 4, 8


class ReportError(ValueError):
    """The path cannot be reported on (not a run dir, no results, a cut results line)."""


@dataclass
class ReportData:
    """Everything the page shows; `missing` lists problem ids without a usable tree."""

    run_dir: Path
    rows: list[dict[str, Any]]
    trees: list[str | None]  # compact tree JSON per row (None: missing or unreadable)
    missing: list[dict[str, str]] = field(default_factory=list)
    summary_items: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: list[dict[str, str]] = field(default_factory=list)
    plots: list[dict[str, str]] = field(default_factory=list)

    def page_data(self) -> dict[str, Any]:
        """The JSON the template's script reads (trees travel separately, one blob each)."""
        return {
            "title": f"Run report: {self.run_dir.name or str(self.run_dir)}",
            "run_dir": str(self.run_dir),
            "summary": self.summary_items,
            "notes": self.notes,
            "missing": self.missing,
            "rows": self.rows,
            "config": self.config,
            "plots": self.plots,
        }


def check_run_dir(run_dir: str | os.PathLike[str]) -> tuple[Path, list[dict[str, Any]]]:
    """The run directory and its intact result rows, or a ReportError naming the path."""
    p = Path(run_dir)
    if not p.exists():
        raise ReportError(f"{p}: no such directory")
    if not p.is_dir():
        raise ReportError(f"{p}: not a run directory (a file; give the directory)")
    results = p / RESULTS
    if not results.exists():
        if any((p / m).exists() for m in RUN_MARKERS):
            raise ReportError(
                f"{p}: no results yet ({RESULTS} is missing): the report needs at least one "
                "finished problem"
            )
        raise ReportError(
            f"{p}: not a run directory (no {RESULTS}, {TREES_DIR}/ or {SUMMARY}); give the "
            "directory a run wrote (the Hydra output dir or search()'s run_dir)"
        )
    try:
        log = ResultsLog(p)
    except (ValueError, OSError) as exc:  # corrupt middle line, unreadable file
        raise ReportError(f"{results}: cannot be read: {exc}") from exc
    if log.torn:
        raise ReportError(
            f"{results}: the last line is cut (an interrupted append, or a run still writing "
            "it); resume the run in this directory to repair it, or retry when it has finished"
        )
    rows = log.rows()
    if not rows:
        raise ReportError(
            f"{p}: no results yet ({RESULTS} is empty): the report needs at least one "
            "finished problem"
        )
    return p, rows


def _num(x: Any, digits: int = 4) -> float | None:
    if isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x):
        return round(float(x), digits)
    return None


def _int(x: Any) -> int | None:
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        return int(x)
    v = _num(x, 6)
    return int(v) if v is not None else None


def _flag(x: Any) -> int | None:
    """True/False -> 1/0, anything else (not checked, missing) -> None."""
    return None if not isinstance(x, bool) else int(x)


def _text(x: Any) -> str:
    return "" if x is None else str(x)


def compact_tree(data: dict[str, Any]) -> dict[str, Any]:
    """Columnar node-link tree: parent index, text and the figures the page shows per node.

    Nodes are ordered by id; `id` is kept only when ids are not 0..n-1. Raises ValueError
    when the graph is not one rooted tree (the page cannot draw it).
    """
    nodes = data.get("nodes")
    edges = data.get("edges", data.get("links"))
    if not isinstance(nodes, list) or not nodes or not isinstance(edges, list):
        raise ValueError("not a node-link tree (no nodes or no edges)")
    ids = [n["id"] for n in nodes]
    try:
        order = sorted(range(len(ids)), key=lambda i: ids[i])
    except TypeError:
        order = sorted(range(len(ids)), key=lambda i: str(ids[i]))
    nodes = [nodes[i] for i in order]
    ids = [ids[i] for i in order]
    index = {v: i for i, v in enumerate(ids)}
    if len(index) != len(ids):
        raise ValueError("duplicate node ids")
    parent = [-1] * len(ids)
    for e in edges:
        s, t = index.get(e.get("source")), index.get(e.get("target"))
        if s is None or t is None:
            raise ValueError(f"edge {e.get('source')!r}->{e.get('target')!r} names no node")
        if parent[t] != -1:
            raise ValueError(f"node {ids[t]!r} has two parents")
        parent[t] = s
    roots = [i for i, p in enumerate(parent) if p == -1]
    if len(roots) != 1:
        raise ValueError(f"{len(roots)} roots (a tree has one)")
    kids: list[list[int]] = [[] for _ in ids]
    for i, p in enumerate(parent):
        if p >= 0:
            kids[p].append(i)
    seen, stack = 0, [roots[0]]
    while stack:
        seen += 1
        stack.extend(kids[stack.pop()])
        if seen > len(ids):
            break
    if seen != len(ids):
        raise ValueError("not connected to the root (a cycle)")

    def flags(a: dict[str, Any]) -> int:
        f = TERMINAL if a.get("terminal") else 0
        c = a.get("correct")
        f |= CORRECT if c is True else INCORRECT if c is False else 0
        return f | (SELECTED if a.get("selected") else 0)

    out: dict[str, Any] = {
        "p": parent,
        "t": [_text(a.get("text")) for a in nodes],
        "v": [_int(a.get("visits")) for a in nodes],
        "q": [_num(a.get("q")) for a in nodes],
        "vt": [_num(a.get("value_target")) for a in nodes],
        "r": [_num(a.get("reward")) for a in nodes],
        "pr": [_num(a.get("prior")) for a in nodes],
        "n": [_int(a.get("n_tokens")) for a in nodes],
        "c": [_int(a.get("count")) for a in nodes],
        "f": [flags(a) for a in nodes],
        "a": [None if a.get("answer") is None else _text(a.get("answer")) for a in nodes],
        "fin": [_text(a.get("finish")) for a in nodes],
    }
    if ids != list(range(len(ids))):
        out["id"] = [str(i) for i in ids]
    return out


def _load_tree(run: Path, row: dict[str, Any]) -> tuple[str | None, str | None, int]:
    """(compact JSON, why it is missing, max depth) for one results row."""
    tp = tree_path(run, str(row["id"]), str(row.get("algorithm") or ""))
    if not tp.exists():
        return None, f"no tree file ({tp.relative_to(run)})", 0
    try:
        ct = compact_tree(json.loads(tp.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"unreadable tree file {tp.relative_to(run)}: {exc}", 0
    depth = [0] * len(ct["p"])
    for i, p in enumerate(ct["p"]):  # parents may come after children: walk up
        d, cur = 0, p
        while cur >= 0 and d <= len(depth):
            d, cur = d + 1, ct["p"][cur]
        depth[i] = d
    s = json.dumps(ct, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return s, None, max(depth)


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _mean(vals: list[float]) -> float:
    return sum(vals) / len(vals) if vals else math.nan


def _secs(x: float) -> str:
    return f"{x:,.0f} s" if abs(x) >= 100 else f"{x:,.1f} s"


def _fig(x: float, unit: str = "") -> str:
    return "n/a" if not math.isfinite(x) else f"{x:,.1f}{unit}"


def summary_items(
    rows: list[dict[str, Any]], summary: dict[str, Any] | None
) -> tuple[list[dict[str, str]], list[str]]:
    """Summary cards (label, value, note, optional help) and page notes, from results.jsonl
    rows; wave fill and the time split exist only in the search's summary."""
    n = len(rows)
    k_ok = sum(1 for r in rows if r.get("correct") is True)
    lo, hi = wilson(k_ok, n)
    pk = [r for r in rows if isinstance(r.get("pass_at_k"), bool)]
    pk_ok = sum(1 for r in pk if r["pass_at_k"])
    found_not_picked = sum(1 for r in pk if r["pass_at_k"] and r.get("correct") is not True)
    ks = [float(r["k"]) for r in rows if _num(r.get("k")) is not None]

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in rows if _num(r.get(key)) is not None]

    gen, rew = col("tokens_generated_tokens"), col("tokens_reward_tokens")
    prompt, cached = col("tokens_prompt_tokens"), col("tokens_cached_prompt_tokens")
    hit = sum(cached) / sum(prompt) if sum(prompt) > 0 else math.nan
    algos = sorted({str(r.get("algorithm") or "") for r in rows})
    items = [
        {"label": "problems", "value": f"{n:,}", "note": ", ".join(algos)},
        {
            "label": "accuracy (selected answer)",
            "value": _pct(k_ok / n if n else math.nan),
            "note": f"{k_ok} / {n}; 95% CI {_pct(lo)} – {_pct(hi)}",
            "help": "the ONE answer the search selected per problem; 95% Wilson interval",
        },
        {
            "label": "pass@k (any terminal correct)",
            "value": _pct(pk_ok / len(pk) if pk else math.nan),
            "note": f"not an accuracy; {found_not_picked} found but not picked",
            "help": f"pass@k: a problem counts when any terminal answer in its tree is "
            f"correct (mean k = {_fig(_mean(ks))} terminals); {found_not_picked} problem(s) "
            "had the right answer in the tree but the search selected another",
        },
        {
            "label": "generated tokens / problem",
            "value": _fig(_mean(gen)),
            "note": f"{sum(gen):,.0f} in all",
        },
        {
            "label": "reward tokens / problem",
            "value": _fig(_mean(rew)),
            "note": f"{sum(rew):,.0f} in all",
        },
        {
            "label": "prompt tokens / problem",
            "value": _fig(_mean(prompt)),
            "note": f"cache hits {_pct(hit)}",
            "help": f"{sum(cached):,.0f} of {sum(prompt):,.0f} prompt tokens came from the "
            "prefix cache",
        },
    ]
    s = summary or {}
    wf = _num(s.get("wave_fill"))
    calls, waves = s.get("generator_calls"), s.get("waves")
    items.append(
        {
            "label": "wave fill",
            "value": _pct(wf) if wf is not None else "n/a",
            "note": f"{waves} waves, {calls} calls, batch "
            f"{_fig(float(s.get('mean_batch_per_call') or math.nan))}"
            if summary
            else f"no {SUMMARY} in the run directory",
            "help": "requests per generator call / (live trees × requests each tree should send)",
        }
    )
    wall, gs, rs = (_num(s.get(k)) for k in ("seconds", "generator_seconds", "reward_seconds"))
    if wall is not None and gs is not None and rs is not None:
        model = gs + rs
        engine = max(0.0, wall - model)
        items.append(
            {
                "label": "time: model vs engine",
                "value": f"{_secs(model)} / {_secs(engine)}",
                "note": f"engine {_pct(engine / wall if wall else math.nan)} of {_secs(wall)} wall",
                "help": f"model = generator {gs:,.1f} s + reward {rs:,.1f} s; engine = the "
                "rest of the wall time (tree kernels, prompts, bookkeeping)",
            }
        )
    else:
        secs = col("seconds")
        items.append(
            {
                "label": "time: model vs engine",
                "value": "n/a",
                "note": f"no {SUMMARY}",
                "help": f"no timing split without {SUMMARY}; problems took "
                f"{_fig(_mean(secs), ' s')} each (wall, while batched with others)",
            }
        )
    notes = []
    now = s.get("searched_now")
    if isinstance(now, int) and now < n:
        notes.append(
            f"Resumed run: wave fill and timings cover the {now} problem(s) searched by the "
            f"last process only; the other figures cover all {n}."
        )
    if s.get("reward_uses_reference") or any(r.get("reward_uses_reference") for r in rows):
        notes.append(
            "The reward reads the reference answer: accuracy is oracle-guided, not a test-time "
            "figure."
        )
    if len(algos) > 1:
        for a in algos:
            sub = [r for r in rows if str(r.get("algorithm") or "") == a]
            ok = sum(1 for r in sub if r.get("correct") is True)
            lo_a, hi_a = wilson(ok, len(sub))
            notes.append(
                f"{a}: accuracy {_pct(ok / len(sub))} ({ok}/{len(sub)}, 95% CI {_pct(lo_a)} – "
                f"{_pct(hi_a)})"
            )
    return items, notes


def _config(run: Path, rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> list:
    """Text blocks of what the run directory says about its configuration."""
    out = []
    for rel in (".hydra/config.yaml", ".hydra/overrides.yaml"):
        p = run / rel
        if p.is_file():
            try:
                out.append({"name": rel, "text": p.read_text(encoding="utf-8", errors="replace")})
            except OSError:
                pass
    fp = rows[0].get("fingerprint_fields")
    if isinstance(fp, dict):
        out.append(
            {
                "name": "fingerprint fields (first results row)",
                "text": json.dumps(fp, indent=2, ensure_ascii=False, default=str),
            }
        )
    if summary:
        out.append(
            {
                "name": SUMMARY,
                "text": json.dumps(summary, indent=2, ensure_ascii=False, default=str),
            }
        )
    return out


def _plots(run: Path) -> list[dict[str, str]]:
    """Budget-curve / loop plots the directory holds, base64 PNG."""
    out = []
    for p in sorted(run.glob("*.png")):
        if p.name == "tree.png" or not p.is_file() or p.stat().st_size > PLOT_MAX_BYTES:
            continue
        data = p.read_bytes()
        if data[:8] != b"\x89PNG\r\n\x1a\n":
            continue
        out.append({"name": p.name, "png": base64.b64encode(data).decode("ascii")})
    return out


def _read_summary(run: Path) -> dict[str, Any] | None:
    p = run / SUMMARY
    if not p.is_file():
        return None
    try:
        s = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) else None


def gather(run_dir: str | os.PathLike[str], summary: dict[str, Any] | None = None) -> ReportData:
    """Read a run directory into ReportData; `summary` overrides summary.json (a search()
    caller has it in hand where no summary.json is written, e.g. mcts.improve)."""
    run, rows = check_run_dir(run_dir)
    if summary is not None:
        summary = json.loads(json.dumps(summary, default=str))  # Paths etc. -> plain JSON
    else:
        summary = _read_summary(run)
    table, trees, missing = [], [], []
    for r in rows:
        tj, why, depth = _load_tree(run, r)
        trees.append(tj)
        if why is not None:
            missing.append({"id": str(r["id"]), "why": why})
        table.append(
            {
                "id": str(r["id"]),
                "alg": _text(r.get("algorithm")),
                "q": _text(r.get("question")),
                "ref": _text(r.get("reference")),
                "sel": None if r.get("selected_answer") is None else _text(r["selected_answer"]),
                "ok": _flag(r.get("correct")),
                "pk": _flag(r.get("pass_at_k")),
                "k": _int(r.get("k")),
                "gen": _int(r.get("tokens_generated_tokens")),
                "rew": _int(r.get("tokens_reward_tokens")),
                "size": _int(r.get("tree_size")),
                "depth": _int(r.get("tree_depth")) if r.get("tree_depth") is not None else depth,
                "picks": r.get("picks") if isinstance(r.get("picks"), dict) else None,
                "tree": tj is not None,
            }
        )
    items, notes = summary_items(rows, summary)
    return ReportData(
        run_dir=run,
        rows=table,
        trees=trees,
        missing=missing,
        summary_items=items,
        notes=notes,
        config=_config(run, rows, summary),
        plots=_plots(run),
    )

"""Size and load time of the run report (issue 15) for a fake 1,000-problem run.

Builds a run directory in the real on-disk format (results.jsonl rows as the search writes
them, node-link trees under trees/<algorithm>/, a summary.json) with random trees of
realistic size (5-60 nodes, steps of 40-220 characters), writes report.html with
mcts.report, and opens it in headless chromium: the page records, on <html>, the time from
navigation start to interactive (file read + HTML parse + its script: summary, 1,000-row
table, one tree opened) and the script's own share; the chromium process's wall time is
reported beside an empty page's (browser start-up).

    .venv/bin/python benchmarks/report_size.py                   # 1,000 problems, prints
    .venv/bin/python benchmarks/report_size.py --write-results   # and the RESULTS.md section
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import networkx as nx  # noqa: E402

from mcts.export.io import dumps_line  # noqa: E402
from mcts.export.trees import tree_path, tree_to_json  # noqa: E402

WORDS = (
    "first we add the two numbers then subtract carry the one so the total is multiply "
    "both sides by divide which gives us check that result step answer equals therefore"
).split()


def fake_tree(rng: random.Random, pid: str, question: str, reference: str, n_nodes: int):
    """A random searched tree with node attributes as mcts.results documents them."""
    g = nx.DiGraph(problem_id=pid, question=question, reference=reference, algorithm="mcts")
    g.add_node(0, text="", depth=0, parent=-1)
    open_nodes = [0]
    for i in range(1, n_nodes):
        p = rng.choice(open_nodes)
        d = g.nodes[p]["depth"] + 1
        words = rng.randint(8, 40)
        g.add_node(i, text=" ".join(rng.choice(WORDS) for _ in range(words)), depth=d, parent=p)
        g.add_edge(p, i)
        if d < 8:
            open_nodes.append(i)
    leaves = [n for n in g if g.out_degree(n) == 0 and n != 0]
    for n, a in g.nodes(data=True):
        term = n in leaves and rng.random() < 0.7
        ans = (reference if rng.random() < 0.3 else str(rng.randint(0, 20))) if term else None
        a.update(
            visits=rng.randint(1, 30),
            q=rng.random(),
            reward=rng.random() if n else None,
            prior=rng.random() if n else 1.0,
            terminal=term,
            n_tokens=len(a["text"].split()) + 1 if n else 0,
            count=1,
            finish="eos" if term else "step",
            value_target=rng.random() if rng.random() < 0.6 else None,
            answer=ans,
            correct=(ans == reference) if term else None,
            selected=False,
        )
    # the selected path: root -> the highest-q terminal (or a leaf)
    ends = [n for n in leaves if g.nodes[n]["terminal"]] or leaves or [0]
    end = max(ends, key=lambda n: g.nodes[n]["q"])
    while True:
        g.nodes[end]["selected"] = True
        preds = list(g.predecessors(end))
        if not preds:
            break
        end = preds[0]
    return g


def make_fake_run(run_dir: str | Path, n_problems: int, *, seed: int = 0) -> Path:
    """A run directory with `n_problems` finished problems, their trees and a summary."""
    rng = random.Random(seed)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_problems):
        pid = f"fake-{i}"
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        question, reference = f"What is {a} + {b}?", str(a + b)
        g = fake_tree(rng, pid, question, reference, rng.randint(5, 60))
        tp = tree_path(run, pid, "mcts")
        tp.parent.mkdir(parents=True, exist_ok=True)
        tp.write_text(tree_to_json(g), encoding="utf-8")
        sel = next((n for n in g if g.nodes[n]["selected"] and g.out_degree(n) == 0), 0)
        answer = g.nodes[sel].get("answer")
        term = [g.nodes[n]["correct"] for n in g if g.nodes[n]["terminal"]]
        prompt = rng.randint(200, 900)
        lines.append(
            dumps_line(
                {
                    "id": pid,
                    "task": "fake",
                    "question": question,
                    "reference": reference,
                    "selected_answer": answer,
                    "correct": answer == reference,
                    "pass_at_k": any(term),
                    "k": len(term),
                    "algorithm": "mcts",
                    "tokens_prompt_tokens": prompt,
                    "tokens_cached_prompt_tokens": rng.randint(0, prompt),
                    "tokens_generated_tokens": rng.randint(50, 256),
                    "tokens_reward_tokens": rng.randint(100, 1500),
                    "tokens_calls": rng.randint(1, 10),
                    "seconds": round(rng.random() * 30, 4),
                    "tree_size": g.number_of_nodes(),
                    "tree_depth": max(d for _, d in g.nodes(data="depth")),
                    "truncated": 0,
                }
            )
        )
    (run / "results.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {
        "problems": n_problems,
        "seconds": 1234.5,
        "generator_seconds": 800.0,
        "reward_seconds": 350.0,
        "waves": 40,
        "generator_calls": 40,
        "requests": 4000,
        "slots": 4100,
        "mean_batch_per_call": 100.0,
        "wave_fill": 4000 / 4100,
        "reward_uses_reference": False,
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return run


def measure(html: Path, fragment: str, repeats: int = 3) -> dict[str, float]:
    """Median in-page timings (ms) and chromium wall time (s) over `repeats` loads."""
    from mcts.report.browser import dump_dom, file_url

    def attr(dom: str, name: str) -> float:
        m = re.search(rf'data-{name}="([0-9.]+)"', dom)
        if not m:
            raise RuntimeError(f"the page did not record data-{name} (did its script run?)")
        return float(m.group(1))

    keys = ("since-nav-ms", "script-ms", "layout-ms", "open-ms")
    got: dict[str, list[float]] = {k: [] for k in (*keys, "wall_s", "empty_wall_s")}
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.html"
        empty.write_text("<!doctype html><title>empty</title><p>empty")
        for _ in range(repeats):
            t0 = time.perf_counter()
            dom = dump_dom(file_url(html, fragment), virtual_time_ms=None)
            got["wall_s"].append(time.perf_counter() - t0)
            for k in keys:
                got[k].append(attr(dom, k))
            t0 = time.perf_counter()
            dump_dom(file_url(empty), virtual_time_ms=None)
            got["empty_wall_s"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", help="build the fake run here (kept) instead of a temp dir")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    from mcts.report import write_report

    with tempfile.TemporaryDirectory() as tmp:
        run = make_fake_run(Path(args.keep or tmp) / "fake-run", args.problems)
        t0 = time.perf_counter()
        html = write_report(run)
        write_s = time.perf_counter() - t0
        size = html.stat().st_size
        trees = sum(p.stat().st_size for p in (run / "trees").rglob("*.json"))
        last = f"problem=fake-{args.problems - 1}"
        m = measure(html, last, args.repeats)
    mib = 1024 * 1024
    lines = [
        f"problems                    {args.problems}",
        f"report.html                 {size / mib:.2f} MiB ({size / args.problems / 1024:.1f} "
        f"KiB/problem; tree files on disk {trees / mib:.2f} MiB)",
        f"python write_report         {write_s:.2f} s",
        f"navigation -> interactive   {m['since-nav-ms']:.0f} ms (median of {args.repeats})",
        f"  of which the page script  {m['script-ms']:.0f} ms (first layout "
        f"{m['layout-ms']:.0f} ms, opening one tree {m['open-ms']:.1f} ms)",
        f"chromium --dump-dom wall    {m['wall_s']:.2f} s (empty page: {m['empty_wall_s']:.2f} s; "
        "start-up, load, printing the whole DOM)",
    ]
    print("\n".join(lines))
    if args.write_results:
        from benchmarks._results import write_section

        cmd = "python benchmarks/report_size.py --write-results"
        if args.problems != 1000:
            cmd += f" --problems {args.problems}"
        body = (
            "One self-contained `report.html` (`python -m mcts.report RUN_DIR`, also written at "
            "the end of every run) for a fake run in the real on-disk format: "
            f"{args.problems} problems, random trees of 5-60 nodes with 40-220-character "
            "steps. Trees are embedded as compact columnar JSON, one "
            '`<script type="application/json">` block each, parsed only when a problem is '
            "opened. Load time: headless Debian chromium (`--dump-dom`, no virtual time), "
            "opening the last problem's tree from the URL fragment; 2 shared CPU cores.\n\n"
            f"Command: `{cmd}`\n\n```\n" + "\n".join(lines) + "\n```"
        )
        write_section("Run report (issue 15)", body)


if __name__ == "__main__":
    main()

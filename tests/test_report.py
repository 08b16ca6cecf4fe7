"""The run report (mcts.report): rendered in a real browser, untrusted text kept inert.

The page is a program (lazy trees, a #problem=<id>&node=<n> fragment), so the checks read
the DOM headless chromium leaves after the scripts ran. Without chromium these tests fail
(`make browser` installs it) unless MCTS_SKIP_BROWSER=1 says to skip them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import networkx as nx
import pytest

from mcts.export.io import dumps_line
from mcts.export.trees import save_tree, tree_path
from mcts.report import (
    REPORT,
    ReportError,
    ReportWarning,
    script_json,
    write_index,
    write_report,
    write_report_safely,
)
from mcts.report.__main__ import main as cli
from mcts.report.browser import BrowserMissingError, dump_dom, file_url, find_chromium
from mcts.stats import wilson

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def browser() -> str:
    if os.environ.get("MCTS_SKIP_BROWSER") == "1":
        pytest.skip("MCTS_SKIP_BROWSER=1: browser checks of the report skipped")
    try:
        return find_chromium()
    except BrowserMissingError as exc:
        pytest.fail(str(exc), pytrace=False)  # says: `make browser` installs it


class _Dom(HTMLParser):
    """Text content per element id, and attributes of <html>, from a serialized DOM."""

    VOID = {"br", "img", "input", "meta", "link", "col", "hr", "source", "wbr"}

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.text: dict[str, str] = {}
        self.html_attrs: dict[str, str | None] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._open: list[tuple[str, str | None]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "html":
            self.html_attrs = a
        if tag in self.VOID:
            return
        self._open.append((tag, a.get("id")))
        if a.get("id"):
            self.text.setdefault(a["id"], "")

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            t, _ = self._open.pop()
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, i in self._open:
            if i:
                self.text[i] += data


def _dom(html_path: Path, fragment: str = "") -> _Dom:
    dom = _Dom(dump_dom(file_url(html_path, fragment)))
    assert dom.html_attrs.get("data-ready") == "1", "the page's script did not finish"
    return dom


def _tree(pid: str, question: str, steps: list[tuple[int, str, dict]]) -> nx.DiGraph:
    """Root 0 plus (parent, text, attrs) nodes 1..n."""
    g = nx.DiGraph(problem_id=pid, question=question, reference="42", algorithm="mcts")
    g.add_node(
        0, text="", depth=0, visits=len(steps) + 1, q=0.5, reward=None, prior=1.0, selected=True
    )
    for i, (parent, text, attrs) in enumerate(steps, start=1):
        base = {
            "text": text,
            "depth": g.nodes[parent]["depth"] + 1,
            "visits": 1,
            "q": 0.5,
            "reward": 0.5,
            "prior": 0.25,
            "terminal": False,
            "n_tokens": len(text.split()),
            "count": 1,
            "value_target": None,
            "answer": None,
            "correct": None,
            "selected": False,
        }
        g.add_node(i, **{**base, **attrs})
        g.add_edge(parent, i)
    return g


def _row(pid: str, question: str, **kw) -> dict:
    row = {
        "id": pid,
        "task": "t",
        "question": question,
        "reference": "42",
        "selected_answer": "42",
        "correct": True,
        "pass_at_k": True,
        "k": 2,
        "algorithm": "mcts",
        "tokens_prompt_tokens": 100,
        "tokens_cached_prompt_tokens": 40,
        "tokens_generated_tokens": 37,
        "tokens_reward_tokens": 120,
        "tokens_calls": 3,
        "seconds": 1.5,
        "tree_size": 4,
        "tree_depth": 2,
    }
    return {**row, **kw}


def _png() -> bytes:
    """A 1x1 PNG (a stand-in for a budget-curve plot)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )


def _run_dir(tmp: Path, problems: list[tuple[dict, nx.DiGraph | None]]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    for row, g in problems:
        if g is not None:
            save_tree(g, tree_path(tmp, row["id"], row["algorithm"]))
    (tmp / "results.jsonl").write_text("".join(dumps_line(r) + "\n" for r, _ in problems))
    return tmp


SOLVED = [
    (0, "Let x be the number of apples.", {"visits": 3, "q": 0.7, "selected": True}),
    (0, "Guess wildly: 7.", {"terminal": True, "answer": "7", "correct": False, "q": 0.1}),
    (
        1,
        "So x = 6 * 7 = 42. The answer is 42.",
        {"terminal": True, "answer": "42", "correct": True, "selected": True, "value_target": 1.0},
    ),
]


def test_one_problem_opens_from_the_fragment_with_text_path_and_summary(tmp_path, browser):
    run = _run_dir(
        tmp_path / "run",
        [(_row("p1", "How many apples are there?"), _tree("p1", "How many apples?", SOLVED))],
    )
    (run / "summary.json").write_text(
        json.dumps(
            {"wave_fill": 0.875, "seconds": 10.0, "generator_seconds": 6.0, "reward_seconds": 2.5}
        )
    )
    (run / "budget_curves.png").write_bytes(_png())
    html = write_report(run)
    assert html == run / REPORT
    page = html.read_text()
    # self-contained: nothing fetched from anywhere
    assert "<link" not in page and "src=" not in page.replace('"data:image/png', "")
    assert "https://" not in page

    dom = _dom(html, "problem=p1&node=3")
    assert dom.text["node-text"] == "So x = 6 * 7 = 42. The answer is 42."
    assert "on the selected path" in dom.text["node-title"]
    assert "terminal, correct" in dom.text["node-title"]
    # the path from the root: both steps, in order
    path = dom.text["node-path"]
    assert path.index("Let x be the number of apples.") < path.index("So x = 6 * 7 = 42.")
    assert "How many apples are there?" in dom.text["question"]
    # the selected path is drawn: root -> 1 -> 3 (two thick edges)
    sel_edges = [a for t, a in dom.tags if t == "path" and a.get("class") == "e s"]
    assert len(sel_edges) == 2
    # summary figures from results.jsonl (and wave fill / time split from summary.json)
    cards = dom.text["cards"]
    lo, hi = wilson(1, 1)
    assert "100.0%" in cards and f"95% CI {100 * lo:.1f}% – {100 * hi:.1f}%" in cards
    assert "pass@k" in cards and "not an accuracy" in cards
    assert "37.0" in cards and "120.0" in cards and "cache hits 40.0%" in cards
    assert "87.5%" in cards and "8.5 s / 1.5 s" in cards
    # the plot the directory holds is inline
    assert any(
        t == "img" and (a.get("src") or "").startswith("data:image/png;base64,")
        for t, a in dom.tags
    )
    assert "1 of 1" in dom.text["count"]

    # without a fragment the first problem opens at the end of its selected path
    dom = _dom(html)
    assert dom.text["node-text"] == "So x = 6 * 7 = 42. The answer is 42."


def test_root_only_tree_and_a_missing_tree_make_a_partial_report(tmp_path, browser, capsys):
    run = _run_dir(
        tmp_path / "run",
        [
            (
                _row("empty", "Nothing searched?", correct=False, pass_at_k=False),
                _tree("empty", "q", []),
            ),
            (_row("gone", "Where is my tree?"), None),
        ],
    )
    with pytest.warns(ReportWarning, match=r"1 problem\(s\) lack a tree: gone"):
        html = write_report(run)
    dom = _dom(html, "problem=empty")
    assert dom.text["node-title"].startswith("Node 0 · depth 0 · root")
    assert "(root: the question)" in dom.text["node-text"]
    assert "Nothing searched?" in dom.text["node-text"]
    assert "gone" in dom.text["missing-trees"] and "empty" not in dom.text["missing-trees"]
    dom = _dom(html, "problem=gone")
    assert "No tree for this problem" in dom.text["problem"]
    # the CLI writes the partial report and names the id on stderr
    assert cli([str(run)]) == 0
    err = capsys.readouterr().err
    assert "lack a tree: gone" in err and "Traceback" not in err


def test_untrusted_step_text_is_shown_as_text_never_run(tmp_path, browser):
    evil = (
        "<script>alert(1)</script></script><img src=x "
        "onerror=\"document.documentElement.setAttribute('data-pwned','img')\">"
        "<script>document.documentElement.setAttribute('data-pwned','script')</script>"
        " <!-- & \u2028 \u2029 end"
    )
    q = "Q </script><script>document.documentElement.setAttribute('data-pwned','q')</script>"
    steps = [(0, evil, {"selected": True, "terminal": True, "answer": "</script>"})]
    run = _run_dir(
        tmp_path / "run", [(_row("x</script>", q, selected_answer=evil), _tree("x", q, steps))]
    )
    html = write_report(run)
    page = html.read_text()
    # the only </script> in the file close the page's own script blocks
    n_blocks = page.count("<script")
    assert page.count("</script>") == n_blocks and "alert(1)" in page
    assert "\u2028" not in page and "\u2029" not in page
    dom = _dom(html, "problem=" + "x%3C%2Fscript%3E" + "&node=1")
    assert "data-pwned" not in dom.html_attrs
    assert dom.text["node-text"] == evil  # shown whole, as text
    assert evil in dom.text["node-path"]
    assert q in dom.text["question"]
    assert not any(t == "img" and a.get("src") == "x" for t, a in dom.tags)


def test_script_json_escapes_what_could_end_a_script_block():
    obj = {"t": "</script><!-- a & b > c \u2028\u2029", "n": [1, None, 2.5]}
    s = script_json(obj)
    assert not any(c in s for c in "<>&\u2028\u2029")
    assert json.loads(s) == obj


def test_thousand_problems_stay_small_and_open_lazily(tmp_path, browser):
    from benchmarks.report_size import make_fake_run

    run = make_fake_run(tmp_path / "big", 1000)
    html = write_report(run)
    size = html.stat().st_size
    assert size < 12 * 1024 * 1024, f"report.html is {size / 2**20:.1f} MiB for 1,000 problems"
    page = html.read_text()
    assert page.count('<script type="application/json" id="tree-') == 1000
    dom = _dom(html, "problem=fake-999&filter=pkbad")
    assert dom.text["node-title"].startswith("Node ")
    assert "fake-999" in dom.text["problem"]
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    pkbad = sum(1 for r in rows if r["pass_at_k"] and not r["correct"])
    assert dom.text["count"] == f"{pkbad} of 1000"
    # sorted by generated tokens, descending: the first row holds the most
    dom = _dom(html, "sort=-gen")
    first = next(a for t, a in dom.tags if t == "div" and a.get("data-i") is not None)
    most = max(r["tokens_generated_tokens"] for r in rows)
    assert rows[int(first["data-i"])]["tokens_generated_tokens"] == most


def _bad_path(tmp: Path, case: str) -> Path:
    if case == "file":
        (tmp / "file.txt").write_text("x")
        return tmp / "file.txt"
    if case == "plain dir":
        (tmp / "plain").mkdir()
        (tmp / "plain" / "notes.txt").write_text("x")
        return tmp / "plain"
    if case == "run dir before its first result":
        (tmp / "fresh" / ".hydra").mkdir(parents=True)
        return tmp / "fresh"
    if case == "empty results":
        (tmp / "e").mkdir()
        (tmp / "e" / "results.jsonl").write_text("")
        return tmp / "e"
    return tmp / "nowhere"


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such directory"),
        ("file", "not a run directory"),
        ("plain dir", "not a run directory"),
        ("run dir before its first result", "no results yet"),
        ("empty results", "no results yet"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, capsys, case, message):
    path = _bad_path(tmp_path, case)
    assert cli([str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err
    with pytest.raises(ReportError, match=message):
        write_report(path)


def test_a_cut_last_results_line_is_refused_by_the_real_cli(tmp_path):
    run = _run_dir(tmp_path / "run", [(_row("p1", "q"), _tree("p1", "q", SOLVED))])
    with open(run / "results.jsonl", "a") as f:
        f.write(dumps_line(_row("p2", "q2"))[:40])  # an interrupted append
    res = subprocess.run(
        [sys.executable, "-m", "mcts.report", str(run)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert res.returncode == 2
    assert "results.jsonl" in res.stderr and "last line is cut" in res.stderr
    assert str(run) in res.stderr and "Traceback" not in res.stderr
    assert not (run / REPORT).exists()


def test_index_of_a_loop_links_every_stage_report(tmp_path):
    out = tmp_path / "improve"
    _run_dir(out / "round0" / "train", [(_row("a", "qa"), _tree("a", "qa", SOLVED))])
    _run_dir(out / "eval" / "judge" / "mcts-128", [(_row("b", "<b>qb</b>", correct=False), None)])
    (out / "report.md").write_text("| reward | <script>x</script> |\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReportWarning)
        index = write_index(out)
    page = index.read_text()
    assert (out / "round0" / "train" / REPORT).exists()
    assert (out / "eval" / "judge" / "mcts-128" / REPORT).exists()
    assert 'href="round0/train/report.html"' in page
    assert 'href="eval/judge/mcts-128/report.html"' in page
    assert "partial" in page and "<script>" not in page  # escaped loop report text
    assert "&lt;script&gt;x&lt;/script&gt;" in page


def test_run_writes_the_report_and_a_failing_report_only_warns(tmp_path, monkeypatch):
    """mcts.run writes report.html after summary.json; a report failure keeps the run."""
    import mcts.distributed as distributed
    import mcts.report as report
    import mcts.tasks as tasks
    from benchmarks.report_size import make_fake_run
    from mcts.run import RunConfig, run

    class Res:
        def __init__(self) -> None:
            self.summary = {"problems": 3, "accuracy": 0.0, "wave_fill": 1.0}

    def fake_search(problems, *a, run_dir, **kw):
        make_fake_run(run_dir, 3)
        return Res()

    monkeypatch.setattr(distributed, "run_search", fake_search)
    monkeypatch.setattr(tasks, "load_task", lambda cfg: [])
    monkeypatch.setattr("mcts.export.check_resume", lambda *a, **k: None)
    summary = run(RunConfig(), tmp_path / "a")
    assert Path(summary["report_html"]) == tmp_path / "a" / REPORT
    assert "fake-2" in (tmp_path / "a" / REPORT).read_text()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_report", boom)
    with pytest.warns(ReportWarning, match="run report not written: .*No space left"):
        summary = run(RunConfig(), tmp_path / "b")
    assert "report_html" not in summary and (tmp_path / "b" / "summary.json").exists()
    monkeypatch.undo()
    with pytest.warns(ReportWarning, match="nowhere: no such directory"):
        assert write_report_safely(tmp_path / "nowhere") is None


def test_screenshot(tmp_path, browser):
    from mcts.report.browser import screenshot

    run = _run_dir(tmp_path / "run", [(_row("p1", "How many apples?"), _tree("p1", "q", SOLVED))])
    png = screenshot(
        file_url(write_report(run), "problem=p1&node=3"), tmp_path / "shot.png", size=(600, 400)
    )
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

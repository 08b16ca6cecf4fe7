"""Output writers: results log with resume, tree files, Parquet tables and their invariants."""

from __future__ import annotations

import json
import math
import pickle

import networkx as nx
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcts.export import (
    PAIRS_SCHEMA,
    STEPWISE_SCHEMA,
    TRACES_SCHEMA,
    OutputDirError,
    ResultsLog,
    check_writable,
    draw_tree,
    load_tree,
    make_prompt,
    save_tree,
    step_pairs,
    trajectory_pairs,
    tree_path,
    write_exports,
)
from mcts.export.trees import node_value
from mcts.results import ProblemResult
from mcts.types import Problem, Usage

NAN = math.nan


def _node(
    g,
    n,
    parent,
    text,
    visits,
    q,
    *,
    vt=NAN,
    terminal=False,
    correct=None,
    selected=False,
    answer=None,
):
    depth = 0 if parent is None else g.nodes[parent]["depth"] + 1
    g.add_node(
        n,
        text=text,
        depth=depth,
        visits=visits,
        q=q,
        reward=q,
        prior=0.5,
        terminal=terminal,
        n_tokens=len(text.split()),
        value_target=vt,
        answer=answer,
        correct=correct,
        selected=selected,
    )
    if parent is not None:
        g.add_edge(parent, n)


def small_tree(pid: str = "p0", question: str = "What is 2 + 3?") -> nx.DiGraph:
    """root -> {1, 2, 3}; 1 -> {4 (correct), 5 (wrong), 7 (unvisited)}; 2 -> 6 (correct); 3 wrong.

    Node 2 has a q (0.5) but no value target: the training tables must not use it."""
    g = nx.DiGraph(problem_id=pid, question=question, reference="5", algorithm="mcts")
    _node(g, 0, None, "", 10, 0.6, selected=True)
    _node(g, 1, 0, "2 + 3 means adding.", 6, 0.7, vt=0.8, selected=True)
    _node(g, 2, 0, "Add 2 and 3 at once.", 3, 0.5)
    _node(g, 3, 0, "Multiply 2 by 3.", 1, 0.0, vt=0.0, terminal=True, correct=False, answer="6")
    _node(
        g,
        4,
        1,
        "The answer is 5.",
        4,
        1.0,
        vt=1.0,
        terminal=True,
        correct=True,
        selected=True,
        answer="5",
    )
    _node(g, 5, 1, "The answer is 4.", 2, 0.0, vt=0.0, terminal=True, correct=False, answer="4")
    _node(g, 7, 1, "Hmm.", 0, NAN)
    _node(g, 6, 2, "So 5.", 3, 1.0, vt=1.0, terminal=True, correct=True, answer="5")
    return g


def result_for(pid: str, tree: nx.DiGraph | None = None, algorithm: str = "mcts") -> ProblemResult:
    tree = tree if tree is not None else small_tree(pid)
    return ProblemResult(
        problem=Problem(id=pid, question=tree.graph["question"], answer="5", task="toy"),
        algorithm=algorithm,
        selected_answer="5",
        selected_text="2 + 3 means adding.\n\nThe answer is 5.",
        correct=True,
        pass_at_k=True,
        n_candidates=4,
        usage=Usage(
            prompt_tokens=100,
            cached_prompt_tokens=40,
            generated_tokens=50,
            reward_tokens=7,
            calls=3,
        ),
        seconds=1.25,
        tree=tree,
    )


# ---------------------------------------------------------------- results log / resume


def test_results_log_appends_one_line_per_problem(tmp_path):
    log = ResultsLog(tmp_path / "results.jsonl")  # a file path works too
    log.append(result_for("a").row())  # a bare row: no tree
    log.append(result_for("b"))  # a ProblemResult: its tree is saved first
    assert not tree_path(tmp_path, "a", "mcts").exists()
    assert load_tree(tree_path(tmp_path, "b", "mcts")).number_of_nodes() == 8
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(s)["id"] for s in lines] == ["a", "b"]
    assert json.loads(lines[0])["tokens_generated_tokens"] == 50
    assert ResultsLog(tmp_path / "results.jsonl").done_ids() == {"a", "b"}


def test_results_log_rejects_duplicate_and_bad_rows(tmp_path):
    log = ResultsLog(tmp_path / "r.jsonl")
    log.append({"id": "a", "algorithm": "mcts"})
    with pytest.raises(ValueError, match="already in"):
        log.append({"id": "a", "algorithm": "mcts"})
    log.append({"id": "a", "algorithm": "best_of_n"})  # same problem, other algorithm: fine
    assert log.done_ids("mcts") == {"a"} and log.done_ids("best_of_n") == {"a"}
    with pytest.raises(ValueError, match="'id'"):
        log.append({"question": "no id"})


def test_results_log_writes_strict_json_for_nan_and_numpy(tmp_path):
    import numpy as np

    log = ResultsLog(tmp_path / "r.jsonl")
    log.append({"id": "x", "score": float("nan"), "n": np.int64(3), "v": np.float32(0.5)})
    text = (tmp_path / "r.jsonl").read_text()
    assert "NaN" not in text
    rec = json.loads(text)
    assert rec["score"] is None and rec["n"] == 3 and rec["v"] == 0.5


def test_resume_after_torn_line(tmp_path):
    out = ResultsLog(tmp_path)
    for pid in ["p0", "p1", "p2"]:
        out.append(result_for(pid))
    # "crash" mid-append: half a JSON line, no newline
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"id": "p3", "question": "What is')
    out2 = ResultsLog(tmp_path)
    assert out2.torn
    assert out2.done_ids() == {"p0", "p1", "p2"}
    assert out2.done_ids("mcts") == {"p0", "p1", "p2"}
    assert out2.done_ids("beam") == set()
    for pid in ["p3", "p4"]:
        if pid not in out2.done_ids():
            out2.append(result_for(pid))
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    ids = [json.loads(s)["id"] for s in lines]  # every line parses: the torn tail is gone
    assert ids == ["p0", "p1", "p2", "p3", "p4"]
    with pytest.raises(ValueError, match="already in"):
        out2.append(result_for("p1"))
    info = write_exports(tmp_path, margin=0.1)
    traces = pq.read_table(info["traces"]).to_pandas()
    assert sorted(traces["problem_id"].unique()) == ["p0", "p1", "p2", "p3", "p4"]


def test_torn_last_line_with_newline_is_dropped_but_corrupt_middle_raises(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b", "x": \n')
    log = ResultsLog(p)
    assert log.done_ids() == {"a"} and log.torn
    log.append({"id": "c"})
    assert [json.loads(s)["id"] for s in p.read_text().splitlines()] == ["a", "c"]
    p.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl:2"):
        ResultsLog(p)


def test_tree_without_results_line_is_ignored(tmp_path):
    ResultsLog(tmp_path).append(result_for("done"))
    # crash after the tree was saved but before its line: an orphan tree
    save_tree(small_tree("orphan"), tree_path(tmp_path, "orphan", "mcts"))
    assert ResultsLog(tmp_path).done_ids() == {"done"}
    info = write_exports(tmp_path, 0.1)
    assert set(pq.read_table(info["traces"]).column("problem_id").to_pylist()) == {"done"}


def test_results_log_refuses_to_truncate_lines_another_process_appended(tmp_path):
    from mcts.export import ResultsLogChangedError

    p = tmp_path / "results.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b", "x": ')  # a torn tail this log would repair
    mine = ResultsLog(tmp_path)
    assert mine.torn
    with open(p, "a") as f:  # meanwhile another writer completes the line and adds one
        f.write('1}\n{"id": "c"}\n')
    with pytest.raises(ResultsLogChangedError, match="another process"):
        mine.append({"id": "d"})
    assert [json.loads(x)["id"] for x in p.read_text().splitlines()] == ["a", "b", "c"]


# ---------------------------------------------------------------- one writer per run dir


_HOLD = """
import sys, time
from mcts.export import hold_run_dir
with hold_run_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_on_a_held_run_dir_fails_at_once(tmp_path):
    import subprocess
    import sys

    from mcts.config import SearchConfig
    from mcts.export import RunDirBusyError
    from mcts.search import search
    from tests.fakes import FakeGenerator, FakePRM, problems

    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        gen = FakeGenerator()
        with pytest.raises(RunDirBusyError, match=rf"pid {holder.pid}\b.*run directory"):
            search(problems(2), gen, FakePRM(), SearchConfig(token_budget=32), run_dir=tmp_path)
        assert gen.calls == 0 and not (tmp_path / "results.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed: the kernel dropped its lock): the directory is free again
    res = search(problems(2), FakeGenerator(), FakePRM(), SearchConfig(token_budget=32), tmp_path)
    assert len(res.results) == 2


def test_run_dir_lock_is_reentrant_in_a_thread_and_exclusive_across_threads(tmp_path):
    import threading

    from mcts.export import RunDirBusyError, hold_run_dir

    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            with hold_run_dir(tmp_path):
                pass
        except BaseException as e:  # noqa: BLE001 - inspected below
            errors.append(e)

    with hold_run_dir(tmp_path):
        with hold_run_dir(tmp_path / "."):  # same directory, same thread: re-entered
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
        assert len(errors) == 1 and isinstance(errors[0], RunDirBusyError)
        # a second open file description in this process cannot take the flock either
        import fcntl
        import os

        fd = os.open(tmp_path / ".lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    with hold_run_dir(tmp_path):  # released at the end of the outer block
        pass


# ---------------------------------------------------------------- run dir checks


def test_check_writable_names_the_directory(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="a_file"):
        check_writable(blocker / "run")
    assert check_writable(tmp_path / "new" / "dir").is_dir()


def test_export_rejects_bad_margin(tmp_path):
    ResultsLog(tmp_path).append(result_for("p"))
    for bad in (-0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="margin"):
            write_exports(tmp_path, bad)


# ---------------------------------------------------------------- tree files


def test_tree_json_roundtrip_keeps_attributes_and_nan(tmp_path):
    g = small_tree("weird/id with spaces")
    p = tree_path(tmp_path, "weird/id with spaces", "mcts")
    assert p.parent.parent == tmp_path / "trees" and "/" not in p.name
    save_tree(g, p)
    text = p.read_text()
    assert "NaN" not in text  # strict JSON
    h = load_tree(p)
    assert set(h.edges) == set(g.edges)
    assert h.graph["problem_id"] == "weird/id with spaces"
    assert math.isnan(h.nodes[7]["q"]) and math.isnan(h.nodes[2]["value_target"])
    assert h.nodes[6]["value_target"] == 1.0
    assert h.nodes[4]["correct"] is True and h.nodes[4]["answer"] == "5"
    assert h.nodes[1]["visits"] == 6 and h.nodes[1]["value_target"] == 0.8


def test_numpy_attributes_are_handled(tmp_path):
    import numpy as np

    g = small_tree()
    g.nodes[1]["q"] = np.float32(0.25)
    g.nodes[1]["value_target"] = np.float64("nan")
    g.nodes[1]["visits"] = np.int64(6)
    assert node_value(g.nodes[1]) == 0.25  # falls back to q, numpy scalar accepted
    save_tree(g, tmp_path / "t.json")
    h = load_tree(tmp_path / "t.json")
    assert h.nodes[1]["q"] == 0.25 and h.nodes[1]["visits"] == 6
    assert math.isnan(h.nodes[1]["value_target"])
    assert {(p["chosen_node"], p["rejected_node"]) for p in step_pairs(g, 0.3)} >= {(4, 5)}
    draw_tree(g, tmp_path / "t.png")


def test_tree_paths_of_distinct_ids_differ(tmp_path):
    assert tree_path(tmp_path, "a/b") != tree_path(tmp_path, "a_b")


# ---------------------------------------------------------------- parquet exports


@pytest.fixture
def exported(tmp_path):
    log = ResultsLog(tmp_path)
    log.append(result_for("p0"))
    log.append(result_for("p1", small_tree("p1", "What is 1 + 4?")))
    return write_exports(tmp_path, margin=0.3), tmp_path


def test_export_files_exist_with_documented_columns(exported):
    info, run = exported
    for key, schema in (
        ("traces", TRACES_SCHEMA),
        ("pairs_dpo", PAIRS_SCHEMA),
        ("stepwise", STEPWISE_SCHEMA),
    ):
        assert info[key].exists()
        t = pq.read_table(info[key])
        assert t.schema.equals(schema), key
        assert len(pd.read_parquet(info[key])) == t.num_rows > 0
    assert info["tree_png"].exists() and info["tree_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob(".*.tmp"))  # no temp files left behind
    assert info["counts"]["problems"] == 2
    assert info["counts"]["traces"] == 8 and info["counts"]["trajectory_pairs"] == 8


def test_traces_are_root_to_terminal_paths(exported):
    info, _ = exported
    df = pd.read_parquet(info["traces"])
    p0 = df[df.problem_id == "p0"].set_index("path_index")
    assert len(p0) == 4  # terminals 3, 4, 5, 6
    by_last = {tuple(r.node_ids)[-1]: r for r in p0.itertuples()}
    r4 = by_last[4]
    assert list(r4.node_ids) == [1, 4]
    assert list(r4.steps) == ["2 + 3 means adding.", "The answer is 5."]
    assert list(r4.visits) == [6, 4] and list(r4.q) == [0.7, 1.0]
    assert list(r4.value_target) == [0.8, 1.0]
    assert r4.correct and r4.selected and r4.answer == "5" and r4.depth == 2
    assert not by_last[5].correct and not by_last[5].selected
    assert math.isnan(by_last[6].value_target[0])  # NaN where no target


def test_pairs_invariants_and_kinds(exported):
    info, _ = exported
    df = pd.read_parquet(info["pairs_dpo"])
    assert set(df.kind) == {"step", "trajectory"}
    step = df[df.kind == "step"]
    assert ((step.chosen_value - step.rejected_value) >= 0.3 - 1e-12).all()
    assert (step.gap == step.chosen_value - step.rejected_value).all()
    assert (step.chosen != step.rejected).all()
    assert (df.value_kind == "mc").all()  # algorithm mcts, no fingerprint: "auto" -> mc
    for r in step.itertuples():
        assert r.prompt_text == make_prompt(r.question, list(r.prefix_steps))
        assert (
            r.chosen_text == r.chosen[0]["content"] and r.rejected_text == r.rejected[0]["content"]
        )
    p0 = step[step.problem_id == "p0"]
    # root children value targets: 1 -> 0.8, 2 -> none (q 0.5 is not a target), 3 -> 0.0;
    # node 1's: 4 -> 1.0, 5 -> 0.0, 7 unvisited
    got = {(r.chosen_node, r.rejected_node) for r in p0.itertuples()}
    assert got == {(1, 3), (4, 5)}
    assert info["counts"]["dropped_step_pairs"]["no_value_target"] == 2 * 2  # (1,2), (2,3) x 2
    r45 = p0[p0.chosen_node == 4].iloc[0]
    assert r45.prompt_text == "What is 2 + 3?\n\n2 + 3 means adding.\n\n"
    assert list(r45.prompt)[-1] == {"role": "assistant", "content": "2 + 3 means adding.\n\n"}
    assert r45.chosen_text == "The answer is 5." and r45.rejected_text == "The answer is 4."
    assert (r45.chosen_support, r45.rejected_support) == (1, 1)
    assert r45.chosen_eos and r45.rejected_eos and not r45.continues  # terminals, no finish attr
    r13 = p0[p0.chosen_node == 1].iloc[0]
    assert (r13.chosen_support, r13.rejected_support) == (2, 1) and r13.continues
    traj = df[(df.kind == "trajectory") & (df.problem_id == "p0")]
    assert len(traj) == 4  # correct {4, 6} x incorrect {3, 5}
    assert (traj.prompt_text == "What is 2 + 3?\n\n").all()
    assert all(len(p) == 2 for p in traj.prompt)  # system + user, no assistant prefix
    assert set(traj.chosen_node) == {4, 6} and set(traj.rejected_node) == {3, 5}
    assert "2 + 3 means adding.\n\nThe answer is 5." in set(traj.chosen_text)


def test_stepwise_labels_follow_values(exported):
    info, _ = exported
    df = pd.read_parquet(info["stepwise"])
    p0 = df[df.problem_id == "p0"]
    # path 2 -> 6 is left out: node 2 has a q but no value target (one scale per table)
    assert len(p0) == 3 and (p0.prompt_text == "What is 2 + 3?").all()
    assert info["counts"]["stepwise_skipped_paths"] == 2
    assert [m["role"] for m in p0.iloc[0].prompt] == ["system", "user"]
    assert (p0.value_kind == "mc").all()
    for r in df.itertuples():
        assert len(r.completions) == len(r.labels) == len(r.values)
        assert list(r.labels) == [v >= 0.5 for v in r.values]
    row = p0[p0.selected].iloc[0]
    assert list(row.completions) == ["2 + 3 means adding.", "The answer is 5."]
    assert list(row.labels) == [True, True]


def test_export_is_idempotent_and_can_draw_a_chosen_tree(exported):
    info, run = exported
    again = write_exports(run, 0.3, draw="p1")
    assert again["counts"] == info["counts"]
    with pytest.raises(ValueError, match="nope"):
        write_exports(run, 0.3, draw="nope")


def test_empty_run_exports_empty_tables(tmp_path):
    info = write_exports(tmp_path, 0.1)
    assert info["counts"]["problems"] == 0 and info["tree_png"] is None
    assert pq.read_table(info["pairs_dpo"]).schema.equals(PAIRS_SCHEMA)


def test_draw_tree_for_a_fifty_node_tree(tmp_path):
    g = random_tree(seed=3, n=50)
    p = draw_tree(g, tmp_path / "t.png")
    assert p.stat().st_size > 10_000
    with pytest.raises(ValueError, match="empty"):
        draw_tree(nx.DiGraph(), tmp_path / "e.png")


def test_problem_result_tree_survives_pickle_for_workers():
    r = result_for("p")
    assert pickle.loads(pickle.dumps(r)).row() == r.row()


# ---------------------------------------------------------------- property: pair invariants


def random_tree(seed: int, n: int) -> nx.DiGraph:
    import random

    rng = random.Random(seed)
    g = nx.DiGraph(problem_id=f"r{seed}", question="Q?", reference="1", algorithm="mcts")
    _node(g, 0, None, "", n, 0.5)
    for i in range(1, n):
        parent = rng.randrange(0, i)
        while g.nodes[parent]["terminal"]:
            parent = rng.randrange(0, i)
        visited = rng.random() < 0.85
        q = rng.random() if visited else NAN
        term = rng.random() < 0.3
        _node(
            g,
            i,
            parent,
            f"step {rng.randrange(6)}",
            rng.randrange(1, 9) if visited else 0,
            q,
            vt=rng.random() if rng.random() < 0.5 else NAN,
            terminal=term,
            correct=(rng.random() < 0.4) if term else None,
        )
    return g


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 40), margin=st.floats(0.0, 1.0))
def test_property_pairs_respect_margin_and_share_prefix(seed, n, margin):
    g = random_tree(seed, n)
    for p in step_pairs(g, margin):
        assert p["chosen_value"] > p["rejected_value"]
        assert p["chosen_value"] - p["rejected_value"] >= margin
        assert p["chosen_value"] == g.nodes[p["chosen_node"]]["value_target"]  # never q
        assert p["rejected_value"] == g.nodes[p["rejected_node"]]["value_target"]
        # siblings: one parent, and the prompt is exactly question + that parent's path
        assert list(g.predecessors(p["chosen_node"])) == [p["parent_node"]]
        assert list(g.predecessors(p["rejected_node"])) == [p["parent_node"]]
        assert p["prompt_text"] == make_prompt("Q?", p["prefix_steps"])
        assert p["chosen"] != p["rejected"]
    for p in trajectory_pairs(g, max_pairs=None):
        assert g.nodes[p["chosen_node"]]["correct"] is True
        assert g.nodes[p["rejected_node"]]["correct"] is False
        assert p["prompt_text"] == "Q?\n\n"
        assert p["chosen_value"] > p["rejected_value"]

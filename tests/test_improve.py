"""The self-improvement loop (mcts.improve) on the planted-path fake world, plus the real
reasoning-gym splits. Fakes: tests/fakes.py (FeatureFakeGenerator returns hidden states)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from mcts.config import SearchConfig
from mcts.improve import ImproveConfig, run_improve
from mcts.improve.labels import LabelSet, label_rows
from mcts.improve.splits import SplitError, Splits, make_splits, question_key
from mcts.search import search
from mcts.types import Problem
from rewards.base import RewardError
from rewards.learned import LearnedValue
from rewards.value_model import ValueHead, ValueHeadConfig, data_fingerprint
from tests.fakes import RIGHT, FakePRM, FeatureFakeGenerator, fake_config


def planted(prefix: str, n: int) -> list[Problem]:
    return [
        Problem(id=f"{prefix}{i}", question=f"{prefix} problem {i}?", answer=RIGHT)
        for i in range(n)
    ]


def scfg(**kw) -> SearchConfig:
    return fake_config(**{**dict(token_budget=60, n_beams=4, beam_width=2), **kw})


def icfg(**kw) -> ImproveConfig:
    base = dict(
        train_size=16,
        eval_size=8,
        train_budget=60,
        budgets=[40],
        eval_runs=["mcts", "best_of_n"],
        head=ValueHeadConfig(epochs=60, patience=20, val_fraction=0.25),
    )
    base.update(kw)
    return ImproveConfig(**base)


class SpyPRM(FakePRM):
    """FakePRM that records what every scored item let it see."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str | None, str | None]] = []

    def score(self, items):
        for it in items:
            pid = it.problem.id if it.problem is not None else ""
            self.seen.append((pid, it.reference, it.problem.answer if it.problem else None))
        return super().score(items)


SPLITS = Splits(train=planted("train", 16), eval=planted("eval", 8), dropped_from_train=0)


def test_loop_trains_on_the_search_targets_and_reports_paired(tmp_path):
    prm = SpyPRM()
    report = run_improve(icfg(), scfg(), FeatureFakeGenerator(), prm, tmp_path, splits=SPLITS)
    rd = tmp_path / "round0"
    assert (rd / "value.pt").exists()
    # The labels are exactly the value targets the TRAIN trees export in traces.parquet.
    labels = LabelSet.load(rd / "labels.npz")
    assert labels.y.size > 20 and labels.meta["label_source"] == "reference"
    # splits of the head's training are by question text (repeats share a side)
    questions = {question_key(p.question): p.id for p in SPLITS.train}
    assert all(
        questions[g] == pid for g, pid in zip(labels.groups, labels.problem_ids, strict=True)
    )
    traces = pq.read_table(rd / "train" / "traces.parquet").to_pylist()
    exported = {
        (t["problem_id"], n): v
        for t in traces
        for n, v in zip(t["node_ids"], t["value_target"], strict=True)
    }
    for pid, node, y in zip(labels.problem_ids, labels.nodes, labels.y, strict=True):
        if (str(pid), int(node)) in exported:
            assert exported[(str(pid), int(node))] == pytest.approx(y)
    # Rewards never saw an EVAL reference; TRAIN searches did get theirs (labels need them).
    eval_seen = [s for s in prm.seen if s[0].startswith("eval")]
    assert eval_seen and all(ref is None and ans is None for _, ref, ans in eval_seen)
    # Every method under both rewards, with paired tests against self-consistency.
    got = {(r["reward"], r["method"]) for r in report["records"]}
    methods = ("mcts", "bon_orm", "bon_prm", "weighted_vote", "self_consistency")
    assert got == {(tag, m) for tag in ("SpyPRM", "learned_r0") for m in methods}
    learned = [r for r in report["records"] if r["reward"] == "learned_r0"]
    assert learned and all(r["n"] == 8 and r["complete"] for r in learned)
    mcts = next(r for r in learned if r["method"] == "mcts")
    assert mcts["vs_self_consistency"]["n"] == 8
    assert mcts["vs_baseline"] is not None  # vs the same method under the round-0 reward
    assert report["value_model"]["round0"]["auc"] is not None
    cv = report["value_model"]["round0"]["cv"]  # every TRAIN problem held out once
    assert cv["n"] == labels.y.size and cv["folds"] == 5 and cv["groups"] == 16
    md = (tmp_path / "report.md").read_text()
    assert "learned_r0" in md and "self_consistency" in md
    assert (tmp_path / "report.png").stat().st_size > 1000
    # The head on EVAL candidates: every learned run, counted from its own traces
    assert set(report["candidates"]) == {"learned_r0/mcts-40", "learned_r0/best_of_n-40"}
    bon = pq.read_table(tmp_path / "eval/learned_r0/best_of_n-40/traces.parquet").to_pylist()
    finished = [t for t in bon if t["answer"] is not None]
    pairs = sum(
        1
        for a in finished
        for b in finished
        if a["problem_id"] == b["problem_id"] and a["correct"] and not b["correct"]
    )
    got = report["candidates"]["learned_r0/best_of_n-40"]
    assert got["candidates"] == len(finished) and got["within_pairs"] == pairs > 0
    assert "within one problem only" in md and "within-problem AUC" in md
    assert "5-fold, every one of the 16 TRAIN problems held out once" in md


def test_train_reward_guides_train_only_and_baseline_budgets(tmp_path):
    # improve.train_reward searches TRAIN; the configured reward stays the EVAL baseline,
    # run only at improve.baseline_budgets.
    train_prm, base_prm = SpyPRM(), SpyPRM()
    report = run_improve(
        icfg(budgets=[40, 60], baseline_budgets=[40]),
        scfg(),
        FeatureFakeGenerator(),
        base_prm,
        tmp_path,
        splits=SPLITS,
        train_reward=train_prm,
    )
    assert train_prm.seen and all(pid.startswith("train") for pid, _, _ in train_prm.seen)
    assert base_prm.seen and all(pid.startswith("eval") for pid, _, _ in base_prm.seen)
    budgets = {(r["reward"], r["budget"]) for r in report["records"]}
    assert budgets == {("SpyPRM", 40), ("learned_r0", 40), ("learned_r0", 60)}
    assert not (tmp_path / "eval" / "SpyPRM" / "mcts-60").exists()


def test_label_runs_add_their_rows_to_the_heads_training_data(tmp_path):
    # improve.label_runs: a best-of-N TRAIN search whose labels join the MCTS ones
    run_improve(
        icfg(label_runs=["best_of_n"], eval_runs=["best_of_n"]),
        scfg(),
        FeatureFakeGenerator(),
        FakePRM(),
        tmp_path,
        splits=SPLITS,
    )
    rd = tmp_path / "round0"
    labels = LabelSet.load(rd / "labels.npz")
    mcts = label_rows(rd / "train", "mcts")
    bon = label_rows(rd / "train_best_of_n", "best_of_n")
    assert len(mcts.y) and len(bon.y) and len(labels.y) == len(mcts.y) + len(bon.y)
    src = labels.source_of_rows()
    assert list(src).count("train_best_of_n") == len(bon.y)
    np.testing.assert_array_equal(labels.y[src == "train_best_of_n"], bon.y)
    # a best-of-N path's steps all carry the path's verified outcome
    traces = pq.read_table(rd / "train_best_of_n" / "traces.parquet").to_pylist()
    assert all(set(t["value_target"]) <= {0.0, 1.0} for t in traces)
    head = ValueHead.load(rd / "value.pt")
    fp = data_fingerprint(labels.X, labels.y, labels.groups, weights=labels.weights)
    assert head.data_fingerprint == fp  # the head was fit on both runs' rows
    assert head.meta["labels"]["runs"][1]["algorithm"] == "best_of_n"


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(baseline_budgets=[]), "improve.baseline_budgets"),
        (dict(baseline_budgets=[0]), "improve.baseline_budgets"),
        (dict(train_reward={"path": "x"}), "improve.train_reward"),
        (dict(eval_rounds=[]), "improve.eval_rounds"),
        (dict(rounds=2, eval_rounds=[2]), "improve.eval_rounds"),
        (dict(label_runs=["beam"]), "improve.label_runs"),
        (dict(cv_folds=1), "improve.cv_folds"),
        (dict(label_runs=["best_of_n", "best_of_n"]), "improve.label_runs"),
    ],
)
def test_bad_improve_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        icfg(**bad).validate()


def test_loop_resumes_each_stage_without_redoing_work(tmp_path):
    # Killed mid-TRAIN search (the generator dies on its 4th call).
    with pytest.raises(Exception, match="backend died"):
        run_improve(
            icfg(),
            scfg(),
            FeatureFakeGenerator(fail_on_call=4),
            FakePRM(),
            tmp_path,
            splits=SPLITS,
        )
    train_log = tmp_path / "round0" / "train" / "results.jsonl"
    before = train_log.read_text().splitlines() if train_log.exists() else []
    gen = FeatureFakeGenerator()
    run_improve(icfg(), scfg(), gen, FakePRM(), tmp_path, splits=SPLITS)
    after = train_log.read_text().splitlines()
    assert after[: len(before)] == before  # finished problems kept, not redone
    ids = [json.loads(x)["id"] for x in after]
    assert len(ids) == len(set(ids)) == 16
    head = tmp_path / "round0" / "value.pt"
    stamp = os.stat(head).st_mtime_ns
    # Everything done: a rerun searches nothing and does not retrain the head.
    gen2 = FeatureFakeGenerator()
    run_improve(icfg(), scfg(), gen2, FakePRM(), tmp_path, splits=SPLITS)
    assert gen2.calls == 0
    assert os.stat(head).st_mtime_ns == stamp
    # Other head settings on the same labels: the head is refit, and the EVAL runs made
    # with the old head refuse to be blended with the new one's.
    other = icfg(head=ValueHeadConfig(hidden=8, epochs=60, patience=20, val_fraction=0.25))
    with pytest.raises(Exception, match="checkpoint_sha256|fingerprint|differ") as e:
        run_improve(other, scfg(), FeatureFakeGenerator(), FakePRM(), tmp_path, splits=SPLITS)
    assert "eval" in str(e.value)
    assert os.stat(head).st_mtime_ns != stamp


def test_learned_reward_checks_model_identity_and_features(tmp_path):
    run_improve(
        icfg(baseline=False), scfg(), FeatureFakeGenerator(), FakePRM(), tmp_path, splits=SPLITS
    )
    head = tmp_path / "round0" / "value.pt"
    with pytest.raises(ValueError, match="model_sha256"):
        LearnedValue(FeatureFakeGenerator(sha="another-model"), str(head))
    reward = LearnedValue(FeatureFakeGenerator(), str(head))
    from mcts.types import ScoreItem

    with pytest.raises(RewardError, match="no features"):
        reward.score([ScoreItem("q?", ("beta",))])
    good = ScoreItem("q?", ("beta", "beta"), features=FeatureFakeGenerator.state(["beta", "beta"]))
    bad = ScoreItem(
        "q?", ("delta", "alpha"), features=FeatureFakeGenerator.state(["delta", "alpha"])
    )
    s = reward.score([good, bad])
    assert s.shape == (2,) and s[0] > s[1]  # it learned which steps lead to the answer
    assert reward.last_tokens.tolist() == [0, 0]  # no model tokens to score
    with pytest.raises(ValueError, match="path"):
        LearnedValue(FeatureFakeGenerator(), "")
    with pytest.raises(ValueError):
        LearnedValue(FeatureFakeGenerator(), str(tmp_path / "missing.pt"))


def test_hide_references_refuses_an_oracle_reward():
    from rewards.verifier import OutcomeVerifier

    with pytest.raises(ValueError, match="hide_references"):
        search(
            planted("e", 2), FeatureFakeGenerator(), OutcomeVerifier(), scfg(hide_references=True)
        )


def test_splits_are_disjoint_and_checked():
    task = {
        "name": "basic_arithmetic",
        "params": {"min_terms": 2, "max_terms": 2, "max_digits": 1, "operators": ["+"]},
    }
    s = make_splits(task, train_size=60, eval_size=60, train_seed=1, eval_seed=2)
    assert not {p.question for p in s.train} & {p.question for p in s.eval}
    assert s.dropped_from_train > 0  # this tiny task space repeats questions across seeds
    assert len(s.train) == 60 - s.dropped_from_train
    with pytest.raises(SplitError, match="train_seed"):
        make_splits(task, train_size=5, eval_size=5, train_seed=3, eval_seed=3)
    overlap = Splits(train=planted("a", 3), eval=planted("a", 2), dropped_from_train=0)
    with pytest.raises(SplitError, match="share"):
        run_improve(icfg(), scfg(), FeatureFakeGenerator(), FakePRM(), "/tmp/never", splits=overlap)


def test_one_label_only_is_a_clear_error(tmp_path):
    # Every problem's reference is unreachable: all targets 0, nothing to learn.
    hopeless = Splits(
        train=[Problem(id=f"t{i}", question=f"t{i}?", answer="-1") for i in range(16)],
        eval=planted("eval", 4),
        dropped_from_train=0,
    )
    with pytest.raises(ValueError, match=r"labels\.npz.*one label"):
        run_improve(icfg(), scfg(), FeatureFakeGenerator(), FakePRM(), tmp_path, splits=hopeless)
    assert (tmp_path / "round0" / "train" / "results.jsonl").exists()  # the search is kept
    assert np.load(tmp_path / "round0" / "labels.npz")["y"].max() == 0.0

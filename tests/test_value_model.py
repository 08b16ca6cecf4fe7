"""The learned value head: learns a known labelling, splits by problem, stops early at the
best epoch, is deterministic, round-trips its checkpoint, and refuses bad input clearly."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.value_model import (
    ValueHead,
    ValueHeadConfig,
    cross_validate,
    data_fingerprint,
    evaluate,
    train_value_head,
    within_group_auc,
)

D = 32
IDENTITY = {"model_sha256": "ab12" * 16, "layer": -1, "pooling": "last_token", "dim": D}


def synthetic(n_groups: int = 40, per_group: int = 10, d: int = D, seed: int = 0):
    """Soft labels y = sigmoid(w.x) + noise, clipped to [0, 1]; one group per problem."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    X = rng.normal(size=(n_groups * per_group, d)).astype(np.float32)
    y = 1.0 / (1.0 + np.exp(-(X @ w) * 2.0 / math.sqrt(d)))
    y = np.clip(y + rng.normal(scale=0.05, size=len(y)), 0.0, 1.0)
    groups = [f"p{i}" for i in range(n_groups) for _ in range(per_group)]
    weights = rng.integers(1, 9, size=len(y)).astype(np.float64)
    return X, y, groups, weights


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module")
def trained(data):
    X, y, groups, weights = data
    cfg = ValueHeadConfig(hidden=0, lr=1e-2, epochs=60, seed=3)
    head, metrics = train_value_head(X, y, groups=groups, weights=weights, cfg=cfg)
    return head, metrics, cfg


def test_logistic_head_learns_known_labelling(trained):
    head, m, _ = trained
    assert m["auc"] > 0.9
    assert m["brier"] < 0.1 and 0 <= m["ece"] < 0.2
    assert m["n_train"] + m["n_val"] == 400 and m["n_val"] == 80
    assert 1 <= m["epochs_run"] <= 60 and m["seconds"] > 0
    table = m["calibration"]
    assert len(table) == 10 and sum(b["count"] for b in table.values()) == m["n_val"]
    assert head.dim == D and head.metrics is m


def test_mlp_head_learns_known_labelling(data):
    X, y, groups, weights = data
    cfg = ValueHeadConfig(hidden=16, lr=1e-2, epochs=60, seed=1)
    head, m = train_value_head(X, y, groups=groups, weights=weights, cfg=cfg)
    assert m["auc"] > 0.9
    p = head.predict(X[:5])
    assert p.dtype == np.float64 and p.shape == (5,) and ((p >= 0) & (p <= 1)).all()


def test_split_is_by_group(trained, data):
    _, m, _ = trained
    _, _, groups, _ = data
    train, val = set(m["groups_train"]), set(m["groups_val"])
    assert not train & val
    assert train | val == set(groups)
    assert m["groups_val"] == sorted(m["groups_val"]) and len(val) == 8
    assert m["n_val"] == sum(g in val for g in groups)


def test_early_stopping_keeps_best_epoch():
    # Pure-noise labels and a wide MLP: validation loss rises once it memorizes.
    rng = np.random.default_rng(5)
    X = rng.normal(size=(200, D)).astype(np.float32)
    y = rng.uniform(size=200)
    groups = np.repeat(np.arange(20), 10)
    cfg = ValueHeadConfig(hidden=64, lr=3e-2, weight_decay=0.0, epochs=300, patience=5, seed=0)
    head, m = train_value_head(X, y, groups=groups, cfg=cfg)
    hist = m["val_loss_history"]
    assert m["epochs_run"] == len(hist) < cfg.epochs  # it stopped early
    assert m["best_epoch"] == len(hist) - cfg.patience
    assert m["val_loss"] == min(hist) <= hist[-1]
    # the kept weights really are the best epoch's: recompute the val loss from predictions
    val = np.isin(groups.astype(str), m["groups_val"])
    p = np.clip(head.predict(X[val]), 1e-12, 1 - 1e-12)
    bce = float(-np.mean(y[val] * np.log(p) + (1 - y[val]) * np.log(1 - p)))
    assert bce == pytest.approx(m["val_loss"], rel=1e-4)
    assert bce < hist[-1]


def test_deterministic_given_seed(trained, data):
    head, _, cfg = trained
    X, y, groups, weights = data
    again, _ = train_value_head(X, y, groups=groups, weights=weights, cfg=cfg)
    np.testing.assert_array_equal(head.predict(X), again.predict(X))


def test_checkpoint_round_trip(trained, data, tmp_path):
    head, m, cfg = trained
    X, y, groups, weights = data
    fp = data_fingerprint(X, y, groups, weights=weights)
    path = tmp_path / "sub" / "value_head.pt"
    head.save(path, feature_identity=IDENTITY, data_fingerprint=fp, meta={"round": 1})
    assert os.listdir(path.parent) == ["value_head.pt"]  # no temp file left behind
    loaded = ValueHead.load(path, expect_identity={"model_sha256": IDENTITY["model_sha256"]})
    np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
    assert loaded.feature_identity == IDENTITY and loaded.data_fingerprint == fp
    assert loaded.meta == {"round": 1} and loaded.config == cfg and loaded.dim == D
    assert loaded.metrics["auc"] == pytest.approx(m["auc"])
    assert loaded.metrics["groups_val"] == m["groups_val"]
    ev = evaluate(loaded, X, y)
    assert ev["n"] == 400 and ev["auc"] > 0.9 and set(ev) >= {"brier", "ece", "log_loss"}


def test_fingerprint_tracks_the_data(data):
    X, y, groups, _ = data
    fp = data_fingerprint(X, y, groups)
    assert fp == data_fingerprint(X.copy(), y.copy(), list(groups)) and len(fp) == 64
    y2 = y.copy()
    y2[0] = 1 - y2[0]
    assert data_fingerprint(X, y2, groups) != fp
    assert data_fingerprint(X, y, groups[::-1]) != fp


def test_evaluate_one_class_gives_nan_auc_with_note(trained, data):
    head, _, _ = trained
    X, _, _, _ = data
    m = evaluate(head, X[:30], np.ones(30))
    assert math.isnan(m["auc"]) and "one class" in m["notes"][0]


# ---------------------------------------------------------------- within-problem order


def _within_reference(labels, scores, groups):
    """Plain loops: every (correct, incorrect) pair of one group, ties half."""
    total = wins = 0.0
    for i in range(len(labels)):
        for j in range(len(labels)):
            if groups[i] == groups[j] and labels[i] and not labels[j]:
                total += 1
                wins += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    return (wins / total if total else math.nan), int(total)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 4), st.sampled_from("abc")),
        min_size=0,
        max_size=25,
    )
)
def test_within_group_auc_matches_pairwise_reference(rows):
    labels = [r[0] for r in rows]
    scores = [r[1] / 4 for r in rows]  # few values: ties are common
    groups = [r[2] for r in rows]
    auc, pairs, n_groups = within_group_auc(labels, scores, groups)
    ref, ref_pairs = _within_reference(labels, scores, groups)
    assert pairs == ref_pairs
    assert (math.isnan(auc) and math.isnan(ref)) or auc == pytest.approx(ref)
    both = {
        g
        for g in set(groups)
        if {lab for lab, gg in zip(labels, groups, strict=True) if gg == g} == {True, False}
    }
    assert n_groups == len(both)


def test_within_auc_ignores_which_problem_is_easy():
    # problem a: every step scores above every step of problem b, but within each problem
    # the incorrect step outranks the correct one: plain AUC is high, the within-AUC is 0
    labels = [True, True, False, True, False, False]
    scores = [0.9, 0.8, 0.95, 0.1, 0.2, 0.05]
    groups = ["a", "a", "a", "b", "b", "b"]
    auc, pairs, n_groups = within_group_auc(labels, scores, groups)
    assert (pairs, n_groups) == (4, 2)  # a: 2 x 1, b: 1 x 2
    assert auc == pytest.approx(0.25)  # b's 0.1 beats its 0.05; the rest are inversions


def _grouped(n_groups: int = 60, per: int = 8, seed: int = 0):
    """Half of each problem's steps correct, decided by feature 1 only; feature 0 is a
    per-problem offset that says nothing about which step is right."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_groups * per, 8)).astype(np.float32)
    gi = np.repeat(np.arange(n_groups), per)
    X[:, 0] = rng.normal(size=n_groups)[gi] * 3
    y = np.zeros(len(gi))
    for g in range(n_groups):
        rows = np.flatnonzero(gi == g)
        y[rows[np.argsort(X[rows, 1])[per // 2 :]]] = 1.0
    return X, y, [f"p{g}" for g in gi]


def test_pairwise_head_orders_steps_within_a_problem():
    X, y, groups = _grouped()
    head, m = train_value_head(X, y, groups=groups, cfg=ValueHeadConfig(pairwise=1.0, seed=2))
    assert m["within_auc"] > 0.9 and m["within_groups"] == 12  # 20% of 60 problems
    Xt, yt, gt = _grouped(seed=7)
    ev = evaluate(head, Xt, yt, groups=gt)
    assert ev["within_auc"] > 0.9 and ev["within_pairs"] == 60 * 16
    assert "within_auc" not in evaluate(head, Xt, yt)  # no groups, no within-problem figure


def test_val_groups_hold_out_exactly_those_problems(data):
    X, y, groups, weights = data
    held = ["p3", "p7", "p11", "absent"]  # a problem without rows is ignored
    _, m = train_value_head(X, y, groups=groups, weights=weights, val_groups=held)
    assert m["groups_val"] == ["p11", "p3", "p7"] and m["n_val"] == 30
    assert not set(m["groups_train"]) & set(held)
    with pytest.raises(ValueError, match="val_groups leaves 40 training and 0 validation"):
        train_value_head(X, y, groups=groups, val_groups=["absent"])


def test_cross_validation_holds_every_problem_out_once(data):
    X, y, groups, weights = data
    m = cross_validate(X, y, groups=groups, weights=weights, folds=4)
    assert (m["n"], m["groups"], m["folds"]) == (400, 40, 4) and m["auc"] > 0.9
    # labels that only a head which saw the problem could know: one random label and one
    # random feature vector per problem. Out of fold there is nothing to learn.
    rng = np.random.default_rng(1)
    centre = rng.normal(size=(40, D))
    gi = np.repeat(np.arange(40), 10)
    Xg = (centre[gi] + 0.01 * rng.normal(size=(400, D))).astype(np.float32)
    yg = (rng.random(40) < 0.5).astype(float)[gi]
    ids = [f"p{g}" for g in gi]
    memorised = evaluate(train_value_head(Xg, yg, groups=ids)[0], Xg, yg)["auc"]
    held_out = cross_validate(Xg, yg, groups=ids, folds=5)["auc"]
    assert memorised > 0.8 and held_out < 0.7
    with pytest.raises(ValueError, match="folds must be an int in 2..40"):
        cross_validate(X, y, groups=groups, folds=41)


def test_pairwise_needs_a_problem_with_both_labels():
    X, y, groups = _good()  # groups of 5 rows alternate labels: give each one label only
    y = np.array([float(g % 2) for g in groups])
    with pytest.raises(ValueError, match="ValueHeadConfig.pairwise > 0 needs problems with both"):
        train_value_head(X, y, groups=groups, cfg=ValueHeadConfig(pairwise=1.0))
    _, m = train_value_head(X, y, groups=groups)  # BCE alone still trains
    assert math.isnan(m["within_auc"]) and "within_auc is NaN" in " ".join(m["notes"])


def test_checkpoint_without_pairwise_field_loads_as_bce_only(trained, tmp_path):
    # heads saved before the field existed read back as pairwise = 0 (what they were)
    import json

    head, _, _ = trained
    path = tmp_path / "old.pt"
    head.save(path, feature_identity=IDENTITY, data_fingerprint="f" * 64)
    blob = torch.load(path, weights_only=True)
    header = json.loads(blob["header"])
    del header["config"]["pairwise"]
    blob["header"] = json.dumps(header)
    torch.save(blob, path)
    assert ValueHead.load(path).config.pairwise == 0.0


# ---------------------------------------------------------------- bad input


def _good(n: int = 60, d: int = 4):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d))
    y = (np.arange(n) % 2).astype(float)
    groups = np.arange(n) // 5
    return X, y, groups


def _bad_cases():
    X, y, g = _good()
    nan_X = X.copy()
    nan_X[7, 2] = np.nan
    inf_X = X.copy()
    inf_X[3, 0] = np.inf
    y_hi = y.copy()
    y_hi[4] = 1.5
    y_nan = y.copy()
    y_nan[9] = np.nan
    return [
        ("1d", dict(X=X[:, 0], y=y, groups=g), "2-D"),
        ("dtype", dict(X=X.astype(int), y=y, groups=g), "must hold floats"),
        ("strings", dict(X=X.astype(str), y=y, groups=g), "must hold floats"),
        ("nan_row", dict(X=nan_X, y=y, groups=g), "X row 7 has NaN"),
        ("inf_row", dict(X=inf_X, y=y, groups=g), "X row 3 has NaN or inf"),
        ("y_range", dict(X=X, y=y_hi, groups=g), "y row 4 is 1.5"),
        ("y_nan", dict(X=X, y=y_nan, groups=g), "y row 9 is nan"),
        ("y_len", dict(X=X, y=y[:-1], groups=g), "lengths differ: X has 60 rows but y has 59"),
        ("g_len", dict(X=X, y=y, groups=g[:-2]), "groups has 58"),
        ("w_len", dict(X=X, y=y, groups=g, weights=np.ones(3)), "weights has shape"),
        ("w_neg", dict(X=X, y=y, groups=g, weights=-np.ones(60)), "weights row 0"),
        ("rows", dict(X=X[:12], y=y[:12], groups=g[:12]), "too few rows: 12"),
        ("groups", dict(X=X, y=y, groups=np.zeros(60)), "too few groups: 1"),
        (
            "one_hi",
            dict(X=X, y=np.full(60, 0.8), groups=g),
            "one label only (all 60 labels >= 0.5)",
        ),
        ("one_lo", dict(X=X, y=np.zeros(60), groups=g), "one label only (all 60 labels < 0.5)"),
        ("cfg", dict(X=X, y=y, groups=g, cfg=ValueHeadConfig(lr=0)), "ValueHeadConfig.lr"),
    ]


@pytest.mark.parametrize(
    "kwargs,match", [c[1:] for c in _bad_cases()], ids=[c[0] for c in _bad_cases()]
)
def test_bad_training_input(kwargs, match):
    kwargs = dict(kwargs)
    X, y = kwargs.pop("X"), kwargs.pop("y")
    with pytest.raises(ValueError, match=_re(match)):
        train_value_head(X, y, **kwargs)


@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden", -1),
        ("epochs", 0),
        ("batch_size", 0),
        ("val_fraction", 1.0),
        ("patience", 0),
        ("weight_decay", -1.0),
        ("standardize", 1),
        ("extra_features", ["a", "a"]),
        ("seed", 1.5),
        ("pairwise", -0.5),
        ("pairwise", float("nan")),
    ],
)
def test_config_validate_names_field(field, value):
    with pytest.raises(ValueError, match=f"ValueHeadConfig.{field} "):
        ValueHeadConfig(**{field: value}).validate()


def test_predict_wrong_width(trained):
    head, _, _ = trained
    with pytest.raises(
        ValueError, match="width 576, the head expects 32: was it trained with another"
    ):
        head.predict(np.zeros((3, 576), dtype=np.float32))
    with pytest.raises(ValueError, match="X row 1 has NaN"):
        head.predict(np.array([[0.0] * D, [np.nan] * D]))


def test_load_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ValueHead.load(tmp_path / "nope.pt")


def test_load_truncated_and_random_files(trained, tmp_path):
    head, _, _ = trained
    good = tmp_path / "good.pt"
    head.save(good, feature_identity=IDENTITY, data_fingerprint="f" * 64)
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(raw[: len(raw) // 2])
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    for bad in (truncated, noise):
        with pytest.raises(ValueError, match="not a readable torch file"):
            ValueHead.load(bad)


def test_load_not_a_value_head(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a value-head checkpoint"):
        ValueHead.load(other)
    wrong_version = tmp_path / "v99.pt"
    header = '{"format": "mcts-reason/value-head", "format_version": 99}'
    torch.save({"header": header, "state_dict": {}}, wrong_version)
    with pytest.raises(ValueError, match="format version 99"):
        ValueHead.load(wrong_version)


def test_load_identity_mismatch_names_key(trained, tmp_path):
    head, _, _ = trained
    path = tmp_path / "h.pt"
    head.save(path, feature_identity=IDENTITY, data_fingerprint="f" * 64)
    other = dict(IDENTITY, model_sha256="cd34" * 16)
    with pytest.raises(
        ValueError, match="model_sha256: trained on 'ab12.*this generator is 'cd34"
    ) as exc:
        ValueHead.load(path, expect_identity=other)
    assert "layer" not in str(exc.value) and "retrain" in str(exc.value)


def test_save_rejects_bad_identity_without_writing(trained, tmp_path):
    head, _, _ = trained
    with pytest.raises(ValueError, match="feature_identity must be JSON"):
        head.save(tmp_path / "h.pt", feature_identity={"x": object()}, data_fingerprint="f")
    assert os.listdir(tmp_path) == []


def _re(text: str) -> str:
    import re

    return re.escape(text)

"""A small learned value head over fixed-width step features: training, metrics, checkpoint.

The features are the policy LLM's hidden state at the end of a reasoning step (576 floats for
the embedded 135M model, 3584 for a 7B), optionally with extra scalar columns appended. The
labels are per-step value targets in [0, 1] (soft: the fraction of a step's verified terminal
descendants that are correct, or ReST-MCTS* values); each row has a weight (how many terminals
back its label) and a group id (its problem). Validation is split BY PROBLEM, so steps of one
problem never sit on both sides and the validation numbers are honest about new problems.

A head reads features of ONE model: the checkpoint records that model's identity
(`feature_identity`) and a fingerprint of the exact training data, and `ValueHead.load`
refuses features from another model when told what to expect.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mcts.export.io import atomic_write

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ValueHead",
    "ValueHeadConfig",
    "binary_auc",
    "cross_validate",
    "data_fingerprint",
    "evaluate",
    "split_groups",
    "train_value_head",
    "within_group_auc",
]

FORMAT = "mcts-reason/value-head"
FORMAT_VERSION = 1
MIN_ROWS = 20
MIN_GROUPS = 2
N_BINS = 10
_EPS = 1e-7


@dataclass
class ValueHeadConfig:
    """How to fit the head; stored in the checkpoint so a head says how it was made."""

    hidden: int = 0  # 0: logistic regression on standardized features; >0: one hidden layer MLP
    epochs: int = 100  # maximum; early stopping usually ends sooner
    lr: float = 3e-3
    weight_decay: float = 1e-4  # AdamW; few rows and wide features overfit without it
    batch_size: int = 256
    val_fraction: float = 0.2  # of GROUPS (problems), not rows
    patience: int = 10  # epochs without a better validation loss before stopping
    seed: int = 0
    standardize: bool = True  # mean/std of the training rows live in the checkpoint
    extra_features: list[str] = field(default_factory=list)  # names of appended scalar columns
    threads: int = 1  # torch threads while training (restored after); 0 leaves torch's setting
    # Weight of a within-problem ranking loss added to the BCE (rStar-Math's process preference
    # model: -log sigmoid(s_pos - s_neg) over pairs of one problem's steps, value >= 0.5 vs
    # < 0.5). BCE alone learns mostly which PROBLEMS are easy; picking among one problem's
    # candidates needs the order within a problem. 0 = BCE only.
    pairwise: float = 0.0

    def validate(self) -> ValueHeadConfig:
        """Raise ValueError naming the first bad field; return self for chaining."""

        def count(lo: int) -> Any:
            return lambda v: isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= lo

        def number(v: Any) -> bool:
            return (
                isinstance(v, int | float | np.number)
                and not isinstance(v, bool)
                and math.isfinite(v)
            )

        def names(v: Any) -> bool:
            ok = isinstance(v, list | tuple) and all(isinstance(n, str) and n for n in v)
            return ok and len(set(v)) == len(v)

        rules: dict[str, tuple[Any, str]] = {
            "hidden": (count(0), "an int >= 0 (0 = logistic regression)"),
            "epochs": (count(1), "an int >= 1"),
            "lr": (lambda v: number(v) and v > 0, "a finite number > 0"),
            "weight_decay": (lambda v: number(v) and v >= 0, "a finite number >= 0"),
            "batch_size": (count(1), "an int >= 1"),
            "val_fraction": (
                lambda v: number(v) and 0 < v < 1,
                "a fraction of the groups in (0, 1)",
            ),
            "patience": (count(1), "an int >= 1"),
            "seed": (count(0), "an int >= 0"),
            "standardize": (lambda v: isinstance(v, bool), "a bool"),
            "extra_features": (names, "a list of distinct non-empty column names"),
            "threads": (count(0), "an int >= 0 (0 = leave torch's setting)"),
            "pairwise": (lambda v: number(v) and v >= 0, "a finite number >= 0 (0 = BCE only)"),
        }
        for name, (ok, want) in rules.items():
            if not ok(getattr(self, name)):
                raise ValueError(
                    f"ValueHeadConfig.{name} must be {want}, got {getattr(self, name)!r}"
                )
        return self


class _Net(nn.Module):
    """Standardize (buffers, saved with the weights), then a linear layer or a 1-hidden MLP."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if hidden == 0:
            self.body: nn.Module = nn.Linear(dim, 1)
        else:
            self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std).squeeze(-1)  # logits

    def out_bias(self) -> torch.Tensor:
        return self.body.bias if isinstance(self.body, nn.Linear) else self.body[2].bias


# ---------------------------------------------------------------- input checks


def _check_X(X: Any, name: str = "X") -> np.ndarray:
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array (rows, features), got shape {arr.shape}; "
            "stack one feature vector per step"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(
            f"{name} must hold floats, got dtype {arr.dtype}; pass hidden states as "
            "float32/float64 (e.g. X.astype(np.float32))"
        )
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"{name} row {row} has NaN or inf ({int((~finite).sum())} bad rows in all); "
            "drop or fix those rows before training or scoring"
        )
    return arr


def _check_y(y: Any, n: int) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"y must be a 1-D array of labels, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.float64)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"y must hold numbers in [0, 1], got dtype {arr.dtype}")
    if len(arr) != n:
        raise ValueError(
            f"lengths differ: X has {n} rows but y has {len(arr)}; pass one label per row"
        )
    arr = arr.astype(np.float64)
    bad = ~((arr >= 0.0) & (arr <= 1.0))  # NaN fails both comparisons
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"y row {row} is {float(arr[row])!r}: labels must be values in [0, 1] without NaN "
            "(fraction of correct terminal descendants); fix or drop that row"
        )
    return arr


def _check_weights(weights: Any, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    arr = np.asarray(weights)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"lengths differ: X has {n} rows but weights has shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"weights must be numbers >= 0, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    bad = ~(np.isfinite(arr) & (arr >= 0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"weights row {row} is {float(arr[row])!r}: weights must be finite and >= 0"
        )
    if arr.sum() <= 0:
        raise ValueError("weights are all zero: at least one row must carry weight")
    return arr


def _check_groups(groups: Any, n: int) -> list[str]:
    if groups is None or isinstance(groups, str | bytes):
        raise ValueError("groups must be a sequence with one problem id per row")
    ids = [str(g) for g in groups]  # ids compare as strings (1 and "1" are one problem)
    if len(ids) != n:
        raise ValueError(
            f"lengths differ: X has {n} rows but groups has {len(ids)}; pass one problem id per row"
        )
    return ids


# ---------------------------------------------------------------- metrics


def binary_auc(labels: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUC with tied scores counted half; NaN if one class only."""
    pos = int(labels.sum())
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    _, inv, counts = np.unique(p, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each tie block
    ranks = avg_rank[inv]
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def _within_pairs(labels: np.ndarray, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (pos, neg) of every pair of rows of ONE group with labels True / False."""
    by: dict[str, tuple[list[int], list[int]]] = {}
    for i, (g, lab) in enumerate(zip(ids, labels, strict=True)):
        by.setdefault(g, ([], []))[0 if lab else 1].append(i)
    pos: list[np.ndarray] = []
    neg: list[np.ndarray] = []
    for ps, ns in by.values():
        if ps and ns:
            a, b = np.meshgrid(ps, ns, indexing="ij")
            pos.append(a.ravel())
            neg.append(b.ravel())
    if not pos:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(pos).astype(np.int64), np.concatenate(neg).astype(np.int64)


def within_group_auc(labels: Any, p: Any, groups: Any) -> tuple[float, int, int]:
    """AUC over pairs of rows of the SAME problem (ties half): how well the scores order one
    problem's correct and incorrect steps, which is what picking an answer needs. The plain
    AUC also rewards knowing which problems are easy. Returns (auc, pairs, groups with both
    classes); NaN when no problem has both."""
    lab = np.asarray(labels, dtype=bool)
    sc = np.asarray(p, dtype=np.float64)
    pi, ni = _within_pairs(lab, [str(g) for g in groups])
    if len(pi) == 0:
        return float("nan"), 0, 0
    diff = sc[pi] - sc[ni]
    auc = float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / len(diff))
    return auc, int(len(diff)), len({str(groups[i]) for i in pi})


def _metrics(p: np.ndarray, y: np.ndarray, groups: list[str] | None = None) -> dict[str, Any]:
    """Unweighted metrics of predictions p against soft labels y (the same in train and eval)."""
    labels = y >= 0.5
    notes: list[str] = []
    auc = binary_auc(labels, p)
    if math.isnan(auc):
        notes.append(
            f"auc is NaN: the labels binarized at 0.5 have one class only ({int(labels.sum())} of {len(y)} >= 0.5)"
        )
    within: dict[str, Any] = {}
    if groups is not None:
        w_auc, w_pairs, w_groups = within_group_auc(labels, p, groups)
        within = {"within_auc": w_auc, "within_pairs": w_pairs, "within_groups": w_groups}
        if math.isnan(w_auc):
            notes.append("within_auc is NaN: no problem has both a correct and an incorrect step")
    pc = np.clip(p, _EPS, 1 - _EPS)
    log_loss = float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc)))
    bins = np.minimum((p * N_BINS).astype(np.int64), N_BINS - 1)
    calibration: dict[str, dict[str, Any]] = {}
    ece = 0.0
    for b in range(N_BINS):
        m = bins == b
        c = int(m.sum())
        key = f"{b / N_BINS:.1f}-{(b + 1) / N_BINS:.1f}"
        if c == 0:
            calibration[key] = {"mean_pred": None, "mean_label": None, "count": 0}
            continue
        mp, ml = float(p[m].mean()), float(y[m].mean())
        calibration[key] = {"mean_pred": mp, "mean_label": ml, "count": c}
        ece += c / len(p) * abs(mp - ml)
    return {
        "auc": auc,
        "brier": float(np.mean((p - y) ** 2)),
        "ece": float(ece),
        "log_loss": log_loss,  # soft labels: its floor is the labels' entropy, not 0
        "calibration": calibration,
        **within,
        "notes": notes,
    }


def _weighted_bce(net: _Net, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    with torch.no_grad():
        loss = nn.functional.binary_cross_entropy_with_logits(net(x), y, reduction="none")
        total = float(w.sum())
        return float((loss * w).sum()) / total if total > 0 else float(loss.mean())


def _rank_loss(logits_pos: torch.Tensor, logits_neg: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(s_pos - s_neg), averaged over the pairs."""
    return nn.functional.softplus(logits_neg - logits_pos).mean()


# ---------------------------------------------------------------- the head


class ValueHead:
    """A trained head: `predict` maps step features to values in [0, 1] once per search wave."""

    def __init__(self, net: _Net, cfg: ValueHeadConfig, dim: int) -> None:
        self._net = net.eval()
        self.config = cfg
        self.dim = dim
        self.metrics: dict[str, Any] = {}
        self.feature_identity: dict[str, Any] = {}
        self.data_fingerprint = ""
        self.meta: dict[str, Any] = {}
        self.created = ""

    def __repr__(self) -> str:
        kind = "logistic" if self.config.hidden == 0 else f"mlp{self.config.hidden}"
        return f"ValueHead(dim={self.dim}, {kind}, auc={self.metrics.get('auc')})"

    def predict(self, X: Any) -> np.ndarray:
        """Values in [0, 1] (float64) for rows of X; a 1-D X is one row. No grad graph is built."""
        arr = np.asarray(X)
        if arr.ndim == 1:
            arr = arr[None, :]
        arr = _check_X(arr)
        if arr.shape[1] != self.dim:
            raise ValueError(
                f"features have width {arr.shape[1]}, the head expects {self.dim}: "
                "was it trained with another policy model?"
            )
        if len(arr) == 0:
            return np.zeros(0)
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        with torch.no_grad():
            return torch.sigmoid(self._net(x)).double().numpy()

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        feature_identity: dict[str, Any],
        data_fingerprint: str,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Write ONE file atomically (tmp + os.replace): weights + a JSON header that says
        which model's features it reads and exactly what data it was trained on."""
        if not isinstance(feature_identity, dict) or not all(
            isinstance(k, str) for k in feature_identity
        ):
            raise ValueError(
                "feature_identity must be a dict with str keys (e.g. {'model_sha256': ...})"
            )
        if not isinstance(data_fingerprint, str) or not data_fingerprint:
            raise ValueError(
                "data_fingerprint must be a non-empty str; use data_fingerprint(X, y, groups)"
            )
        if meta is not None and not isinstance(meta, dict):
            raise ValueError(f"meta must be a dict or None, got {type(meta).__name__}")
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": dataclasses.asdict(self.config),
            "dim": self.dim,
            "feature_identity": feature_identity,
            "data_fingerprint": data_fingerprint,
            "metrics": _json_safe(self.metrics),
            "meta": meta or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch_version": torch.__version__,
        }
        for key in ("feature_identity", "meta"):
            try:
                json.dumps(header[key], allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{key} must be JSON-serialisable: {exc}") from None
        text = json.dumps(header, allow_nan=False)
        state = {"header": text, "state_dict": self._net.state_dict()}
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        self.feature_identity = dict(feature_identity)
        self.data_fingerprint = data_fingerprint
        self.meta = dict(meta or {})
        self.created = header["created"]

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, expect_identity: dict[str, Any] | None = None
    ) -> ValueHead:
        """Read a checkpoint written by `save`; with `expect_identity`, refuse a head trained
        on another model's features (naming each differing key with both values)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(
                f"value head checkpoint {path} does not exist; train one "
                "(train_value_head + ValueHead.save) or fix the path"
            )
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for truncated / foreign files
            raise ValueError(
                f"value head checkpoint {path} is not a readable torch file (truncated or "
                f"corrupt: {type(exc).__name__}: {str(exc)[:120]}); retrain and save it again"
            ) from None
        header = _read_header(blob, path)
        try:
            cfg = ValueHeadConfig(**header["config"]).validate()
            dim = int(header["dim"])
            net = _Net(dim, cfg.hidden)
            net.load_state_dict(blob["state_dict"], strict=True)
        except (TypeError, KeyError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"value head checkpoint {path} has a config or weights that do not fit "
                f"({type(exc).__name__}: {str(exc)[:160]}); retrain and save it again"
            ) from None
        head = cls(net, cfg, dim)
        head.feature_identity = dict(header.get("feature_identity") or {})
        head.data_fingerprint = str(header.get("data_fingerprint", ""))
        head.metrics = dict(header.get("metrics") or {})
        head.meta = dict(header.get("meta") or {})
        head.created = str(header.get("created", ""))
        if expect_identity is not None:
            _check_identity(head.feature_identity, expect_identity, path)
        return head


def _read_header(blob: Any, path: str) -> dict[str, Any]:
    if (
        not isinstance(blob, dict)
        or not isinstance(blob.get("header"), str)
        or "state_dict" not in blob
    ):
        raise ValueError(
            f"{path} is a torch file but not a value-head checkpoint (no header); "
            "pass a file written by ValueHead.save"
        )
    try:
        header = json.loads(blob["header"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the value-head header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a value-head checkpoint (format is not {FORMAT!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has value-head format version {header.get('format_version')!r}, this "
            f"code reads version {FORMAT_VERSION}; retrain the head with this version"
        )
    return header


def _check_identity(stored: dict[str, Any], expect: dict[str, Any], path: str) -> None:
    missing = object()
    diffs = [
        f"{key}: trained on {stored.get(key, '<absent>')!r}, this generator is {value!r}"
        for key, value in expect.items()
        if stored.get(key, missing) != value
    ]
    if diffs:
        raise ValueError(
            f"value head {path} was trained on other features ({'; '.join(diffs)}); "
            "retrain the value head or pass the matching model"
        )


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so the header is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---------------------------------------------------------------- data, training, evaluation


def data_fingerprint(X: Any, y: Any, groups: Any, *, weights: Any = None) -> str:
    """sha256 over the features (as float32, what the head sees), labels, per-row and sorted
    group ids (and weights when given): a checkpoint records exactly what it was trained on."""
    Xa = np.ascontiguousarray(np.asarray(X), dtype="<f4")
    ya = np.ascontiguousarray(np.asarray(y), dtype="<f8")
    ids = [str(g) for g in groups]
    h = hashlib.sha256()
    h.update(f"X{Xa.shape}y{ya.shape}".encode())
    h.update(Xa.tobytes())
    h.update(ya.tobytes())
    h.update(json.dumps([ids, sorted(set(ids))]).encode())
    if weights is not None:
        h.update(np.ascontiguousarray(np.asarray(weights), dtype="<f8").tobytes())
    return h.hexdigest()


def split_groups(ids: list[str], cfg: ValueHeadConfig) -> tuple[list[str], list[str]]:
    uniq = sorted(set(ids))
    order = np.random.default_rng(cfg.seed).permutation(len(uniq))
    n_val = min(max(1, round(cfg.val_fraction * len(uniq))), len(uniq) - 1)
    val = sorted(uniq[i] for i in order[:n_val])
    train = sorted(uniq[i] for i in order[n_val:])
    return train, val


def train_value_head(
    X: Any,
    y: Any,
    *,
    groups: Any,
    weights: Any = None,
    cfg: ValueHeadConfig | None = None,
    val_groups: Any = None,
) -> tuple[ValueHead, dict[str, Any]]:
    """Fit the head with weighted soft-label BCE; split by problem (cfg.val_fraction drawn
    with cfg.seed, or exactly `val_groups`); stop early on the validation loss and keep the
    best epoch. Deterministic given cfg.seed.

    Returns the head and validation metrics (auc, brier, ece, log_loss, calibration, split
    sizes and group ids, epochs_run, best_epoch, val_loss_history, seconds)."""
    t0 = time.perf_counter()
    cfg = (cfg or ValueHeadConfig()).validate()
    Xa = _check_X(X)
    n, dim = Xa.shape
    ya = _check_y(y, n)
    ids = _check_groups(groups, n)
    wa = _check_weights(weights, n)
    n_groups = len(set(ids))
    if n < MIN_ROWS:
        raise ValueError(
            f"too few rows: {n} (need at least {MIN_ROWS}); search more TRAIN problems"
        )
    if n_groups < MIN_GROUPS:
        raise ValueError(
            f"too few groups: {n_groups} problem(s) (need at least {MIN_GROUPS}, validation is "
            "split by problem); search more TRAIN problems"
        )
    n_pos = int((ya >= 0.5).sum())
    if n_pos in (0, n):
        side = ">= 0.5" if n_pos else "< 0.5"
        raise ValueError(
            f"training data has one label only (all {n} labels {side}); a value head needs "
            "correct and incorrect steps: search more or harder/easier TRAIN problems"
        )
    if len(cfg.extra_features) >= dim:
        raise ValueError(
            f"ValueHeadConfig.extra_features names {len(cfg.extra_features)} columns but X has only {dim}"
        )
    if val_groups is None:
        groups_train, groups_val = split_groups(ids, cfg)
    else:  # the caller's held-out problems, e.g. the same ones for heads fit on other rows
        val_given = {str(g) for g in val_groups}
        groups_val = sorted(set(ids) & val_given)
        groups_train = sorted(set(ids) - val_given)
        if not groups_val or not groups_train:
            raise ValueError(
                f"val_groups leaves {len(groups_train)} training and {len(groups_val)} "
                "validation problems among these rows; both need at least one"
            )
    val_set = set(groups_val)
    is_val = np.array([g in val_set for g in ids])
    tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    x_tr, y_tr, w_tr = t(Xa[tr]), t(ya[tr]), t(wa[tr])
    x_va, y_va, w_va = t(Xa[va]), t(ya[va]), t(wa[va])
    pairs_tr = pairs_va = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if cfg.pairwise > 0:
        pairs_tr = _within_pairs(ya[tr] >= 0.5, [ids[i] for i in tr])
        pairs_va = _within_pairs(ya[va] >= 0.5, [ids[i] for i in va])
        if len(pairs_tr[0]) == 0:
            raise ValueError(
                "ValueHeadConfig.pairwise > 0 needs problems with both a correct and an "
                "incorrect step among the training problems, and none has both; set "
                "pairwise=0 or search more TRAIN problems"
            )

    def objective(net: _Net) -> float:  # early stopping reads the training objective
        loss = _weighted_bce(net, x_va, y_va, w_va)
        if cfg.pairwise > 0 and len(pairs_va[0]):
            with torch.no_grad():
                lg = net(x_va)
                loss += cfg.pairwise * float(_rank_loss(lg[pairs_va[0]], lg[pairs_va[1]]))
        return loss

    w_scale = float(w_tr.mean()) or 1.0  # loss ~ weighted mean, step size independent of scale

    prev_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching global RNG state
            torch.manual_seed(cfg.seed)
            net = _Net(dim, cfg.hidden)
        if cfg.standardize:
            std = x_tr.std(dim=0, unbiased=False)
            net.mean.copy_(x_tr.mean(dim=0))
            net.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
        with torch.no_grad():  # start at the base rate: fewer epochs, same optimum
            base = float((w_tr * y_tr).sum() / w_tr.sum()) if float(w_tr.sum()) > 0 else 0.5
            base = min(max(base, 1e-3), 1 - 1e-3)
            net.out_bias().fill_(math.log(base / (1 - base)))
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        rng = np.random.default_rng(cfg.seed + 1)
        best_loss, best_epoch, stale = math.inf, 0, 0
        best_state = {k: v.clone() for k, v in net.state_dict().items()}
        history: list[float] = []
        for epoch in range(1, cfg.epochs + 1):
            net.train()
            perm = torch.from_numpy(rng.permutation(len(tr)))
            for start in range(0, len(tr), cfg.batch_size):
                idx = perm[start : start + cfg.batch_size]
                logits = net(x_tr[idx])
                loss = nn.functional.binary_cross_entropy_with_logits(
                    logits, y_tr[idx], reduction="none"
                )
                loss = (loss * w_tr[idx]).sum() / (len(idx) * w_scale)
                if cfg.pairwise > 0:  # as many random within-problem pairs as rows per step
                    pick = torch.from_numpy(rng.integers(0, len(pairs_tr[0]), len(idx)))
                    pos = x_tr[torch.from_numpy(pairs_tr[0])[pick]]
                    neg = x_tr[torch.from_numpy(pairs_tr[1])[pick]]
                    loss = loss + cfg.pairwise * _rank_loss(net(pos), net(neg))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            net.eval()
            val_loss = objective(net)
            history.append(val_loss)
            if val_loss < best_loss:
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = {k: v.clone() for k, v in net.state_dict().items()}
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        net.load_state_dict(best_state)
    finally:
        torch.set_num_threads(prev_threads)

    head = ValueHead(net, cfg, dim)
    metrics = _metrics(head.predict(Xa[va]), ya[va], [ids[i] for i in va])
    metrics.update(
        n_train=len(tr),
        n_val=len(va),
        groups_train=groups_train,
        groups_val=groups_val,
        epochs_run=len(history),
        best_epoch=best_epoch,
        val_loss=best_loss,  # the early-stopping objective (weighted BCE + pairwise * rank loss)
        val_loss_history=history,
        seconds=time.perf_counter() - t0,
    )
    head.metrics = metrics
    return head, metrics


def evaluate(head: ValueHead, X: Any, y: Any, *, groups: Any = None) -> dict[str, Any]:
    """The training metrics (unweighted) on held-out rows, e.g. EVAL problems' steps; with
    groups (one problem id per row) also the within-problem AUC."""
    Xa = _check_X(X)
    ya = _check_y(y, len(Xa))
    if len(Xa) == 0:
        raise ValueError("X has no rows: nothing to evaluate")
    ids = None if groups is None else _check_groups(groups, len(Xa))
    metrics = _metrics(head.predict(Xa), ya, ids)
    metrics["n"] = len(Xa)
    return metrics


def cross_validate(
    X: Any,
    y: Any,
    *,
    groups: Any,
    weights: Any = None,
    cfg: ValueHeadConfig | None = None,
    folds: int = 5,
) -> dict[str, Any]:
    """Every problem held out once: `folds` heads, each fit (with its own early-stopping
    split) on the other folds' problems, predict the held-out fold; the metrics are over the
    pooled out-of-fold predictions of ALL rows. One validation split of a few dozen problems
    is noisy; this figure uses every problem."""
    cfg = (cfg or ValueHeadConfig()).validate()
    Xa = _check_X(X)
    ya = _check_y(y, len(Xa))
    ids = _check_groups(groups, len(Xa))
    wa = _check_weights(weights, len(Xa))
    uniq = sorted(set(ids))
    if not (isinstance(folds, int) and 2 <= folds <= len(uniq)):
        raise ValueError(
            f"folds must be an int in 2..{len(uniq)} (the number of problems), got {folds!r}"
        )
    order = np.random.default_rng(cfg.seed).permutation(len(uniq))
    fold_of = {uniq[j]: k % folds for k, j in enumerate(order)}
    fold = np.array([fold_of[g] for g in ids])
    pred = np.empty(len(ya))
    for k in range(folds):
        test = fold == k
        head, _ = train_value_head(
            Xa[~test],
            ya[~test],
            groups=[ids[i] for i in np.flatnonzero(~test)],
            weights=wa[~test],
            cfg=cfg,
        )
        pred[test] = head.predict(Xa[test])
    metrics = _metrics(pred, ya, ids)
    metrics.update(folds=folds, n=len(ya), groups=len(uniq))
    return metrics

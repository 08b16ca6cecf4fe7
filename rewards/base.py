"""What every reward shares: input validation, the finite-score check, the error class.

One place decides what a bad wave looks like, so every reward fails the same way: before any
model work for malformed items, and with the reward's name and the item index for a model
that returned NaN/inf (such a value is never returned, let alone backed up into a tree).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from mcts.types import Problem, ScoreItem

__all__ = [
    "RewardError",
    "validate_items",
    "finite_scores",
    "item_problem",
    "missing_references",
    "aggregate_steps",
    "AGGREGATIONS",
    "reward_identity",
]

AGGREGATIONS = ("last", "min", "prod", "mean")
"""How per-step scores of a path become one score ("product" is accepted for "prod")."""


def aggregate_steps(step_scores: np.ndarray, how: str) -> float:
    """One score from a path's per-step scores (all in [0, 1]): last, min, prod or mean."""
    s = np.asarray(step_scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("aggregate_steps: no step scores to aggregate")
    if how == "last":
        return float(s[-1])
    if how == "min":
        return float(s.min())
    if how in ("prod", "product"):
        return float(np.prod(s))
    if how == "mean":
        return float(s.mean())
    raise ValueError(f"aggregation must be one of {AGGREGATIONS} (or 'product'), got {how!r}")


class RewardError(ValueError):
    """A reward could not produce a valid score; names the reward and the item."""

    def __init__(self, message: str, reward: str = "", item_index: int | None = None) -> None:
        super().__init__(message)
        self.reward = reward
        self.item_index = item_index


def validate_items(items: Sequence[ScoreItem], reward: str) -> None:
    """Reject a malformed wave before any model work, naming the item and field."""
    if isinstance(items, ScoreItem | str | bytes) or not isinstance(items, Sequence):
        raise TypeError(f"{reward}.score() takes a sequence of ScoreItem (wrap one in a list)")
    for i, it in enumerate(items):
        where = f"{reward}: items[{i}]"
        if not isinstance(it, ScoreItem):
            raise TypeError(f"{where} must be a mcts.types.ScoreItem, got {type(it).__name__}")
        if not isinstance(it.question, str) or not it.question.strip():
            raise ValueError(f"{where}.question must be a non-empty string")
        if not isinstance(it.steps, tuple) or not it.steps:
            raise ValueError(
                f"{where}.steps must be a non-empty tuple of str (the last step is scored)"
            )
        for j, s in enumerate(it.steps):
            if not isinstance(s, str):
                raise TypeError(f"{where}.steps[{j}] must be str, got {type(s).__name__}")
        if it.reference is not None and not isinstance(it.reference, str):
            raise TypeError(f"{where}.reference must be str or None")
        if it.problem is not None and not isinstance(it.problem, Problem):
            raise TypeError(f"{where}.problem must be a mcts.types.Problem or None")


def finite_scores(values: Iterable[float] | np.ndarray, reward: str, n: int) -> np.ndarray:
    """`values` as a float64 array of length n in [0, 1]; NaN/inf or out-of-range -> RewardError.

    A tolerance of 1e-6 absorbs float rounding at the ends of [0, 1] (then clipped).
    """
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape[0] != n:
        raise RewardError(f"{reward}: produced {arr.shape[0]} scores for {n} items", reward)
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        i = int(bad[0])
        raise RewardError(
            f"{reward}: non-finite score {arr[i]} for items[{i}] (model output NaN/inf); "
            "it was not used",
            reward,
            i,
        )
    out = np.flatnonzero((arr < -1e-6) | (arr > 1 + 1e-6))
    if out.size:
        i = int(out[0])
        raise RewardError(f"{reward}: score {arr[i]} for items[{i}] is outside [0, 1]", reward, i)
    return np.clip(arr, 0.0, 1.0)


def item_problem(item: ScoreItem, index: int, reward: str) -> Problem:
    """The Problem to verify an item against: its own, else one built from `reference`."""
    if item.problem is not None:
        p = item.problem
        if p.check is None and p.answer is None and item.reference is not None:
            return Problem(p.id, p.question, answer=item.reference, task=p.task)
        if p.check is not None or p.answer is not None:
            return p
    if item.reference is None:
        raise RewardError(
            f"{reward}: items[{index}] has no reference answer and no problem.check; the "
            "outcome verifier needs one (use a task with answers, or another reward)",
            reward,
            index,
        )
    return Problem(f"item{index}", item.question, answer=item.reference)


def missing_references(problems: Iterable[Problem]) -> list[str]:
    """Ids of problems that an answer-checking reward cannot verify (no answer, no check)."""
    return [p.id for p in problems if p.answer is None and p.check is None]


# Attributes that are run state, not configuration (counters, last-call results, caches).
_STATE_ATTRS = frozenset({"stats", "calls", "truncated", "tokenizer", "pad_id"})
_UNKNOWN = object()


def _describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of one configuration value (models by identity, not bytes)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 1024 else _UNKNOWN
    if depth > 4:
        return _UNKNOWN
    if isinstance(value, (list, tuple)):
        items = [_describe(v, depth + 1) for v in value]
        return _UNKNOWN if any(v is _UNKNOWN for v in items) else items
    if isinstance(value, dict):
        out = {str(k): _describe(v, depth + 1) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _UNKNOWN}
    if hasattr(value, "score") and callable(value.score):  # a component reward
        return reward_identity(value)
    name = getattr(value, "name_or_path", None) or getattr(
        getattr(value, "config", None), "_name_or_path", None
    )
    if isinstance(name, str) and name:  # a HF model (a PRM): its weights
        from mcts.generators.base import model_source

        return {**model_source(name), "dtype": str(getattr(value, "dtype", ""))}
    if hasattr(value, "generate") and callable(value.generate):  # a generator (judge, rollout)
        from mcts.generators.base import generator_identity

        return generator_identity(value)
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value))}"
    return _UNKNOWN


def reward_identity(reward: Any) -> dict[str, Any] | None:
    """What a reward's scores depend on, for the run fingerprint (mcts.export.fingerprint).

    A reward's own `identity()` wins. Otherwise: its class, `name`, `requires_reference` and
    every public attribute that describes configuration: numbers, strings, lists of them,
    component rewards and generators (by their identity), HF models (by name or local hash).
    Run state is left out: names starting with "_" or "last_", and counters such as
    `calls` / `stats`. None for no reward.
    """
    if reward is None:
        return None
    own = getattr(reward, "identity", None)
    if callable(own):
        return dict(own())
    cls = type(reward)
    out: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    for key in ("name", "requires_reference"):
        if hasattr(reward, key):
            out[key] = _describe(getattr(reward, key))
    for key, value in sorted(vars(reward).items()):
        if key.startswith(("_", "last_")) or key in _STATE_ATTRS:
            continue
        desc = _describe(value)
        if desc is not _UNKNOWN:
            out[key] = desc
    return out

"""reasoning-gym problems: procedural, offline, reproducible from (name, params, seed, index).

Each Problem carries the dataset's own `score_answer` as `check`, wrapped in a small
picklable class (Ray ships problems to workers): it holds the entry and the recipe of its
dataset, and rebuilds the dataset lazily (cached per process) on the first call.

Model text is never executed, also through a task's checker: some reasoning-gym scorers
hand the answer to `eval` or sympy's `parse_expr` (countdown, puzzle24, the integration and
polynomial tasks, the matrix / board / string list forms; see `mcts.tasks.safe_answers`).
`GymScorer` first checks the answer against its task's strict grammar; an answer outside it
scores 0.0 and the dataset's `score_answer` is never called. A task whose scorer may
evaluate text and that has no grammar is refused when it is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from functools import lru_cache
from typing import Any

from mcts.tasks.safe_answers import admits, ensure_guarded
from mcts.types import Problem

DEFAULT_SIZE = 100


def known_tasks() -> list[str]:
    """Names of the registered reasoning-gym datasets."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _unknown_task_error(name: str) -> ValueError:
    known = known_tasks()
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {close}?" if close else ""
    return ValueError(
        f"unknown reasoning-gym task {name!r}.{hint} Set task.name to one of: {', '.join(known)}"
    )


def _params_key(params: dict[str, Any]) -> str:
    try:
        return json.dumps(params, sort_keys=True)
    except TypeError as e:
        raise TypeError(
            f"task.params must hold plain JSON-like values (numbers, strings, lists): {e}"
        ) from e


def make_dataset(name: str, params: dict[str, Any], seed: int, size: int) -> Any:
    """Build a reasoning-gym dataset, turning its config errors into ValueErrors that name the fix."""
    from reasoning_gym.factory import DATASETS, create_dataset

    if name not in DATASETS:
        raise _unknown_task_error(name)
    for reserved in ("seed", "size"):
        if reserved in params:
            raise ValueError(f"task.params.{reserved} is not allowed: set task.{reserved} instead")
    config_cls = DATASETS[name][1]
    allowed = {f.name for f in dataclasses.fields(config_cls)} - {"seed", "size"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(
            f"unknown task.params {unknown} for reasoning-gym task {name!r}; "
            f"its config accepts: {sorted(allowed)}"
        )
    try:
        return create_dataset(name, seed=seed, size=size, **params)
    except (AssertionError, TypeError, ValueError) as e:
        raise ValueError(
            f"invalid task.params for reasoning-gym task {name!r}: {e or type(e).__name__}"
        ) from e


@lru_cache(maxsize=32)
def _cached_dataset(name: str, params_key: str, seed: int, size: int) -> Any:
    return make_dataset(name, json.loads(params_key), seed, size)


class GymScorer:
    """Picklable `check` for one reasoning-gym entry: answer text -> the dataset's score in [0, 1].

    The answer reaches the dataset's `score_answer` only if it passes the task's grammar
    (`mcts.tasks.safe_answers.admits`); otherwise it scores 0.0.
    """

    __slots__ = ("name", "params_key", "seed", "size", "index", "entry")

    def __init__(
        self, name: str, params_key: str, seed: int, size: int, index: int, entry: dict[str, Any]
    ) -> None:
        self.name = name
        self.params_key = params_key
        self.seed = seed
        self.size = size
        self.index = index
        self.entry = entry

    def __call__(self, answer: str | None) -> float:
        if not admits(self.name, answer, self.entry):
            return 0.0
        ds = _cached_dataset(self.name, self.params_key, self.seed, self.size)
        return float(ds.score_answer(answer, self.entry))

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for s, v in zip(self.__slots__, state, strict=True):
            setattr(self, s, v)

    def __repr__(self) -> str:
        return f"GymScorer({self.name!r}, seed={self.seed}, index={self.index})"


def load_reasoning_gym(
    name: str, size: int | None = None, seed: int = 0, params: dict[str, Any] | None = None
) -> list[Problem]:
    """Generate `size` problems of reasoning-gym task `name`; ids are f"{name}-{seed}-{index}"."""
    if not isinstance(name, str) or not name:
        raise ValueError("task.name must be a reasoning-gym task name, e.g. 'basic_arithmetic'")
    size = DEFAULT_SIZE if size is None else size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"task.size must be a positive integer, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"task.seed must be an integer, got {seed!r}")
    params = dict(params or {})
    key = _params_key(params)
    ds = _cached_dataset(name, key, seed, size)
    ensure_guarded(name, params)
    problems = []
    for i in range(size):
        entry = ds[i]
        problems.append(
            Problem(
                id=f"{name}-{seed}-{i}",
                question=str(entry["question"]),
                answer=None if entry.get("answer") is None else str(entry["answer"]),
                task=name,
                meta={"source": "reasoning_gym", "seed": seed, "index": i, "params": params},
                check=GymScorer(name, key, seed, size, i, entry),
            )
        )
    return problems

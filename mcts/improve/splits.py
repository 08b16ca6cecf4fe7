"""TRAIN and EVAL problems from one procedural task, never overlapping.

Both come from the same reasoning-gym generator with different seeds (checked: equal seeds
are an error). Small task spaces repeat questions across seeds, so every TRAIN problem whose
question text also appears in EVAL is dropped from TRAIN (EVAL, what is reported, is never
changed); the count dropped is recorded. Nothing learned ever sees an EVAL question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mcts.tasks import load_task
from mcts.tasks.config import as_task_config
from mcts.types import Problem


class SplitError(ValueError):
    """TRAIN and EVAL could not be made disjoint as configured."""


@dataclass
class Splits:
    train: list[Problem]
    eval: list[Problem]
    dropped_from_train: int

    def describe(self) -> dict[str, Any]:
        return {
            "train": len(self.train),
            "eval": len(self.eval),
            "dropped_from_train_as_eval_duplicates": self.dropped_from_train,
            "train_ids": [p.id for p in self.train],
            "eval_ids": [p.id for p in self.eval],
        }


def make_splits(
    task: Any, *, train_size: int, eval_size: int, train_seed: int, eval_seed: int
) -> Splits:
    """TRAIN (seed train_seed) and EVAL (seed eval_seed) of the task, disjoint by text."""
    base = as_task_config(task)
    if base.source != "reasoning_gym":
        raise SplitError(
            f"improve needs a procedural task (task.source=reasoning_gym) to draw TRAIN and "
            f"EVAL from disjoint seeds; got task.source={base.source!r}"
        )
    if train_seed == eval_seed:
        raise SplitError(
            f"improve.train_seed and improve.eval_seed are both {train_seed}: TRAIN and EVAL "
            "would be the same problems; choose different seeds"
        )
    for name, v in (("train_size", train_size), ("eval_size", eval_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SplitError(f"improve.{name} must be a positive integer, got {v!r}")
    spec = {**base.__dict__, "params": dict(base.params)}
    train = load_task({**spec, "seed": train_seed, "size": train_size})
    evals = load_task({**spec, "seed": eval_seed, "size": eval_size})
    seen = {_text(p) for p in evals}
    kept = [p for p in train if _text(p) not in seen]
    if not kept:
        raise SplitError(
            f"every TRAIN question also appears in EVAL ({len(train)} of {len(train)}): the "
            "task space is too small for these sizes; raise its difficulty or lower eval_size"
        )
    out = Splits(train=kept, eval=evals, dropped_from_train=len(train) - len(kept))
    check_disjoint(out)
    return out


def check_disjoint(splits: Splits) -> None:
    """TRAIN and EVAL share no problem id and no question text (else SplitError)."""
    if not splits.train or not splits.eval:
        raise SplitError(
            f"TRAIN has {len(splits.train)} and EVAL {len(splits.eval)} problems: both need some"
        )
    ids = {p.id for p in splits.train} & {p.id for p in splits.eval}
    if ids:
        raise SplitError(f"TRAIN and EVAL share problem ids {sorted(ids)[:3]}")
    texts = {_text(p) for p in splits.train} & {_text(p) for p in splits.eval}
    if texts:
        raise SplitError(
            f"TRAIN and EVAL share {len(texts)} question(s), e.g. {sorted(texts)[0]!r}: "
            "remove them from TRAIN"
        )


def question_key(question: str) -> str:
    """What makes two questions the same: their words, case-folded (whitespace ignored)."""
    return " ".join(question.split()).lower()


def _text(p: Problem) -> str:
    return question_key(p.question)

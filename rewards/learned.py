"""A learned process reward: a small head over the policy model's own hidden state.

The generator returns, with every step it writes, its hidden state at the step's end
(`Step.features`, from the same decode that produced the step: no second pass). The search
hands it on as `ScoreItem.features`, and this reward scores a whole wave with one call of
the head: zero model tokens, no prompt re-read (the judge re-reads ~120 tokens per node).

The head (rewards/value_model.py) is trained by `mcts.improve` on the value targets the
search itself inferred from verified answers on TRAIN problems. A checkpoint records the
feature extractor's identity (model file hash, layer, pooling, width); loading it against
another policy model is an error, because its features would mean something else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mcts.types import Generator, ScoreItem
from rewards.base import RewardError, finite_scores, validate_items
from rewards.value_model import ValueHead

__all__ = ["LearnedValue"]

# What must match between the checkpoint's features and the generator's (n_ctx, seed and
# other sampling settings do not change what a hidden state means).
_IDENTITY_KEYS = ("backend", "model_sha256", "layer", "pooling", "dim")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LearnedValue:
    """P(step leads to a correct answer) from the policy's hidden state at the step's end."""

    name = "learned"
    requires_reference = False

    def __init__(self, generator: Generator, path: str) -> None:
        if not path or path == "???":
            raise ValueError(
                "reward 'learned' needs `path`: a value-head checkpoint written by "
                "`python -m mcts.improve` (e.g. reward.path=outputs/improve/round0/value.pt)"
            )
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(
                f"reward.path {str(self.path)!r}: no such value-head checkpoint; train one with "
                "`python -m mcts.improve` (it writes <run dir>/round<r>/value.pt)"
            )
        ident = getattr(generator, "feature_identity", None)
        enable = getattr(generator, "enable_features", None)
        if not callable(ident) or not callable(enable):
            raise ValueError(
                f"reward 'learned' reads the policy model's hidden states, but generator "
                f"{type(generator).__name__} does not return them (no feature_identity / "
                "enable_features): use generator=llama_cpp"
            )
        have = dict(ident())
        expect = {k: have[k] for k in _IDENTITY_KEYS if k in have}
        self.head = ValueHead.load(self.path, expect_identity=expect)
        if self.head.dim != have.get("dim", self.head.dim):
            raise ValueError(
                f"{self.path}: the head reads {self.head.dim} features, the generator's hidden "
                f"state has {have.get('dim')}: it was trained with another policy model"
            )
        enable()
        self.checkpoint_sha256 = _file_sha256(self.path)
        self.last_tokens = np.zeros(0, dtype=np.int64)

    def identity(self) -> dict[str, Any]:
        """What scores depend on: the checkpoint's bytes and the features it reads."""
        return {
            "class": "rewards.learned.LearnedValue",
            "name": self.name,
            "requires_reference": False,
            "checkpoint_sha256": self.checkpoint_sha256,
            "data_fingerprint": self.head.data_fingerprint,
            "feature_identity": self.head.feature_identity,
        }

    def score(self, items: Sequence[ScoreItem]) -> np.ndarray:
        validate_items(items, self.name)
        n = len(items)
        self.last_tokens = np.zeros(n, dtype=np.int64)
        if n == 0:
            return np.zeros(0)
        for i, it in enumerate(items):
            if it.features is None:
                raise RewardError(
                    f"items[{i}] has no features: the learned reward reads the policy's hidden "
                    "state, which the generator returns only with features enabled "
                    "(llama_cpp backend)",
                    self.name,
                    i,
                )
        X = np.stack([np.asarray(it.features, dtype=np.float32).reshape(-1) for it in items])
        return finite_scores(self.head.predict(X), self.name, n)

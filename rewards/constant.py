"""The reward that knows nothing: every item scores `value` (0.5 by default), at no cost.

For runs whose reward does not matter: sampling for self-consistency / pass@k (the vote
ignores scores), a policy's own evaluation in mcts.improve, or a search-free baseline.
`reward=none` in Hydra.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mcts.types import ScoreItem
from rewards.base import validate_items

__all__ = ["ConstantReward"]


class ConstantReward:
    """Scores every item `value`; reads nothing, costs no tokens."""

    name = "none"
    requires_reference = False

    def __init__(self, value: float = 0.5) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"reward 'none': value must be in [0, 1], got {value!r}")
        self.value = float(value)
        self.last_tokens = np.zeros(0, dtype=np.int64)

    def identity(self) -> dict[str, Any]:
        return {"class": "rewards.constant.ConstantReward", "name": self.name, "value": self.value}

    def score(self, items: Sequence[ScoreItem]) -> np.ndarray:
        validate_items(items, self.name)
        self.last_tokens = np.zeros(len(items), dtype=np.int64)
        return np.full(len(items), self.value, dtype=np.float64)

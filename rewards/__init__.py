"""rewards: process and outcome reward models behind one batched interface.

Every reward has `score(items: Sequence[ScoreItem]) -> np.ndarray` (floats in [0, 1], one
per item, one call per wave) and, when it spends model tokens, `last_tokens`. Rewards that
check answers have `requires_reference = True` and `check_problems(problems)` to fail at
setup rather than mid-search. The HF PRMs import torch only when used.
"""

from __future__ import annotations

from typing import Any

from rewards.base import AGGREGATIONS, RewardError, aggregate_steps
from rewards.factory import REWARD_NAMES, make_reward
from rewards.judge import LLMJudge
from rewards.mix import TerminalSwitch, WeightedMix
from rewards.rollout import MCRollout
from rewards.verifier import OutcomeVerifier

__all__ = [
    "AGGREGATIONS",
    "REWARD_NAMES",
    "ClassifierPRM",
    "LLMJudge",
    "MCRollout",
    "MathShepherdPRM",
    "OutcomeVerifier",
    "RewardError",
    "TerminalSwitch",
    "WeightedMix",
    "aggregate_steps",
    "make_reward",
]


def __getattr__(name: str) -> Any:
    if name in ("MathShepherdPRM", "ClassifierPRM", "HFPRM"):
        from rewards import prm

        return getattr(prm, name)
    raise AttributeError(f"module 'rewards' has no attribute {name!r}")

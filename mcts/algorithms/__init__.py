"""Search algorithms as small policies over the one wave loop (see base.py)."""

from __future__ import annotations

from mcts.algorithms.base import Children, Expansion, Policy
from mcts.config import SearchConfig


def make_policy(cfg: SearchConfig) -> Policy:
    """The policy for `cfg.algorithm`."""
    if cfg.algorithm in ("mcts", "rest_mcts"):
        from mcts.algorithms.mcts import MCTSPolicy

        return MCTSPolicy(cfg)
    if cfg.algorithm in ("best_of_n", "self_consistency"):
        from mcts.algorithms.sampling import SamplingPolicy

        return SamplingPolicy(cfg)
    if cfg.algorithm in ("beam", "dvts"):
        from mcts.algorithms.beam import BeamPolicy

        return BeamPolicy(cfg)
    raise ValueError(f"search.algorithm: unknown {cfg.algorithm!r}")


__all__ = ["Children", "Expansion", "Policy", "make_policy"]

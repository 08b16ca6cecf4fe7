"""The self-improvement loop: search TRAIN, learn a value model from the search's own
value targets, search EVAL with it, report against voting (see mcts/improve/loop.py).

    python -m mcts.improve                       # Hydra app (configs/improve.yaml)
    from mcts.improve import run_improve, ImproveConfig
"""

from __future__ import annotations

from mcts.improve.loop import ImproveConfig, run_improve

__all__ = ["ImproveConfig", "run_improve"]

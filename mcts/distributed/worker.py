"""One search worker: owns a generator and a reward, searches the chunks it is dealt.

A plain class so it runs (and is tested) without Ray; the driver wraps it with
`ray.remote` and each actor process builds its own models from picklable recipes.
The Search engine is kept across chunks so its forest allocation is reused.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mcts.config import SearchConfig
from mcts.distributed.factories import Spec, build_generator, build_reward
from mcts.results import ProblemResult
from mcts.search import Search
from mcts.types import Problem


@dataclass
class ChunkOutput:
    """What a worker sends back for one chunk: every result of it, at once."""

    chunk_id: int
    results: list[ProblemResult]
    stats: dict[str, float]  # this chunk's share of Search.stats
    worker: str  # host:pid, for logs
    seconds: float  # wall time inside the worker
    received: float = 0.0  # time.time() when the worker started it (for overhead accounting)
    meta: dict[str, Any] = field(default_factory=dict)


def _placement() -> dict[str, Any]:
    """The Ray node and GPUs this process was placed on (None / [] outside Ray): the driver
    needs the node to tell a lost node from a crashed worker, and reports both."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {"node_id": None, "gpu_ids": []}
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
    }


class SearchWorker:
    def __init__(self, generator_spec: Spec, reward_spec: Spec | None, cfg: SearchConfig) -> None:
        self.generator = build_generator(generator_spec)
        self.reward = build_reward(reward_spec, self.generator)
        self.cfg = cfg
        self.engine = Search(self.generator, self.reward, cfg)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def info(self) -> dict[str, Any]:
        """Returns once the models are built (the driver waits on it to surface load errors)."""
        from mcts.search import summarize

        zero = dict.fromkeys(self.engine.stats, 0)
        return {
            "name": self.name,
            # Whatever rule search() uses to flag an oracle-guided reward, applied here.
            "reward_uses_reference": summarize([], zero, 1.0, self.reward)["reward_uses_reference"],
            **_placement(),
        }

    def identity(self) -> dict[str, Any]:
        """The models' identities for the run fingerprint (mcts.export.fingerprint), computed
        here where the model files are (the driver may not see them)."""
        from mcts.export.fingerprint import model_identities

        return model_identities(self.generator, self.reward)

    def check_problems(self, problems: Sequence[Problem]) -> None:
        """The reward's own pre-flight check (e.g. a verifier without reference answers)."""
        if self.reward is not None and hasattr(self.reward, "check_problems"):
            self.reward.check_problems(list(problems))

    def run_chunk(self, chunk_id: int, problems: Sequence[Problem]) -> ChunkOutput:
        received = time.time()
        t0 = time.perf_counter()
        before = dict(self.engine.stats)
        results = self.engine.run(list(problems))
        stats = {k: v - before.get(k, 0) for k, v in self.engine.stats.items()}
        return ChunkOutput(
            chunk_id=chunk_id,
            results=results,
            stats=stats,
            worker=self.name,
            seconds=time.perf_counter() - t0,
            received=received,
        )

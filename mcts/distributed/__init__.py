"""Scale-out on Ray: problems sharded over worker actors that each own a generator + reward.

    from mcts.distributed import distributed_search
    res = distributed_search(problems, {"backend": "llama_cpp", "n_threads": 1},
                             {"name": "verifier"}, SearchConfig(), run_dir="runs/x", workers=2)

Ray is imported only when workers > 0. See docs/distributed.md.
"""

from mcts.distributed.chunks import Chunk, ChunkLedger, Loss, default_chunk_size, make_chunks
from mcts.distributed.config import REASONS, DistributedConfig
from mcts.distributed.driver import distributed_search, run_search
from mcts.distributed.errors import DistributedError
from mcts.distributed.factories import build_generator, build_reward, check_spec
from mcts.distributed.failed_log import FailedLog
from mcts.distributed.worker import ChunkOutput, SearchWorker

__all__ = [
    "Chunk",
    "ChunkLedger",
    "ChunkOutput",
    "DistributedConfig",
    "DistributedError",
    "FailedLog",
    "Loss",
    "REASONS",
    "SearchWorker",
    "build_generator",
    "build_reward",
    "check_spec",
    "default_chunk_size",
    "distributed_search",
    "make_chunks",
    "run_search",
]

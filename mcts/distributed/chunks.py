"""The driver's ledger of chunks: which are waiting, which a worker holds, which are done.

Pure bookkeeping (no Ray), so the exactly-once rules are easy to test on their own:
- a chunk is dealt to one worker at a time, to whichever worker is free first (a slow
  worker never holds problems another could be doing);
- a chunk whose worker was lost goes back to the FRONT of the queue: its results travel
  back in one message, so none of them was recorded;
- a chunk lost with its node is re-dealt whole (the node failed, not the problems); one that
  crashed or hung its worker is re-dealt one problem per chunk, so a bad problem is isolated
  and its batch-mates finish; a problem that failed on `poison_after` different workers is
  poisoned: taken out of the run (a caller records it) instead of killing workers forever;
- a result for a problem already recorded is refused (never written twice).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from mcts.config import SearchConfig
from mcts.distributed.config import REASONS
from mcts.types import Problem


@dataclass(frozen=True)
class Chunk:
    id: int
    problems: tuple[Problem, ...]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(p.id for p in self.problems)


def make_chunks(problems: Sequence[Problem], size: int) -> list[Chunk]:
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {size}")
    return [
        Chunk(i, tuple(problems[lo : lo + size]))
        for i, lo in enumerate(range(0, len(problems), size))
    ]


def default_chunk_size(n_problems: int, workers: int, cfg: SearchConfig) -> int:
    """One search batch per chunk, but no fewer chunks than workers."""
    return max(1, min(cfg.max_live_trees, math.ceil(n_problems / max(1, workers))))


@dataclass
class Loss:
    """What the ledger did with a lost worker's chunk."""

    chunk: Chunk | None  # the chunk the worker held (None: it held nothing)
    reason: str
    requeued: list[Chunk] = field(default_factory=list)  # back at the front of the queue
    poisoned: list[Chunk] = field(default_factory=list)  # taken out of the run


class ChunkLedger:
    def __init__(self, chunks: Sequence[Chunk], poison_after: int | None = None) -> None:
        """poison_after: None never gives up on a problem (re-deals it forever)."""
        if poison_after is not None and poison_after < 1:
            raise ValueError(f"poison_after must be >= 1, got {poison_after}")
        self.waiting: deque[Chunk] = deque(chunks)
        self.held: dict[Hashable, Chunk] = {}  # worker key -> chunk it is searching
        self.done_ids: set[str] = set()
        self.poison_after = poison_after
        self.redealt_by: dict[str, int] = dict.fromkeys(REASONS, 0)
        # problem id -> [(worker key, reason)] for every crash/hang it was part of
        self.failures: dict[str, list[tuple[Hashable, str]]] = {}
        self.poisoned: list[Chunk] = []
        self._all = {p.id for c in chunks for p in c.problems}
        self._next_id = max((c.id for c in chunks), default=-1) + 1

    @property
    def redealt(self) -> int:
        return sum(self.redealt_by.values())

    def deal(self, worker: Hashable) -> Chunk | None:
        if worker in self.held:
            raise RuntimeError(f"worker {worker!r} already holds chunk {self.held[worker].id}")
        if not self.waiting:
            return None
        chunk = self.waiting.popleft()
        self.held[worker] = chunk
        return chunk

    def complete(self, worker: Hashable, ids: Sequence[str]) -> list[str]:
        """The worker returned its chunk; returns the ids to record (new ones only)."""
        chunk = self.held.pop(worker)
        expected = set(chunk.ids)
        got = list(ids)
        if set(got) != expected or len(got) != len(expected):
            missing = sorted(expected - set(got))[:5]
            extra = sorted(set(got) - expected)[:5]
            raise RuntimeError(
                f"chunk {chunk.id} came back with the wrong problems "
                f"(missing {missing}, unexpected {extra})"
            )
        fresh = [i for i in got if i not in self.done_ids]
        self.done_ids.update(fresh)
        return fresh

    def failed_workers(self, problem_id: str) -> int:
        """Different workers this problem crashed or hung."""
        return len({w for w, _ in self.failures.get(problem_id, [])})

    def lost(self, worker: Hashable, reason: str = "worker_died") -> Loss:
        """The worker is gone (`reason` in REASONS): its chunk back to the front of the queue,
        whole (node_lost) or one problem per chunk, minus the problems now poisoned."""
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {REASONS}, got {reason!r}")
        chunk = self.held.pop(worker, None)
        loss = Loss(chunk, reason)
        if chunk is None:
            return loss
        if reason == "node_lost":
            loss.requeued = [chunk]
        else:
            for pid in chunk.ids:
                self.failures.setdefault(pid, []).append((worker, reason))
            pieces = [chunk] if len(chunk.problems) == 1 else self._split(chunk)
            for piece in pieces:
                bad = (
                    self.poison_after is not None
                    and self.failed_workers(piece.problems[0].id) >= self.poison_after
                )
                (loss.poisoned if bad else loss.requeued).append(piece)
        self.waiting.extendleft(reversed(loss.requeued))  # front of the queue, in order
        self.poisoned += loss.poisoned
        if loss.requeued:
            self.redealt_by[reason] += 1
        return loss

    def _split(self, chunk: Chunk) -> list[Chunk]:
        out = []
        for p in chunk.problems:
            out.append(Chunk(self._next_id, (p,)))
            self._next_id += 1
        return out

    @property
    def finished(self) -> bool:
        return not self.waiting and not self.held

    def poisoned_ids(self) -> list[str]:
        return [i for c in self.poisoned for i in c.ids]

    def remaining_ids(self) -> list[str]:
        return sorted(self._all - self.done_ids - set(self.poisoned_ids()))

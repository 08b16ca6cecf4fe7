"""The driver's ledger of chunks: which are waiting, which a worker holds, which are done.

Pure bookkeeping (no Ray), so the exactly-once rules are easy to test on their own:
- a chunk is dealt to one worker at a time, to whichever worker is free first (a slow
  worker never holds problems another could be doing);
- a chunk whose worker died goes back to the FRONT of the queue, whole: its results
  travel back in one message, so none of them was recorded;
- a result for a problem already recorded is refused (never written twice).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

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


class ChunkLedger:
    def __init__(self, chunks: Sequence[Chunk]) -> None:
        self.waiting: deque[Chunk] = deque(chunks)
        self.held: dict[Hashable, Chunk] = {}  # worker key -> chunk it is searching
        self.done_ids: set[str] = set()
        self.redealt = 0
        self._all = {p.id for c in chunks for p in c.problems}

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

    def lost(self, worker: Hashable) -> Chunk | None:
        """The worker died: its chunk (if any) goes back to the front of the queue."""
        chunk = self.held.pop(worker, None)
        if chunk is not None:
            self.waiting.appendleft(chunk)
            self.redealt += 1
        return chunk

    @property
    def finished(self) -> bool:
        return not self.waiting and not self.held

    def remaining_ids(self) -> list[str]:
        return sorted(self._all - self.done_ids)

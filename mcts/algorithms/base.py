"""What an algorithm is: a small policy over the shared wave loop in `mcts.search`.

Each wave the loop asks the policy which nodes to expand (`propose`), makes ONE generator
call and ONE reward call for the whole wave across all problems, attaches the children to
the forest, and hands them back (`after_wave`). When a tree retires the policy picks the
ONE answer it stands by (`select`). Policies never call the model themselves, so every
algorithm pays for tokens the same way and is compared at equal cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from mcts.state import BatchState


@dataclass
class Expansion:
    """Ask for `n` continuations of node `node` in tree `tree`.

    to_end: the model writes to the end of the solution (best-of-N); the completion is
    split into steps at the delimiter and attached as a chain under `node`.
    """

    tree: int
    node: int
    n: int
    max_tokens: int
    to_end: bool = False
    group: int = 0  # policy's own tag (beam group / DVTS subtree)


@dataclass
class Children:
    """The nodes an expansion produced: first step of each candidate, and chain ends."""

    expansion: Expansion
    heads: np.ndarray  # node ids of the first new step of each candidate
    tails: np.ndarray  # node ids of the last step of each candidate (== heads unless to_end)


class Policy(Protocol):
    name: str
    slots_per_tree: int  # requests a live tree should add to every wave (for wave fill)

    def start(self, state: BatchState) -> None: ...

    def propose(self, state: BatchState) -> list[Expansion]: ...

    def needs_score(self, terminal: bool) -> bool:
        """Whether a new node must be scored by the reward (self-consistency needs none)."""
        ...

    def after_wave(self, state: BatchState, children: list[Children]) -> None: ...

    def done(self, state: BatchState, tree: int) -> bool:
        """Whether tree `tree` has nothing left to do (budget aside)."""
        ...

    def select(self, state: BatchState, tree: int) -> int:
        """The node whose root path is the chosen solution."""
        ...

    # Optional: `figures(state, tree) -> dict` adds per-problem figures to the results row
    # (beam: beams_per_wave).
    # Optional: `alternatives(state, tree) -> dict[str, int]`, the picks other selection rules
    # would make from the same tree (best-of-N aggregations). The search records them in the
    # result's `picks` so one run compares rules at equal cost.

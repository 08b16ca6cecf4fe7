"""Combinations of rewards: weighted sums and "verifier on terminal steps, another elsewhere".

Each component still gets ONE score call per wave (a switch sends each component only its
share of the items), and token costs add up per item.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from mcts.types import Problem, Reward, ScoreItem
from rewards.base import RewardError, finite_scores, validate_items

__all__ = ["WeightedMix", "TerminalSwitch"]


def _tokens(reward: Reward, n: int, attr: str = "last_tokens") -> np.ndarray:
    t = getattr(reward, attr, None)
    if t is None:
        return np.zeros(n, dtype=np.int64)
    arr = np.asarray(t, dtype=np.int64).reshape(-1)
    return arr if arr.shape[0] == n else np.zeros(n, dtype=np.int64)


def _max_generated(components: Sequence[Reward]) -> int:
    """Worst-case generated tokens per item: the components' (rollouts) add up."""
    return sum(int(getattr(r, "max_generated_tokens", 0) or 0) for r in components)


def _check_component(r: object, where: str) -> None:
    if not callable(getattr(r, "score", None)):
        raise TypeError(f"{where} must be a Reward (an object with score(items)), got {type(r)}")


class WeightedMix:
    """score = sum_i w_i * score_i / sum_i w_i (e.g. 0.5 judge + 0.5 rollout)."""

    def __init__(self, components: Sequence[tuple[float, Reward]]) -> None:
        if not components:
            raise ValueError("mix.components must name at least one (weight, reward)")
        weights = []
        for j, pair in enumerate(components):
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise TypeError(f"mix.components[{j}] must be a (weight, reward) pair")
            w, r = pair
            _check_component(r, f"mix.components[{j}]")
            if isinstance(w, bool) or not isinstance(w, int | float) or not np.isfinite(w) or w < 0:
                raise ValueError(
                    f"mix.components[{j}] weight must be a finite number >= 0, got {w!r}"
                )
            weights.append(float(w))
        if sum(weights) <= 0:
            raise ValueError("mix weights must not all be 0")
        self.weights = np.array(weights) / sum(weights)
        self.components = [r for _, r in components]
        self.name = (
            "mix(" + ",".join(getattr(r, "name", type(r).__name__) for r in self.components) + ")"
        )
        self.requires_reference = any(
            getattr(r, "requires_reference", False) for r in self.components
        )
        self.last_tokens = np.zeros(0, dtype=np.int64)
        self.last_generated_tokens = np.zeros(0, dtype=np.int64)
        self.max_generated_tokens = _max_generated(self.components)

    def check_problems(self, problems: Iterable[Problem]) -> None:
        ps = list(problems)
        for r in self.components:
            if hasattr(r, "check_problems"):
                r.check_problems(ps)

    def score(self, items: Sequence[ScoreItem]) -> np.ndarray:
        validate_items(items, self.name)
        n = len(items)
        total = np.zeros(n)
        tokens = np.zeros(n, dtype=np.int64)
        gen = np.zeros(n, dtype=np.int64)
        for w, r in zip(self.weights, self.components, strict=True):
            s = finite_scores(r.score(items), getattr(r, "name", type(r).__name__), n)
            total += w * s
            tokens += _tokens(r, n)
            gen += _tokens(r, n, "last_generated_tokens")
        self.last_tokens = tokens
        self.last_generated_tokens = gen
        return finite_scores(total, self.name, n)


class TerminalSwitch:
    """`terminal` reward on terminal items (e.g. the verifier), `other` on the rest (e.g. a PRM)."""

    def __init__(self, terminal: Reward, other: Reward) -> None:
        _check_component(terminal, "switch.terminal")
        _check_component(other, "switch.other")
        self.terminal = terminal
        self.other = other
        self.name = (
            f"switch({getattr(terminal, 'name', type(terminal).__name__)}"
            f"|{getattr(other, 'name', type(other).__name__)})"
        )
        self.requires_reference = bool(getattr(terminal, "requires_reference", False)) or bool(
            getattr(other, "requires_reference", False)
        )
        self.last_tokens = np.zeros(0, dtype=np.int64)
        self.last_generated_tokens = np.zeros(0, dtype=np.int64)
        # Only non-terminal items can cost rollouts, and those all go to `other`.
        self.max_generated_tokens = _max_generated([self.other])

    def check_problems(self, problems: Iterable[Problem]) -> None:
        ps = list(problems)
        for r in (self.terminal, self.other):
            if hasattr(r, "check_problems"):
                r.check_problems(ps)

    def score(self, items: Sequence[ScoreItem]) -> np.ndarray:
        validate_items(items, self.name)
        n = len(items)
        out = np.zeros(n)
        tokens = np.zeros(n, dtype=np.int64)
        gen = np.zeros(n, dtype=np.int64)
        term = np.array([it.terminal for it in items], dtype=bool)
        for mask, r in ((term, self.terminal), (~term, self.other)):
            idx = np.flatnonzero(mask)
            if idx.size == 0:
                continue
            sub = [items[i] for i in idx]
            rname = getattr(r, "name", type(r).__name__)
            try:
                out[idx] = finite_scores(r.score(sub), rname, idx.size)
            except RewardError as e:  # name the item by its index in the whole wave
                if e.item_index is None:
                    raise
                j = int(idx[e.item_index])
                raise RewardError(f"{e} (= items[{j}] of the wave)", e.reward, j) from e
            tokens[idx] = _tokens(r, idx.size)
            gen[idx] = _tokens(r, idx.size, "last_generated_tokens")
        self.last_tokens = tokens
        self.last_generated_tokens = gen
        return finite_scores(out, self.name, n)

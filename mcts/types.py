"""Plain data types shared by the search, the generators, the rewards and the exports.

Everything that crosses a module boundary is one of these small frozen dataclasses, so a
user who swaps in their own model or reward only has to speak this vocabulary.
Text lives here and in the Python-side node store; the numba forest only sees numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

Finish = Literal["step", "eos", "length"]
"""Why a generated step ended: the step delimiter, end of sequence, or the max-token limit."""


@dataclass(frozen=True)
class Message:
    """One chat message; generators render a list of them with the model's own chat template."""

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class Problem:
    """One problem to solve. `id` is stable across runs (resume and dedup rely on it)."""

    id: str
    question: str
    answer: str | None = None
    task: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # Optional task-specific scorer: (candidate answer text) -> score in [0, 1].
    # reasoning-gym problems carry their dataset's own `score_answer` here.
    check: Callable[[str], float] | None = field(default=None, compare=False, hash=False)


@dataclass(frozen=True)
class StepRequest:
    """Ask for `n` candidate next steps after `prefix` (the steps so far, already joined).

    The generator renders `messages` with the model's chat template (generation prompt
    on) and appends `prefix`, so requests of one problem share a byte-identical prompt
    prefix and prefix caches pay.
    """

    messages: tuple[Message, ...]
    prefix: str = ""
    n: int = 1
    stop: str = "\n\n"
    max_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 1.0
    seed: int | None = None
    # When True the model may write to the end (used for rollouts / full solutions):
    # the delimiter does not stop it.
    to_end: bool = False


@dataclass(frozen=True)
class Step:
    """One generated candidate step."""

    text: str
    token_ids: tuple[int, ...]
    logprob: float  # sum of the per-token logprobs
    token_logprobs: tuple[float, ...]
    finish: Finish
    count: int = 1  # identical siblings are merged into one Step with count > 1
    # The policy model's hidden state at the end of the step, from the decode that generated
    # it (generators that support it, when features are enabled), float32, shape
    # (n_pieces, dim): one row per piece of `text.split(stop)` (to_end samples run through
    # delimiters; a plain step has one piece). Row i is the state at the last token fed
    # before piece i ended (the state whose logits chose the delimiter / EOS / last token).
    features: Any = field(default=None, compare=False, repr=False)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(1, len(self.token_ids))


@dataclass
class Usage:
    """Exact token accounting. Adds up with `+=`.

    `calls` counts model calls. A backend sets it to 1 on the first Generation of each
    `generate()` call, so a wave's usages sum to one call. `call_id` names the call a usage
    came from (the search stamps it, see mcts.generators.counting): adding usages of the same
    call one after the other counts that call once, so a problem's usage counts the
    generator calls (waves) that included it, however many of its requests a wave held.
    """

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    reward_tokens: int = 0
    calls: int = 0
    call_id: int | None = field(default=None, compare=False, repr=False)

    def __iadd__(self, other: Usage) -> Usage:
        self.prompt_tokens += other.prompt_tokens
        self.cached_prompt_tokens += other.cached_prompt_tokens
        self.generated_tokens += other.generated_tokens
        self.reward_tokens += other.reward_tokens
        if other.call_id is None or other.call_id != self.call_id:
            self.calls += other.calls
        if other.call_id is not None:
            self.call_id = other.call_id
        return self

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "reward_tokens": self.reward_tokens,
            "calls": self.calls,
        }


@dataclass
class Generation:
    """The answer to one StepRequest: its candidate steps (deduplicated) and what it cost.

    `usage.generated_tokens` counts every sampled token, duplicates included: that is
    what was paid for.
    """

    steps: list[Step]
    usage: Usage


@dataclass(frozen=True)
class ContinuationRequest:
    """Score fixed `continuations` after a rendered prompt (e.g. P("Yes") for a judge)."""

    messages: tuple[Message, ...]
    prefix: str = ""
    continuations: tuple[str, ...] = ("Yes", "No")


@runtime_checkable
class Generator(Protocol):
    """A language-model backend. One `generate` call serves a whole wave of leaves."""

    def generate(self, requests: Sequence[StepRequest]) -> list[Generation]: ...

    def logprob_of(self, requests: Sequence[ContinuationRequest]) -> tuple[np.ndarray, list[Usage]]:
        """Summed logprob of each continuation: array (len(requests), n_continuations)."""
        ...


@dataclass(frozen=True)
class ScoreItem:
    """A partial (or complete) solution to score; the last step is the one being judged."""

    question: str
    steps: tuple[str, ...]
    reference: str | None = None
    terminal: bool = False
    problem: Problem | None = None
    # The policy's hidden state at the end of the last step (Step.features row), when the
    # generator returned one: what a learned value model reads instead of the text.
    features: Any = field(default=None, compare=False, repr=False)


@runtime_checkable
class Reward(Protocol):
    """Scores a wave of items at once: one float in [0, 1] each.

    NaN/inf are errors, never silently used. A reward that spends model tokens sets
    `last_tokens` (np.ndarray of ints, one per item of the last call: tokens the reward
    model read) so costs are charged to the right problem; rewards that cost nothing may
    omit it. A reward that WRITES text (MC rollouts) also sets `last_generated_tokens`
    (counted as the problem's generated tokens) and `max_generated_tokens` (its worst case
    per item, reserved inside the token budget so the budget stays a hard bound).
    """

    def score(self, items: Sequence[ScoreItem]) -> np.ndarray: ...

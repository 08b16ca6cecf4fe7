"""Per-problem call counting: which generator calls (waves) included a problem.

A backend reports `Usage.calls = 1` on the first Generation of a `generate()` call only (so a
wave's usages sum to one call). The search adds each request's usage to its problem's total,
so by that convention only the problem of a wave's first request was ever charged a call and
`tokens_calls` read 0 for almost every problem.

`count_calls(generator)` wraps a generator so that every Generation of one call carries
`calls = 1` and the same `call_id`; `Usage.__iadd__` counts a call id once in a row, so a
problem's usage counts the calls that held at least one of its requests: with one generator
call per wave, the waves it took part in. Calls made by a reward (a judge's `logprob_of`,
rollouts) are reward costs and are not counted here.
`mcts.search.Search` wraps the generator it is given, so search(), the Ray workers and a
user's own Search count the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from mcts.types import ContinuationRequest, Generation, Generator, StepRequest, Usage

_CALL_IDS = itertools.count(1)


class CallCountingGenerator:
    """A transparent wrapper: same results, each Generation's usage stamped with its call."""

    def __init__(self, inner: Generator) -> None:
        self.inner = inner

    def generate(self, requests: Sequence[StepRequest]) -> list[Generation]:
        gens = self.inner.generate(requests)
        call = next(_CALL_IDS)
        return [replace(g, usage=replace(g.usage, calls=1, call_id=call)) for g in gens]

    def logprob_of(self, requests: Sequence[ContinuationRequest]) -> tuple[np.ndarray, list[Usage]]:
        return self.inner.logprob_of(requests)

    def __getattr__(self, name: str) -> Any:  # everything else is the inner generator's
        if name == "inner":  # not set yet (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "inner":
            object.__setattr__(self, name, value)
        else:  # e.g. a flag a reward turns on: it belongs to the model, not the wrapper
            setattr(self.inner, name, value)


def count_calls(generator: Generator) -> Generator:
    """`generator` wrapped by CallCountingGenerator (once: a wrapped one is returned as is)."""
    if isinstance(generator, CallCountingGenerator):
        return generator
    return CallCountingGenerator(generator)

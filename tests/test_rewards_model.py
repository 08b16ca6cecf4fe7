"""Judge and rollout values on the real embedded model (few, short)."""

from __future__ import annotations

import numpy as np
import pytest

from mcts.types import ScoreItem
from rewards import LLMJudge, MCRollout

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def generator():
    pytest.importorskip("llama_cpp")
    from mcts.generators.llama_cpp import LlamaCppConfig, LlamaCppGenerator

    return LlamaCppGenerator(LlamaCppConfig(n_ctx=1024, seed=0))  # make install ships the model


Q = "What is 3 + 4?"


def test_judge_on_embedded_model(generator) -> None:
    judge = LLMJudge(generator)
    items = [ScoreItem(Q, ("3 + 4 = 7.",)), ScoreItem(Q, ("3 + 4 = 12.",))]
    a = judge.score(items)
    b = judge.score(items)
    assert a.shape == (2,) and np.all((a > 0) & (a < 1))
    assert np.allclose(a, b)  # logprobs are deterministic
    assert a[0] != a[1]  # the judged text matters
    assert judge.last_tokens.shape == (2,) and np.all(judge.last_tokens > 20)


def test_rollout_on_embedded_model(generator) -> None:
    roll = MCRollout(generator, k=2, max_tokens=16, temperature=0.8, seed=1)
    items = [
        ScoreItem(Q, ("We add 3 and 4.",), reference="7"),
        ScoreItem(Q, ("3 + 4 = 7. The answer is 7.",), reference="7", terminal=True),
    ]
    s = roll.score(items)
    assert s.shape == (2,) and set(np.round(s * 2).tolist()) <= {0.0, 1.0, 2.0}
    assert s[1] == 1.0  # a terminal item is verified directly
    assert roll.last_tokens[0] > 0 and roll.last_tokens[1] == 0
    again = roll.score(items)
    assert np.array_equal(s, again)  # seeded from the item text: reproducible

"""Small deterministic generator and reward for testing the search logic.

The world: every problem is solved in three steps. Steps 1 and 2 are one of four words,
sampled with fixed probabilities that favour "alpha"; step 3 states an answer and ends
the sequence. Only the planted path beta -> beta leads to the right answer (42), so a
greedy decoder (always "alpha") is always wrong and a search guided by the reward below
can find the right path. Costs are exact: each word is one token, the delimiter one more.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence

import numpy as np

from mcts.types import (
    ContinuationRequest,
    Generation,
    Problem,
    ScoreItem,
    Step,
    StepRequest,
    Usage,
)

WORDS = ("alpha", "beta", "gamma", "delta")
LOGP = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
PLANTED = ("beta", "beta")
RIGHT = "42"


def final_step(path: Sequence[str]) -> str:
    if tuple(path) == PLANTED:
        return f"The answer is {RIGHT}."
    wrong = 10 + sum(WORDS.index(w) * (3**i) for i, w in enumerate(path))
    return f"The answer is {wrong}."


def _tok(text: str) -> tuple[int, ...]:
    # crc32, not hash(): str hashes differ between processes (PYTHONHASHSEED), and a Ray
    # worker's ids must equal the driver's
    return tuple(zlib.crc32(w.encode()) % 1000 for w in text.split())


class FakeGenerator:
    """Samples from the planted world; temperature 0 is greedy ("alpha" every time)."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.fail_on_call = fail_on_call

    def _sample_step(self, depth: int, path: list[str], rng, temp: float) -> tuple[str, float, str]:
        if depth >= 2:
            return final_step(path), -0.05, "eos"
        if temp == 0:
            i = 0
        else:
            p = np.exp(LOGP / temp)
            p /= p.sum()
            i = int(rng.choice(4, p=p))
        return WORDS[i], float(LOGP[i]), "step"

    def generate(self, requests: Sequence[StepRequest]) -> list[Generation]:
        self.calls += 1
        self.batch_sizes.append(len(requests))
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("backend died mid-wave")
        out = []
        for r in requests:
            path = [s for s in r.prefix.split(r.stop) if s]
            rng = np.random.default_rng(r.seed)
            prompt_tokens = sum(len(m.content.split()) for m in r.messages) + len(path) * 2
            usage = Usage(prompt_tokens=prompt_tokens, calls=1)
            merged: dict[str, Step] = {}
            for _ in range(r.n):
                cur = list(path)
                texts, lp, finish = [], 0.0, "step"
                while True:
                    text, step_lp, finish = self._sample_step(len(cur), cur, rng, r.temperature)
                    texts.append(text)
                    lp += step_lp
                    cur.append(text)
                    if finish == "eos" or not r.to_end:
                        break
                body = r.stop.join(texts)
                toks = _tok(body)
                n_tok = len(toks) + (1 if finish == "step" else 0)
                if n_tok > r.max_tokens:
                    toks, n_tok, finish = toks[: r.max_tokens], r.max_tokens, "length"
                    body = " ".join(body.split()[: r.max_tokens])
                usage.generated_tokens += n_tok
                if body in merged:
                    s = merged[body]
                    merged[body] = Step(
                        s.text, s.token_ids, s.logprob, s.token_logprobs, s.finish, s.count + 1
                    )
                else:
                    per = (lp / max(1, len(toks)),) * len(toks)
                    merged[body] = Step(body, toks, lp, per, finish)
            out.append(Generation(list(merged.values()), usage))
        return out

    def logprob_of(self, requests: Sequence[ContinuationRequest]):
        arr = np.full((len(requests), 2), np.log(0.5))
        return arr, [Usage(prompt_tokens=1, calls=1) for _ in requests]


class FakePRM:
    """Scores a step 0.9 if the path so far follows the planted path, else 0.2."""

    requires_reference = False

    def __init__(self, bad_value: float | None = None) -> None:
        self.calls = 0
        self.bad_value = bad_value

    def score(self, items: Sequence[ScoreItem]) -> np.ndarray:
        self.calls += 1
        good = (*PLANTED, f"The answer is {RIGHT}.")
        out = np.array([0.9 if tuple(it.steps) == good[: len(it.steps)] else 0.2 for it in items])
        self.last_tokens = np.array([len(it.steps) for it in items])
        if self.bad_value is not None and len(out):
            out[-1] = self.bad_value
        return out


def fake_config(**overrides):
    """A SearchConfig sized for the planted world (three steps, one-token words)."""
    from mcts.config import SearchConfig

    base = dict(
        token_budget=120,
        step_max_tokens=4,
        solution_max_tokens=12,
        min_step_tokens=2,
        max_depth=3,
        n_children=4,
        samples_per_wave=4,
        n_beams=6,
        beam_width=3,
    )
    base.update(overrides)
    return SearchConfig(**base)


def problems(n: int) -> list[Problem]:
    return [Problem(id=f"p{i}", question=f"Planted problem {i}?", answer=RIGHT) for i in range(n)]


class FeatureFakeGenerator(FakeGenerator):
    """FakeGenerator that also returns a hidden state per step, as llama.cpp does.

    The state encodes what a model could know: the last word, the depth, and whether the path
    so far is the planted one (so a value head can learn which steps lead to the answer).
    """

    DIM = 8

    def __init__(self, fail_on_call: int | None = None, sha: str = "fake-model-1") -> None:
        super().__init__(fail_on_call)
        self.features_on = False
        self.sha = sha

    def enable_features(self) -> None:
        self.features_on = True

    def feature_identity(self) -> dict:
        return {
            "backend": "fake",
            "model_sha256": self.sha,
            "layer": "planted",
            "pooling": "last",
            "dim": self.DIM,
        }

    @classmethod
    def state(cls, path: Sequence[str]) -> np.ndarray:
        v = np.zeros(cls.DIM, dtype=np.float32)
        last = path[-1] if path else ""
        if last in WORDS:
            v[WORDS.index(last)] = 1.0
        v[4] = len(path) / 3.0
        v[5] = float(tuple(path[:2]) == PLANTED[: min(2, len(path))])
        v[6] = float(f"The answer is {RIGHT}." in path)
        v[7] = 1.0
        return v

    def generate(self, requests):
        out = super().generate(requests)
        if not self.features_on:
            return out
        done = []
        for r, g in zip(requests, out, strict=True):
            base = [s for s in r.prefix.split(r.stop) if s]
            steps = []
            for s in g.steps:
                pieces = s.text.split(r.stop)
                rows = [self.state(base + pieces[: i + 1]) for i in range(len(pieces))]
                steps.append(
                    Step(
                        s.text,
                        s.token_ids,
                        s.logprob,
                        s.token_logprobs,
                        s.finish,
                        s.count,
                        features=np.stack(rows),
                    )
                )
            done.append(Generation(steps, g.usage))
        return done


class SlowFakeGenerator(FakeGenerator):
    """The fake world plus a fixed latency per generate() call (sleep: no CPU used): a
    stand-in for a model on its own device (benchmarks/ray_*.py)."""

    def __init__(self, call_ms: float = 0.0) -> None:
        super().__init__()
        self.call_s = call_ms / 1000

    def generate(self, requests):
        if self.call_s:
            time.sleep(self.call_s)
        return super().generate(requests)

"""Monte-Carlo rollout value (Math-Shepherd / OmegaPRM): finish the solution k times, verify.

value = fraction of the k completions whose final answer is correct ("soft"), or 1 if any is
("hard"). All items of a wave go to the generator in ONE `generate` call (n=k per item,
to_end=True). Terminal items need no rollout: their own answer is verified directly.
Identical completions come back merged (Step.count) and are weighted by their count.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

import numpy as np

from mcts.answers import VerifyStats, extract_answer, score_answer
from mcts.prompts import DEFAULT_SYSTEM, join_steps, problem_messages
from mcts.types import Generator, Problem, ScoreItem, StepRequest, Usage
from rewards.base import (
    RewardError,
    finite_scores,
    item_problem,
    missing_references,
    validate_items,
)

__all__ = ["MCRollout"]


class MCRollout:
    """Rollout value.

    Costs per item of the last call: `last_tokens` = prompt tokens the rollouts read
    (reward-model tokens), `last_generated_tokens` = tokens they wrote, which the search
    counts as the problem's generated tokens. `max_generated_tokens` (k x max_tokens) is
    the worst case per item, which the search reserves inside the token budget.
    """

    name = "rollout"
    requires_reference = True

    def __init__(
        self,
        generator: Generator,
        k: int = 4,
        mode: str = "soft",
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_p: float = 1.0,
        extract: str = "auto",
        timeout: float = 5.0,
        seed: int | None = 0,
        system: str | None = DEFAULT_SYSTEM,
        delimiter: str = "\n\n",
    ) -> None:
        """seed: rollouts of an item are seeded from (seed, its text), so identical items get
        identical rollouts whatever the wave; None = the generator's own stream."""
        if generator is None or not hasattr(generator, "generate"):
            raise TypeError("rollout needs a Generator with generate() (got none)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"rollout.k must be an int >= 1 (completions per item), got {k!r}")
        if mode not in ("soft", "hard"):
            raise ValueError(
                f"rollout.mode must be 'soft' (fraction) or 'hard' (any), got {mode!r}"
            )
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"rollout.max_tokens must be an int >= 1, got {max_tokens!r}")
        if not timeout > 0:
            raise ValueError(f"rollout.timeout must be > 0 seconds, got {timeout}")
        extract_answer("", extract)  # bad mode -> ValueError now
        self.generator = generator
        self.k = k
        self.mode = mode
        self.max_tokens = max_tokens
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.extract = extract
        self.timeout = float(timeout)
        self.seed = seed
        self.system = system
        self.delimiter = delimiter
        self.stats = VerifyStats()
        self.last_tokens = np.zeros(0, dtype=np.int64)
        self.last_generated_tokens = np.zeros(0, dtype=np.int64)
        self.last_usage: list[Usage] = []

    @property
    def max_generated_tokens(self) -> int:
        """Worst-case tokens the rollouts of one item write (reserved in the budget)."""
        return self.k * self.max_tokens

    def check_problems(self, problems: Iterable[Problem]) -> None:
        """Fail at setup when some problem's rollouts could not be verified."""
        missing = missing_references(problems)
        if missing:
            raise ValueError(
                f"reward 'rollout' verifies completions, but {len(missing)} problem(s) have no "
                f"reference answer or task scorer ({', '.join(missing[:5])})"
            )

    def _seed(self, item: ScoreItem) -> int | None:
        if self.seed is None:
            return None
        key = "\x1f".join((item.question, *item.steps)).encode("utf-8", "surrogatepass")
        return (zlib.crc32(key) ^ (int(self.seed) * 0x9E3779B1)) & 0x7FFFFFFF

    def score(self, items: Sequence[ScoreItem]) -> np.ndarray:
        validate_items(items, self.name)
        problems = [item_problem(it, i, self.name) for i, it in enumerate(items)]
        out = np.zeros(len(items), dtype=np.float64)
        self.last_usage = [Usage() for _ in items]
        todo: list[int] = []
        for i, it in enumerate(items):
            if it.terminal:  # complete already: verify its own answer, no tokens spent
                ans = extract_answer(join_steps(it.steps, self.delimiter), self.extract)
                out[i] = float(score_answer(ans, problems[i], self.timeout, self.stats) >= 1.0)
            else:
                todo.append(i)
        if todo:
            reqs = [
                StepRequest(
                    messages=problem_messages(items[i].question, self.system),
                    prefix=join_steps(items[i].steps, self.delimiter),
                    n=self.k,
                    stop=self.delimiter,
                    max_tokens=self.max_tokens,
                    temperature=self.temperature,
                    top_p=self.top_p,
                    seed=self._seed(items[i]),
                    to_end=True,
                )
                for i in todo
            ]
            gens = self.generator.generate(reqs)
            if len(gens) != len(reqs):
                raise RewardError(
                    f"rollout: generator returned {len(gens)} generations for {len(reqs)} requests",
                    self.name,
                )
            for i, req, gen in zip(todo, reqs, gens, strict=True):
                total = correct = 0
                for step in gen.steps:
                    if not np.isfinite(step.logprob):
                        raise RewardError(
                            f"rollout: non-finite logprob in a completion of items[{i}]; not used",
                            self.name,
                            i,
                        )
                    ans = extract_answer(req.prefix + step.text, self.extract)
                    ok = score_answer(ans, problems[i], self.timeout, self.stats) >= 1.0
                    total += step.count
                    correct += step.count * int(ok)
                if total == 0:
                    raise RewardError(
                        f"rollout: the generator returned no completion for items[{i}]",
                        self.name,
                        i,
                    )
                out[i] = correct / total if self.mode == "soft" else float(correct > 0)
                u = gen.usage
                self.last_usage[i] = Usage(
                    prompt_tokens=u.prompt_tokens,
                    cached_prompt_tokens=u.cached_prompt_tokens,
                    generated_tokens=u.generated_tokens,
                    reward_tokens=u.prompt_tokens,
                    calls=u.calls,
                )
        self.last_tokens = np.array([u.reward_tokens for u in self.last_usage], dtype=np.int64)
        self.last_generated_tokens = np.array(
            [u.generated_tokens for u in self.last_usage], dtype=np.int64
        )
        return finite_scores(out, self.name, len(items))

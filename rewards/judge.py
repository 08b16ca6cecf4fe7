"""LLM-judge value: ask a model whether the partial solution is on track.

Score = P(yes) / (P(yes) + P(no)) from the summed logprobs of the two continuations
(the self-critic value of ReST-MCTS* / AlphaLLM). Normalising against "No" removes the mass
the model puts on other tokens, which for small models is most of it. One `logprob_of` call
per wave.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np

from mcts.prompts import join_steps
from mcts.types import ContinuationRequest, Generator, Message, ScoreItem, Usage
from rewards.base import RewardError, finite_scores, validate_items

__all__ = ["LLMJudge", "DEFAULT_JUDGE_SYSTEM", "DEFAULT_JUDGE_TEMPLATE"]

DEFAULT_JUDGE_SYSTEM = "You are a careful math teacher who checks students' work."
DEFAULT_JUDGE_TEMPLATE = (
    "Problem:\n{question}\n\nPartial solution:\n{steps}\n\n"
    "Is the last step of this partial solution correct and on track to the right answer? "
    "Answer Yes or No."
)


class LLMJudge:
    """P(Yes) vs P(No) after a judging prompt; `last_tokens` counts the tokens scored."""

    name = "judge"
    requires_reference = False  # per instance: True when the template uses {reference}

    def __init__(
        self,
        generator: Generator,
        template: str = DEFAULT_JUDGE_TEMPLATE,
        system: str | None = DEFAULT_JUDGE_SYSTEM,
        yes_text: str = "Yes",
        no_text: str = "No",
        answer_prefix: str = "",
        delimiter: str = "\n\n",
    ) -> None:
        """template: str.format with {question} and {steps} (and optionally {last_step},
        {reference}); answer_prefix: assistant text before the Yes/No token."""
        if generator is None or not hasattr(generator, "logprob_of"):
            raise TypeError("judge needs a Generator with logprob_of() (got none)")
        if not isinstance(template, str) or "{steps}" not in template:
            raise ValueError("judge.template must be a str containing '{steps}' (and '{question}')")
        try:
            template.format(question="q", steps="s", last_step="l", reference="r")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"judge.template has an unknown field {e}; allowed: question, steps, "
                "last_step, reference (double other braces: '{{' '}}')"
            ) from e
        if not yes_text or not no_text or yes_text == no_text:
            raise ValueError(
                "judge.yes_text and judge.no_text must be two different non-empty strings"
            )
        self.generator = generator
        self.template = template
        # A template that shows the reference answer makes the judge an oracle: its
        # accuracy is not a test-time figure (summary and results rows say so).
        self.requires_reference = "reference" in {
            f.split(".")[0].split("[")[0]
            for _, f, _, _ in string.Formatter().parse(template)
            if f is not None
        }
        self.system = system
        self.continuations = (yes_text, no_text)
        self.answer_prefix = answer_prefix
        self.delimiter = delimiter
        self.last_tokens = np.zeros(0, dtype=np.int64)
        self.last_usage: list[Usage] = []

    def request(self, item: ScoreItem) -> ContinuationRequest:
        """The judging request for one item (public so users can inspect the prompt)."""
        steps = join_steps(item.steps, self.delimiter).rstrip()
        user = self.template.format(
            question=item.question,
            steps=steps,
            last_step=item.steps[-1],
            reference=item.reference or "",
        )
        msgs: list[Message] = []
        if self.system:
            msgs.append(Message("system", self.system))
        msgs.append(Message("user", user))
        return ContinuationRequest(tuple(msgs), self.answer_prefix, self.continuations)

    def score(self, items: Sequence[ScoreItem]) -> np.ndarray:
        validate_items(items, self.name)
        self.last_tokens = np.zeros(len(items), dtype=np.int64)
        self.last_usage = []
        if not items:
            return np.zeros(0)
        lp, usages = self.generator.logprob_of([self.request(it) for it in items])
        lp = np.asarray(lp, dtype=np.float64)
        if lp.shape != (len(items), 2) or len(usages) != len(items):
            raise RewardError(
                f"judge: generator.logprob_of returned shape {lp.shape} and {len(usages)} "
                f"usages for {len(items)} items (want ({len(items)}, 2))",
                self.name,
            )
        bad = np.flatnonzero(~np.isfinite(lp).all(axis=1))
        if bad.size:
            i = int(bad[0])
            raise RewardError(
                f"judge: the model returned non-finite logprobs {lp[i].tolist()} for items[{i}]; "
                "not used",
                self.name,
                i,
            )
        # P(yes) / (P(yes) + P(no)) = sigmoid(lp_yes - lp_no), computed stably.
        d = lp[:, 0] - lp[:, 1]
        scores = np.exp(-np.logaddexp(0.0, -d))
        self.last_usage = [_as_reward_usage(u) for u in usages]
        self.last_tokens = np.array([u.reward_tokens for u in self.last_usage], dtype=np.int64)
        return finite_scores(scores, self.name, len(items))


def _as_reward_usage(u: Usage) -> Usage:
    """A generator's usage re-labelled as reward cost: every token the model processed."""
    total = u.prompt_tokens + u.generated_tokens
    return Usage(
        prompt_tokens=u.prompt_tokens,
        cached_prompt_tokens=u.cached_prompt_tokens,
        generated_tokens=u.generated_tokens,
        reward_tokens=total,
        calls=u.calls,
    )

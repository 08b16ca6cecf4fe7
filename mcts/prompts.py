"""How a problem and its steps so far become a StepRequest.

One place for the convention every backend relies on: the assistant's text so far is the
steps joined by the delimiter, with a trailing delimiter, so the next step starts fresh and
all requests of one problem share a byte-identical prompt prefix (prefix caches pay).
"""

from __future__ import annotations

from collections.abc import Sequence

from mcts.types import Message

DEFAULT_SYSTEM = (
    "Solve the problem step by step. Separate steps with a blank line. "
    "End with 'The answer is X.' where X is the final answer."
)


def problem_messages(question: str, system: str | None = DEFAULT_SYSTEM) -> tuple[Message, ...]:
    """The chat messages that open every request for `question`."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    msgs: list[Message] = []
    if system:
        msgs.append(Message("system", system))
    msgs.append(Message("user", question))
    return tuple(msgs)


def join_steps(steps: Sequence[str], delimiter: str = "\n\n") -> str:
    """The assistant prefix for `steps`: each step followed by the delimiter ('' for none)."""
    if not delimiter:
        raise ValueError("delimiter must be a non-empty string (e.g. '\\n\\n')")
    return "".join(s + delimiter for s in steps)

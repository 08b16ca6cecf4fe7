"""A policy's own accuracy on EVAL: one greedy solution per problem, appended as it finishes.

Self-consistency at a token budget is the best-of-N search run with the reward `none`
(its vote pick; mcts/improve/loop.py), so both policies are sampled, budgeted and voted by
the same code. Greedy is a plain full solution at temperature 0 with the run's system
prompt, scored after (the reference is never in the prompt). Rows go to
eval/<tag>/greedy-0/results.jsonl (algorithm "greedy"), so the report reads them like any
run and a rerun skips the problems already there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mcts.answers import extract_answer, is_correct
from mcts.export.results_log import ResultsLog
from mcts.prompts import problem_messages
from mcts.types import Generator, Problem, StepRequest

GREEDY = "greedy"


def greedy_eval(
    problems: list[Problem],
    generator: Generator,
    run_dir: str | Path,
    *,
    system: str | None,
    max_tokens: int,
    extract: str = "auto",
    chunk: int = 16,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Greedy-decode every problem not yet in run_dir; returns all rows for `problems`."""
    log = ResultsLog(Path(run_dir))
    done = log.done_ids(GREEDY)
    todo = [p for p in problems if p.id not in done]
    for start in range(0, len(todo), chunk):
        batch = todo[start : start + chunk]
        reqs = [
            StepRequest(
                problem_messages(p.question, system),
                n=1,
                temperature=0.0,
                max_tokens=max_tokens,
                to_end=True,
            )
            for p in batch
        ]
        for p, out in zip(batch, generator.generate(reqs), strict=True):
            step = out.steps[0]
            answer = extract_answer(step.text, extract)
            ok = bool(is_correct(answer, p))
            log.append(
                {
                    "id": p.id,
                    "algorithm": GREEDY,
                    "question": p.question,
                    "reference": p.answer,
                    "answer": answer,
                    "correct": ok,
                    "pass_at_k": float(ok),
                    "text": step.text,
                    "finish": str(step.finish),
                    "tokens_generated_tokens": int(out.usage.generated_tokens),
                    "tokens_prompt_tokens": int(out.usage.prompt_tokens),
                    "tokens_reward_tokens": 0,
                    "tokens_cached_prompt_tokens": int(out.usage.cached_prompt_tokens),
                    **(extra or {}),
                }
            )
    want = {p.id for p in problems}
    return [r for r in log.rows() if r.get("algorithm") == GREEDY and r["id"] in want]

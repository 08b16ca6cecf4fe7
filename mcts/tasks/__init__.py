"""Problem sources: `load_task(cfg) -> list[Problem]` over a small registry of sources.

Built in: "reasoning_gym" (offline procedural generators) and "jsonl" (GSM8K / MATH style
files). `register_source` lets a user plug in another source without editing this package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mcts.tasks.config import TaskConfig, as_task_config
from mcts.tasks.jsonl import TaskFileError, load_jsonl, question_id, reference_answer
from mcts.tasks.reasoning_gym import GymScorer, known_tasks, load_reasoning_gym
from mcts.types import Problem

__all__ = [
    "GymScorer",
    "TaskConfig",
    "TaskFileError",
    "known_tasks",
    "load_jsonl",
    "load_reasoning_gym",
    "load_task",
    "question_id",
    "reference_answer",
    "register_source",
    "SOURCES",
]


def _rg(cfg: TaskConfig) -> list[Problem]:
    return load_reasoning_gym(cfg.name, size=cfg.size, seed=cfg.seed, params=cfg.params)


def _jsonl(cfg: TaskConfig) -> list[Problem]:
    if cfg.params:
        raise ValueError("task.params is only for reasoning-gym sources; remove it for jsonl")
    return load_jsonl(
        cfg.path or "",
        question_field=cfg.question_field,
        answer_field=cfg.answer_field,
        id_field=cfg.id_field,
        answer_format=cfg.answer_format,
        on_error=cfg.on_error,
        size=cfg.size,
        task=cfg.name if cfg.name != TaskConfig.name else "jsonl",
    )


SOURCES: dict[str, Callable[[TaskConfig], list[Problem]]] = {
    "reasoning_gym": _rg,
    "jsonl": _jsonl,
}


def register_source(name: str, loader: Callable[[TaskConfig], list[Problem]]) -> None:
    """Add a problem source usable as `task.source=<name>`."""
    if not name or not callable(loader):
        raise ValueError("register_source needs a non-empty name and a callable loader")
    SOURCES[name] = loader


def load_task(cfg: Any) -> list[Problem]:
    """The problems a task config describes (a non-empty list with unique ids)."""
    tc = as_task_config(cfg)
    if tc.source not in SOURCES:
        raise ValueError(f"unknown task.source {tc.source!r}; known sources: {sorted(SOURCES)}")
    problems = SOURCES[tc.source](tc)
    if not problems:
        raise ValueError(
            f"task {tc.source}:{tc.name} produced no problems; check task.size / task.path"
        )
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"task {tc.source}:{tc.name} produced duplicate problem id {dup!r}")
    return problems

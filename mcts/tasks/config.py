"""The task config: one flat, Hydra-friendly record naming where problems come from.

Flat (not one class per source) so a sweep can override any field from the command line
(`task.size=200 task.params.max_digits=2`) and a structured config can reject unknown keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class TaskConfig:
    """Where problems come from.

    source: "reasoning_gym" (procedural, offline) or "jsonl" (a user-supplied file).
    name: the reasoning-gym dataset name; for JSONL a label stored in Problem.task.
    size: how many problems. reasoning-gym generates this many (100 when None); a JSONL
        file is cut to its first `size` problems (all when None).
    seed: reasoning-gym generator seed (part of every problem id).
    params: extra keyword arguments of the reasoning-gym dataset config.
    path: the JSONL file.
    question_field / answer_field / id_field: JSONL keys. answer_field None: unlabeled
        problems; id_field None or absent on a line: the id is a hash of the question.
    answer_format: "auto" reduces GSM8K-style "... #### 42" to "42" and MATH-style
        solutions to their last \\boxed{...}; "raw" keeps the field as is.
    on_error: what a malformed JSONL line does: "raise" stops, "skip" warns and skips it.
    """

    source: str = "reasoning_gym"
    name: str = "basic_arithmetic"
    size: int | None = None
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    question_field: str = "question"
    answer_field: str | None = "answer"
    id_field: str | None = "id"
    answer_format: str = "auto"
    on_error: str = "raise"


def as_task_config(cfg: Any) -> TaskConfig:
    """Accept a TaskConfig, a mapping or an OmegaConf node; reject unknown keys by name."""
    if isinstance(cfg, TaskConfig):
        return cfg
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra-core
        pass
    if not isinstance(cfg, dict):
        raise TypeError(
            f"task config must be a TaskConfig, dict or DictConfig, got {type(cfg).__name__}"
        )
    known = {f.name for f in fields(TaskConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown task config key(s) {unknown}; known keys: {sorted(known)}")
    out = TaskConfig(**cfg)
    if out.params is None:
        out.params = {}
    return out

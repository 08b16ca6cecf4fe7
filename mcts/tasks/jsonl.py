"""JSONL problem files (GSM8K / MATH style): one JSON object per line, supplied by the user.

Ids: the `id_field` value when a line has one, else a stable hash of the question, so a
rerun over the same file resumes cleanly. Duplicate ids are an error (resume would skip
the second silently).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

from mcts.types import Problem


class TaskFileError(ValueError):
    """A problem file that cannot be read as configured; the message names file and line."""


def question_id(question: str) -> str:
    """Stable id for a question without one: 'q-' + 16 hex chars of sha256 of the stripped text."""
    return "q-" + hashlib.sha256(question.strip().encode("utf-8")).hexdigest()[:16]


def _last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def reference_answer(text: str, answer_format: str = "auto") -> str:
    """The reference answer from a dataset's answer field.

    auto: GSM8K "rationale #### 42" -> "42"; a MATH solution -> its last \\boxed{} content;
    anything else stripped. raw: unchanged.
    """
    if answer_format == "raw":
        return text
    if answer_format != "auto":
        raise ValueError(f"task.answer_format must be 'auto' or 'raw', got {answer_format!r}")
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    boxed = _last_boxed(text)
    return boxed if boxed is not None else text.strip()


def load_jsonl(
    path: str | os.PathLike[str],
    *,
    question_field: str = "question",
    answer_field: str | None = "answer",
    id_field: str | None = "id",
    answer_format: str = "auto",
    on_error: str = "raise",
    size: int | None = None,
    task: str = "jsonl",
) -> list[Problem]:
    """Read problems from a JSONL file. Blank lines are ignored; see TaskConfig for the fields."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"task.on_error must be 'raise' or 'skip', got {on_error!r}")
    if answer_format not in ("auto", "raw"):
        raise ValueError(f"task.answer_format must be 'auto' or 'raw', got {answer_format!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"task.size must be a positive integer or null, got {size!r}")
    if path is None or str(path) in ("", "???"):
        raise ValueError(
            "task.path is required for a JSONL task: set task.path=/path/to/file.jsonl"
        )
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task.path {path!r} does not exist or is not a file")

    problems: list[Problem] = []
    seen: dict[str, int] = {}
    skipped: list[str] = []

    def bad(lineno: int, why: str) -> None:
        msg = f"{path}:{lineno}: {why}"
        if on_error == "raise":
            raise TaskFileError(msg + " (set task.on_error=skip to skip such lines)")
        skipped.append(msg)

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if size is not None and len(problems) >= size:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                bad(lineno, f"malformed JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(rec, dict):
                bad(lineno, f"expected a JSON object, got {type(rec).__name__}")
                continue
            p = _problem_from(
                rec, lineno, path, question_field, answer_field, id_field, answer_format, task, bad
            )
            if p is None:
                continue
            if p.id in seen:
                raise TaskFileError(
                    f"{path}:{lineno}: duplicate problem id {p.id!r} (first on line {seen[p.id]}); "
                    "ids must be unique for resume to be correct: fix the file's "
                    f"{id_field or 'question'} values"
                )
            seen[p.id] = lineno
            problems.append(p)
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} bad line(s) of {path}; first: {skipped[0]}", stacklevel=2
        )
    if not problems:
        raise TaskFileError(f"{path}: no problems found (file empty or every line skipped)")
    return problems


def _problem_from(
    rec: dict[str, Any],
    lineno: int,
    path: str,
    question_field: str,
    answer_field: str | None,
    id_field: str | None,
    answer_format: str,
    task: str,
    bad: Any,
) -> Problem | None:
    question = rec.get(question_field)
    if not isinstance(question, str) or not question.strip():
        bad(
            lineno,
            f"missing or empty question field {question_field!r} "
            f"(keys: {sorted(rec)}; set task.question_field)",
        )
        return None
    answer: str | None = None
    if answer_field is not None:
        raw = rec.get(answer_field)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            bad(
                lineno,
                f"missing or empty answer field {answer_field!r} "
                f"(keys: {sorted(rec)}; set task.answer_field, or null for unlabeled)",
            )
            return None
        answer = reference_answer(raw if isinstance(raw, str) else json.dumps(raw), answer_format)
    pid: str | None = None
    if id_field is not None and rec.get(id_field) is not None:
        pid = str(rec[id_field])
        if not pid.strip():
            bad(lineno, f"empty id field {id_field!r}")
            return None
    meta = {"source": "jsonl", "path": path, "line": lineno}
    if (
        answer_field is not None
        and isinstance(rec.get(answer_field), str)
        and answer != rec[answer_field]
    ):
        meta["solution"] = rec[answer_field]
    return Problem(
        id=pid or question_id(question),
        question=question,
        answer=answer,
        task=task,
        meta=meta,
    )

"""The configuration fingerprint every results row carries, and the resume check that uses it.

Resume skips the problems results.jsonl already holds. That is only right when they were
searched by the same experiment: rerunning a directory with another budget, model, reward,
seed or task would otherwise skip problems and blend two experiments' accuracies. So each
row records

    fingerprint            a stable 16-hex hash of the fields below
    fingerprint_fields     the fingerprinted settings, flat: "search.token_budget": 256, ...
    reward_uses_reference  whether the reward read the reference answer (oracle-guided)

and a run refuses, before any problem is searched, to resume into a directory whose rows
differ, naming each differing key (old -> new).

What is fingerprinted:
  search.*     every SearchConfig field (system_prompt None as the default prompt's text)
               except those that cannot change a result:
               max_live_trees (how many problems share a wave: request seeds depend only on
               problem, node and wave, never on batch composition), pair_margin and
               pair_min_support (used only by the Parquet exports, which are rebuilt from
               all rows at each run's end)
  generator.*  its `identity()`: backend, model (a local file/folder by SHA-256, a hub id by
               name and revision), chat template, dtype, n_ctx, fallback seed; the model's
               path is recorded (generator.model_path) but not compared, so moving a model
               file changes nothing. A generator without `identity()`: its class only.
  reward.*     rewards.base.reward_identity: class, name, requires_reference and its public
               configuration (judge template, rollout k/temperature/seed, the judge's or
               rollout's generator identity, PRM model, mixture weights and components)
  task.*       the task config (Hydra app / task_config=) except size and on_error, which
               choose how many problems, not which problem an id is. Whatever the source,
               a finished problem whose question or reference differs from the one asked
               now is refused too.
Not fingerprinted: progress bars, the distributed settings (workers, chunks), thread counts,
the backends' batching and memory knobs (llama.cpp batched/n_seq_max/n_batch, vLLM block
size/max_num_seqs/prefix caching/GPU memory, transformers batch_size): like max_live_trees
they decide how requests are scheduled, not what is sampled (seeds are per request; float
differences between batch shapes aside). Nor the code version: an engine upgrade that adds a
SearchConfig field does show up as a differing key (<absent> -> value).

Rows without a fingerprint (written before fingerprints existed) are refused with an error:
nothing says which settings produced them, and resuming into them is exactly the silent
blend this guards against. Results of another algorithm in the same directory are separate
experiments (the ledger is keyed by problem id and algorithm); they must share generator,
reward and task, but may differ in search settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mcts.export.io import jsonable
from mcts.export.results_log import ResultsLog
from mcts.types import Problem

FINGERPRINT_VERSION = 1
# SearchConfig fields that cannot change a result row (see the module docstring).
SEARCH_EXCLUDED = frozenset({"max_live_trees", "pair_margin", "pair_min_support"})
TASK_EXCLUDED = frozenset({"size", "on_error"})
# Recorded for the reader, never compared: where a hashed model lies on this machine.
_INFO_SUFFIX = "model_path"
SECTIONS = ("search", "task", "generator", "reward")


class RunDirMismatchError(ValueError):
    """The run directory holds results of a different configuration (or of unknown one)."""

    def __init__(self, message: str, differences: dict[str, tuple[Any, Any]] | None = None):
        super().__init__(message)
        self.differences = differences or {}


@dataclass(frozen=True)
class Fingerprint:
    fields: dict[str, Any]
    hash: str
    reward_uses_reference: bool = False
    # sections computed: a fingerprint without models (before they load) has search + task
    sections: tuple[str, ...] = SECTIONS

    def row_fields(self) -> dict[str, Any]:
        """What ResultsLog.append adds to every row."""
        return {
            "fingerprint": self.hash,
            "fingerprint_fields": dict(self.fields),
            "reward_uses_reference": bool(self.reward_uses_reference),
        }


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k in sorted(value):
            _flatten(f"{prefix}.{k}", value[k], out)
    elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
        out[f"{prefix}.len"] = len(value)
        for i, v in enumerate(value):
            _flatten(f"{prefix}.{i}", v, out)
    else:
        out[prefix] = value


def _compared(fields: Mapping[str, Any], sections: Iterable[str]) -> dict[str, Any]:
    secs = tuple(sections)
    return {
        k: v
        for k, v in fields.items()
        if not k.endswith(_INFO_SUFFIX) and (k == "version" or k.split(".", 1)[0] in secs)
    }


def _hash(fields: Mapping[str, Any]) -> str:
    blob = json.dumps(
        _compared(fields, SECTIONS), sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def search_identity(config: Any) -> dict[str, Any]:
    """SearchConfig as a dict, minus SEARCH_EXCLUDED; float fields as floats (1 == 1.0), and
    system_prompt None as the default prompt's text (the prompt the policy actually saw)."""
    out = {}
    for f in dataclasses.fields(config):
        if f.name in SEARCH_EXCLUDED:
            continue
        v = getattr(config, f.name)
        if f.type in ("float", float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        out[f.name] = v
    if out.get("system_prompt", "") is None:
        from mcts.prompts import DEFAULT_SYSTEM

        out["system_prompt"] = DEFAULT_SYSTEM
    return out


def task_identity(task_config: Any) -> dict[str, Any] | None:
    """The task config (TaskConfig, dict or DictConfig) minus TASK_EXCLUDED; None if none."""
    if task_config is None:
        return None
    from mcts.tasks.config import as_task_config

    d = dataclasses.asdict(as_task_config(task_config))
    return {k: v for k, v in d.items() if k not in TASK_EXCLUDED}


def model_identities(generator: Any, reward: Any) -> dict[str, Any]:
    """The generator's and reward's identities (computed where the models live: a Ray
    worker returns this dict to the driver)."""
    from mcts.generators.base import generator_identity
    from rewards.base import reward_identity

    return {
        "generator": generator_identity(generator),
        "reward": reward_identity(reward),
        "reward_uses_reference": bool(getattr(reward, "requires_reference", False)),
    }


def run_fingerprint(
    config: Any, task_config: Any = None, models: Mapping[str, Any] | None = None
) -> Fingerprint:
    """The fingerprint of a run. models: `model_identities(...)`; None gives a partial
    fingerprint (search + task) that can be checked before any model loads."""
    tree: dict[str, Any] = {
        "search": search_identity(config),
        "task": task_identity(task_config),
    }
    sections: tuple[str, ...] = ("search", "task")
    if models is not None:
        tree["generator"] = models.get("generator")
        tree["reward"] = models.get("reward")
        sections = SECTIONS
    fields: dict[str, Any] = {"version": FINGERPRINT_VERSION}
    for key in sorted(tree):
        _flatten(key, jsonable(tree[key], key), fields)
    return Fingerprint(
        fields=fields,
        hash=_hash(fields),
        reward_uses_reference=bool(models and models.get("reward_uses_reference")),
        sections=sections,
    )


_ABSENT = "<absent>"


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    keys = sorted(set(old) | set(new))
    return {
        k: (old.get(k, _ABSENT), new.get(k, _ABSENT))
        for k in keys
        if old.get(k, _ABSENT) != new.get(k, _ABSENT)
    }


def _show(v: Any) -> str:
    s = v if v == _ABSENT else json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 120 else s[:117] + "..."


_ADVICE = (
    "Choose a new run directory (hydra.run.dir=... for the app, run_dir=... for search()), "
    "or rerun with the original settings to resume."
)


def check_resume(
    log: ResultsLog,
    fp: Fingerprint,
    problems: Iterable[Problem] | None = None,
) -> None:
    """Raise RunDirMismatchError unless resuming `log` with `fp` (and `problems`) is safe.

    Compares `fp` with every distinct fingerprint in the log: all compared keys for rows of
    the same algorithm, all but search.* for rows of other algorithms. With `problems`, a
    finished problem whose question or reference changed is refused as well.
    """
    rows = log.rows()
    if not rows:
        return
    where = str(log.path)
    legacy = [r for r in rows if not isinstance(r.get("fingerprint_fields"), dict)]
    if legacy:
        raise RunDirMismatchError(
            f"{where} holds {len(legacy)} result(s) written without a configuration "
            f"fingerprint (e.g. problem {legacy[0].get('id')!r}, by an older version): "
            "nothing says which settings produced them, so this run will not resume into "
            "them and risk mixing two experiments. Choose a new run directory "
            "(hydra.run.dir=... for the app, run_dir=... for search())."
        )
    algorithm = fp.fields.get("search.algorithm")
    seen: set[tuple[bool, str]] = set()
    for r in rows:
        same = r.get("algorithm") == algorithm
        key = (same, str(r.get("fingerprint")))
        if key in seen:
            continue
        seen.add(key)
        secs = fp.sections if same else tuple(s for s in fp.sections if s != "search")
        diff = _diff(_compared(r["fingerprint_fields"], secs), _compared(fp.fields, secs))
        if diff:
            n = sum(1 for x in rows if x.get("fingerprint") == r.get("fingerprint"))
            lines = "\n".join(f"  {k}: {_show(a)} -> {_show(b)}" for k, (a, b) in diff.items())
            whose = "" if same else f" (algorithm {r.get('algorithm')!r})"
            raise RunDirMismatchError(
                f"{where} holds {n} result(s){whose} of a different configuration; resuming "
                "would skip their problems and mix two experiments in one results file.\n"
                f"Differing settings (in the directory -> now):\n{lines}\n{_ADVICE}",
                diff,
            )
    if problems is not None:
        mine = {str(r["id"]): r for r in rows if r.get("algorithm") == algorithm}
        changed = []
        for p in problems:
            r = mine.get(p.id)
            if r is not None and (r.get("question"), r.get("reference")) != (p.question, p.answer):
                changed.append(p.id)
        if changed:
            raise RunDirMismatchError(
                f"{where}: {len(changed)} finished problem(s) have the same id but another "
                f"question or reference answer than now (e.g. {changed[:3]}): the task "
                f"changed. {_ADVICE}"
            )

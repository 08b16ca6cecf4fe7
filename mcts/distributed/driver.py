"""Sharded search on Ray: W worker actors, chunks dealt to whoever is free, results streamed
back and appended to the same results.jsonl / exports as a single-process run.

    driver: problems - done_ids - failed.jsonl ids -> chunks -> ChunkLedger
              | deal one chunk to each free worker      (a slow worker holds only its own)
              | ray.wait: the first chunk back          (recorded at once: log.append)
              | a lost node / dead or hung worker: its chunk back to the queue, a new worker
              | a problem failing on N workers: poisoned, appended to failed.jsonl
    worker: builds its own generator + reward from picklable recipes, Search.run(chunk)

The Ray side (placement, deadlines, replacements) is mcts.distributed.fleet; this module is
the run around it: the run directory, the fingerprint, the summary.

Exactly once: a chunk's results come back in one message, so a chunk is recorded whole or
not at all; the ledger refuses an id already recorded, and ResultsLog refuses a duplicate
line. A killed driver loses only chunks in flight: a rerun skips what results.jsonl holds.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from mcts.config import SearchConfig
from mcts.distributed.chunks import default_chunk_size
from mcts.distributed.config import DistributedConfig
from mcts.distributed.errors import DistributedError
from mcts.distributed.factories import Spec, build_generator, build_reward, check_spec
from mcts.distributed.fleet import Fleet, import_ray, start_ray
from mcts.distributed.worker import SearchWorker
from mcts.results import ProblemResult
from mcts.search import SearchResult, empty_stats, summarize
from mcts.types import Problem

__all__ = ["DistributedError", "default_chunk_size", "distributed_search", "run_search"]


def _check_problems(problems: Sequence[Problem]) -> list[Problem]:
    problems = list(problems)
    if not problems:
        raise ValueError("problems is empty: nothing to search (check the task config)")
    counts = Counter(p.id for p in problems)
    dup = sorted(i for i, c in counts.items() if c > 1)
    if dup:
        raise ValueError(f"problem ids must be unique; duplicated: {dup[:5]}")
    return problems


def distributed_search(
    problems: Sequence[Problem],
    generator_factory: Spec,
    reward_factory: Spec | None,
    config: SearchConfig | None = None,
    run_dir: str | Path | None = None,
    *,
    workers: int = 2,
    address: str | None = None,
    chunk_size: int | None = None,
    worker_cpus: float = 0.5,
    worker_gpus: float = 0.0,
    worker_resources: dict[str, float] | None = None,
    max_worker_restarts: int = 3,
    chunk_deadline_s: float | None = None,
    deadline_min_tokens_per_s: float = 2.0,
    deadline_grace_s: float = 300.0,
    poison_after: int = 3,
    retry_failed: bool = False,
    num_cpus: int | None = None,
    runtime_env: dict[str, Any] | None = None,
    namespace: str | None = None,
    progress: bool = False,
    on_result: Callable[[ProblemResult], None] | None = None,
    task_config: Any = None,
) -> SearchResult:
    """`mcts.search.search`, sharded over `workers` Ray actors that each build their own models.

    generator_factory / reward_factory: recipes, not models (see mcts.distributed.factories):
    a generator/reward config dict, a ("module:attr", kwargs) pair or a picklable callable.
    Results come back in the order of `problems` (results.jsonl is in completion order).
    With `run_dir`, finished problems are appended as their chunk returns, problems already
    there are skipped, and the exports are rebuilt at the end, exactly as `search` does.
    `workers=0` runs the plain single-process search on one generator built here.
    If Ray is already initialised that session is used (and left running); otherwise one
    is started (address=None: a private local instance) and shut down at the end.
    As `search`, the driver holds `<run_dir>/.lock` for the whole run and stamps every row
    with the configuration fingerprint: search and task settings are checked against the
    directory before Ray starts, the models' identities (computed on a worker) before any
    chunk is dealt. When nothing is left to search no model is built, so only the search
    and task settings are checked.
    Faults (see docs/distributed.md): a lost node or a crashed / hung worker (past its chunk
    deadline) has its chunk re-dealt; a problem that crashes or hangs `poison_after` different
    workers is skipped and appended to <run_dir>/failed.jsonl (a rerun skips it again unless
    `retry_failed`). Counts by reason are in summary["distributed"].
    """
    dcfg = DistributedConfig(
        workers=workers,
        address=address,
        chunk_size=chunk_size,
        worker_cpus=worker_cpus,
        worker_gpus=worker_gpus,
        worker_resources=worker_resources,
        max_worker_restarts=max_worker_restarts,
        chunk_deadline_s=chunk_deadline_s,
        deadline_min_tokens_per_s=deadline_min_tokens_per_s,
        deadline_grace_s=deadline_grace_s,
        poison_after=poison_after,
        retry_failed=retry_failed,
        num_cpus=num_cpus,
        runtime_env=runtime_env,
        namespace=namespace,
    )
    cfg = config or SearchConfig()
    cfg.validate()
    problems = _check_problems(problems)
    gen_spec = check_spec(generator_factory, "generator_factory")
    reward_spec = check_spec(reward_factory, "reward_factory", optional=True)

    with ExitStack() as held:
        results_log = failed_log = None
        skipped_failed: list[str] = []
        stamp: dict[str, Any] = {}  # the fingerprint fields every results row carries
        if run_dir is not None:
            from mcts.export import (
                ResultsLog,
                check_resume,
                check_writable,
                hold_run_dir,
                run_fingerprint,
            )

            run_dir = Path(run_dir)
            check_writable(run_dir)  # before any model loads
            held.enter_context(hold_run_dir(run_dir))  # one writer per run dir, whole run
            results_log = ResultsLog(run_dir)
            # search + task settings now, before Ray starts or any model loads
            check_resume(results_log, run_fingerprint(cfg, task_config), problems)
            done = results_log.done_ids(cfg.algorithm)
            problems = [p for p in problems if p.id not in done]
            if dcfg.workers != 0:
                from mcts.distributed.failed_log import FailedLog

                failed_log = FailedLog(run_dir)
                if not dcfg.retry_failed:  # poisoned in an earlier run: not again
                    failed = failed_log.ids(cfg.algorithm)
                    skipped_failed = [p.id for p in problems if p.id in failed]
                    problems = [p for p in problems if p.id not in failed]

        def identify(models: dict[str, Any]) -> None:
            """Called once the models are built, before any problem is searched."""
            if results_log is not None:
                fp = run_fingerprint(cfg, task_config, models)
                check_resume(results_log, fp)
                stamp.update(fp.row_fields())

        collected: list[ProblemResult] = []

        def record(res: ProblemResult) -> None:
            if results_log is not None:
                results_log.append(res, extra=stamp)
            collected.append(res)
            if on_result is not None:
                on_result(res)

        def poisoned(row: dict[str, Any]) -> None:
            if failed_log is not None:
                failed_log.append({**row, **stamp})

        t0 = time.perf_counter()
        if not problems:  # everything is in results.jsonl already
            stats, uses_ref, extra = empty_stats(), False, {}
        elif dcfg.workers == 0:
            stats, uses_ref, extra = _run_local(
                problems, gen_spec, reward_spec, cfg, record, progress, identify
            )
        else:
            stats, uses_ref, extra = _run_ray(
                problems, gen_spec, reward_spec, cfg, dcfg, record, progress, identify, poisoned
            )
        wall = time.perf_counter() - t0

        order = {p.id: i for i, p in enumerate(problems)}
        collected.sort(key=lambda r: order[r.problem.id])
        # As search(): with a run dir the figures cover every problem in it (resumed runs too).
        if results_log is not None:
            rows = [r for r in results_log.rows() if r.get("algorithm") == cfg.algorithm]
        else:
            rows = [r.row() for r in collected]
        summary = summarize(rows, stats, wall)
        summary["reward_uses_reference"] = uses_ref
        summary["searched_now"] = len(collected)
        if skipped_failed:
            # poisoned in an earlier run (failed.jsonl); distributed.retry_failed=true retries
            summary["skipped_failed"] = skipped_failed
        if extra:
            # Worker time outside model calls (idle waiting for a chunk included).
            worker_time = wall * extra["workers"]
            model_s = stats["generator_seconds"] + stats["reward_seconds"]
            summary["overhead_share"] = max(0.0, 1 - model_s / worker_time) if worker_time else 0.0
            summary["distributed"] = extra
        if run_dir is not None:
            from mcts.export import write_exports

            summary["exports"] = write_exports(
                run_dir, margin=cfg.pair_margin, min_support=cfg.pair_min_support
            )
        return SearchResult(results=collected, summary=summary)


def _run_local(problems, gen_spec, reward_spec, cfg, record, progress, identify):
    worker = SearchWorker(gen_spec, reward_spec, cfg)
    identify(worker.identity())
    worker.check_problems(problems)
    worker.engine.on_result, worker.engine.progress = record, progress
    worker.engine.run(problems)
    return worker.engine.stats, worker.info()["reward_uses_reference"], {}


def _run_ray(
    problems,
    gen_spec,
    reward_spec,
    cfg,
    dcfg: DistributedConfig,
    record,
    progress,
    identify,
    poisoned,
):
    ray = import_ray()
    t0 = time.perf_counter()
    owned = start_ray(ray, dcfg)
    try:
        fleet = Fleet(
            ray,
            problems,
            gen_spec,
            reward_spec,
            cfg,
            dcfg,
            record=record,
            identify=identify,
            on_poisoned=poisoned,
            progress=progress,
            # a private instance cannot grow: too few resources is an error, not a wait
            strict_resources=owned and dcfg.address is None,
            t0=t0,
        )
        return fleet.run()
    finally:
        if owned:
            ray.shutdown()


def run_search(
    problems: Sequence[Problem],
    generator_cfg: Spec,
    reward_cfg: Spec | None,
    search_cfg: SearchConfig,
    run_dir: str | Path | None = None,
    distributed: DistributedConfig | dict[str, Any] | None = None,
    progress: bool = False,
    task_config: Any = None,
) -> SearchResult:
    """What the Hydra app calls: sharded when `distributed.workers > 0`, else in-process.

    generator_cfg / reward_cfg are the app's config dicts (the reward is dropped for
    self_consistency, which needs none, as the single-process app does). task_config goes
    into the run fingerprint.
    """
    dcfg = (
        distributed
        if isinstance(distributed, DistributedConfig)
        else DistributedConfig.from_dict(distributed)
    )
    reward = None if search_cfg.algorithm == "self_consistency" else reward_cfg
    if dcfg.workers == 0:
        from mcts.search import search

        generator = build_generator(check_spec(generator_cfg, "generator"))
        rew = build_reward(check_spec(reward, "reward", optional=True), generator)
        return search(
            problems,
            generator,
            rew,
            search_cfg,
            run_dir=run_dir,
            progress=progress,
            task_config=task_config,
        )
    return distributed_search(
        problems,
        generator_cfg,
        reward,
        search_cfg,
        run_dir,
        progress=progress,
        task_config=task_config,
        **dcfg.kwargs(),
    )

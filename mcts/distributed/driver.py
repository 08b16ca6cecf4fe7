"""Sharded search on Ray: W worker actors, chunks dealt to whoever is free, results streamed
back and appended to the same results.jsonl / exports as a single-process run.

    driver: problems - done_ids -> chunks -> ChunkLedger
              | deal one chunk to each free worker      (a slow worker holds only its own)
              | ray.wait: the first chunk back          (recorded at once: log.append)
              | a dead worker: its chunk back to the front of the queue, a new worker
    worker: builds its own generator + reward from picklable recipes, Search.run(chunk)

Exactly once: a chunk's results come back in one message, so a chunk is recorded whole or
not at all; the ledger refuses an id already recorded, and ResultsLog refuses a duplicate
line. A killed driver loses only chunks in flight: a rerun skips what results.jsonl holds.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from mcts.config import SearchConfig
from mcts.distributed.chunks import ChunkLedger, make_chunks
from mcts.distributed.config import DistributedConfig
from mcts.distributed.factories import Spec, build_generator, build_reward, check_spec
from mcts.distributed.worker import ChunkOutput, SearchWorker
from mcts.results import ProblemResult
from mcts.search import SearchResult, empty_stats, summarize
from mcts.types import Problem

log = logging.getLogger("mcts.distributed")


class DistributedError(RuntimeError):
    """The sharded run could not finish; what was recorded stays in results.jsonl."""


def _check_problems(problems: Sequence[Problem]) -> list[Problem]:
    problems = list(problems)
    if not problems:
        raise ValueError("problems is empty: nothing to search (check the task config)")
    counts = Counter(p.id for p in problems)
    dup = sorted(i for i, c in counts.items() if c > 1)
    if dup:
        raise ValueError(f"problem ids must be unique; duplicated: {dup[:5]}")
    return problems


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "distributed search needs Ray: pip install 'mcts-reason[ray]' (or 'ray[default]'), "
            "or set distributed.workers=0 for the single-process search"
        ) from e
    return ray


def default_chunk_size(n_problems: int, workers: int, cfg: SearchConfig) -> int:
    """One search batch per chunk, but no fewer chunks than workers."""
    return max(1, min(cfg.max_live_trees, math.ceil(n_problems / max(1, workers))))


class _Stats:
    def __init__(self) -> None:
        self.search: dict[str, float] = {}
        self.chunks = 0
        self.worker_seconds = 0.0
        self.round_trip_seconds = 0.0  # submit -> result in the driver's hands

    def add(self, out: ChunkOutput, round_trip: float) -> None:
        for k, v in out.stats.items():
            self.search[k] = self.search.get(k, 0) + v
        self.chunks += 1
        self.worker_seconds += out.seconds
        self.round_trip_seconds += round_trip


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
    max_worker_restarts: int = 3,
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
    """
    dcfg = DistributedConfig(
        workers=workers,
        address=address,
        chunk_size=chunk_size,
        worker_cpus=worker_cpus,
        worker_gpus=worker_gpus,
        max_worker_restarts=max_worker_restarts,
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
        results_log = None
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

        t0 = time.perf_counter()
        if not problems:  # everything is in results.jsonl already
            stats, uses_ref, extra = empty_stats(), False, {}
        elif dcfg.workers == 0:
            stats, uses_ref, extra = _run_local(
                problems, gen_spec, reward_spec, cfg, record, progress, identify
            )
        else:
            stats, uses_ref, extra = _run_ray(
                problems, gen_spec, reward_spec, cfg, dcfg, record, progress, identify
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


def _start_ray(ray: Any, dcfg: DistributedConfig) -> bool:
    """Use the session already running, or start/join one; True if we must shut it down."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "namespace": dcfg.namespace}
    if dcfg.address is None:
        kwargs["num_cpus"] = dcfg.num_cpus
    else:
        kwargs["address"] = dcfg.address
    if dcfg.runtime_env:
        kwargs["runtime_env"] = dcfg.runtime_env
    ray.init(**kwargs)
    return True


def _check_resources(ray: Any, dcfg: DistributedConfig, n_workers: int, strict: bool) -> None:
    have = ray.cluster_resources()
    for key, per in (("CPU", dcfg.worker_cpus), ("GPU", dcfg.worker_gpus)):
        need = per * n_workers
        if need > have.get(key, 0) + 1e-9:
            msg = (
                f"{n_workers} workers x {key.lower()}s={per} need {need:g} {key}, the Ray "
                f"cluster has {have.get(key, 0):g}: lower distributed.workers or "
                f"distributed.worker_{key.lower()}s"
            )
            if strict:
                raise DistributedError(msg)
            log.warning("%s (waiting for the autoscaler, if any)", msg)


def _run_ray(
    problems, gen_spec, reward_spec, cfg, dcfg: DistributedConfig, record, progress, identify
):
    ray = _import_ray()
    from ray import exceptions as rex

    lost_errors = (
        rex.RayActorError,
        rex.WorkerCrashedError,
        rex.OutOfMemoryError,
        rex.ObjectLostError,
        rex.NodeDiedError,
    )
    size = dcfg.chunk_size or default_chunk_size(len(problems), dcfg.workers, cfg)
    ledger = ChunkLedger(make_chunks(problems, size))
    n_workers = min(dcfg.workers, len(ledger.waiting))
    t_start = time.perf_counter()
    owned = _start_ray(ray, dcfg)
    actor_cls = ray.remote(SearchWorker).options(
        num_cpus=dcfg.worker_cpus,
        num_gpus=dcfg.worker_gpus,
        max_restarts=0,  # the driver replaces dead workers itself and re-deals their chunk
        max_task_retries=0,
    )
    actors: dict[int, Any] = {}
    inflight: dict[Any, tuple[int, float]] = {}  # ObjectRef -> (slot, submit time)
    restarts = 0
    stats = _Stats()
    bar = None
    try:
        _check_resources(ray, dcfg, n_workers, strict=owned and dcfg.address is None)
        for slot in range(n_workers):
            actors[slot] = actor_cls.remote(gen_spec, reward_spec, cfg)
        try:  # surface model-loading errors now, with the worker's traceback
            infos = ray.get([a.info.remote() for a in actors.values()])
        except rex.RayError as e:
            raise DistributedError(f"a worker failed to start (building its models): {e}") from e
        uses_ref = any(i["reward_uses_reference"] for i in infos)
        # the run fingerprint with the models' identities, before any chunk is dealt
        identify(ray.get(actors[0].identity.remote()))
        try:  # the reward's pre-flight check, once, before any chunk is dealt
            ray.get(actors[0].check_problems.remote(problems))
        except rex.RayTaskError as e:
            raise DistributedError(f"the reward rejected the problems: {e}") from e
        startup = time.perf_counter() - t_start
        log.info("%d workers up: %s", n_workers, ", ".join(i["name"] for i in infos))
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(problems), desc=f"{cfg.algorithm} x{n_workers}", unit="problem")

        def fill() -> None:
            busy = {s for s, _ in inflight.values()}
            for slot, actor in actors.items():
                if slot in busy:
                    continue
                chunk = ledger.deal(slot)
                if chunk is None:
                    return
                ref = actor.run_chunk.remote(chunk.id, chunk.problems)
                inflight[ref] = (slot, time.perf_counter())

        fill()
        while not ledger.finished:
            if not inflight:
                left = ledger.remaining_ids()
                raise DistributedError(
                    f"every worker is lost (restarts used: {restarts}); {len(left)} problems "
                    f"unfinished, e.g. {left[:5]}. What finished is in results.jsonl: rerun "
                    "to resume (raise distributed.max_worker_restarts if workers crash often)"
                )
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            slot, sent = inflight.pop(ref)
            try:
                out: ChunkOutput = ray.get(ref)
            except lost_errors as e:
                chunk = ledger.lost(slot)
                log.warning(
                    "worker %d died (%s); chunk %s re-dealt",
                    slot,
                    type(e).__name__,
                    chunk.id if chunk else None,
                )
                ray.kill(actors.pop(slot), no_restart=True)
                if restarts < dcfg.max_worker_restarts:
                    restarts += 1
                    actors[slot] = actor_cls.remote(gen_spec, reward_spec, cfg)
                fill()
                continue
            except rex.RayTaskError as e:
                chunk = ledger.held.get(slot)
                raise DistributedError(
                    f"chunk {chunk.id if chunk else '?'} (problems "
                    f"{list(chunk.ids)[:5] if chunk else []}) failed on worker {slot}: {e}"
                ) from e
            stats.add(out, time.perf_counter() - sent)
            fresh = set(ledger.complete(slot, [r.problem.id for r in out.results]))
            for res in out.results:
                if res.problem.id in fresh:
                    record(res)
                    if bar is not None:
                        bar.update(1)
            fill()
    finally:
        if bar is not None:
            bar.close()
        for actor in actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        if owned:
            ray.shutdown()
    search_stats = {**empty_stats(), **stats.search}
    extra = {
        "workers": n_workers,
        "chunk_size": size,
        "chunks": stats.chunks,
        "redealt_chunks": ledger.redealt,
        "worker_restarts": restarts,
        "address": dcfg.address,
        # ray.init (when started here) + starting the actors + building their models.
        "startup_seconds": startup,
        "worker_seconds": stats.worker_seconds,
        # Ray's cost per chunk: the driver's round trip minus the time spent in the worker.
        "overhead_per_chunk_s": (stats.round_trip_seconds - stats.worker_seconds) / stats.chunks
        if stats.chunks
        else 0.0,
    }
    return search_stats, uses_ref, extra


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

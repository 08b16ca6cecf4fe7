"""The Ray side of a sharded run: workers placed where nodes have room, chunks dealt to the
free ones, deadlines watched, lost workers replaced, poisoned problems given up on.

    start: check the address, join/start Ray, count the room per node for one worker
           (none anywhere: one clear error before any problem is searched), start W actors
    loop:  ray.wait on chunk results and starting workers, up to the next chunk deadline
           - a result: record it (the driver appends results.jsonl), deal the next chunk
           - a worker lost: node_lost (its node is gone) or worker_died (crash); the chunk
             goes back to the queue (ChunkLedger) and a replacement starts if a node has room
           - a deadline passed: the worker is killed (a hung model call never returns by
             itself) and replaced, the chunk re-dealt; after poison_after different workers a
             problem is poisoned: skipped, reported, appended to failed.jsonl
           - no worker left and no room for one: stop, naming what is unfinished

Why replacements are bounded differently: max_worker_restarts counts crashes only (a crash
loop is a bug to stop on); a worker killed at its deadline or lost with its node is replaced
whenever there is room, because poisoning already bounds deadline kills (poison_after per
problem) and a lost node is not the workers' fault.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mcts.config import SearchConfig
from mcts.distributed.chunks import Chunk, ChunkLedger, default_chunk_size, make_chunks
from mcts.distributed.config import DistributedConfig
from mcts.distributed.errors import DistributedError
from mcts.distributed.factories import Spec
from mcts.distributed.placement import (
    capacity_by_node,
    check_address,
    explain_no_room,
    free_slots,
    raylet_reachable,
)
from mcts.distributed.worker import ChunkOutput, SearchWorker
from mcts.results import ProblemResult
from mcts.search import empty_stats
from mcts.types import Problem

log = logging.getLogger("mcts.distributed")

MAX_EVENTS = 200  # re-deal / poison events kept in the summary (counts are always complete)
# Dealing waits for every worker that fits to start (model-load errors surface before any
# chunk, and all start in parallel), but no longer than this after the first is up: a worker
# that cannot be placed (resources held by others) must not idle the ones that are.
START_GRACE_S = 120.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "distributed search needs Ray: pip install 'mcts-reason[ray]' (or 'ray[default]'), "
            "or set distributed.workers=0 for the single-process search"
        ) from e
    return ray


def start_ray(ray: Any, dcfg: DistributedConfig) -> bool:
    """Use the session already running, or start/join one; True if we must shut it down."""
    if dcfg.address is not None:
        try:  # even with a session running: a wrong setting is reported, not ignored
            check_address(dcfg.address)
        except ConnectionError as e:
            raise DistributedError(str(e)) from e
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "namespace": dcfg.namespace}
    if dcfg.address is None:
        kwargs["num_cpus"] = dcfg.num_cpus
    else:
        kwargs["address"] = dcfg.address
    if dcfg.runtime_env:
        kwargs["runtime_env"] = dcfg.runtime_env
    try:
        ray.init(**kwargs)
    except (ConnectionError, TimeoutError, RuntimeError) as e:
        if dcfg.address is None:
            raise
        raise DistributedError(
            f"distributed.address={dcfg.address!r}: could not join the Ray cluster ({e}). "
            "Check that `ray start --head` runs there (and the Ray versions match), or set "
            "distributed.address=null for a private Ray instance on this machine"
        ) from e
    return True


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


@dataclass
class _Worker:
    wid: int  # unique in the run: "different workers" for poisoning are different wids
    actor: Any
    ready: bool = False
    node: str | None = None  # Ray node id, once placed
    name: str = ""
    gpus: list[str] = field(default_factory=list)


@dataclass
class _Pending:
    kind: str  # "start" (the worker's info(): it is built) or "chunk"
    wid: int
    chunk: Chunk | None = None
    sent: float = 0.0
    deadline: float = float("inf")


class Fleet:
    """One sharded run on Ray. `run()` returns (search stats, reward_uses_reference, summary)."""

    def __init__(
        self,
        ray: Any,
        problems: Sequence[Problem],
        gen_spec: Spec,
        reward_spec: Spec | None,
        cfg: SearchConfig,
        dcfg: DistributedConfig,
        record: Callable[[ProblemResult], None],
        identify: Callable[[dict[str, Any]], None],
        on_poisoned: Callable[[dict[str, Any]], None],
        progress: bool = False,
        strict_resources: bool = False,
        t0: float | None = None,
    ) -> None:
        from ray import exceptions as rex

        self.ray, self.rex = ray, rex
        self.problems = list(problems)
        self.cfg, self.dcfg = cfg, dcfg
        self.record, self.identify, self.on_poisoned = record, identify, on_poisoned
        self.progress, self.strict = progress, strict_resources
        self.request = dcfg.request()
        self.lost_errors = (
            rex.RayActorError,  # ActorDiedError, ActorUnavailableError
            rex.WorkerCrashedError,
            rex.OutOfMemoryError,
            rex.ObjectLostError,  # the result object went down with its node
            rex.NodeDiedError,
            rex.LocalRayletDiedError,
        )
        options: dict[str, Any] = {
            "num_cpus": dcfg.worker_cpus,
            "num_gpus": dcfg.worker_gpus,
            "max_restarts": 0,  # the driver replaces lost workers itself and re-deals
            "max_task_retries": 0,
        }
        if dcfg.worker_resources:
            options["resources"] = {k: float(v) for k, v in dcfg.worker_resources.items() if v}
        self.actor_cls = ray.remote(SearchWorker).options(**options)
        self.args = (gen_spec, reward_spec, cfg)
        self.workers: dict[int, _Worker] = {}
        self.pending: dict[Any, _Pending] = {}  # ObjectRef -> what it is
        self.seen: dict[int, _Worker] = {}  # every worker of the run, for reports
        self.next_wid = 0
        self.crash_restarts = 0
        self.restarts = 0
        self.no_room = False
        self.dealing = False
        self.uses_ref = False
        self.nodes_lost: set[str] = set()
        self.events: list[dict[str, Any]] = []
        self.stats = _Stats()
        self.t0 = time.perf_counter() if t0 is None else t0  # for startup_seconds
        self.startup = 0.0
        self.bar: Any = None

    # -- workers -----------------------------------------------------------------------------
    def _start_worker(self) -> None:
        w = _Worker(self.next_wid, self.actor_cls.remote(*self.args))
        self.next_wid += 1
        self.workers[w.wid] = self.seen[w.wid] = w
        self.pending[w.actor.info.remote()] = _Pending("start", w.wid)

    def _drop(self, w: _Worker, reason: str, error: BaseException | None = None) -> None:
        """Forget a lost (or killed) worker, re-deal its chunk, replace it if there is room."""
        self.workers.pop(w.wid, None)
        for ref in [r for r, p in self.pending.items() if p.wid == w.wid]:
            del self.pending[ref]
        try:
            self.ray.kill(w.actor, no_restart=True)
        except Exception:  # already gone with its node
            pass
        if reason == "node_lost" and w.node:
            self.nodes_lost.add(w.node)
        loss = self.ledger.lost(w.wid, reason)
        if loss.chunk is not None and len(self.events) < MAX_EVENTS:
            self.events.append(
                {
                    "at_s": round(time.perf_counter() - self.t0, 3),  # since the run began
                    "unix_time": time.time(),
                    "reason": reason,
                    "worker": w.wid,
                    "node": w.node,
                    "chunk": loss.chunk.id,
                    "problems": list(loss.chunk.ids)[:20],
                    "poisoned": [i for c in loss.poisoned for i in c.ids],
                }
            )
        log.warning(
            "worker %d (%s, node %s) %s%s; chunk %s %s",
            w.wid,
            w.name or "starting",
            (w.node or "?")[:12],
            {"node_lost": "lost with its node", "worker_died": "died", "deadline": "hung"}[reason],
            f" ({type(error).__name__})" if error is not None else "",
            loss.chunk.id if loss.chunk else None,
            "re-dealt" if loss.requeued else ("poisoned" if loss.poisoned else "-"),
        )
        for chunk in loss.poisoned:
            self._poison(chunk)
        self._replace(reason)

    def _replace(self, reason: str) -> None:
        if self.ledger.finished:
            return
        if reason == "worker_died":
            if self.crash_restarts >= self.dcfg.max_worker_restarts:
                log.warning(
                    "not replacing the crashed worker: distributed.max_worker_restarts=%d used",
                    self.dcfg.max_worker_restarts,
                )
                return
        ours = [w.node for w in self.workers.values()]
        if free_slots(self._nodes(), self.request, ours) < 1:
            self.no_room = True
            log.warning("no Ray node has room for a replacement worker; the others carry on")
            return
        if reason == "worker_died":
            self.crash_restarts += 1
        self.restarts += 1
        self._start_worker()

    def _reason(self, w: _Worker, error: BaseException) -> str:
        """node_lost when the worker's node is gone (by the GCS, or its raylet no longer
        answers: a crashed node), else worker_died."""
        if isinstance(error, self.rex.NodeDiedError) or "node has died" in str(error):
            return "node_lost"
        if w.node is not None:
            record = next((n for n in self.ray.nodes() if n["NodeID"] == w.node), None)
            if record is None or not record.get("Alive") or not raylet_reachable(record):
                return "node_lost"
        return "worker_died"

    def _nodes(self) -> list[dict[str, Any]]:
        """ray.nodes() without the nodes this run saw die (the GCS may lag behind)."""
        return [n for n in self.ray.nodes() if n["NodeID"] not in self.nodes_lost]

    # -- chunks ------------------------------------------------------------------------------
    def _begin(self) -> None:
        """Once the first workers are up: fingerprint and pre-flight check, then deal."""
        first = next(w for w in self.workers.values() if w.ready)
        try:
            # the run fingerprint with the models' identities, before any chunk is dealt
            self.identify(self.ray.get(first.actor.identity.remote()))
            try:  # the reward's pre-flight check, once, before any chunk is dealt
                self.ray.get(first.actor.check_problems.remote(self.problems))
            except self.rex.RayTaskError as e:
                raise DistributedError(f"the reward rejected the problems: {e}") from e
        except self.lost_errors as e:  # nothing was searched yet: a rerun starts clean
            raise DistributedError(
                f"worker {first.wid} was lost during the pre-flight checks ({e}); rerun"
            ) from e
        self.startup = time.perf_counter() - self.t0
        self.dealing = True
        up = [w for w in self.workers.values() if w.ready]
        log.info("%d workers up: %s", len(up), ", ".join(w.name for w in up))
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=len(self.problems),
                desc=f"{self.cfg.algorithm} x{len(up)}",
                unit="problem",
            )

    def _fill(self) -> None:
        for w in list(self.workers.values()):
            if not w.ready or w.wid in self.ledger.held:
                continue
            chunk = self.ledger.deal(w.wid)
            if chunk is None:
                return
            now = time.perf_counter()
            limit = self.dcfg.chunk_deadline(len(chunk.problems), self.cfg.token_budget)
            ref = w.actor.run_chunk.remote(chunk.id, chunk.problems)
            self.pending[ref] = _Pending("chunk", w.wid, chunk, now, now + limit)

    def _poison(self, chunk: Chunk) -> None:
        for p in chunk.problems:
            attempts = [
                {
                    "worker": self.seen[wid].name or f"worker {wid}",
                    "node": self.seen[wid].node,
                    "reason": reason,
                }
                for wid, reason in self.ledger.failures.get(p.id, [])
            ]
            row = {
                "id": p.id,
                "algorithm": self.cfg.algorithm,
                "question": p.question,
                "attempts": attempts,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            self.on_poisoned(row)
        log.error(
            "poisoned: problem(s) %s crashed or hung %d different workers; skipped "
            "(see failed.jsonl)",
            list(chunk.ids),
            self.dcfg.poison_after,
        )

    def _handle(self, ref: Any) -> None:
        job = self.pending.pop(ref, None)
        if job is None:
            return
        w = self.workers.get(job.wid)
        if w is None:  # dropped while this was in flight
            return
        try:
            value = self.ray.get(ref)
        except self.rex.RayTaskError as e:
            if job.kind == "start":
                raise DistributedError(
                    f"a worker failed to start (building its models): {e}"
                ) from e
            chunk = job.chunk
            raise DistributedError(
                f"chunk {chunk.id if chunk else '?'} (problems "
                f"{list(chunk.ids)[:5] if chunk else []}) failed on worker {w.wid} "
                f"({w.name}): {e}"
            ) from e
        except self.lost_errors as e:
            if getattr(e, "actor_init_failed", False):
                raise DistributedError(
                    f"a worker failed to start (building its models): {e}"
                ) from e
            self._drop(w, self._reason(w, e), e)
            return
        if job.kind == "start":
            w.ready, w.name = True, value["name"]
            w.node, w.gpus = value.get("node_id"), list(value.get("gpu_ids") or [])
            self.uses_ref = self.uses_ref or bool(value["reward_uses_reference"])
            return
        out: ChunkOutput = value
        self.stats.add(out, time.perf_counter() - job.sent)
        fresh = set(self.ledger.complete(w.wid, [r.problem.id for r in out.results]))
        for res in out.results:
            if res.problem.id in fresh:
                self.record(res)
                if self.bar is not None:
                    self.bar.update(1)

    def _expire(self) -> None:
        """Kill every worker whose chunk is past its deadline (its chunk is re-dealt)."""
        now = time.perf_counter()
        for ref, job in list(self.pending.items()):
            if job.kind != "chunk" or now < job.deadline or ref not in self.pending:
                continue
            done, _ = self.ray.wait([ref], timeout=0)
            if done:  # finished right at the deadline: take the result
                continue
            w = self.workers[job.wid]
            log.warning(
                "chunk %d (problems %s) passed its %.0f s deadline on worker %d: killing it",
                job.chunk.id if job.chunk else -1,
                list(job.chunk.ids)[:5] if job.chunk else [],
                job.deadline - job.sent,
                w.wid,
            )
            self._drop(w, "deadline")

    def _no_workers(self) -> DistributedError:
        left = self.ledger.remaining_ids()
        tail = (
            f"{len(left)} problems unfinished, e.g. {left[:5]}. What finished is in "
            "results.jsonl: rerun the same command to resume"
        )
        if self.no_room:
            nodes = self._nodes()
            if any(capacity_by_node(nodes, self.request).values()):
                why = "the nodes that fit one are full"
            else:
                why = explain_no_room(nodes, self.request)
            return DistributedError(
                f"every worker is lost and no Ray node is left with room for another "
                f"({', '.join(f'{k}={v:g}' for k, v in self.request.items())} each: {why}); "
                f"{tail} once nodes are back"
            )
        return DistributedError(
            f"every worker is lost (restarts used: {self.restarts}); {tail} "
            "(raise distributed.max_worker_restarts if workers crash often)"
        )

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> tuple[dict[str, float], bool, dict[str, Any]]:
        ray, dcfg = self.ray, self.dcfg
        nodes = ray.nodes()
        fits = sum(capacity_by_node(nodes, self.request).values())
        if fits == 0:
            raise DistributedError(
                f"no node of the Ray cluster can host a worker: {explain_no_room(nodes, self.request)}"
            )
        want = fits if dcfg.workers == -1 else dcfg.workers
        size = dcfg.chunk_size or default_chunk_size(len(self.problems), min(want, fits), self.cfg)
        self.ledger = ChunkLedger(make_chunks(self.problems, size), dcfg.poison_after)
        n = min(want, len(self.ledger.waiting))
        if n > fits:
            msg = (
                f"{n} workers x ({', '.join(f'{k}={v:g}' for k, v in self.request.items())}) "
                f"do not fit: the Ray cluster's nodes have room for {fits}; lower "
                "distributed.workers (-1: as many as fit) or the per-worker reservation "
                "(distributed.worker_cpus / worker_gpus / worker_resources)"
            )
            if self.strict:
                raise DistributedError(msg)
            log.warning("%s (the others start if nodes join)", msg)
        try:
            for _ in range(n):
                self._start_worker()
            target = min(n, fits)  # wait for these before dealing (all start in parallel)
            first_up: float | None = None
            while not self.ledger.finished:
                if not self.dealing:
                    ready = sum(w.ready for w in self.workers.values())
                    starting = len(self.workers) - ready
                    if ready and first_up is None:
                        first_up = time.perf_counter()
                    late = first_up is not None and time.perf_counter() - first_up > START_GRACE_S
                    if ready and (ready >= target or not starting or late):
                        self._begin()
                if self.dealing:
                    self._fill()
                if not self.workers:
                    raise self._no_workers()
                if self.ledger.finished:
                    break
                deadlines = [p.deadline for p in self.pending.values() if p.kind == "chunk"]
                if first_up is not None and not self.dealing:
                    deadlines.append(first_up + START_GRACE_S)
                wait = max(0.0, min(deadlines, default=float("inf")) - time.perf_counter())
                ready_refs, _ = ray.wait(list(self.pending), num_returns=1, timeout=min(wait, 60))
                for ref in ready_refs:
                    self._handle(ref)
                if not ready_refs and not any(p.kind == "chunk" for p in self.pending.values()):
                    log.warning(
                        "waiting for %d worker(s) to be placed (each needs %s)",
                        len(self.workers),
                        self.request,
                    )
                self._expire()
        finally:
            if self.bar is not None:
                self.bar.close()
            for w in self.workers.values():
                try:
                    ray.kill(w.actor, no_restart=True)
                except Exception:  # already gone
                    pass
        return {**empty_stats(), **self.stats.search}, self.uses_ref, self._summary(n, size)

    def _summary(self, n: int, size: int) -> dict[str, Any]:
        st, led = self.stats, self.ledger
        if led.redealt or led.poisoned:
            log.warning(
                "re-dealt %d chunk(s) (%s); poisoned %d problem(s)%s",
                led.redealt,
                ", ".join(f"{k}={v}" for k, v in led.redealt_by.items() if v) or "-",
                len(led.poisoned_ids()),
                f": {led.poisoned_ids()[:10]} (see failed.jsonl)" if led.poisoned else "",
            )
        return {
            "workers": n,
            "chunk_size": size,
            "chunks": st.chunks,
            "redealt_chunks": led.redealt,
            # why: node_lost (node gone), worker_died (crash), deadline (hung, killed)
            "redealt_by_reason": dict(led.redealt_by),
            "worker_restarts": self.restarts,
            "poisoned_chunks": len(led.poisoned),
            "poisoned_problems": led.poisoned_ids(),
            "nodes_lost": sorted(self.nodes_lost),
            "events": self.events,
            # where every worker of the run was placed (node id, GPU ids Ray gave it)
            "placement": [
                {"worker": w.wid, "node": w.node, "gpus": w.gpus}
                for w in self.seen.values()
                if w.ready
            ],
            "chunk_deadline_s": self.dcfg.chunk_deadline(size, self.cfg.token_budget),
            "address": self.dcfg.address,
            # ray.init (when started here) + starting the actors + building their models.
            "startup_seconds": self.startup,
            "worker_seconds": st.worker_seconds,
            # Ray's cost per chunk: the driver's round trip minus the time spent in the worker.
            "overhead_per_chunk_s": (st.round_trip_seconds - st.worker_seconds) / st.chunks
            if st.chunks
            else 0.0,
        }

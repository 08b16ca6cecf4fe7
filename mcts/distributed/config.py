"""Settings of a sharded run: how many workers, where the Ray cluster is, what each reserves.

One dataclass shared by the library call (`distributed_search(..., **cfg.kwargs())`) and the
Hydra `distributed:` group, so a typo in either is rejected with the key named.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN


REASONS = ("node_lost", "worker_died", "deadline")  # why a chunk is re-dealt


@dataclass
class DistributedConfig:
    # 0 = no Ray: the plain single-process search (the default of the Hydra app).
    # -1 = as many as the cluster's nodes fit (one per GPU with worker_gpus: 1).
    workers: int = 0
    # None starts a private local Ray instance; "auto" joins the cluster `ray start` made on
    # this node; "<head-ip>:6379" joins that cluster; "ray://host:10001" connects a remote
    # client. Probed before Ray starts: nothing listening there is one clear error.
    address: str | None = None
    # Problems dealt to a worker at a time (the unit of streaming and of re-dealing after a
    # crash). None: min(search.max_live_trees, ceil(problems / workers)).
    chunk_size: int | None = None
    # Resources each worker actor reserves. Keep CPUs fractional on small machines: actors
    # that reserve every core starve Ray's own tasks and the run hangs.
    worker_cpus: float = 0.5
    worker_gpus: float = 0.0
    # Custom Ray resources each worker reserves, e.g. {"mcts_node": 1} with every node started
    # as `ray start --resources='{"mcts_node": 1}'`: exactly one worker per node. From Hydra:
    # +distributed.worker_resources.mcts_node=1 (a new dict key needs the +).
    worker_resources: dict[str, float] | None = field(default_factory=dict)
    # Workers that crashed (not hung, not lost with their node) replaced during one run; past
    # it the survivors carry on. Their chunks are re-dealt either way.
    max_worker_restarts: int = 3
    # Seconds one chunk may take on a worker; past it the worker (a hung model call) is killed
    # and replaced and the chunk re-dealt. None: derived from the chunk's token budget,
    # deadline_grace_s + problems x search.token_budget / deadline_min_tokens_per_s.
    chunk_deadline_s: float | None = None
    # The slowest generation (tokens/s over a whole chunk) still taken for progress.
    deadline_min_tokens_per_s: float = 2.0
    # Fixed part of the derived deadline (first-chunk warm-up: kernel caches, CUDA graphs).
    deadline_grace_s: float = 300.0
    # A problem whose chunk crashed or hung its worker on this many different workers is
    # poisoned: skipped, named in the summary and appended to <run_dir>/failed.jsonl.
    poison_after: int = 3
    # A rerun skips the problems in failed.jsonl unless this is true (say, after a fix).
    retry_failed: bool = False
    # CPUs a locally started Ray instance advertises (None: all cores). Ignored when joining.
    num_cpus: int | None = None
    # Passed to ray.init, e.g. {"working_dir": ".", "excludes": [".venv", "outputs"]} to ship
    # the code to other nodes, or {"env_vars": {...}}.
    runtime_env: dict[str, Any] | None = None
    namespace: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(field: str, msg: str) -> ValueError:
            return ValueError(f"distributed.{field}: {msg}")

        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < -1:
            raise bad(
                "workers",
                f"must be an integer >= -1 (0 = no Ray, -1 = as many as the cluster fits), "
                f"got {self.workers!r}",
            )
        if self.address is not None:
            if not isinstance(self.address, str):
                raise bad("address", f"must be a string or null, got {self.address!r}")
            from mcts.distributed.placement import parse_address

            parse_address(self.address)  # raises naming distributed.address
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool)
            or not isinstance(self.chunk_size, int)
            or self.chunk_size < 1
        ):
            raise bad("chunk_size", f"must be a positive integer or null, got {self.chunk_size!r}")
        if not isinstance(self.worker_cpus, (int, float)) or self.worker_cpus < 0:
            raise bad("worker_cpus", f"must be >= 0 (fractions allowed), got {self.worker_cpus!r}")
        if not isinstance(self.worker_gpus, (int, float)) or self.worker_gpus < 0:
            raise bad(
                "worker_gpus", f"must be >= 0 (1 = one GPU per worker), got {self.worker_gpus!r}"
            )
        if (
            isinstance(self.max_worker_restarts, bool)
            or not isinstance(self.max_worker_restarts, int)
            or self.max_worker_restarts < 0
        ):
            raise bad(
                "max_worker_restarts", f"must be an integer >= 0, got {self.max_worker_restarts!r}"
            )
        if self.worker_resources is not None and (
            not isinstance(self.worker_resources, dict)
            or not all(
                isinstance(k, str)
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
                and v >= 0
                for k, v in self.worker_resources.items()
            )
        ):
            raise bad(
                "worker_resources",
                f"must map resource names to amounts >= 0 (or be null), got {self.worker_resources!r}",
            )
        if self.worker_resources and {"CPU", "GPU"} & set(self.worker_resources):
            raise bad("worker_resources", "set CPU / GPU with worker_cpus / worker_gpus")
        if self.workers == -1 and not self.request():
            raise bad(
                "workers",
                "-1 (as many as the cluster fits) needs a per-worker reservation to count with: "
                "set worker_cpus, worker_gpus or worker_resources above 0",
            )
        if self.chunk_deadline_s is not None and (
            not _number(self.chunk_deadline_s) or self.chunk_deadline_s <= 0
        ):
            raise bad(
                "chunk_deadline_s",
                f"must be > 0 seconds, or null to derive it from the chunk's token budget; "
                f"got {self.chunk_deadline_s!r}",
            )
        if not _number(self.deadline_min_tokens_per_s) or self.deadline_min_tokens_per_s <= 0:
            raise bad(
                "deadline_min_tokens_per_s",
                f"must be > 0 (tokens/s below which a chunk counts as hung), "
                f"got {self.deadline_min_tokens_per_s!r}",
            )
        if not _number(self.deadline_grace_s) or self.deadline_grace_s < 0:
            raise bad("deadline_grace_s", f"must be >= 0 seconds, got {self.deadline_grace_s!r}")
        if (
            isinstance(self.poison_after, bool)
            or not isinstance(self.poison_after, int)
            or (self.poison_after < 1)
        ):
            raise bad(
                "poison_after",
                f"must be an integer >= 1 (workers a problem may fail on), got {self.poison_after!r}",
            )
        if self.num_cpus is not None and (not isinstance(self.num_cpus, int) or self.num_cpus < 1):
            raise bad("num_cpus", f"must be a positive integer or null, got {self.num_cpus!r}")
        if self.runtime_env is not None and not isinstance(self.runtime_env, dict):
            raise bad(
                "runtime_env", f"must be a mapping or null, got {type(self.runtime_env).__name__}"
            )

    def request(self) -> dict[str, float]:
        """The Ray resources one worker reserves (only the non-zero ones)."""
        want = {"CPU": self.worker_cpus, "GPU": self.worker_gpus, **(self.worker_resources or {})}
        return {k: float(v) for k, v in want.items() if v}

    def chunk_deadline(self, n_problems: int, token_budget: int) -> float:
        """Seconds one chunk may run before its worker counts as hung.

        Derived (chunk_deadline_s null) from the chunk's token budget, so a bigger chunk or
        budget gets proportionally longer, and a hung call is still caught in bounded time.
        """
        if self.chunk_deadline_s is not None:
            return float(self.chunk_deadline_s)
        return self.deadline_grace_s + n_problems * token_budget / self.deadline_min_tokens_per_s

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DistributedConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"distributed: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `distributed_search` (everything but nothing-to-do 0)."""
        return asdict(self)

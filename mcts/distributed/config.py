"""Settings of a sharded run: how many workers, where the Ray cluster is, what each reserves.

One dataclass shared by the library call (`distributed_search(..., **cfg.kwargs())`) and the
Hydra `distributed:` group, so a typo in either is rejected with the key named.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class DistributedConfig:
    # 0 = no Ray: the plain single-process search (the default of the Hydra app).
    workers: int = 0
    # None starts a private local Ray instance; "auto" joins the cluster `ray start` made on
    # this node; "ray://host:10001" connects a remote client.
    address: str | None = None
    # Problems dealt to a worker at a time (the unit of streaming and of re-dealing after a
    # crash). None: min(search.max_live_trees, ceil(problems / workers)).
    chunk_size: int | None = None
    # Resources each worker actor reserves. Keep CPUs fractional on small machines: actors
    # that reserve every core starve Ray's own tasks and the run hangs.
    worker_cpus: float = 0.5
    worker_gpus: float = 0.0
    # Dead workers replaced during one run before it gives up (their chunks are re-dealt).
    max_worker_restarts: int = 3
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

        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise bad("workers", f"must be an integer >= 0 (0 = no Ray), got {self.workers!r}")
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
        if self.num_cpus is not None and (not isinstance(self.num_cpus, int) or self.num_cpus < 1):
            raise bad("num_cpus", f"must be a positive integer or null, got {self.num_cpus!r}")
        if self.runtime_env is not None and not isinstance(self.runtime_env, dict):
            raise bad(
                "runtime_env", f"must be a mapping or null, got {type(self.runtime_env).__name__}"
            )

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

"""What Ray itself costs: throughput of the sharded search with 1 vs 2 workers on a fast fake
generator, against the same search in one process, plus the measured per-task overhead.

    .venv/bin/python benchmarks/ray_overhead.py --problems 256 --call-ms 0,20

--call-ms adds a fixed sleep per generator call: 0 shows pure overhead (the search loop is
then all CPU and 2 workers share 2 cores with Ray); 20 stands in for a model call that does
not burn the driver's cores (a GPU, a server), where sharding should scale.
The fake world is tests/fakes.py (deterministic): every configuration must give the same
per-problem results, which is checked before any figure is printed.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mcts.config import SearchConfig  # noqa: E402
from mcts.distributed import distributed_search  # noqa: E402
from mcts.search import search  # noqa: E402
from tests.fakes import FakeGenerator, FakePRM, SlowFakeGenerator, problems  # noqa: E402


class Noop:
    def ping(self, x=None):
        return x


def rows(results):
    return {r.problem.id: {k: v for k, v in r.row().items() if k != "seconds"} for r in results}


def actor_round_trip(ray, n: int = 300) -> tuple[float, float]:
    """Median and p90 seconds of an empty actor call (submit + execute + get)."""
    a = ray.remote(Noop).options(num_cpus=0.25).remote()
    ray.get(a.ping.remote())
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        ray.get(a.ping.remote())
        ts.append(time.perf_counter() - t)
    ray.kill(a)
    ts.sort()
    return statistics.median(ts), ts[int(0.9 * len(ts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--call-ms", default="0,20", help="comma list of per-call latencies")
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--budget", type=int, default=48)
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()

    import ray

    cfg = SearchConfig(
        token_budget=args.budget, step_max_tokens=8, n_children=3, max_live_trees=args.chunk_size
    )
    ps = problems(args.problems)
    search(problems(4), FakeGenerator(), FakePRM(), cfg)  # numba warm-up in the driver

    t = time.perf_counter()
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    init_s = time.perf_counter() - t
    med, p90 = actor_round_trip(ray)

    print(f"machine: {os.cpu_count()} cores; ray {ray.__version__}; ray.init {init_s:.1f} s")
    print(f"empty actor call round trip: median {med * 1e3:.2f} ms, p90 {p90 * 1e3:.2f} ms")
    print(
        f"problems={args.problems} chunk_size={args.chunk_size} budget={args.budget} "
        "(wall time includes starting the worker actors)\n"
    )
    print(
        "| call ms | mode | problems/min after start-up | problems/min incl. start-up | wall s "
        "| worker start-up s | search s in workers (sum) | chunks | Ray overhead per chunk, ms "
        "| result bytes/problem |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for call_ms in [float(x) for x in args.call_ms.split(",")]:
        t = time.perf_counter()
        ref = search(ps, SlowFakeGenerator(call_ms), FakePRM(), cfg)
        wall = time.perf_counter() - t
        nbytes = len(pickle.dumps(ref.results)) / len(ref.results)
        rate = len(ps) / wall * 60
        print(
            f"| {call_ms:g} | 1 process, no Ray | {rate:,.0f} | {rate:,.0f} | {wall:.1f} | - | {wall:.1f} | - | - | {nbytes:,.0f} |"
        )
        want = rows(ref.results)
        for w in [int(x) for x in args.workers.split(",")]:
            t = time.perf_counter()
            res = distributed_search(
                ps, _recipe(call_ms), FakePRM, cfg, workers=w, chunk_size=args.chunk_size
            )
            wall = time.perf_counter() - t
            if rows(res.results) != want:
                raise SystemExit(f"{w} workers gave different per-problem results")
            d = res.summary["distributed"]
            up = d["startup_seconds"]
            print(
                f"| {call_ms:g} | {w} Ray worker{'s' if w > 1 else ''} "
                f"| {len(ps) / (wall - up) * 60:,.0f} | {len(ps) / wall * 60:,.0f} | {wall:.1f} "
                f"| {up:.1f} | {d['worker_seconds']:.1f} | {d['chunks']} | {d['overhead_per_chunk_s'] * 1e3:.1f} | {nbytes:,.0f} |"
            )
    ray.shutdown()


def _recipe(call_ms: float):
    import functools

    return functools.partial(SlowFakeGenerator, call_ms)


if __name__ == "__main__":
    main()

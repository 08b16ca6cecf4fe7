"""Sharded search on 1, 2 and 3 simulated Ray nodes, and the cost of losing one mid-run.

    .venv/bin/python benchmarks/ray_nodes.py --problems 384 --repeats 3 --call-ms 0,20 --write

One `ray.cluster_utils.Cluster` on this machine: a head node (the driver's, no worker slot)
and three worker nodes advertising `mcts_node: 1`; workers reserve it, so N workers sit on N
different nodes. Every configuration runs `--repeats` times, interleaved (1, 2, 3 nodes, then
again), and the medians are reported side by side. Before any figure is printed each run's
per-problem results are checked against the single-process search (they must be equal).

Node loss: 3 workers; once a third of the problems are recorded a helper thread removes one
worker node (`cluster.remove_node`), then adds it back for the next repeat. Two ways:
"shutdown" (the node drains: Ray's GCS knows at once) and "crash" (its raylet and workers
are SIGKILLed, like a machine that dies: the GCS notices only after its health checks).
Reported: detection (node removed -> the driver has re-dealt the chunk), recovery (node
removed -> the lost chunk's problems are recorded by a surviving node), and the run's wall
time against the same run without a loss.

--call-ms adds a sleep to every generator call: 0 = the search loop alone (all CPU, and this
machine's cores are shared by every raylet and worker); 20 = a stand-in for a model on its
own device, where more nodes should mean more throughput.
--write replaces the section "Ray multi-node (issue 16)" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mcts.config import SearchConfig  # noqa: E402
from mcts.distributed import distributed_search  # noqa: E402
from mcts.search import search  # noqa: E402
from tests.fakes import FakeGenerator, FakePRM, SlowFakeGenerator, problems  # noqa: E402

SECTION = "Ray multi-node (issue 16)"
SLOT = {"mcts_node": 1.0}


def rows(results) -> dict:
    return {r.problem.id: {k: v for k, v in r.row().items() if k != "seconds"} for r in results}


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


class Sim:
    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
        )
        for _ in range(3):
            self.cluster.add_node(num_cpus=1, resources=dict(SLOT))

    def worker_nodes(self):
        return list(self.cluster.worker_nodes)


def run_once(ps, recipe, cfg, workers: int, chunk: int, on_result=None):
    t = time.perf_counter()
    res = distributed_search(
        ps,
        recipe,
        FakePRM,
        cfg,
        workers=workers,
        chunk_size=chunk,
        worker_cpus=0.25,
        worker_resources=SLOT,
        on_result=on_result,
    )
    return res, time.perf_counter() - t


def node_loss_once(sim: Sim, ps, recipe, cfg, chunk: int, want: dict, crash: bool) -> dict:
    """3 workers; one node removed once a third of the problems are in."""
    import ray

    recorded: dict[str, float] = {}
    trigger = threading.Event()
    removed: dict[str, float] = {}

    def on_result(res) -> None:
        recorded[res.problem.id] = time.time()
        if len(recorded) == len(ps) // 3:
            trigger.set()

    def remove() -> None:
        if trigger.wait(timeout=600):
            node = sim.worker_nodes()[0]
            removed["id"] = node.node_id
            removed["t"] = time.time()
            sim.cluster.remove_node(node, allow_graceful=not crash)

    killer = threading.Thread(target=remove, daemon=True)
    killer.start()
    res, wall = run_once(ps, recipe, cfg, 3, chunk, on_result)
    killer.join(timeout=60)
    sim.cluster.add_node(num_cpus=1, resources=dict(SLOT))  # back for the next repeat
    end = time.monotonic() + 120  # a crashed node: let the GCS mark it dead before going on
    while time.monotonic() < end and any(
        n["NodeID"] == removed.get("id") and n["Alive"] for n in ray.nodes()
    ):
        time.sleep(0.5)
    if rows(res.results) != want:
        raise SystemExit("a run with a lost node gave different per-problem results")
    d = res.summary["distributed"]
    ev = [e for e in d["events"] if e["reason"] == "node_lost"]
    out = {"wall": wall, "redealt": d["redealt_by_reason"]["node_lost"]}
    if ev and "t" in removed:
        lost = [p for e in ev for p in e["problems"]]
        out["detect"] = min(e["unix_time"] for e in ev) - removed["t"]
        out["recover"] = max(recorded[p] for p in lost) - removed["t"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--problems", type=int, default=384)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--budget", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--call-ms", default="0,20", help="comma list of per-call latencies")
    ap.add_argument("--write", action="store_true", help="write the RESULTS.md section")
    args = ap.parse_args()

    import ray

    cfg = SearchConfig(
        token_budget=args.budget, step_max_tokens=8, n_children=3, max_live_trees=args.chunk_size
    )
    ps = problems(args.problems)
    want = rows(search(ps, FakeGenerator(), FakePRM(), cfg).results)  # also warms numba

    t = time.perf_counter()
    sim = Sim()
    ray.init(
        address=sim.cluster.address,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    up_s = time.perf_counter() - t
    load = os.getloadavg()[0]
    lines = [
        f"Command: `.venv/bin/python benchmarks/ray_nodes.py --problems {args.problems} "
        f"--repeats {args.repeats} --call-ms {args.call_ms} --write` "
        f"({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, Ray {ray.__version__}, "
        f"load average {load:.1f} at the start).",
        "",
        f"Cluster: `ray.cluster_utils.Cluster` on this machine, a head node (driver, no worker "
        f"slot) + 3 worker nodes with `mcts_node: 1` each, 1 CPU each; up in {up_s:.1f} s. "
        f"Workload: tests/fakes.py MCTS, token budget {args.budget}, {args.problems} problems, "
        f"chunk size {args.chunk_size} (= max_live_trees), workers reserve `mcts_node: 1` + "
        f"0.25 CPU, so N workers sit on N nodes. Medians of {args.repeats} interleaved repeats. "
        "Every run's per-problem results equal the single-process search (checked).",
        "",
        "| call ms | nodes (= workers) | problems/min after start-up | problems/min incl. "
        "start-up | wall s | worker start-up s | speed-up vs 1 node (after start-up) |",
        "|---|---|---|---|---|---|---|",
    ]
    loss_lines = [
        "| call ms | how | wall s, 3 nodes, no loss | wall s, a node lost at 1/3 | chunks re-dealt "
        "| detection s (removed -> re-dealt) | recovery s (removed -> its chunk recorded) "
        "| a chunk's normal time s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for call_ms in [float(x) for x in args.call_ms.split(",")]:
        recipe = functools.partial(SlowFakeGenerator, call_ms)
        runs: dict[int, list[tuple[float, ...]]] = {1: [], 2: [], 3: []}
        chunk_s: list[float] = []
        for _ in range(args.repeats):
            for n in (1, 2, 3):
                res, wall = run_once(ps, recipe, cfg, n, args.chunk_size)
                if rows(res.results) != want:
                    raise SystemExit(f"{n} nodes gave different per-problem results")
                d = res.summary["distributed"]
                if len({p["node"] for p in d["placement"]}) != n:
                    raise SystemExit(f"{n} workers did not sit on {n} different nodes")
                up = d["startup_seconds"]
                runs[n].append((len(ps) / (wall - up) * 60, len(ps) / wall * 60, wall, up))
                chunk_s.append(d["worker_seconds"] / max(1, d["chunks"]))
                print(f"call {call_ms:g} ms, {n} nodes: {wall:.1f} s", flush=True)
        base = med([r[0] for r in runs[1]])
        for n in (1, 2, 3):
            after = med([r[0] for r in runs[n]])
            lines.append(
                f"| {call_ms:g} | {n} | {after:,.0f} | {med([r[1] for r in runs[n]]):,.0f} "
                f"| {med([r[2] for r in runs[n]]):.1f} | {med([r[3] for r in runs[n]]):.1f} "
                f"| {after / base:.2f}x |"
            )
        for crash in (False, True):
            how = "crash" if crash else "shutdown"
            losses = [
                node_loss_once(sim, ps, recipe, cfg, args.chunk_size, want, crash)
                for _ in range(args.repeats)
            ]
            for i, x in enumerate(losses):
                print(f"call {call_ms:g} ms, node {how} {i}: {x}", flush=True)
            hit = [x for x in losses if "recover" in x]
            loss_lines.append(
                f"| {call_ms:g} | {how} | {med([r[2] for r in runs[3]]):.1f} "
                f"| {med([x['wall'] for x in losses]):.1f} "
                f"| {sum(x['redealt'] for x in losses)} in {len(losses)} runs "
                f"| {med([x['detect'] for x in hit]):.2f} "
                f"| {med([x['recover'] for x in hit]):.2f} | {med(chunk_s):.2f} |"
            )
    ray.shutdown()
    sim.cluster.shutdown()
    body = "\n".join(
        lines
        + [
            "",
            "Node loss (3 workers on 3 nodes; once a third of the problems are recorded one "
            "worker node is removed with `cluster.remove_node`: shutdown = it drains, so the "
            "GCS knows at once; crash = its raylet and workers are SIGKILLed, like a machine "
            "that dies; no node has a free slot, so the two survivors finish the run; medians "
            "of the repeats):",
            "",
        ]
        + loss_lines
    )
    print()
    print(body)
    if args.write:
        from benchmarks._results import write_section

        write_section(SECTION, body)


if __name__ == "__main__":
    main()

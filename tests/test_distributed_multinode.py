"""Sharded search on a simulated multi-node Ray cluster: workers spread over nodes, a node
removed mid-run, a hung worker, a poisoned problem, GPU placement, a lost driver resumed.

`ray.cluster_utils.Cluster` starts several raylets on this machine, each a Ray node with its
own resources. One cluster serves the module (start-up costs seconds): a head node (the
driver's, no worker slot) and three worker nodes advertising `mcts_node: 1`, so workers that
reserve it land exactly one per node. Nodes a test removes are added back by it.

No test depends on timing: a worker reports "I am inside the chunk" through a marker file
(the event the test waits on, bounded), deadlines are 100x what the fake generator needs,
and every wait and every hang has a bound (the whole test too, via SIGALRM).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mcts.config import SearchConfig
from mcts.distributed import (
    REASONS,
    ChunkLedger,
    DistributedConfig,
    DistributedError,
    FailedLog,
    distributed_search,
    make_chunks,
)
from mcts.distributed.placement import (
    capacity_by_node,
    explain_no_room,
    free_slots,
    node_capacity,
)
from mcts.search import search
from tests.fakes import FakeGenerator, FakePRM, problems

ROOT = Path(__file__).resolve().parents[1]
CFG = SearchConfig(token_budget=48, step_max_tokens=8, n_children=3, max_live_trees=4)
ONE = SearchConfig(**{**CFG.__dict__, "max_live_trees": 1})
SLOT = {"mcts_node": 1.0}  # one worker per worker node
ON_NODES = {"worker_resources": SLOT, "worker_cpus": 0.25}
DEADLINE_S = 20.0  # a chunk of the fake world takes well under 0.5 s, even on a busy box
HANG_S = 150.0  # a "hung" worker gives up after this (it must have been killed long before)
TEST_BOUND_S = 240.0


def rows(results) -> dict[str, dict]:
    return {r.problem.id: {k: v for k, v in r.row().items() if k != "seconds"} for r in results}


def log_ids(run_dir: Path) -> list[str]:
    path = run_dir / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(x)["id"] for x in path.read_text().splitlines() if x.strip()]


def logged_rows(run_dir: Path) -> dict[str, dict]:
    drop = {"seconds", "fingerprint", "fingerprint_fields", "reward_uses_reference"}
    out = {}
    for line in (run_dir / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["id"]] = {k: v for k, v in r.items() if k not in drop}
    return out


def reference_rows(ps, cfg) -> dict[str, dict]:
    return {
        i: json.loads(json.dumps({k: v for k, v in r.items() if k != "seconds"}))
        for i, r in rows(search(ps, FakeGenerator(), FakePRM(), cfg).results).items()
    }


# -- test generators, imported by the workers (tests.test_distributed_multinode:...) --------
class FakeModel(FakeGenerator):
    """The fake model, and for the run fingerprint IS the fake (a run through a harness
    resumes with the plain fake)."""

    def identity(self) -> dict:
        return {"class": "tests.fakes.FakeGenerator"}

    def asks(self, requests, question: str) -> bool:
        return any(m.content == question for r in requests for m in r.messages)


def _claim(marker: Path) -> bool:
    """First caller wins and writes its Ray node id (the event the test waits for)."""
    import ray

    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, ray.get_runtime_context().get_node_id().encode())
    os.close(fd)
    return True


def _hang() -> None:
    """A model call that never returns (bounded, so a missed kill fails instead of hanging)."""
    end = time.monotonic() + HANG_S
    while time.monotonic() < end:
        time.sleep(0.1)
    raise RuntimeError("this worker should have been killed long ago")


class HangOnce(FakeModel):
    """Hangs the first time it is asked `question` (after claiming `marker`); a re-deal of
    the problem on another worker runs normally."""

    def __init__(self, marker: str, question: str) -> None:
        super().__init__()
        self.marker, self.question = Path(marker), question

    def generate(self, requests):
        if self.asks(requests, self.question) and _claim(self.marker):
            _hang()
        return super().generate(requests)


class CrashThenHang(FakeModel):
    """A poisonous problem: the first worker asked it dies (like an OOM kill), every later
    one hangs."""

    def __init__(self, marker: str, question: str) -> None:
        super().__init__()
        self.marker, self.question = Path(marker), question

    def generate(self, requests):
        if self.asks(requests, self.question):
            if _claim(self.marker):
                os._exit(1)
            _hang()
        return super().generate(requests)


# -- bounds ----------------------------------------------------------------------------------
@contextlib.contextmanager
def bounded(seconds: float):
    """Fail the test (TimeoutError in the main thread) if it runs past `seconds`."""

    def expire(signum, frame):
        raise TimeoutError(f"test ran past its bound of {seconds:g} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def wait_for(check, what: str, bound_s: float = 120.0):
    """Poll `check()` until it returns something truthy (bounded)."""
    end = time.monotonic() + bound_s
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {bound_s:g} s waiting for {what}")


def marked(marker: Path):
    return lambda: marker.exists() and marker.read_text()


class NodeKiller(threading.Thread):
    """Removes the node whose id a worker wrote to `marker` (the worker is then provably
    mid-chunk on it). Runs beside the driver, which is blocked in distributed_search."""

    def __init__(self, sim, marker: Path, graceful: bool = True) -> None:
        super().__init__(daemon=True)
        self.sim, self.marker, self.graceful = sim, marker, graceful
        self.removed: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            node_id = wait_for(marked(self.marker), "a worker to block inside its chunk")
            self.sim.remove(node_id, graceful=self.graceful)
            self.removed = node_id
        except BaseException as e:  # reported by the test
            self.error = e


class Sim:
    """The module's cluster, with the resources of each node it added (to add them back)."""

    def __init__(self, ray) -> None:
        from ray.cluster_utils import Cluster

        self.ray = ray
        self.cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
        )
        self.args: dict[str, dict] = {}
        self.slot_nodes = [self.add(num_cpus=1, resources=dict(SLOT)) for _ in range(3)]

    def add(self, **kwargs) -> str:
        node = self.cluster.add_node(**kwargs)
        self.args[node.node_id] = kwargs
        return node.node_id

    def remove(self, node_id: str, graceful: bool = True) -> None:
        """graceful: the node shuts down (the GCS knows at once); else its raylet and
        workers are SIGKILLed, like a crashed machine (the GCS notices ~15 s later)."""
        node = next(n for n in self.cluster.worker_nodes if n.node_id == node_id)
        self.cluster.remove_node(node, allow_graceful=graceful)

    def replace(self, node_id: str) -> str:
        """Add back a node like the removed `node_id` (a fresh id)."""
        new = self.add(**self.args[node_id])
        self.slot_nodes = [new if n == node_id else n for n in self.slot_nodes]
        return new


@pytest.fixture(scope="module")
def sim():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # another module's session: this one needs its own cluster
        ray.shutdown()
    s = Sim(ray)
    ray.init(
        address=s.cluster.address,
        # workers import tests.* and mcts.* whatever directory pytest was started in
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        log_to_driver=False,
    )
    yield s
    ray.shutdown()
    s.cluster.shutdown()


@pytest.fixture
def bound():
    with bounded(TEST_BOUND_S):
        yield


# -- no Ray needed ---------------------------------------------------------------------------
def test_bad_settings_fail_before_anything_starts(tmp_path):
    for kw, key in [
        ({"chunk_deadline_s": 0}, "chunk_deadline_s"),
        ({"chunk_deadline_s": -5.0}, "chunk_deadline_s"),
        ({"deadline_min_tokens_per_s": 0}, "deadline_min_tokens_per_s"),
        ({"poison_after": 0}, "poison_after"),
        ({"workers": -1, "worker_cpus": 0}, "workers"),
        ({"worker_resources": {"GPU": 1}}, "worker_resources"),
        ({"address": "headnode"}, "address"),
    ]:
        with pytest.raises(ValueError, match=rf"distributed\.{key}"):
            distributed_search(problems(2), FakeGenerator, FakePRM, CFG, tmp_path, **kw)
    with pytest.raises(ValueError, match=r"distributed\.chunk_deadline_s.*null"):
        DistributedConfig.from_dict({"workers": 2, "chunk_deadline_s": 0})
    # nothing listens on port 1 of the loopback: refused at once, before Ray starts
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        with pytest.raises(DistributedError, match=r"distributed\.address=.*ray start --head"):
            distributed_search(
                problems(2), FakeGenerator, FakePRM, CFG, tmp_path, workers=1, address=address
            )
    assert not (tmp_path / "results.jsonl").exists()


def test_chunk_deadline_is_derived_from_the_chunk_token_budget():
    d = DistributedConfig(workers=2)
    assert d.chunk_deadline(4, 256) == 300 + 4 * 256 / 2.0
    assert d.chunk_deadline(8, 256) > d.chunk_deadline(4, 256) > d.chunk_deadline(4, 128)
    fast = DistributedConfig(workers=2, deadline_min_tokens_per_s=200, deadline_grace_s=60)
    assert fast.chunk_deadline(256, 2048) == 60 + 256 * 2048 / 200
    assert DistributedConfig(workers=2, chunk_deadline_s=7).chunk_deadline(99, 4096) == 7


def _node(nid: str, alive: bool = True, **res) -> dict:
    return {"NodeID": nid, "Alive": alive, "Resources": res}


def test_placement_counts_room_per_node_not_cluster_totals():
    nodes = [
        _node("head", CPU=1),
        _node("a", CPU=1, mcts_node=1),
        _node("b", CPU=2, GPU=2),
        _node("gone", alive=False, CPU=8, GPU=8),
    ]
    req = {"CPU": 0.25, "GPU": 1}
    assert capacity_by_node(nodes, req) == {"head": 0, "a": 0, "b": 2}
    assert node_capacity({"CPU": 1.0}, {"CPU": 0.1}) == 10  # no float rounding loss
    assert free_slots(nodes, req, ["b"]) == 1 and free_slots(nodes, req, ["b", None]) == 0
    assert free_slots(nodes, {"CPU": 0.25, "mcts_node": 1}, ["a"]) == 0
    msg = explain_no_room(nodes, {"CPU": 0.25, "GPU": 4})
    assert "distributed.worker_gpus=4" in msg and "largest of 3 alive node(s) has 2" in msg
    msg = explain_no_room(nodes, {"CPU": 0.5, "nope": 1})
    assert "distributed.worker_resources.nope=1" in msg and "ray start --resources" in msg
    # each resource exists, but never together on one node: a worker cannot span nodes
    assert "no single node" in explain_no_room(nodes, {"GPU": 1, "mcts_node": 1})


def test_ledger_redeals_by_reason_and_poisons_after_n_workers():
    ledger = ChunkLedger(make_chunks(problems(6), 3), poison_after=2)
    a = ledger.deal("w0")  # p0 p1 p2
    loss = ledger.lost("w0", "node_lost")  # not the problems' fault: whole, no failure
    assert loss.requeued == [a] and ledger.waiting[0] == a and not ledger.failures
    ledger.deal("w1")
    loss = ledger.lost("w1", "worker_died")  # split: the culprit is isolated
    assert [c.ids for c in loss.requeued] == [("p0",), ("p1",), ("p2",)]
    assert [c.ids for c in list(ledger.waiting)[:3]] == [("p0",), ("p1",), ("p2",)]
    for w in ("w2", "w3"):
        ledger.complete(w, ledger.deal(w).ids)  # p0, p1 fine alone
    assert ledger.deal("w4").ids == ("p2",)
    loss = ledger.lost("w4", "deadline")  # second different worker: poisoned
    assert loss.poisoned and not loss.requeued and ledger.poisoned_ids() == ["p2"]
    assert ledger.redealt_by == {"node_lost": 1, "worker_died": 1, "deadline": 0}
    assert ledger.failed_workers("p2") == 2 and set(REASONS) == set(ledger.redealt_by)
    while (c := ledger.deal("w5")) is not None:
        ledger.complete("w5", c.ids)
    assert ledger.finished and ledger.remaining_ids() == []
    assert sorted(ledger.done_ids) == ["p0", "p1", "p3", "p4", "p5"]


def test_failed_log_survives_a_torn_line(tmp_path):
    log = FailedLog(tmp_path)
    log.append({"id": "p1", "algorithm": "mcts"})
    with open(log.path, "a") as f:
        f.write('{"id": "p2", "algor')  # a crash mid-append
    log.append({"id": "p3", "algorithm": "beam"})
    assert log.ids() == {"p1", "p3"} and log.ids("mcts") == {"p1"}


# -- on the simulated cluster ----------------------------------------------------------------
def test_workers_spread_over_nodes_and_give_the_single_process_results(sim, tmp_path, bound):
    ps = problems(12)
    res = distributed_search(
        ps, FakeGenerator, FakePRM, CFG, tmp_path, workers=-1, chunk_size=2, **ON_NODES
    )
    d = res.summary["distributed"]
    assert d["workers"] == 3  # -1: as many as fit, one per node with mcts_node: 1
    assert sorted(p["node"] for p in d["placement"]) == sorted(sim.slot_nodes)
    assert rows(res.results) == rows(search(ps, FakeGenerator(), FakePRM(), CFG).results)
    assert sorted(log_ids(tmp_path)) == sorted(p.id for p in ps)
    assert d["redealt_chunks"] == 0 and d["poisoned_problems"] == []


@pytest.mark.model
def test_embedded_model_on_three_nodes_matches_one_process(sim, bound):
    """llama.cpp: equal when batching is equal (one problem per batch on both sides);
    prompt-cache hits depend on the previous call in a process, so they are left out."""
    from mcts.distributed import build_generator, build_reward
    from mcts.tasks import load_task

    ps = load_task({"source": "reasoning_gym", "name": "basic_arithmetic", "size": 3})
    gen = {"backend": "llama_cpp", "n_threads": 1}
    cfg = SearchConfig(token_budget=32, step_max_tokens=16, n_children=2, max_live_trees=1)
    g = build_generator(gen)
    ref = search(ps, g, build_reward({"name": "verifier"}, g), cfg)
    res = distributed_search(
        ps, gen, {"name": "verifier"}, cfg, workers=3, chunk_size=1, **ON_NODES
    )

    def strip(rs):
        return {
            i: {k: v for k, v in r.items() if k != "tokens_cached_prompt_tokens"}
            for i, r in rows(rs).items()
        }

    assert strip(res.results) == strip(ref.results)
    assert len({p["node"] for p in res.summary["distributed"]["placement"]}) == 3


@pytest.mark.parametrize("graceful", [True, False], ids=["shutdown", "crash"])
def test_node_lost_mid_run_redeals_its_chunk_to_the_surviving_nodes(sim, tmp_path, bound, graceful):
    ps = problems(9)
    marker = tmp_path / "blocked.node"
    recipe = (
        "tests.test_distributed_multinode:HangOnce",
        {"marker": str(marker), "question": ps[0].question},
    )
    killer = NodeKiller(sim, marker, graceful)
    killer.start()
    try:
        res = distributed_search(
            ps, recipe, FakePRM, ONE, tmp_path, workers=3, chunk_size=1, **ON_NODES
        )
    finally:
        killer.join(timeout=130)
        if killer.removed:
            sim.replace(killer.removed)
    assert killer.error is None and killer.removed
    d = res.summary["distributed"]
    assert d["redealt_by_reason"] == {"node_lost": 1, "worker_died": 0, "deadline": 0}
    assert d["redealt_chunks"] == 1 and d["nodes_lost"] == [killer.removed]
    assert d["events"][0]["reason"] == "node_lost" and d["events"][0]["problems"] == ["p0"]
    assert d["events"][0]["node"] == killer.removed
    # no node had a free slot (one per node, two survivors busy): no replacement started
    assert d["worker_restarts"] == 0 and d["poisoned_problems"] == []
    assert sorted(log_ids(tmp_path)) == sorted(p.id for p in ps)  # each exactly once
    assert rows(res.results) == rows(search(ps, FakeGenerator(), FakePRM(), ONE).results)


DRIVER = """
import sys
import ray
from mcts.distributed import distributed_search
from tests.test_distributed_multinode import ONE, ON_NODES
from tests.fakes import FakePRM, problems

address, run_dir, marker, root = sys.argv[1:5]
ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": root}})
ps = problems(4)
recipe = ("tests.test_distributed_multinode:HangOnce", {"marker": marker, "question": ps[3].question})
distributed_search(ps, recipe, FakePRM, ONE, run_dir, workers=2, chunk_size=1, **ON_NODES)
"""


def test_no_node_left_stops_then_a_lost_driver_resumes(sim, tmp_path, bound):
    ps = problems(4)
    # 1. the only node a worker fits on is lost mid-chunk: a clear stop, p0 p1 kept
    solo = sim.add(num_cpus=1, resources={"mcts_solo": 1})
    m1 = tmp_path / "solo.node"
    recipe = (
        "tests.test_distributed_multinode:HangOnce",
        {"marker": str(m1), "question": ps[2].question},
    )
    killer = NodeKiller(sim, m1)
    killer.start()
    try:
        with pytest.raises(DistributedError, match=r"no Ray node is left with room.*mcts_solo"):
            distributed_search(
                ps,
                recipe,
                FakePRM,
                ONE,
                tmp_path,
                workers=1,
                chunk_size=1,
                worker_cpus=0.25,
                worker_resources={"mcts_solo": 1},
            )
    finally:
        killer.join(timeout=130)
    assert killer.error is None and killer.removed == solo
    assert log_ids(tmp_path) == ["p0", "p1"]

    # 2. a rerun whose driver process is SIGKILLed while p3 is in flight (p2 recorded)
    m2 = tmp_path / "driver.node"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    err = tmp_path / "driver.err"
    with open(err, "wb") as f:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, sim.cluster.address, str(tmp_path), str(m2), str(ROOT)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=f,
        )
        try:
            wait_for(
                lambda: (marked(m2)() and len(log_ids(tmp_path)) == 3) or driver.poll() is not None,
                "p2 recorded, p3 hung",
            )
        finally:
            driver.kill()
            driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL, err.read_text()[-2000:]
    assert sorted(log_ids(tmp_path)) == ["p0", "p1", "p2"]

    # 3. the same command again resumes: only p3 is searched, every problem once
    res = distributed_search(ps, FakeGenerator, FakePRM, ONE, tmp_path, workers=2, **ON_NODES)
    assert [r.problem.id for r in res.results] == ["p3"]
    assert sorted(log_ids(tmp_path)) == ["p0", "p1", "p2", "p3"]
    assert logged_rows(tmp_path) == reference_rows(ps, ONE)
    assert res.summary["exports"]["counts"]["problems"] == 4


def test_hung_worker_is_killed_at_its_deadline_and_replaced(sim, tmp_path, bound):
    ps = problems(6)
    marker = tmp_path / "hung.node"
    recipe = (
        "tests.test_distributed_multinode:HangOnce",
        {"marker": str(marker), "question": ps[1].question},
    )
    t = time.monotonic()
    res = distributed_search(
        ps,
        recipe,
        FakePRM,
        ONE,
        tmp_path,
        workers=2,
        chunk_size=1,
        chunk_deadline_s=DEADLINE_S,
        **ON_NODES,
    )
    assert time.monotonic() - t < HANG_S  # the hang was cut, not waited out
    d = res.summary["distributed"]
    assert d["redealt_by_reason"] == {"node_lost": 0, "worker_died": 0, "deadline": 1}
    assert d["worker_restarts"] == 1 and d["poisoned_problems"] == []
    assert [(e["reason"], e["problems"]) for e in d["events"]] == [("deadline", ["p1"])]
    assert d["chunk_deadline_s"] == DEADLINE_S
    assert sorted(log_ids(tmp_path)) == sorted(p.id for p in ps)
    assert rows(res.results) == rows(search(ps, FakeGenerator(), FakePRM(), ONE).results)


def test_poisoned_problem_is_skipped_reported_and_retried_on_request(sim, tmp_path, bound):
    ps = problems(6)
    marker = tmp_path / "poison.node"
    recipe = (
        "tests.test_distributed_multinode:CrashThenHang",
        {"marker": str(marker), "question": ps[2].question},
    )
    kw = dict(workers=2, chunk_size=2, chunk_deadline_s=DEADLINE_S, poison_after=2, **ON_NODES)
    res = distributed_search(ps, recipe, FakePRM, CFG, tmp_path, **kw)
    d = res.summary["distributed"]
    # chunk [p2, p3] crashed its worker: re-dealt one problem per chunk, p3 then finished;
    # p2 alone hung a second worker: poisoned (not re-dealt again)
    assert d["poisoned_problems"] == ["p2"] and d["poisoned_chunks"] == 1
    assert d["redealt_by_reason"] == {"node_lost": 0, "worker_died": 1, "deadline": 0}
    assert [e["reason"] for e in d["events"]] == ["worker_died", "deadline"]
    assert d["events"][1]["poisoned"] == ["p2"]
    failed = FailedLog(tmp_path).rows()
    assert [r["id"] for r in failed] == ["p2"]
    assert [a["reason"] for a in failed[0]["attempts"]] == ["worker_died", "deadline"]
    assert len({a["worker"] for a in failed[0]["attempts"]}) == 2
    assert (
        failed[0]["fingerprint"]
        == json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])["fingerprint"]
    )
    assert sorted(log_ids(tmp_path)) == ["p0", "p1", "p3", "p4", "p5"]
    want = reference_rows(ps, CFG)
    assert logged_rows(tmp_path) == {i: r for i, r in want.items() if i != "p2"}

    # a rerun skips it again (no Ray needed: nothing is left) ...
    again = distributed_search(ps, FakeGenerator, FakePRM, CFG, tmp_path, **kw)
    assert again.summary["skipped_failed"] == ["p2"] and again.summary["searched_now"] == 0
    # ... unless asked to retry it (the cause fixed: here, a healthy model)
    retry = distributed_search(ps, FakeGenerator, FakePRM, CFG, tmp_path, retry_failed=True, **kw)
    assert [r.problem.id for r in retry.results] == ["p2"]
    assert logged_rows(tmp_path) == want


def test_gpu_placement_one_worker_per_gpu(sim, tmp_path, bound):
    from omegaconf import OmegaConf

    # a CPU-only cluster: one clear error naming the setting, before any problem is searched
    with pytest.raises(DistributedError, match=r"distributed\.worker_gpus=1 .*CPU-only"):
        distributed_search(
            problems(2), FakeGenerator, FakePRM, CFG, tmp_path, workers=2, worker_gpus=1
        )
    with pytest.raises(DistributedError, match=r"distributed\.worker_resources\.nope=1"):
        distributed_search(
            problems(2),
            FakeGenerator,
            FakePRM,
            CFG,
            tmp_path,
            workers=2,
            worker_resources={"nope": 1},
        )
    assert not (tmp_path / "results.jsonl").exists()

    # two nodes with two (fake) GPUs each; the shipped gpu_node config: one worker per GPU
    gpu_nodes = [sim.add(num_cpus=1, num_gpus=2) for _ in range(2)]
    try:
        raw = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/distributed/gpu_node.yaml"))
        dcfg = DistributedConfig.from_dict({**raw, "worker_cpus": 0.25, "chunk_size": 2})
        assert dcfg.workers == -1 and dcfg.worker_gpus == 1
        ps = problems(8)
        res = distributed_search(ps, FakeGenerator, FakePRM, CFG, tmp_path, **dcfg.kwargs())
    finally:
        for n in gpu_nodes:
            sim.remove(n)
    place = res.summary["distributed"]["placement"]
    assert res.summary["distributed"]["workers"] == 4
    assert sorted(p["node"] for p in place) == sorted(gpu_nodes * 2)
    assert all(len(p["gpus"]) == 1 for p in place)  # one GPU each, never shared
    for n in gpu_nodes:
        assert sorted(p["gpus"][0] for p in place if p["node"] == n) == ["0", "1"]
    assert rows(res.results) == rows(search(ps, FakeGenerator(), FakePRM(), CFG).results)

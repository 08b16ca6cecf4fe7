"""Sharded search on Ray: same per-problem results as one process, every problem exactly once
through worker crashes, a killed driver and resumes.

One local Ray session serves the whole module (ray.init costs seconds and ~1 GiB); actors
reserve fractional CPUs (Ray hangs on 2 cores if actors reserve every core). The logic
tests use the deterministic fake generator from tests/fakes.py.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcts.config import ALGORITHMS, SearchConfig
from mcts.distributed import (
    ChunkLedger,
    DistributedConfig,
    DistributedError,
    SearchWorker,
    build_generator,
    build_reward,
    check_spec,
    default_chunk_size,
    distributed_search,
    make_chunks,
)
from mcts.search import Search, search
from tests.fakes import FakeGenerator, FakePRM, problems

ROOT = Path(__file__).resolve().parents[1]
CFG = SearchConfig(token_budget=48, step_max_tokens=8, n_children=3, max_live_trees=4)


def _canon(v):
    return "nan" if isinstance(v, float) and math.isnan(v) else v


def tree_key(g) -> tuple:
    """Every node and edge attribute of a tree (NaN-safe), without its slot in the batch."""
    nodes = sorted((n, sorted((k, _canon(v)) for k, v in d.items())) for n, d in g.nodes(data=True))
    graph = sorted((k, _canon(v)) for k, v in g.graph.items() if k != "tree")
    return nodes, sorted(g.edges()), graph


def rows(results) -> dict[str, dict]:
    """Per-problem records and whole trees, without wall time (never reproducible)."""
    return {
        r.problem.id: {
            **{k: v for k, v in r.row().items() if k != "seconds"},
            "tree": tree_key(r.tree),
        }
        for r in results
    }


def log_ids(run_dir: Path) -> list[str]:
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    return [json.loads(line)["id"] for line in lines if line.strip()]


# -- test generators, imported by the workers (by reference: tests.test_distributed) --------
class SameModelAsFake(FakeGenerator):
    """A test harness around the fake model: for the run fingerprint it IS the fake (a run
    that crashed through it resumes with the plain fake)."""

    def identity(self) -> dict:
        return {"class": "tests.fakes.FakeGenerator"}


class BlockOnce(SameModelAsFake):
    """Blocks the first time it sees `question` (after writing its pid to `marker`) so the
    test can kill this worker while it is provably mid-chunk; later attempts run normally."""

    def __init__(self, marker: str, question: str) -> None:
        super().__init__()
        self.marker, self.question = Path(marker), question

    def generate(self, requests):
        if any(m.content == self.question for r in requests for m in r.messages):
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass  # a re-deal: this problem's first worker was killed already
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                time.sleep(120)  # killed long before; if not, the test fails (no re-deal)
        return super().generate(requests)


class CrashOn(SameModelAsFake):
    """The worker process dies (like an OOM kill) whenever it is asked about `question`."""

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def generate(self, requests):
        if any(m.content == self.question for r in requests for m in r.messages):
            os._exit(1)
        return super().generate(requests)


# -- no Ray needed ---------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS])
def test_per_problem_results_do_not_depend_on_batching(algorithm):
    """The determinism the sharding relies on: a problem's result is the same whichever
    problems share its batch (seeds come from (seed, problem id, node, wave))."""
    cfg = SearchConfig(
        algorithm=algorithm,
        token_budget=48,
        step_max_tokens=8,
        solution_max_tokens=8,
        n_children=3,
        max_live_trees=7,
        n_beams=4,
        beam_width=2,
        samples_per_wave=2,
    )
    ps = problems(7)
    reward = None if algorithm == "self_consistency" else FakePRM()
    whole = rows(Search(FakeGenerator(), reward, cfg).run(ps))
    one = SearchConfig(**{**cfg.__dict__, "max_live_trees": 1})
    alone = rows(Search(FakeGenerator(), reward, one).run(ps[::-1]))
    three = SearchConfig(**{**cfg.__dict__, "max_live_trees": 3})
    worker = SearchWorker(FakeGenerator, FakePRM if reward else None, three)
    chunked = {}
    for c in make_chunks(ps[3:] + ps[:3], 3):
        chunked.update(rows(worker.run_chunk(c.id, c.problems).results))
    assert whole == alone == chunked


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 20),
    size=st.integers(1, 6),
    events=st.lists(st.tuples(st.integers(0, 2), st.booleans()), max_size=60),
)
def test_ledger_records_every_problem_exactly_once(n, size, events):
    ps = problems(n)
    ledger = ChunkLedger(make_chunks(ps, size))
    recorded: list[str] = []
    for worker, dies in events:  # any order of deals, deaths and returns
        if worker in ledger.held:
            if dies:
                ledger.lost(worker)
            else:
                recorded += ledger.complete(worker, ledger.held[worker].ids)
        else:
            ledger.deal(worker)
    for w in list(ledger.held):  # the rest die; one healthy worker drains the queue
        ledger.lost(w)
    while (chunk := ledger.deal(9)) is not None:
        recorded += ledger.complete(9, chunk.ids)
    assert ledger.finished
    assert sorted(recorded) == sorted(p.id for p in ps)
    assert ledger.remaining_ids() == []


def test_ledger_refuses_a_chunk_with_the_wrong_problems():
    ledger = ChunkLedger(make_chunks(problems(4), 2))
    ledger.deal("a")
    with pytest.raises(RuntimeError, match="wrong problems"):
        ledger.complete("a", ["p0"])


def test_config_and_recipes_are_checked_before_any_worker_starts():
    with pytest.raises(ValueError, match="distributed.workers"):
        DistributedConfig(workers=-2)  # -1 = as many as the cluster fits
    with pytest.raises(ValueError, match="distributed.chunk_size"):
        DistributedConfig(chunk_size=0)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['wokers'\]"):
        DistributedConfig.from_dict({"wokers": 2})
    with pytest.raises(TypeError, match="cannot be pickled"):
        check_spec(functools.partial(dict, lock=threading.Lock()), "generator_factory")
    with pytest.raises(TypeError, match="not a built model"):
        check_spec(FakeGenerator(), "generator_factory")
    with pytest.raises(ValueError, match="a recipe is required"):
        check_spec(None, "generator_factory")
    with pytest.raises(ValueError, match="must be unique"):
        distributed_search(problems(2) * 2, FakeGenerator, FakePRM, CFG, workers=0)
    assert default_chunk_size(10, 2, CFG) == 4 and default_chunk_size(3, 8, CFG) == 1


def test_recipes_build_fresh_models():
    gen = build_generator(("tests.fakes:FakeGenerator", {"fail_on_call": 5}))
    assert isinstance(gen, FakeGenerator) and gen.fail_on_call == 5
    judge = build_reward(lambda g: (g, "judge"), gen)  # one required parameter: the generator
    assert judge == (gen, "judge")
    assert isinstance(build_reward(("tests.fakes.FakePRM", {}), gen), FakePRM)
    assert isinstance(build_reward(FakePRM, gen), FakePRM)  # no required parameter
    assert build_reward(None, gen) is None
    assert type(build_reward({"name": "verifier"}, gen)).__name__ == "OutcomeVerifier"


def test_workers_zero_is_the_single_process_search(tmp_path):
    ref = search(problems(5), FakeGenerator(), FakePRM(), CFG)
    res = distributed_search(problems(5), FakeGenerator, FakePRM, CFG, tmp_path, workers=0)
    assert rows(res.results) == rows(ref.results)
    assert sorted(log_ids(tmp_path)) == sorted(rows(ref.results))


def test_workers_zero_writes_and_checks_the_fingerprint_like_search(tmp_path):
    from mcts.export import RunDirMismatchError

    ref = tmp_path / "search"
    search(problems(2), FakeGenerator(), FakePRM(), CFG, run_dir=ref)
    distributed_search(problems(2), FakeGenerator, FakePRM, CFG, tmp_path / "d", workers=0)
    lines = (ref / "results.jsonl").read_text().splitlines()
    want = {json.loads(x)["fingerprint"] for x in lines}
    got = [json.loads(x) for x in (tmp_path / "d" / "results.jsonl").read_text().splitlines()]
    assert {r["fingerprint"] for r in got} == want and len(want) == 1
    assert all(r["reward_uses_reference"] is False for r in got)
    other = SearchConfig(**{**CFG.__dict__, "token_budget": 64})
    with pytest.raises(RunDirMismatchError, match=r"search\.token_budget: 48 -> 64"):
        distributed_search(problems(3), FakeGenerator, FakePRM, other, tmp_path / "d", workers=0)
    # a different reward is only known once the models are built, still before any search
    verifier = ("rewards.verifier:OutcomeVerifier", {})
    with pytest.raises(RunDirMismatchError, match=r"reward\.class"):
        distributed_search(problems(3), FakeGenerator, verifier, CFG, tmp_path / "d", workers=0)
    assert log_ids(tmp_path / "d") == [r["id"] for r in got]  # nothing was added


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "distributed").glob("*.yaml")))
def test_distributed_configs_are_valid(path):
    from omegaconf import OmegaConf

    cfg = DistributedConfig.from_dict(OmegaConf.to_container(OmegaConf.load(path)))
    assert (cfg.workers == 0) == (path.stem == "single")


LAUNCHERS = {
    "parallel_local": ("hydra_joblib_launcher", "JoblibLauncher"),
    "slurm": ("hydra_submitit_launcher", "SlurmLauncher"),
    "submitit_local_test": ("hydra_submitit_launcher", "LocalLauncher"),
    "ray_local": ("hydra_ray_launcher", "RayLauncher"),
    "ray_cluster": ("hydra_ray_launcher", "RayLauncher"),
}


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_configs_compose_with_the_app(name):
    import importlib.util

    plugin, cls = LAUNCHERS[name]
    # the `ray` extra installs every launcher plugin (make install does)
    assert importlib.util.find_spec(f"hydra_plugins.{plugin}") is not None, plugin
    from hydra import compose, initialize_config_dir

    import mcts.run  # noqa: F401  (registers the app's schema)

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(cls)
    assert (ROOT / "configs" / "hydra" / "launcher" / f"{name}.yaml").exists()


# -- one local Ray session for the rest of the module ---------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            # Workers import tests.* and mcts.* whatever directory pytest was started in.
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
            log_to_driver=False,
        )
    yield ray
    if started:
        ray.shutdown()


def test_two_workers_give_the_single_process_results(ray_session, tmp_path):
    from mcts.tasks import load_task

    # reasoning-gym problems carry a picklable scorer (`check`): it must survive the trip.
    ps = load_task({"source": "reasoning_gym", "name": "basic_arithmetic", "size": 6})
    ps += problems(3)
    ref = search(ps, FakeGenerator(), FakePRM(), CFG)
    res = distributed_search(ps, FakeGenerator, FakePRM, CFG, tmp_path, workers=2, chunk_size=2)
    assert rows(res.results) == rows(ref.results)
    assert [r.problem.id for r in res.results] == [p.id for p in ps]  # input order
    assert sorted(log_ids(tmp_path)) == sorted(p.id for p in ps)  # each line exactly once
    assert res.results[0].problem.check(ps[0].answer) == 1.0
    d = res.summary["distributed"]
    assert d["workers"] == 2 and d["chunks"] == 5 and d["redealt_chunks"] == 0
    assert res.summary["accuracy"] == ref.summary["accuracy"]
    assert res.summary["exports"]["counts"]["problems"] == len(ps)
    assert (tmp_path / "traces.parquet").exists()


def test_killed_worker_mid_chunk_loses_and_duplicates_nothing(ray_session, tmp_path):
    ps = problems(8)
    marker = tmp_path / "p2.pid"
    killed: list[int] = []
    seen: list[str] = []

    def kill_blocked_worker(res) -> None:
        # p2 is dealt when the first result comes back; the second result necessarily comes
        # from the other worker (p2's holder is blocked), so p2's worker is mid-chunk: kill it.
        seen.append(res.problem.id)
        if len(seen) != 2:
            return
        for _ in range(1200):
            if marker.exists() and marker.read_text():
                break
            time.sleep(0.05)
        pid = int(marker.read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    recipe = (
        "tests.test_distributed:BlockOnce",
        {"marker": str(marker), "question": ps[2].question},
    )
    cfg = SearchConfig(**{**CFG.__dict__, "max_live_trees": 1})
    res = distributed_search(
        ps, recipe, FakePRM, cfg, tmp_path, workers=2, chunk_size=1, on_result=kill_blocked_worker
    )
    assert killed, "the blocked worker was never killed"
    assert sorted(log_ids(tmp_path)) == sorted(p.id for p in ps)
    d = res.summary["distributed"]
    assert d["redealt_chunks"] == 1 and d["worker_restarts"] == 1
    assert rows(res.results) == rows(search(ps, FakeGenerator(), FakePRM(), cfg).results)


def test_lost_workers_then_resume_records_each_problem_once(ray_session, tmp_path):
    ps = problems(4)
    crash = ("tests.test_distributed:CrashOn", {"question": ps[1].question})
    with pytest.raises(DistributedError, match=r"every worker is lost.*'p1'"):
        distributed_search(
            ps, crash, FakePRM, CFG, tmp_path, workers=1, chunk_size=1, max_worker_restarts=0
        )
    assert log_ids(tmp_path) == ["p0"]  # what finished before the crash is kept

    # The driver itself dies after recording one more problem: the rerun resumes.
    def driver_dies(res) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distributed_search(
            ps,
            FakeGenerator,
            FakePRM,
            CFG,
            tmp_path,
            workers=2,
            chunk_size=1,
            on_result=driver_dies,
        )
    assert len(log_ids(tmp_path)) == 2
    res = distributed_search(ps, FakeGenerator, FakePRM, CFG, tmp_path, workers=2)
    assert len(res.results) == 2  # only what was left
    assert sorted(log_ids(tmp_path)) == ["p0", "p1", "p2", "p3"]
    assert res.summary["exports"]["counts"]["problems"] == 4


def test_worker_errors_stop_the_run_with_the_cause(ray_session, tmp_path):
    with pytest.raises(DistributedError, match="backend died mid-wave"):
        distributed_search(
            problems(2),
            ("tests.fakes:FakeGenerator", {"fail_on_call": 1}),
            FakePRM,
            CFG,
            workers=1,
        )
    with pytest.raises(DistributedError, match="failed to start"):
        distributed_search(
            problems(2),
            ("tests.fakes:FakeGenerator", {"no_such_key": 1}),
            FakePRM,
            CFG,
            workers=1,
        )


def test_ray_rows_carry_the_single_process_fingerprint_and_refuse_another_model(
    ray_session, tmp_path
):
    from mcts.export import RunDirMismatchError

    ref = search(problems(2), FakeGenerator(), FakePRM(), CFG, run_dir=tmp_path / "one")
    assert ref.results
    res = distributed_search(problems(3), FakeGenerator, FakePRM, CFG, tmp_path, workers=1)
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    one = json.loads((tmp_path / "one" / "results.jsonl").read_text().splitlines()[0])
    assert {r["fingerprint"] for r in rows} == {one["fingerprint"]}
    assert all(r["tokens_calls"] > 0 for r in rows) and len(res.results) == 3
    # another generator (its identity comes from a worker) is refused before any chunk
    other = ("tests.test_distributed:OtherModel", {})
    with pytest.raises(RunDirMismatchError, match=r"generator\.class"):
        distributed_search(problems(4), other, FakePRM, CFG, tmp_path, workers=1)
    assert sorted(log_ids(tmp_path)) == ["p0", "p1", "p2"]


class OtherModel(FakeGenerator):
    """Another model, as far as the fingerprint can tell."""


def test_run_search_dispatches_like_the_app(ray_session, tmp_path):
    """The Hydra app's entry: sharded when distributed.workers > 0, and no reward for
    self_consistency (as the single-process app does)."""
    from mcts.distributed import run_search

    cfg = SearchConfig(**{**CFG.__dict__, "algorithm": "self_consistency", "samples_per_wave": 2})
    ref = search(problems(3), FakeGenerator(), None, cfg)
    res = run_search(problems(3), FakeGenerator, FakePRM, cfg, tmp_path, {"workers": 1})
    assert rows(res.results) == rows(ref.results)
    assert res.summary["distributed"]["workers"] == 1 and res.summary["reward_calls"] == 0


@pytest.mark.model
def test_embedded_model_two_workers_match_one_process(ray_session):
    """llama.cpp: equal when batching is equal (one problem per batch on both sides).

    Prompt-cache hits depend on the previous call in the same process, so
    tokens_cached_prompt_tokens is left out of the comparison.
    """
    from mcts.tasks import load_task

    ps = load_task({"source": "reasoning_gym", "name": "basic_arithmetic", "size": 2})
    gen = {"backend": "llama_cpp", "n_threads": 1}
    cfg = SearchConfig(token_budget=32, step_max_tokens=16, n_children=2, max_live_trees=1)
    g = build_generator(gen)
    ref = search(ps, g, build_reward({"name": "verifier"}, g), cfg)
    res = distributed_search(ps, gen, {"name": "verifier"}, cfg, workers=2, chunk_size=1)

    def strip(rs):
        return {
            i: {k: v for k, v in r.items() if k != "tokens_cached_prompt_tokens"}
            for i, r in rows(rs).items()
        }

    assert strip(res.results) == strip(ref.results)

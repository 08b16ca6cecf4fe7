"""The Hydra app: config validation, and one real end-to-end run on the embedded model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from mcts.run import format_summary, run

CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("config", overrides=overrides)


def test_default_config_composes_for_every_algorithm():
    for algo in ("mcts", "rest_mcts", "best_of_n", "self_consistency", "beam", "dvts"):
        cfg = _compose([f"search={algo}"])
        assert cfg.search.algorithm == algo
        s = OmegaConf.to_object(cfg.search)
        assert s.token_budget > 0


def test_unknown_key_and_wrong_type_are_rejected_with_the_key_named():
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="n_childs"):
        _compose(["search.n_childs=3"])
    with pytest.raises(ValueError, match="n_childs"):  # forced in with '+': caught by run()
        run(_compose(["+search.n_childs=3"]), "/nonexistent/never-written")
    with pytest.raises((ConfigCompositionException, ValidationError), match="token_budget"):
        _compose(["search.token_budget=lots"])
    cfg = _compose(["search.token_budget=2"])
    with pytest.raises(ValueError, match="token_budget"):
        OmegaConf.to_object(cfg.search)


def test_unwritable_output_dir_fails_before_any_model_loads(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = _compose(["task.size=2"])
    with pytest.raises(OSError, match="file"):
        run(cfg, blocker / "run")


@pytest.mark.model
def test_end_to_end_on_the_embedded_model(tmp_path):
    import pyarrow.parquet as pq

    cfg = _compose(
        [
            "task.size=2",
            "search.token_budget=40",
            "search.step_max_tokens=12",
            "search.n_children=2",
            "generator.n_threads=1",
            "progress=false",
        ]
    )
    summary = run(cfg, tmp_path)
    assert summary["problems"] == 2
    assert summary["generator_calls"] == summary["waves"]
    assert 0.0 <= summary["accuracy"] <= summary["pass_at_k"] or summary["accuracy"] == 0
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["tokens_generated_tokens"] <= 40
        for key in (
            "id",
            "question",
            "reference",
            "selected_answer",
            "correct",
            "pass_at_k",
            "algorithm",
            "tokens_prompt_tokens",
            "tokens_cached_prompt_tokens",
            "tokens_reward_tokens",
            "seconds",
            "tree_size",
            "tree_depth",
        ):
            assert key in r
    assert (tmp_path / "tree.png").stat().st_size > 1000
    trees = list((tmp_path / "trees").rglob("*.json"))
    assert len(trees) == 2
    cols = {
        "traces.parquet": {
            "problem_id",
            "steps",
            "visits",
            "q",
            "reward",
            "value_target",
            "correct",
        },
        "pairs_dpo.parquet": {"prompt", "chosen", "rejected", "kind", "gap"},
        "stepwise.parquet": {"prompt", "completions", "labels"},
    }
    for name, want in cols.items():
        table = pq.read_table(tmp_path / name)
        assert want <= set(table.column_names), (name, table.column_names)
    pairs = pq.read_table(tmp_path / "pairs_dpo.parquet").to_pylist()
    for p in pairs:
        assert p["chosen"] != p["rejected"]
        assert p["gap"] >= cfg.search.pair_margin - 1e-9
        assert p["chosen_value"] - p["rejected_value"] == pytest.approx(p["gap"])
    text = format_summary(summary)
    assert "accuracy (selected)" in text and "pass@k" in text
    assert not math.isnan(summary["seconds"])


# -- resume safety, with the deterministic fakes in place of the models -----------------


@pytest.fixture
def fake_models(monkeypatch):
    """The app's factories build the fakes; `built` counts the generators built."""
    import threading

    import mcts.distributed.driver as driver
    from mcts.export import RunDirBusyError, hold_run_dir
    from tests.fakes import FakeGenerator, FakePRM

    built: list[object] = []
    lock_probe: dict[str, object] = {}

    class ProbingFake(FakeGenerator):
        def generate(self, requests):
            if "run_dir" in lock_probe and "result" not in lock_probe:

                def probe() -> None:
                    try:
                        with hold_run_dir(lock_probe["run_dir"]):
                            lock_probe["result"] = "acquired"
                    except RunDirBusyError as e:
                        lock_probe["result"] = e

                t = threading.Thread(target=probe)
                t.start()
                t.join()
            return super().generate(requests)

    def build_generator(spec):
        built.append(spec)
        return ProbingFake()

    monkeypatch.setattr(driver, "build_generator", build_generator)
    monkeypatch.setattr(driver, "build_reward", lambda spec, gen: FakePRM())
    return built, lock_probe


FAST = ["task.size=2", "search.token_budget=24", "search.step_max_tokens=8", "progress=false"]


def test_app_rerun_with_another_budget_stops_before_any_model_loads(tmp_path, fake_models):
    from mcts.export import RunDirBusyError, RunDirMismatchError

    built, lock_probe = fake_models
    lock_probe["run_dir"] = tmp_path
    first = run(_compose(FAST), tmp_path)
    assert first["problems"] == 2 and len(built) == 1
    # while the search ran, the directory was held: another claimant was refused
    assert isinstance(lock_probe["result"], RunDirBusyError)
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert all(r["fingerprint_fields"]["task.name"] == "basic_arithmetic" for r in rows)
    assert all(r["reward_uses_reference"] is False for r in rows)
    with pytest.raises(RunDirMismatchError, match=r"search\.token_budget: 24 -> 32"):
        run(_compose([*FAST, "search.token_budget=32"]), tmp_path)
    with pytest.raises(RunDirMismatchError, match=r"task\.seed: 0 -> 1"):
        run(_compose([*FAST, "task.seed=1"]), tmp_path)
    assert len(built) == 1  # refused before any model was built
    # the original settings resume (a larger task extends the run)
    again = run(_compose([*FAST, "task.size=3"]), tmp_path)
    assert again["searched_now"] == 1 and again["problems"] == 3


def test_app_summary_json_survives_a_crash_while_it_is_written(tmp_path, fake_models, monkeypatch):
    import os

    import mcts.export.io as io

    run(_compose(FAST), tmp_path)
    before = (tmp_path / "summary.json").read_bytes()
    assert json.loads(before)["problems"] == 2
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:  # the disk fills up while summary.json is written
        if "summary.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        run(_compose([*FAST, "task.size=3"]), tmp_path)
    assert (tmp_path / "summary.json").read_bytes() == before  # the old one, whole
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".summary.json")]


def test_printed_summary_names_redealt_chunks_and_poisoned_problems():
    base = dict(
        problems=4, accuracy=0.5, pass_at_k=0.75, generated_tokens_per_problem=10.0,
        prompt_tokens_per_problem=5.0, prefix_cache_hit_rate=0.5, reward_tokens_per_problem=0.0,
        waves=3, generator_calls=3, mean_batch_per_call=2.0, seconds=1.0, overhead_share=0.1,
    )  # fmt: skip
    assert "re-dealt" not in format_summary(base)
    dist = {"redealt_by_reason": {"node_lost": 2, "deadline": 1}, "nodes_lost": ["n1"],
            "poisoned_problems": ["p7"]}  # fmt: skip
    text = format_summary({**base, "distributed": dist})
    assert "node_lost 2, deadline 1" in text and "nodes lost 1" in text and "p7" in text

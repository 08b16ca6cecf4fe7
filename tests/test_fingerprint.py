"""Resume never blends experiments: rows carry the run's configuration fingerprint, and a
rerun with other settings stops before searching anything. Also: tokens_calls counts the
generator calls that included each problem, and the oracle flag of a judge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mcts.config import SearchConfig
from mcts.export import ResultsLog, RunDirMismatchError, run_fingerprint
from mcts.export.fingerprint import model_identities
from mcts.generators.base import generator_identity, model_sha256, model_source
from mcts.search import search
from mcts.types import Problem
from rewards.judge import LLMJudge
from rewards.verifier import OutcomeVerifier
from tests.fakes import FakeGenerator, FakePRM, problems

CFG = SearchConfig(token_budget=48, step_max_tokens=8, n_children=3)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]


class CountingFake(FakeGenerator):
    """Follows the real backends' convention (Usage.calls = 1 on the first Generation of a
    call only) and records which problems (questions) each call included."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[set[str]] = []

    def generate(self, requests):
        self.asked.append({r.messages[-1].content for r in requests})
        gens = super().generate(requests)
        for j, g in enumerate(gens):
            g.usage.calls = 1 if j == 0 else 0
        return gens


# ------------------------------------------------------------------ resume and fingerprint


def test_rerun_with_another_budget_stops_before_searching_and_names_the_key(tmp_path):
    search(problems(3), FakeGenerator(), FakePRM(), CFG, run_dir=tmp_path)
    before = (tmp_path / "results.jsonl").read_bytes()
    gen = FakeGenerator()
    other = SearchConfig(**{**CFG.__dict__, "token_budget": 64})
    with pytest.raises(RunDirMismatchError, match=r"search\.token_budget: 48 -> 64") as err:
        search(problems(5), gen, FakePRM(), other, run_dir=tmp_path)
    assert set(err.value.differences) == {"search.token_budget"}
    assert "new run directory" in str(err.value) and "original settings" in str(err.value)
    assert gen.calls == 0  # nothing was searched
    assert (tmp_path / "results.jsonl").read_bytes() == before


def test_rerun_with_the_same_settings_resumes(tmp_path):
    search(problems(3), FakeGenerator(), FakePRM(), CFG, run_dir=tmp_path)
    # a different max_live_trees only changes batching, not results: still the same run
    again = SearchConfig(**{**CFG.__dict__, "max_live_trees": 1})
    res = search(problems(5), FakeGenerator(), FakePRM(), again, run_dir=tmp_path)
    assert [r.problem.id for r in res.results] == ["p3", "p4"]
    rows = _rows(tmp_path)
    assert sorted(r["id"] for r in rows) == ["p0", "p1", "p2", "p3", "p4"]
    assert len({r["fingerprint"] for r in rows}) == 1
    assert res.summary["problems"] == 5


def test_rows_carry_the_fingerprint_and_the_oracle_flag(tmp_path):
    search(problems(2), FakeGenerator(), FakePRM(), CFG, run_dir=tmp_path / "prm")
    search(problems(2), FakeGenerator(), OutcomeVerifier(), CFG, run_dir=tmp_path / "ver")
    for sub, oracle in (("prm", False), ("ver", True)):
        for row in _rows(tmp_path / sub):
            assert row["reward_uses_reference"] is oracle
            assert len(row["fingerprint"]) == 16
            f = row["fingerprint_fields"]
            assert f["search.token_budget"] == 48 and f["search.seed"] == 0
            assert f["generator.class"] == "tests.fakes.FakeGenerator"
            assert f["reward.requires_reference"] is oracle
            assert "search.max_live_trees" not in f and "search.pair_margin" not in f
    a, b = _rows(tmp_path / "prm")[0], _rows(tmp_path / "ver")[0]
    assert a["fingerprint"] != b["fingerprint"]
    # the hash is stable: recomputed from the same settings it is the same
    fp = run_fingerprint(CFG, None, model_identities(FakeGenerator(), FakePRM()))
    assert fp.hash == a["fingerprint"] and fp.fields == a["fingerprint_fields"]


def test_another_reward_or_seed_is_refused(tmp_path):
    search(problems(2), FakeGenerator(), FakePRM(), CFG, run_dir=tmp_path)
    with pytest.raises(RunDirMismatchError, match=r"reward\.class"):
        search(problems(2), FakeGenerator(), OutcomeVerifier(), CFG, run_dir=tmp_path)
    seeded = SearchConfig(**{**CFG.__dict__, "seed": 7})
    with pytest.raises(RunDirMismatchError, match=r"search\.seed: 0 -> 7"):
        search(problems(2), FakeGenerator(), FakePRM(), seeded, run_dir=tmp_path)


def test_other_algorithms_may_share_the_dir_but_not_the_model_or_reward(tmp_path):
    search(problems(2), FakeGenerator(), FakePRM(), CFG, run_dir=tmp_path)
    bon = SearchConfig(**{**CFG.__dict__, "algorithm": "best_of_n", "token_budget": 96})
    res = search(problems(2), FakeGenerator(), FakePRM(), bon, run_dir=tmp_path)
    assert len(res.results) == 2  # its own experiment, keyed apart
    beam = SearchConfig(**{**CFG.__dict__, "algorithm": "beam"})
    with pytest.raises(RunDirMismatchError, match=r"(?s)algorithm 'mcts'.*reward\.class"):
        search(problems(2), FakeGenerator(), OutcomeVerifier(), beam, run_dir=tmp_path)


def test_task_config_is_fingerprinted_but_not_its_size(tmp_path):
    task = {"source": "reasoning_gym", "name": "basic_arithmetic", "size": 2, "seed": 0}
    search(problems(2), FakeGenerator(), FakePRM(), CFG, run_dir=tmp_path, task_config=task)
    bigger = {**task, "size": 4}
    search(problems(3), FakeGenerator(), FakePRM(), CFG, run_dir=tmp_path, task_config=bigger)
    with pytest.raises(RunDirMismatchError, match=r"task\.params\.max_digits: <absent> -> 2"):
        search(
            problems(3),
            FakeGenerator(),
            FakePRM(),
            CFG,
            run_dir=tmp_path,
            task_config={**task, "params": {"max_digits": 2}},
        )


def test_a_changed_problem_under_the_same_id_is_refused(tmp_path):
    search(problems(2), FakeGenerator(), FakePRM(), CFG, run_dir=tmp_path)
    changed = [problems(2)[0], Problem(id="p1", question="Another question?", answer="42")]
    with pytest.raises(RunDirMismatchError, match=r"same id but another question.*'p1'"):
        search(changed, FakeGenerator(), FakePRM(), CFG, run_dir=tmp_path)


def test_rows_without_a_fingerprint_are_refused(tmp_path):
    log = ResultsLog(tmp_path)
    log.append({"id": "p0", "algorithm": "mcts", "question": "Planted problem 0?"})
    gen = FakeGenerator()
    with pytest.raises(RunDirMismatchError, match="without a configuration fingerprint"):
        search(problems(2), gen, FakePRM(), CFG, run_dir=tmp_path)
    assert gen.calls == 0


def test_summary_and_exports_cover_only_fingerprinted_rows(tmp_path):
    res = search(problems(2), FakeGenerator(), FakePRM(), CFG, run_dir=tmp_path)
    assert res.summary["problems"] == 2 and res.summary["reward_uses_reference"] is False
    assert res.summary["exports"]["counts"]["problems"] == 2


# ------------------------------------------------------------------ identities


def test_model_hash_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("MCTS_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "model.gguf"
    f.write_bytes(b"weights v1")
    h1 = model_sha256(f)
    cache = json.loads((tmp_path / "cache" / "sha256-cache.json").read_text())
    assert cache[str(f.resolve())]["sha256"] == h1
    # a cache hit does not read the file: a planted value comes back
    cache[str(f.resolve())]["sha256"] = "planted"
    (tmp_path / "cache" / "sha256-cache.json").write_text(json.dumps(cache))
    assert model_sha256(f) == "planted"
    f.write_bytes(b"weights v2, longer")  # size (and mtime) change: hashed again
    h2 = model_sha256(f)
    assert h2 not in (h1, "planted")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_text("x")
    src = model_source(folder)
    assert src["model_path"] == str(folder.resolve()) and len(src["model_sha256"]) == 64
    assert model_source("org/some-model") == {"model": "org/some-model"}


def test_a_moved_model_file_is_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MCTS_CACHE", str(tmp_path / "cache"))

    class Gen(FakeGenerator):
        def __init__(self, path):
            super().__init__()
            self.path = path

        def identity(self):
            return {"backend": "fake", **model_source(self.path)}

    (tmp_path / "a.gguf").write_bytes(b"same weights")
    (tmp_path / "b.gguf").write_bytes(b"same weights")
    (tmp_path / "c.gguf").write_bytes(b"other weights")
    run = tmp_path / "run"
    search(problems(2), Gen(tmp_path / "a.gguf"), FakePRM(), CFG, run_dir=run)
    search(problems(3), Gen(tmp_path / "b.gguf"), FakePRM(), CFG, run_dir=run)
    with pytest.raises(RunDirMismatchError, match=r"generator\.model_sha256"):
        search(problems(3), Gen(tmp_path / "c.gguf"), FakePRM(), CFG, run_dir=run)
    assert generator_identity(Gen(tmp_path / "a.gguf"))["class"].endswith("Gen")


def test_judge_with_reference_in_its_template_is_an_oracle():
    gen = FakeGenerator()
    assert LLMJudge(gen).requires_reference is False
    oracle = LLMJudge(gen, template="Q: {question}\nSteps: {steps}\nThe answer is {reference}.")
    assert oracle.requires_reference is True
    escaped = LLMJudge(gen, template="Q: {question}\n{steps}\nNo {{reference}} here.")
    assert escaped.requires_reference is False
    ids = model_identities(gen, oracle)
    assert ids["reward_uses_reference"] is True
    assert ids["reward"]["template"] == oracle.template
    assert ids["reward"]["generator"]["class"] == "tests.fakes.FakeGenerator"


def test_oracle_judge_rows_say_so(tmp_path):
    judge = LLMJudge(FakeGenerator(), template="{question} {steps} (answer: {reference})")
    res = search(problems(2), FakeGenerator(), judge, CFG, run_dir=tmp_path)
    assert res.summary["reward_uses_reference"] is True
    assert all(r["reward_uses_reference"] is True for r in _rows(tmp_path))


# ------------------------------------------------------------------ tokens_calls


@pytest.mark.parametrize("algorithm", ["mcts", "best_of_n", "beam"])
def test_tokens_calls_counts_the_generator_calls_that_included_each_problem(algorithm):
    gen = CountingFake()
    cfg = SearchConfig(**{**CFG.__dict__, "algorithm": algorithm, "n_beams": 4, "beam_width": 2})
    res = search(problems(4), gen, FakePRM(), cfg)
    for r in res.results:
        waves = sum(r.problem.question in asked for asked in gen.asked)
        assert waves > 0
        assert r.usage.calls == waves == r.row()["tokens_calls"], r.problem.id
    assert res.summary["generator_calls"] == len(gen.asked)


def test_usage_counts_a_call_once_however_many_requests_it_held():
    from mcts.types import Usage

    total = Usage()
    for _ in range(3):  # three requests of one problem in call 7
        total += Usage(generated_tokens=2, calls=1, call_id=7)
    total += Usage(generated_tokens=1, calls=1, call_id=8)
    total += Usage(reward_tokens=5)  # no call id: added as before
    assert (total.calls, total.generated_tokens, total.reward_tokens) == (2, 7, 5)
    assert Usage(calls=1, call_id=1) == Usage(calls=1, call_id=2)  # not part of equality
    assert "call_id" not in Usage().as_dict()


def test_reward_identity_describes_configuration_not_run_state():
    from types import SimpleNamespace

    from rewards.base import reward_identity
    from rewards.mix import WeightedMix

    class PRMLike:
        requires_reference = False

        def __init__(self):
            # a HF causal LM has .generate too: it is described by its weights, not as a policy
            self.model = SimpleNamespace(
                config=SimpleNamespace(_name_or_path="org/prm-7b"), generate=lambda: None
            )
            self.aggregate = "min"
            self.calls = 5  # run state
            self.last_tokens = np.zeros(3)  # run state
            self._cache = {}

        def score(self, items):
            return np.zeros(len(items))

    ident = reward_identity(PRMLike())
    assert ident["model"]["model"] == "org/prm-7b" and ident["aggregate"] == "min"
    assert not {"calls", "last_tokens", "_cache"} & set(ident)
    mix = WeightedMix([(1.0, FakePRM()), (3.0, OutcomeVerifier())])
    fp = run_fingerprint(CFG, None, model_identities(FakeGenerator(), mix))
    assert fp.fields["reward.weights"] == [0.25, 0.75]
    assert fp.fields["reward.components.1.class"] == "rewards.verifier.OutcomeVerifier"
    assert fp.reward_uses_reference is True


def test_the_call_counting_wrapper_is_transparent():
    from mcts.generators.counting import CallCountingGenerator, count_calls

    inner = FakeGenerator()
    wrapped = count_calls(inner)
    assert isinstance(wrapped, CallCountingGenerator) and count_calls(wrapped) is wrapped
    wrapped.some_flag = True  # attributes are the model's
    assert inner.some_flag is True and wrapped.calls == inner.calls == 0
    assert generator_identity(wrapped) == generator_identity(inner)


def test_vllm_identity_without_an_engine(tmp_path, monkeypatch):
    """VLLMGenerator.identity() reads the engine's model config (a stand-in engine here)."""
    from types import SimpleNamespace

    from mcts.generators.vllm import VLLMGenerator

    monkeypatch.setenv("MCTS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")

    def engine(model):
        mc = SimpleNamespace(
            model=model, max_model_len=2048, dtype="torch.float32", quantization=None
        )
        tok = SimpleNamespace(chat_template="{{ messages }}")
        return SimpleNamespace(
            llm_engine=SimpleNamespace(model_config=mc), get_tokenizer=lambda: tok
        )

    local = VLLMGenerator(engine(str(folder)), seed=3).identity()
    assert local["backend"] == "vllm" and len(local["model_sha256"]) == 64
    assert local["seed"] == 3 and local["max_model_len"] == 2048
    hub = VLLMGenerator(engine("org/model-7b"), seed=3).identity()
    assert hub["model"] == "org/model-7b" and hub["revision"] is None
    assert hub["chat_template_sha256"] == local["chat_template_sha256"]

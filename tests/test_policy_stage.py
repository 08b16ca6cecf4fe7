"""The loop's policy stage (mcts/improve/policy.py): data from a real searched run dir, one
short SFT and DPO run on a tiny random Llama through TRL + peft, export to HF and GGUF,
resume, and the errors. Needs the [train] extra (trl, peft, datasets)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("datasets")
pytest.importorskip("gguf")

from mcts.config import SearchConfig  # noqa: E402
from mcts.improve.policy import (  # noqa: E402
    PolicyConfig,
    PolicyDataError,
    read_data,
    sft_rows,
    tokenizer_sha256,
    train_policy,
    write_data,
)
from mcts.prompts import DEFAULT_SYSTEM, problem_messages  # noqa: E402
from mcts.search import search  # noqa: E402
from mcts.types import Problem  # noqa: E402
from tests.fakes import RIGHT, FakeGenerator, FakePRM  # noqa: E402
from tests.test_transformers_generator import _model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Llama saved as a HF folder with its byte-level BPE tokenizer."""
    tok = tiny_tokenizer()
    path = tmp_path_factory.mktemp("base") / "hf"
    _model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A searched run (planted world: right and wrong solutions in every tree)."""
    path = tmp_path_factory.mktemp("train")
    problems = [Problem(id=f"p{i}", question=f"What is item {i}?", answer=RIGHT) for i in range(3)]
    cfg = SearchConfig(token_budget=600, pair_margin=0.1, system_prompt="Be exact.")
    search(problems, FakeGenerator(), FakePRM(), cfg, run_dir=path)
    return path


def test_sft_rows_are_the_verified_solutions_as_the_policy_saw_them(run_dir):
    rows, counts = sft_rows(run_dir, "mcts", max_per_problem=4)
    assert rows and counts["solutions"] == len(rows) and counts["problems"] == 3
    for r in rows:
        want = [
            {"role": m.role, "content": m.content}
            for m in problem_messages(r["question"], "Be exact.")
        ]
        assert r["prompt"] == want and DEFAULT_SYSTEM not in json.dumps(r["prompt"])
        text = r["completion"][0]["content"]
        assert r["completion"][0]["role"] == "assistant"
        assert text.endswith(f"The answer is {RIGHT}.")  # verified correct, full solution
        assert not text.endswith("\n")  # no dangling delimiter after the last step
    one, c1 = sft_rows(run_dir, "mcts", max_per_problem=1)
    assert len(one) == c1["with_correct"] <= 3
    assert c1["over_cap"] == len(rows) - len(one)


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_train_exports_hf_and_gguf_and_resumes(method, run_dir, base, tmp_path):
    cfg = PolicyConfig(method=method, epochs=1, batch_size=2, lora_r=4, lora_alpha=8)
    rows, header = write_data(run_dir, "mcts", cfg, tmp_path, tokenizer_sha256(base))
    back, header2 = read_data(tmp_path / "data.jsonl")
    assert back == json.loads(json.dumps(rows)) and header2 == header
    if method == "dpo":  # TRL consumes the exported pairs' columns unchanged
        import pyarrow.parquet as pq

        traj = [
            r
            for r in pq.read_table(run_dir / "pairs_dpo.parquet").to_pylist()
            if r["kind"] == "trajectory"
        ]
        assert [(r["prompt"], r["chosen"], r["rejected"]) for r in traj] == [
            (r["prompt"], r["chosen"], r["rejected"]) for r in rows
        ]
    out = tmp_path / "policy"
    rec = train_policy(tmp_path / "data.jsonl", base, out, cfg)
    assert rec["steps"] >= 1 and rec["loss_first"] is not None and rec["rows"] == len(rows)
    assert (out / "hf" / "config.json").exists() and (out / "model.gguf").stat().st_size > 10_000
    # the merged weights moved away from the base (LoRA was trained and merged in)
    from safetensors.numpy import load_file

    new = load_file(next((out / "hf").glob("*.safetensors")))
    old = load_file(next(base.glob("*.safetensors")))
    key = next(k for k in old if "q_proj" in k)
    assert abs(new[key] - old[key]).max() > 0
    # the GGUF serves on the default backend
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=64, n_threads=1, verbose=False)
    try:
        assert llm.n_vocab() == len(tiny_tokenizer())
    finally:
        llm.close()
    # resume: same data and settings -> nothing retrained
    stamp = os.stat(out / "trained.json").st_mtime_ns
    assert train_policy(tmp_path / "data.jsonl", base, out, cfg) == rec
    assert os.stat(out / "trained.json").st_mtime_ns == stamp


def test_a_checkpoint_with_another_tokenizer_is_refused(run_dir, base, tmp_path):
    cfg = PolicyConfig(method="sft")
    write_data(run_dir, "mcts", cfg, tmp_path, "0" * 64)
    with pytest.raises(PolicyDataError, match="tokenizer") as e:
        train_policy(tmp_path / "data.jsonl", base, tmp_path / "policy", cfg)
    assert "data.jsonl" in str(e.value) and "tokenizer.json" in str(e.value)
    assert not (tmp_path / "policy").exists()  # nothing written


def test_no_rows_says_why_and_writes_nothing(tmp_path, base):
    problems = [Problem(id="q", question="What is it?", answer="never")]
    search(
        problems,
        FakeGenerator(),
        FakePRM(),
        SearchConfig(token_budget=200),
        run_dir=tmp_path / "run",
    )
    with pytest.raises(PolicyDataError, match="no verified-correct solution in 1 TRAIN") as e:
        write_data(
            tmp_path / "run", "mcts", PolicyConfig(method="sft"), tmp_path, tokenizer_sha256(base)
        )
    assert "run" in str(e.value)
    assert not (tmp_path / "data.jsonl").exists()


@pytest.mark.parametrize(
    "field, value", [("method", "ppo"), ("batch_size", 0), ("lr", 0.0), ("gguf_dtype", "q4")]
)
def test_bad_policy_settings_are_named(field, value):
    with pytest.raises(ValueError, match=f"improve.policy.{field}"):
        PolicyConfig(**{field: value}).validate()


def _planted_splits():
    """16 TRAIN and 8 EVAL problems of the planted world (the loop tests' splits)."""
    from mcts.improve.splits import Splits

    def planted(prefix, n):
        return [
            Problem(id=f"{prefix}{i}", question=f"{prefix} problem {i}?", answer=RIGHT)
            for i in range(n)
        ]

    return Splits(train=planted("train", 16), eval=planted("eval", 8), dropped_from_train=0)


def _loop_config(**kw):
    """The loop tests' settings: tiny budgets, MCTS and best-of-N on EVAL, one SFT epoch."""
    from mcts.improve import ImproveConfig
    from rewards.value_model import ValueHeadConfig

    return ImproveConfig(
        train_budget=60,
        budgets=[40],
        eval_runs=["mcts", "best_of_n"],
        baseline=False,
        head=ValueHeadConfig(epochs=60, patience=20, val_fraction=0.25),
        policy=PolicyConfig(method="sft", epochs=1, batch_size=4, lora_r=4, lora_alpha=8),
        **kw,
    )


def test_loop_policy_stage_trains_exports_and_reports_both_policies(base, tmp_path):
    from mcts.improve import run_improve
    from tests.fakes import FeatureFakeGenerator, fake_config

    splits = _planted_splits()
    cfg = _loop_config()
    served = []

    def policy_generator(gguf):
        served.append(gguf)
        return FeatureFakeGenerator()

    report = run_improve(
        cfg,
        fake_config(token_budget=60, n_beams=4, beam_width=2),
        FeatureFakeGenerator(),
        FakePRM(),
        tmp_path,
        splits=splits,
        policy_generator=policy_generator,
        base_hf=base,
    )
    assert served == [tmp_path / "round0" / "policy" / "model.gguf"] and served[0].exists()
    got = {(r["reward"], r["method"], r["budget"]) for r in report["records"]}
    for k in (0, 1):
        assert {(f"policy_r{k}", "greedy", 0), (f"policy_r{k}", "self_consistency", 40)} <= got
    r1 = [r for r in report["records"] if r["reward"] == "policy_r1"]
    assert all(r["vs_previous_policy"]["n"] == 8 for r in r1)
    assert report["policy"]["round0"]["rows"] > 0
    md = (tmp_path / "report.md").read_text()
    assert "vs previous policy" in md and "Policy round0: sft" in md
    greedy = (tmp_path / "eval" / "policy_r0" / "greedy-0" / "results.jsonl").read_text()
    assert len(greedy.splitlines()) == 8 and '"reference": null' not in greedy
    # the round's own policy is not sampled twice: its vote is the learned best-of-N's vote
    assert not (tmp_path / "eval" / "policy_r0" / "best_of_n-40").exists()
    index = {(r["reward"], r["method"], r["budget"]): r for r in report["records"]}
    sc0, sc_learned = (index[(t, "self_consistency", 40)] for t in ("policy_r0", "learned_r0"))
    assert sc0["source"] == "learned_r0/best_of_n-40" and sc0["ok"] == sc_learned["ok"]
    assert index[("policy_r1", "self_consistency", 40)]["source"] == "policy_r1/best_of_n-40"


def test_a_second_round_searches_with_the_new_policy_and_fits_its_own_head(base, tmp_path):
    """rounds=2 with the policy stage: round 1 searches TRAIN and EVAL with round 0's
    fine-tuned policy, under round 0's TRAIN reward (the round-0 head reads the old model),
    fits a head on the new policy's features, and is compared with that policy's own vote;
    eval_rounds=[1] leaves round 0 unevaluated."""
    from mcts.improve import run_improve
    from rewards.value_model import ValueHead
    from tests.fakes import FeatureFakeGenerator, fake_config

    splits = _planted_splits()
    cfg = _loop_config(rounds=2, eval_rounds=[1], label_runs=["best_of_n"])
    served = []

    class Seen(FeatureFakeGenerator):
        def generate(self, requests):
            self.seen.update(m.content.split()[0] for r in requests for m in r.messages[-1:])
            return super().generate(requests)

    def make(sha):
        g = Seen(sha=sha)
        g.seen = set()
        return g

    def policy_generator(gguf):
        served.append(make(f"fake-policy-{len(served) + 1}"))
        served[-1].gguf = gguf
        return served[-1]

    base_gen = make("fake-base")
    report = run_improve(
        cfg,
        fake_config(token_budget=60, n_beams=4, beam_width=2),
        base_gen,
        FakePRM(),
        tmp_path,
        splits=splits,
        policy_generator=policy_generator,
        base_hf=base,
    )
    assert [g.gguf for g in served] == [tmp_path / f"round{r}/policy/model.gguf" for r in (0, 1)]
    heads = [ValueHead.load(tmp_path / f"round{r}" / "value.pt") for r in (0, 1)]
    assert [h.feature_identity["model_sha256"] for h in heads] == ["fake-base", "fake-policy-1"]
    # the base policy searched TRAIN only (round 0 is not evaluated); round 1's policy
    # searched TRAIN and EVAL; round 2's policy only EVAL (greedy and its vote)
    assert base_gen.seen == {"train"}
    assert served[0].seen == {"train", "eval"} and served[1].seen == {"eval"}
    tags = {r["reward"] for r in report["records"]}
    assert tags == {"learned_r1", "policy_r1", "policy_r2"}  # nothing of round 0 on EVAL
    assert not (tmp_path / "eval" / "learned_r0").exists()
    # label_runs search TRAIN only in the round whose head is used (round 1 searches EVAL;
    # round 0's head guides nothing: round 1 has a new policy)
    assert (tmp_path / "round1" / "train_best_of_n" / "results.jsonl").exists()
    assert not (tmp_path / "round0" / "train_best_of_n").exists()
    mcts1 = next(
        r for r in report["records"] if (r["reward"], r["method"]) == ("learned_r1", "mcts")
    )
    assert mcts1["vs_self_consistency"]["against"] == "learned_r1"  # the same policy's vote
    p2 = next(r for r in report["records"] if (r["reward"], r["method"]) == ("policy_r2", "greedy"))
    assert p2["vs_previous_policy"]["against"] == "policy_r1"
    # ReST-EM: both rounds fine-tune the base weights (each on its own round's solutions)
    recs = [json.loads((tmp_path / f"round{r}/policy/trained.json").read_text()) for r in (0, 1)]
    assert recs[0]["key"]["base_weights"] == recs[1]["key"]["base_weights"]

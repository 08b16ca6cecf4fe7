"""The training tables mean what they say: the prompt the policy saw, one value scale,
enough support behind each pair, and no EOS taught after a mid-solution step."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from mcts.config import SearchConfig
from mcts.export import ResultsLog, load_tree, save_tree, tree_path, write_exports
from mcts.export.tables import pretokenize_pair, support
from mcts.prompts import DEFAULT_SYSTEM, join_steps, problem_messages
from mcts.search import search
from tests.fakes import FakeGenerator, FakePRM, problems


class RecordingGenerator(FakeGenerator):
    """The fake world, remembering every (messages, prefix) the search sent."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[tuple[tuple[str, str], ...], str]] = set()

    def generate(self, requests):
        for r in requests:
            self.seen.add((tuple((m.role, m.content) for m in r.messages), r.prefix))
        return super().generate(requests)


def run(tmp_path, n=2, **kw):
    kw = {"token_budget": 600, "pair_margin": 0.1, **kw}
    gen = RecordingGenerator()
    search(problems(n), gen, FakePRM(), SearchConfig(**kw), run_dir=tmp_path)
    pairs = pq.read_table(tmp_path / "pairs_dpo.parquet").to_pylist()
    stepwise = pq.read_table(tmp_path / "stepwise.parquet").to_pylist()
    return gen, pairs, stepwise


def as_request(prompt):
    """Split exported messages back into (messages, assistant prefix) as the search sent them."""
    msgs = [(m["role"], m["content"]) for m in prompt]
    prefix = msgs.pop()[1] if msgs[-1][0] == "assistant" else ""
    return tuple(msgs), prefix


@pytest.mark.parametrize("system", ["Be brief and exact.", None])
def test_prompt_is_what_the_search_rendered(tmp_path, system):
    gen, pairs, stepwise = run(tmp_path, system_prompt=system)
    kinds = {p["kind"] for p in pairs}
    assert kinds == {"step", "trajectory"}
    assert any(p["prefix_steps"] for p in pairs)  # some step pairs continue an assistant turn
    want_system = DEFAULT_SYSTEM if system is None else system
    for p in pairs:
        assert as_request(p["prompt"]) in gen.seen  # the exact messages + prefix the policy got
        head = [(m.role, m.content) for m in problem_messages(p["question"], want_system)]
        assert [(m["role"], m["content"]) for m in p["prompt"][:2]] == head
        assert p["system_prompt"] == want_system and p["system_prompt_source"] == "run"
        if p["prefix_steps"]:
            assert p["prompt"][-1] == {
                "role": "assistant",
                "content": join_steps(p["prefix_steps"], p["delimiter"]),
            }
        else:
            assert len(p["prompt"]) == 2
    for r in stepwise:
        assert as_request(r["prompt"]) in gen.seen and r["prompt_text"] == r["prompt"][1]["content"]


def test_a_row_without_fingerprint_falls_back_to_the_default_system_and_says_so(tmp_path):
    run(tmp_path, system_prompt="Custom.")
    path = tmp_path / "results.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:
        del r["fingerprint_fields"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_exports(tmp_path, 0.1)
    pairs = pq.read_table(tmp_path / "pairs_dpo.parquet").to_pylist()
    assert pairs and all(p["system_prompt_source"] == "default" for p in pairs)
    assert all(p["prompt"][0] == {"role": "system", "content": DEFAULT_SYSTEM} for p in pairs)


def test_step_pairs_are_exact_sibling_texts_with_value_targets(tmp_path):
    _, pairs, _ = run(tmp_path)
    step = [p for p in pairs if p["kind"] == "step"]
    assert step
    for p in step:
        g = load_tree(tree_path(tmp_path, p["problem_id"], "mcts"))
        c, r = g.nodes[p["chosen_node"]], g.nodes[p["rejected_node"]]
        assert list(g.predecessors(p["chosen_node"])) == [p["parent_node"]]
        assert list(g.predecessors(p["rejected_node"])) == [p["parent_node"]]
        assert p["chosen"] == [{"role": "assistant", "content": c["text"]}]
        assert p["rejected"] == [{"role": "assistant", "content": r["text"]}]
        assert p["chosen_text"] == c["text"] and p["rejected_text"] == r["text"]
        assert (p["chosen_value"], p["rejected_value"]) == (c["value_target"], r["value_target"])
        assert p["value_kind"] == "mc"
        assert p["chosen_eos"] == (c["finish"] == "eos") and p["rejected_eos"] == (
            r["finish"] == "eos"
        )
        assert p["continues"] == (not (p["chosen_eos"] and p["rejected_eos"]))
    assert any(p["continues"] for p in step)
    traj = [p for p in pairs if p["kind"] == "trajectory"]
    assert traj and all(p["chosen_eos"] and not p["continues"] for p in traj)


def test_rest_mcts_rows_say_rest(tmp_path):
    _, pairs, stepwise = run(tmp_path, algorithm="rest_mcts")
    assert pairs and {p["value_kind"] for p in pairs} == {"rest"}
    assert {r["value_kind"] for r in stepwise} == {"rest"}


def test_no_pair_falls_back_to_q_when_a_value_target_is_missing(tmp_path):
    _, before, _ = run(tmp_path)
    # take the value target away from the chosen side of one step pair (its q stays)
    victim = next(p for p in before if p["kind"] == "step")
    tp = tree_path(tmp_path, victim["problem_id"], "mcts")
    g = load_tree(tp)
    node = victim["chosen_node"]
    assert math.isfinite(g.nodes[node]["q"])
    g.nodes[node]["value_target"] = math.nan
    save_tree(g, tp)
    info = write_exports(tmp_path, 0.1)
    after = pq.read_table(info["pairs_dpo"]).to_pylist()
    mine = [p for p in after if p["problem_id"] == victim["problem_id"]]
    assert all(node not in (p["chosen_node"], p["rejected_node"]) for p in mine)
    assert info["counts"]["dropped_step_pairs"]["no_value_target"] > 0
    for p in after:
        h = load_tree(tree_path(tmp_path, p["problem_id"], "mcts"))
        assert p["chosen_value"] == h.nodes[p["chosen_node"]]["value_target"]
        assert p["rejected_value"] == h.nodes[p["rejected_node"]]["value_target"]


def test_min_support_filters_step_pairs_and_counts_say_so(tmp_path):
    run(tmp_path)
    base = write_exports(tmp_path, 0.1, min_support=1, draw=False)
    pairs1 = pq.read_table(base["pairs_dpo"]).to_pylist()
    step1 = [p for p in pairs1 if p["kind"] == "step"]
    for p in pairs1:  # support = merged samples of checked terminals at or below each side
        sup = support(load_tree(tree_path(tmp_path, p["problem_id"], "mcts")))
        assert (p["chosen_support"], p["rejected_support"]) == (
            sup[p["chosen_node"]],
            sup[p["rejected_node"]],
        )
    sides = sorted({min(p["chosen_support"], p["rejected_support"]) for p in step1})
    assert len(sides) >= 2, sides  # the threshold below splits the pairs
    k = sides[-1]
    info = write_exports(tmp_path, 0.1, min_support=k, draw=False)
    stepk = [p for p in pq.read_table(info["pairs_dpo"]).to_pylist() if p["kind"] == "step"]
    assert stepk and all(min(p["chosen_support"], p["rejected_support"]) >= k for p in stepk)
    want = sum(min(p["chosen_support"], p["rejected_support"]) >= k for p in step1)
    assert len(stepk) == want == info["counts"]["step_pairs"]
    d1, dk = base["counts"]["dropped_step_pairs"], info["counts"]["dropped_step_pairs"]
    assert dk["min_support"] - d1["min_support"] >= len(step1) - len(stepk) > 0
    # trajectory pairs rest on checked outcomes: min_support leaves them alone
    assert info["counts"]["trajectory_pairs"] == base["counts"]["trajectory_pairs"]
    with pytest.raises(ValueError, match="min_support"):
        write_exports(tmp_path, 0.1, min_support=-1)


def test_hand_built_tree_support_and_reasons(tmp_path):
    from tests.test_export import result_for

    ResultsLog(tmp_path).append(result_for("p0"))
    info = write_exports(tmp_path, 0.3, min_support=2, draw=False)
    pairs = pq.read_table(info["pairs_dpo"]).to_pylist()
    # (1, 3): node 3 has support 1 < 2; (4, 5): both 1; node 2 has no value target
    assert [p for p in pairs if p["kind"] == "step"] == []
    assert info["counts"]["dropped_step_pairs"] == {
        "no_value_target": 2,
        "min_support": 2,
        "margin": 0,
        "max_pairs": 0,
    }


# ---------------------------------------------------------------- TRL tokenization


def _tiny_tokenizer():
    from tests.test_transformers_generator import tiny_tokenizer

    return tiny_tokenizer()


def test_trl_tokenization_follows_the_eos_policy(tmp_path):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("torch")
    import copy
    import types

    from trl import DPOConfig, DPOTrainer

    from tests.test_transformers_generator import _model as tiny_llama

    tok = _tiny_tokenizer()
    eos = tok.eos_token_id
    _, pairs, _ = run(tmp_path, n=1)
    step = next(p for p in pairs if p["kind"] == "step" and p["continues"] and p["prefix_steps"])
    traj = next(p for p in pairs if p["kind"] == "trajectory")
    assert not step["chosen_eos"] and traj["chosen_eos"] and traj["rejected_eos"]
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        per_device_train_batch_size=2,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )

    def content_ids(ids):  # drop the chat template's trailing newline after the end of turn
        ids = list(ids)
        while ids and tok.decode(ids[-1:]).strip() == "":
            ids.pop()
        return ids

    # TRL's own processing of the conversational columns (DPOTrainer._prepare_dataset)
    cols = ("prompt", "chosen", "rejected")
    ds = datasets.Dataset.from_list([{k: r[k] for k in cols} for r in (traj, step)])
    stub = types.SimpleNamespace(_tokenizer=tok)
    trl_traj, trl_step = DPOTrainer._prepare_dataset(stub, ds, tok, args, "train")
    # a trajectory pair is right as TRL tokenizes it: the solution, then EOS
    assert content_ids(trl_traj["chosen_ids"])[-1] == eos
    assert content_ids(trl_traj["rejected_ids"])[-1] == eos
    assert tok.decode(content_ids(trl_traj["chosen_ids"])[:-1]) == traj["chosen"][0]["content"]
    # ... a continuing step pair is not (why the docstring routes it through pretokenize_pair):
    # TRL closes the prefix turn and ends the step with EOS
    assert content_ids(trl_step["chosen_ids"])[-1] == eos

    # the documented route: pretokenize_pair, then a DPOTrainer that keeps the ids
    pre_step, pre_traj = pretokenize_pair(step, tok), pretokenize_pair(traj, tok)
    assert pre_step["chosen_ids"][-1] != eos and eos not in pre_step["chosen_ids"]
    assert eos not in pre_step["rejected_ids"]
    assert tok.decode(pre_step["chosen_ids"]) == step["chosen"][0]["content"]
    assert pre_traj["chosen_ids"][-1] == eos and pre_traj["rejected_ids"][-1] == eos
    msgs, prefix = as_request(step["prompt"])
    rendered = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in msgs], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(pre_step["prompt_ids"]) == rendered + prefix  # as the generator renders
    # TRL's trajectory tokenization agrees with ours up to the template's trailing newline
    assert pre_traj["prompt_ids"] == trl_traj["prompt_ids"]
    assert pre_traj["chosen_ids"] == content_ids(trl_traj["chosen_ids"])

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset

    model = tiny_llama(tok)  # the tiny random Llama of the generator tests, seed 0
    trainer = PreTokenizedDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=datasets.Dataset.from_list([pre_step, pre_traj]),
        processing_class=tok,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    for row, mask in zip(batch["input_ids"], batch["completion_mask"], strict=True):
        completion = [int(i) for i, m in zip(row, mask, strict=True) if m]
        # the continuing step's completions carry no EOS; the trajectory's end with it
        assert completion in (
            pre_step["chosen_ids"],
            pre_step["rejected_ids"],
            pre_traj["chosen_ids"],
            pre_traj["rejected_ids"],
        )
    out = trainer.train()
    assert math.isfinite(out.training_loss)


# ---------------------------------------------------------------- sampled tokens


class TokenRecordingGenerator(FakeGenerator):
    """The fake world with a unique token id (and a unique logprob) per sampled token, and a
    record of every Step returned: (messages, prefix, stripped text) -> [(ids, logprobs)].

    Lengths and the Steps' summed `logprob` are the fake's own, so the search runs as before;
    unique ids make any mix-up of siblings, samples or problems visible."""

    def __init__(self) -> None:
        super().__init__()
        self.next_id = 10_000
        self.returned: dict[tuple, list[tuple[tuple[int, ...], tuple[float, ...]]]] = {}

    def generate(self, requests):
        from mcts.types import Generation, Step

        out = []
        for r, g in zip(requests, super().generate(requests), strict=True):
            steps = []
            for s in g.steps:
                ids = tuple(range(self.next_id, self.next_id + len(s.token_ids)))
                self.next_id += len(ids)
                lps = tuple(-0.5 - (i - 10_000) * 1e-3 for i in ids)
                steps.append(Step(s.text, ids, s.logprob, lps, s.finish, s.count))
                msgs = tuple((m.role, m.content) for m in r.messages)
                self.returned.setdefault((msgs, r.prefix, s.text.strip()), []).append((ids, lps))
            out.append(Generation(steps, g.usage))
        return out

    def sample_of(self, prompt, text, ids):
        """The (ids, logprobs) this generator returned for `text` after `prompt` whose ids are
        `ids` (None if it never returned them there)."""
        msgs, prefix = as_request(prompt)
        for got in self.returned.get((msgs, prefix, text), []):
            if list(got[0]) == list(ids):
                return got
        return None


def run_tokens(tmp_path, **kw):
    kw = {"token_budget": 600, "pair_margin": 0.1, **kw}
    gen = TokenRecordingGenerator()
    search(problems(2), gen, FakePRM(), SearchConfig(**kw), run_dir=tmp_path)
    tables = {
        name: pq.read_table(tmp_path / f"{name}.parquet").to_pylist()
        for name in ("pairs_dpo", "stepwise", "traces")
    }
    return gen, tables


def assert_logprobs(got, want):
    assert got is not None and len(got) == len(want)
    assert got == pytest.approx(list(want), rel=1e-5)  # the tree keeps 6 significant digits


def test_step_pairs_carry_the_exact_sampled_tokens_of_each_sibling(tmp_path):
    gen, t = run_tokens(tmp_path)
    pairs = t["pairs_dpo"]
    step = [p for p in pairs if p["kind"] == "step"]
    assert step
    for p in step:
        g = load_tree(tree_path(tmp_path, p["problem_id"], "mcts"))
        for side in ("chosen", "rejected"):
            ids, lps = p[f"{side}_token_ids"], p[f"{side}_token_logprobs"]
            text = p[side][0]["content"]
            got = gen.sample_of(p["prompt"], text, ids)
            assert got is not None, (side, text, ids)  # what the generator returned there
            assert ids == list(got[0]) and len(ids) == g.nodes[p[f"{side}_node"]]["n_tokens"]
            assert_logprobs(lps, got[1])
        assert p["chosen_token_ids"] != p["rejected_token_ids"]
    # multi-step solutions are several samples: their trajectory pairs carry no ids
    traj = [p for p in pairs if p["kind"] == "trajectory"]
    assert traj
    for p in traj:
        g = load_tree(tree_path(tmp_path, p["problem_id"], "mcts"))
        assert g.nodes[p["chosen_node"]]["depth"] > 1
        assert p["chosen_token_ids"] is None and p["chosen_token_logprobs"] is None
        assert p["rejected_token_ids"] is None and p["rejected_token_logprobs"] is None


def test_traces_and_stepwise_carry_per_step_tokens(tmp_path):
    gen, t = run_tokens(tmp_path)
    assert t["traces"] and t["stepwise"]
    for r in t["traces"]:
        g = load_tree(tree_path(tmp_path, r["problem_id"], r["algorithm"]))
        assert len(r["token_ids"]) == len(r["token_logprobs"]) == len(r["steps"])
        for k, (node, ids, lps) in enumerate(
            zip(r["node_ids"], r["token_ids"], r["token_logprobs"], strict=True)
        ):
            prompt = [
                {"role": m.role, "content": m.content}
                for m in problem_messages(r["question"], DEFAULT_SYSTEM)
            ]
            if k:
                prompt.append({"role": "assistant", "content": join_steps(r["steps"][:k], "\n\n")})
            got = gen.sample_of(prompt, r["steps"][k], ids)
            assert got is not None and ids == g.nodes[node]["token_ids"]
            assert_logprobs(lps, got[1])
    traces = {(r["problem_id"], tuple(r["steps"])): r["token_ids"] for r in t["traces"]}
    for r in t["stepwise"]:
        want = traces[(r["problem_id"], tuple(r["completions"]))]
        assert r["completion_token_ids"] == want and all(want)


def test_to_end_samples_keep_their_tokens_on_the_tail_only(tmp_path):
    gen, t = run_tokens(tmp_path, algorithm="best_of_n")
    pairs = t["pairs_dpo"]
    tails = 0
    for pid in ("p0", "p1"):
        g = load_tree(tree_path(tmp_path, pid, "best_of_n"))
        root = next(n for n, d in g.in_degree() if d == 0)
        msgs = [
            {"role": m.role, "content": m.content}
            for m in problem_messages(g.graph["question"], DEFAULT_SYSTEM)
        ]
        for n, a in g.nodes(data=True):
            assert "token_ids" not in a and "token_logprobs" not in a  # pieces: no step ids
            if n == root:
                continue
            if g.out_degree(n) == 0:  # a chain's last piece: the whole sample
                tails += 1
                nodes = []
                cur = n
                while cur != root:
                    nodes.append(cur)
                    cur = next(iter(g.predecessors(cur)))
                nodes.reverse()
                assert a["sample_head"] == nodes[0]
                text = "\n\n".join(g.nodes[x]["text"] for x in nodes)
                got = gen.sample_of(msgs, text, a["sample_token_ids"])
                assert got is not None
                assert_logprobs(a["sample_token_logprobs"], got[1])
            else:
                assert "sample_token_ids" not in a and "sample_head" not in a
    assert tails >= 4
    step = [p for p in pairs if p["kind"] == "step"]
    assert step
    for p in step:
        for k in ("chosen", "rejected"):
            assert p[f"{k}_token_ids"] is None and p[f"{k}_token_logprobs"] is None
    traj = [p for p in pairs if p["kind"] == "trajectory"]
    assert traj
    for p in traj:
        g = load_tree(tree_path(tmp_path, p["problem_id"], "best_of_n"))
        for k in ("chosen", "rejected"):
            a = g.nodes[p[f"{k}_node"]]
            assert p[f"{k}_token_ids"] == a["sample_token_ids"]
            text = p[k][0]["content"]  # the solution, its steps joined by the delimiter
            got = gen.sample_of(p["prompt"], text, p[f"{k}_token_ids"])
            assert got is not None
            assert_logprobs(p[f"{k}_token_logprobs"], got[1])
    for r in t["traces"]:  # per step: unknown
        assert r["token_ids"] == [None] * len(r["steps"])
        assert r["token_logprobs"] == [None] * len(r["steps"])


def test_trees_without_tokens_still_export_with_nulls(tmp_path):
    _, t = run_tokens(tmp_path)
    assert any(p["chosen_token_ids"] for p in t["pairs_dpo"])
    keys = ("token_ids", "token_logprobs", "sample_token_ids", "sample_token_logprobs")
    for f in (tmp_path / "trees").rglob("*.json"):
        data = json.loads(f.read_text())
        stripped = 0
        for node in data["nodes"]:
            for k in (*keys, "sample_head"):
                stripped += node.pop(k, None) is not None
        assert stripped
        f.write_text(json.dumps(data))  # as a tree written before tokens were recorded
    info = write_exports(tmp_path, 0.1, draw=False)
    pairs = pq.read_table(info["pairs_dpo"]).to_pylist()
    assert [p["chosen_node"] for p in pairs] == [p["chosen_node"] for p in t["pairs_dpo"]]
    for p in pairs:
        for k in ("chosen", "rejected"):
            assert p[f"{k}_token_ids"] is None and p[f"{k}_token_logprobs"] is None
    traces = pq.read_table(info["traces"]).to_pylist()
    assert traces
    for r in traces:
        assert r["token_ids"] == r["token_logprobs"] == [None] * len(r["steps"])
    stepwise = pq.read_table(info["stepwise"]).to_pylist()
    assert stepwise
    for r in stepwise:
        assert r["completion_token_ids"] == [None] * len(r["completions"])

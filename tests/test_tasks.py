"""Problem sources: reasoning-gym by name and seed, JSONL files, the registry and configs."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mcts.tasks import (
    GymScorer,
    TaskConfig,
    TaskFileError,
    known_tasks,
    load_jsonl,
    load_task,
    question_id,
    reference_answer,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "task"
ARITH = {
    "source": "reasoning_gym",
    "name": "basic_arithmetic",
    "size": 6,
    "seed": 3,
    "params": {
        "min_terms": 2,
        "max_terms": 2,
        "min_digits": 1,
        "max_digits": 1,
        "operators": ["+"],
    },
}


# ---------------------------------------------------------------- reasoning-gym


def test_reasoning_gym_problems_are_stable_and_checkable():
    a = load_task(ARITH)
    b = load_task(dict(ARITH, size=10))
    assert [p.id for p in a] == [f"basic_arithmetic-3-{i}" for i in range(6)]
    # the same (name, params, seed, index) gives the same problem whatever the size
    assert [(p.id, p.question, p.answer) for p in a] == [
        (p.id, p.question, p.answer) for p in b[:6]
    ]
    for p in a:
        assert p.task == "basic_arithmetic" and p.question.startswith("Calculate")
        terms = [int(t) for t in re.findall(r"-?\d+", p.question)]
        assert len(terms) == 2 and p.answer == str(sum(terms))
        assert p.check(p.answer) == 1.0
        assert p.check(str(int(p.answer) + 1)) == 0.0
        assert p.check(None) == 0.0


def test_reasoning_gym_seed_changes_problems():
    a = load_task(dict(ARITH, size=8))
    c = load_task(dict(ARITH, size=8, seed=4))
    assert [p.question for p in a] != [p.question for p in c]


def test_problem_with_check_survives_pickle():
    p = load_task(ARITH)[2]
    q = pickle.loads(pickle.dumps(p))
    assert isinstance(q.check, GymScorer)
    assert q == p and q.check(p.answer) == 1.0 and q.check("nonsense") == 0.0


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match="basic_arithmetic") as e:
        load_task(dict(ARITH, name="basic_arithmetc"))
    assert "Did you mean" in str(e.value) and "gsm_symbolic" in str(e.value)
    assert "basic_arithmetic" in known_tasks()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"params": {"bogus": 1}}, "bogus"),
        ({"params": {"min_terms": 5, "max_terms": 2}}, "max_terms"),
        ({"params": {"seed": 1}}, "task.seed"),
        ({"size": 0}, "task.size"),
        ({"size": "ten"}, "task.size"),
        ({"source": "nowhere"}, "known sources"),
        ({"sizee": 3}, "sizee"),
    ],
)
def test_bad_reasoning_gym_config(change, match):
    with pytest.raises(ValueError, match=match):
        load_task(dict(ARITH, **change))


def test_config_type_is_checked():
    with pytest.raises(TypeError, match="task config"):
        load_task(["basic_arithmetic"])


# ---------------------------------------------------------------- JSONL


def write(tmp_path, lines, name="p.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_jsonl_gsm8k_style(tmp_path):
    path = write(
        tmp_path,
        [
            {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
            {"id": 17, "question": "What is 1,000 + 234?", "answer": "#### 1,234"},
            "",
        ],
    )
    ps = load_task({"source": "jsonl", "path": str(path)})
    assert [p.answer for p in ps] == ["7", "1234"]
    assert ps[0].id == question_id("Tom has 3 apples and buys 4. How many?")
    assert ps[0].id.startswith("q-") and ps[1].id == "17"
    assert ps[0].meta["solution"].startswith("3 + 4") and ps[0].meta["line"] == 1
    assert ps[0].task == "jsonl" and ps[0].check is None
    # stable across loads
    assert [p.id for p in load_jsonl(path)] == [p.id for p in ps]


def test_jsonl_math_style_and_raw(tmp_path):
    sol = r"We get $x = \frac{1}{2}$, so $\boxed{\frac{1}{2}}$."
    path = write(tmp_path, [{"problem": "Solve 2x = 1.", "solution": sol}])
    cfg = {
        "source": "jsonl",
        "path": str(path),
        "question_field": "problem",
        "answer_field": "solution",
    }
    assert load_task(cfg)[0].answer == r"\frac{1}{2}"
    assert load_task(dict(cfg, answer_format="raw"))[0].answer == sol
    assert reference_answer("  42 ") == "42"
    with pytest.raises(ValueError, match="answer_format"):
        load_task(dict(cfg, answer_format="fancy"))


def test_jsonl_malformed_line_raise_names_file_and_line(tmp_path):
    path = write(
        tmp_path,
        [
            {"question": "a?", "answer": "1"},
            '{"question": "b?", "answer"',
            {"question": "c?", "answer": "3"},
        ],
    )
    with pytest.raises(TaskFileError, match=r"p\.jsonl:2: malformed JSON"):
        load_task({"source": "jsonl", "path": str(path)})
    with pytest.warns(UserWarning, match=r"skipped 1 bad line.*p\.jsonl:2"):
        ps = load_task({"source": "jsonl", "path": str(path), "on_error": "skip"})
    assert [p.question for p in ps] == ["a?", "c?"]


def test_jsonl_missing_fields(tmp_path):
    path = write(tmp_path, [{"question": "a?", "answer": "1"}, {"q": "b?", "answer": "2"}])
    with pytest.raises(TaskFileError, match=r":2: missing or empty question field 'question'"):
        load_jsonl(path)
    path = write(tmp_path, [{"question": "a?"}], name="noans.jsonl")
    with pytest.raises(TaskFileError, match=r"noans\.jsonl:1: missing or empty answer field"):
        load_jsonl(path)
    assert load_jsonl(path, answer_field=None)[0].answer is None  # unlabeled on purpose
    path = write(tmp_path, [[1, 2]], name="list.jsonl")
    with pytest.raises(TaskFileError, match="expected a JSON object"):
        load_jsonl(path)


def test_jsonl_duplicate_ids_are_an_error(tmp_path):
    path = write(
        tmp_path,
        [
            {"id": "x", "question": "a?", "answer": "1"},
            {"id": "x", "question": "b?", "answer": "2"},
        ],
    )
    with pytest.raises(TaskFileError, match=r"duplicate problem id 'x' \(first on line 1\)"):
        load_jsonl(path)
    path = write(
        tmp_path,
        [{"question": "same?", "answer": "1"}, {"question": "same?", "answer": "1"}],
        name="q.jsonl",
    )
    with pytest.raises(TaskFileError, match="duplicate"):
        load_jsonl(path, on_error="skip")  # duplicates are never skipped silently


def test_jsonl_empty_missing_and_size(tmp_path):
    empty = write(tmp_path, ["", ""], name="empty.jsonl")
    with pytest.raises(TaskFileError, match="no problems"):
        load_jsonl(empty)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_task({"source": "jsonl", "path": str(tmp_path / "nope.jsonl")})
    with pytest.raises(ValueError, match="task.path is required"):
        load_task({"source": "jsonl"})
    path = write(tmp_path, [{"question": f"{i}?", "answer": str(i)} for i in range(5)])
    assert len(load_task({"source": "jsonl", "path": str(path), "size": 2})) == 2
    with pytest.raises(ValueError, match="on_error"):
        load_jsonl(path, on_error="ignore")
    with pytest.raises(ValueError, match="task.params"):
        load_task({"source": "jsonl", "path": str(path), "params": {"x": 1}})


# ---------------------------------------------------------------- Hydra configs


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_task_configs_fit_the_schema(name):
    node = OmegaConf.merge(
        OmegaConf.structured(TaskConfig), OmegaConf.load(CONFIGS / f"{name}.yaml")
    )
    assert node.source in ("reasoning_gym", "jsonl")
    if node.source == "reasoning_gym":
        ps = load_task(OmegaConf.merge(node, {"size": 3}))
        assert len(ps) == 3 and all(p.answer for p in ps)
    else:
        with pytest.raises(ValueError, match="task.path"):
            load_task(node)


def test_default_task_config_is_the_measured_one():
    node = OmegaConf.load(CONFIGS / "default.yaml")
    assert node.name == "basic_arithmetic" and list(node.params.operators) == ["+"]
    assert node.params.max_digits == 1
    assert "greedy" in (CONFIGS / "default.yaml").read_text()


# ---------------------------------------------------------------- probe (task difficulty)


class _OracleOnEvenIds:
    """Fake generator: right on even-indexed problems greedily, sampled right once in two."""

    def __init__(self, problems):
        self.by_q = {p.question: (i, p.answer) for i, p in enumerate(problems)}

    def generate(self, requests):
        from mcts.types import Generation, Step, Usage

        out = []
        for r in requests:
            i, ans = self.by_q[r.messages[-1].content]
            texts = (
                [f"So it is {ans}." if i % 2 == 0 else "So it is 999."]
                if r.temperature == 0
                else [f"{ans}" if j % 2 == 0 else "nope 998" for j in range(r.n)]
            )
            out.append(Generation([Step(t, (1,), -1.0, (-1.0,), "eos") for t in texts], Usage()))
        return out


def test_probe_counts_greedy_and_pass_at_k():
    from mcts.tasks.probe import probe

    ps = load_task(ARITH)
    got = probe(ps, _OracleOnEvenIds(ps), samples=2)
    assert got["problems"] == 6 and got["greedy_correct"] == 3
    assert (
        got["pass_at_k_correct"] == 6 and got["sample_correct"] == 6 and got["sample_total"] == 12
    )


def test_question_space_counts_repeats_by_question_key():
    from omegaconf import OmegaConf

    from mcts.tasks.probe import CONFIG_DIR, question_space

    small = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "default.yaml"))
    wide = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "arith2d.yaml"))
    s, w = question_space(small, 600), question_space(wide, 600)
    assert s["drawn"] == w["drawn"] == 600
    # 1-digit a + b has ~19 x 19 plain questions: 600 draws must repeat; 1-2 digits rarely do
    assert s["distinct"] < 450 < w["distinct"] <= 600

"""Model text is never executed, also through a task's checker (issue 12, item 6).

Some reasoning-gym scorers hand the answer to `eval` or sympy's `parse_expr`; `GymScorer`
checks the answer against a strict per-task grammar first (mcts/tasks/safe_answers.py).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mcts.tasks import GymScorer, load_task
from mcts.tasks import safe_answers as sa

GUARDED = sorted(sa.GRAMMARS)  # the risky tasks, plus the two the scan flags on their own
PARSE_EXPR = {
    "countdown",
    "puzzle24",
    "polynomial_multiplication",
    "simple_integration",
    "intermediate_integration",
}
EVAL = {"binary_matrix", "n_queens", "spiral_matrix", "string_insertion"}


def payloads(marker_path: str) -> list[str]:
    touch = f"__import__('os').system('touch {marker_path}')"
    return [
        touch,
        f"__import__('pathlib').Path('{marker_path}').touch()",
        "().__class__.__base__.__subclasses__()",
        "lambda: 1",
        "1 if open('/etc/passwd') else 2",
        f"[{touch}]",
        f"[[{touch}]]",
        f"x + {touch} + C",
        f"1 + {touch}",
        f"exec(\"open('{marker_path}', 'w')\")",
        "[().__class__]",
        "['a'.__class__]",
        "[x for x in (1,)]",
        "[f'{1}']",
        "9**9**9**9",
        "(x+1)**999 + C",
        "x**(x*0 + 999*999*999*999) + C",
        "",
        " ",
    ]


def problems(task: str) -> list[Any]:
    return load_task({"name": task, "size": 2, "seed": 0})


def _spy_scorer(monkeypatch, problem) -> list[Any]:
    """Record every answer the dataset's own score_answer receives."""
    from reasoning_gym.factory import DATASETS

    ds_cls = DATASETS[problem.task][0]
    seen: list[Any] = []
    real = ds_cls.score_answer

    def spy(self, answer, entry):
        seen.append(answer)
        return real(self, answer, entry)

    monkeypatch.setattr(ds_cls, "score_answer", spy)
    return seen


# ---------------------------------------------------------------- the audit


def test_every_task_the_scan_flags_has_a_grammar():
    from reasoning_gym.factory import DATASETS

    flagged = {n for n, (cls, _) in DATASETS.items() if sa.scorer_risk(cls)}
    assert set(sa.RISKY_TASKS) == PARSE_EXPR | EVAL  # the audit of reasoning-gym 0.1.25
    assert set(sa.RISKY_TASKS) <= flagged
    assert flagged <= set(sa.GRAMMARS), f"no grammar for {sorted(flagged - set(sa.GRAMMARS))}"
    # the two flagged only for eval() on their own reference / problem
    assert flagged - set(sa.RISKY_TASKS) <= {"number_sorting", "bitwise_arithmetic"}
    assert sa.grammar_for("basic_arithmetic") is None  # string / number comparison only
    assert sa.grammar_for("gsm_symbolic") is None


SWEEP = textwrap.dedent(
    """
    import json, sys
    MARK = sys.argv[1]
    hits = []
    current = [None]

    def hook(event, args):
        if current[0] is None or event not in ("compile", "exec"):
            return
        src = args[0]
        if isinstance(src, (bytes, bytearray)):
            src = src.decode("utf-8", "replace")
        elif hasattr(src, "co_consts"):
            src = repr(src.co_consts) + repr(src.co_names)
        if isinstance(src, str) and MARK in src:
            hits.append(current[0])

    sys.addaudithook(hook)
    from reasoning_gym.factory import DATASETS, create_dataset
    from mcts.tasks import load_task

    # harmless if evaluated, but the marker shows up in whatever gets compiled
    harmless = [MARK, f"[{MARK}]", f"['{MARK}']", f"(1, '{MARK}')", f"{MARK}(1)"]
    raw, guarded, refused = set(), set(), []
    for name in sorted(DATASETS):
        if name == "composite":
            continue
        ds = create_dataset(name, seed=0, size=2)
        for i in range(2):
            for p in harmless:
                current[0] = name
                try:
                    ds.score_answer(p, ds[i])
                except Exception:
                    pass
                current[0] = None
        raw.update(hits); hits.clear()
        try:
            problems = load_task({"name": name, "size": 2, "seed": 0})
        except ValueError:
            refused.append(name)
            continue
        # ['MARK'] is left out: a quoted word is a literal some grammars admit (the marker is
        # longer than the 32 characters they allow anyway)
        for prob in problems:
            for p in [h for h in harmless if h[1] != "'"] + [f"__import__('os').getenv('{MARK}')"]:
                current[0] = name
                try:
                    prob.check(p)
                except Exception:
                    pass
                current[0] = None
        guarded.update(hits); hits.clear()
    got = {"raw": sorted(raw), "guarded": sorted(guarded), "refused": refused}
    print("RESULT " + json.dumps(got))
    """
)


def test_no_task_compiles_the_answer_through_check(tmp_path):
    """Every registered task, under an audit hook (in a subprocess: hooks cannot be removed)."""
    mark = f"PWNED_{uuid.uuid4().hex}"
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP)
    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    )
    out = subprocess.run(
        [sys.executable, str(script), mark],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.rsplit("RESULT ", 1)[-1])  # some generators print dots
    # called raw, exactly the audited scorers compile the answer text ...
    assert set(got["raw"]) == set(sa.RISKY_TASKS)
    # ... and through Problem.check none does
    assert got["guarded"] == [] and got["refused"] == []


# ---------------------------------------------------------------- every guarded task, for real


@pytest.mark.parametrize("task", GUARDED)
def test_payloads_score_zero_and_never_reach_the_scorer(task, tmp_path, monkeypatch):
    ps = problems(task)
    seen = _spy_scorer(monkeypatch, ps[0])
    marker = tmp_path / f"PWNED_{uuid.uuid4().hex}"
    for p in ps:
        for bad in payloads(str(marker)):
            assert p.check(bad) == 0.0, bad
        assert seen == [], f"{task} scorer saw {seen[:2]}"
        assert not marker.exists()
        # the reference answer still scores 1.0, through the dataset's own scorer
        if "Integral(" in p.answer:  # an unevaluated integral: refused on purpose
            assert p.check(p.answer) == 0.0
            continue
        assert p.check(p.answer) == 1.0
        assert seen[-1] == p.answer
        seen.clear()


@pytest.mark.parametrize(
    ("task", "module", "attr"),
    [
        ("countdown", "reasoning_gym.games.countdown", "parse_expr"),
        ("puzzle24", "reasoning_gym.games.puzzle24", "parse_expr"),
        ("polynomial_multiplication", "sympy", "parse_expr"),
        ("simple_integration", "sympy", "parse_expr"),
        ("intermediate_integration", "sympy", "parse_expr"),
        ("binary_matrix", "reasoning_gym.algorithmic.binary_matrix", "eval"),
        ("n_queens", "reasoning_gym.games.n_queens", "eval"),
        ("spiral_matrix", "reasoning_gym.algorithmic.spiral_matrix", "eval"),
        ("string_insertion", "reasoning_gym.algorithmic.string_insertion", "eval"),
    ],
)
def test_without_the_guard_the_payload_reaches_the_evaluator(
    task, module, attr, tmp_path, monkeypatch
):
    """Spy on the evaluator the scorer uses: raw, it gets the payload; through check, never."""
    import importlib

    mod = importlib.import_module(module)
    real = getattr(mod, attr, None) or eval
    marker = tmp_path / "PWNED"
    payload = f"[__import__('os').system('touch {marker}')]"
    received: list[str] = []

    def spy(text, *args, **kwargs):
        if isinstance(text, str) and "__import__" in text:
            received.append(text)
            raise ValueError("spy: refusing to evaluate the payload")
        return real(text, *args, **kwargs)

    monkeypatch.setattr(mod, attr, spy, raising=False)
    p = problems(task)[0]
    assert isinstance(p.check, GymScorer)
    from mcts.tasks.reasoning_gym import _cached_dataset

    dataset = _cached_dataset(p.check.name, p.check.params_key, p.check.seed, p.check.size)
    dataset.score_answer(payload, p.check.entry)  # the dataset's scorer, unguarded
    assert received == [payload]  # this is the hole the grammar closes
    received.clear()
    assert p.check(payload) == 0.0
    assert received == [] and not marker.exists()
    if "Integral(" not in p.answer:
        assert p.check(p.answer) == 1.0


def test_countdown_parse_expr_spy_in_sympy_itself(monkeypatch):
    """The same through sympy's own module: parse_expr never sees the payload via check."""
    import reasoning_gym.games.countdown as cd

    calls: list[str] = []
    real = cd.parse_expr

    def spy(text, *a, **k):
        calls.append(text)
        return real(text, *a, **k)

    monkeypatch.setattr(cd, "parse_expr", spy)
    p = problems("countdown")[0]
    assert p.check("__import__('os').system('true')") == 0.0
    assert p.check("().__class__.__base__.__subclasses__()") == 0.0
    assert calls == []
    assert p.check(p.answer) == 1.0 and calls == [p.answer]


# ---------------------------------------------------------------- legitimate forms still score


def test_list_forms_keep_their_partial_credit():
    sp = problems("spiral_matrix")[0]
    sol = sp.check.entry["metadata"]["solution"]
    assert sp.check(str(sol)) == 0.1 and sp.check(", ".join(map(str, sol))) == 0.1
    bm = problems("binary_matrix")[0]
    assert bm.check(str(bm.check.entry["metadata"]["solution"])) == 0.1
    nq = problems("n_queens")[0]
    board = [row.split(" ") for row in nq.answer.split("\n")]
    assert nq.check(str(board)) == 0.5 and nq.check(nq.answer) == 1.0
    si = problems("string_insertion")[0]
    assert si.check(str(list(si.answer))) == 0.1
    assert si.check("ABABAB") == 0.0 and si.check(si.answer) == 1.0
    ns = problems("number_sorting")[0]
    assert ns.check(ns.answer.replace("'", '"')) == 1.0
    assert ns.check(json.dumps([float(x) for x in json.loads(ns.answer.replace("'", '"'))])) == 1.0
    bw = problems("bitwise_arithmetic")[0]
    assert bw.check(str(int(bw.answer, 16))) == 1.0 and bw.check(bw.answer) == 1.0


def test_countdown_alternative_correct_expression():
    p = problems("countdown")[0]
    nums = p.check.entry["metadata"]["numbers"]
    # any expression over the same numbers that hits the target is right; a wrong one is not
    assert p.check(p.answer.replace(" ", "")) == 1.0
    assert p.check(" + ".join(map(str, nums))) in (0.05, 1.0)


# ---------------------------------------------------------------- the grammars themselves

CD = {"answer": "6*(98 - 54) - 34 - 66", "metadata": {"numbers": [66, 34, 98, 54, 6]}}
POLY = {"answer": "-896*x**4 + 2240*x**3 + 3584*x", "metadata": {"variables": ["x"]}}
CALC = {"answer": "-4*(-2*x - 8)**(3/2)/3 + C", "metadata": {"variable": "x"}}


@pytest.mark.parametrize(
    ("task", "entry", "answer", "ok"),
    [
        ("countdown", CD, "6*(98 - 54) - 34 - 66", True),
        ("countdown", CD, "-(6 + 98) / 2\t* 4", True),
        ("countdown", CD, "6**2", False),
        ("countdown", CD, "98 // 2", False),
        ("countdown", CD, "1 + 2 = 3", False),
        ("countdown", CD, "1.5 + 2", False),
        ("countdown", CD, "(1 + 2", False),
        ("countdown", CD, "1 + 2)", False),
        ("countdown", CD, "()", False),
        ("countdown", CD, "(1)(2)", False),
        ("countdown", CD, "1 +\n2", False),
        ("countdown", CD, "\u0663 + 1", False),  # an Arabic-Indic digit
        ("countdown", CD, "1" + "+1" * 100, False),  # over 200 characters
        ("countdown", CD, "---1", False),
        ("countdown", CD, "x + 1", False),
        ("puzzle24", CD, "1*3*5 + 9", True),
        ("polynomial_multiplication", POLY, POLY["answer"], True),
        ("polynomial_multiplication", POLY, "x**2*x**3 - 5/2*x", True),
        ("polynomial_multiplication", POLY, "y**2", False),  # not this entry's variable
        ("polynomial_multiplication", POLY, "(x+1)**2", False),
        ("polynomial_multiplication", POLY, "x**1000", False),
        ("polynomial_multiplication", POLY, "x**-1", False),
        ("polynomial_multiplication", POLY, "2**3*x", False),
        ("polynomial_multiplication", POLY, "x(2)", False),
        ("polynomial_multiplication", POLY, "2x", False),
        ("polynomial_multiplication", POLY, "S(2)*x", False),
        ("simple_integration", CALC, CALC["answer"], True),
        ("intermediate_integration", CALC, "x*asin(3*x) + sqrt(1 - 9*x**2)/3 + C", True),
        ("intermediate_integration", CALC, "E**(2*x)/2 + exp(-x) + pi*x + 0.5*x + C", True),
        ("intermediate_integration", CALC, "3*cos(3*x + 6)**5/5 + C", True),
        ("intermediate_integration", CALC, "x**(-2) + x**-1 + C", True),
        ("intermediate_integration", CALC, "3*Integral(x**3*cos(3*x), x) + C", False),
        ("intermediate_integration", CALC, "x**x + C", False),
        ("intermediate_integration", CALC, "2**x + C", False),
        ("intermediate_integration", CALC, "(x+1)**99 + C", False),
        ("intermediate_integration", CALC, "(x+1)**40*(x+2)**40 + C", False),  # budget
        ("intermediate_integration", CALC, "(x**2)**3 + C", False),
        ("intermediate_integration", CALC, "x**(2**3) + C", False),
        ("intermediate_integration", CALC, "E**(E**x) + C", False),
        ("intermediate_integration", CALC, "9**9 + C", False),
        ("intermediate_integration", CALC, "sin + C", False),
        ("intermediate_integration", CALC, "sin(x, 2) + C", False),
        ("intermediate_integration", CALC, "factorial(x) + C", False),
        ("intermediate_integration", CALC, "x.diff(x) + C", False),
        ("intermediate_integration", CALC, "lambda x: x", False),
        ("intermediate_integration", CALC, "x if x else x", False),
        ("intermediate_integration", CALC, "0.[3]*x + C", False),  # sympy repeated decimals
        ("intermediate_integration", CALC, "x! + C", False),
        ("spiral_matrix", CD, "1 2 3 4", True),
        ("spiral_matrix", CD, "[1, 2, 3,]", True),
        ("spiral_matrix", CD, "[[1, -2], [3, 4]]", True),
        ("spiral_matrix", CD, "[[[1]]]", False),
        ("spiral_matrix", CD, "[1, 2] * 99999999", False),
        ("spiral_matrix", CD, "['1']", False),
        ("spiral_matrix", CD, "[1 2]", False),
        ("spiral_matrix", CD, "[1,, 2]", False),
        ("spiral_matrix", CD, "[1, 2", False),
        ("n_queens", CD, "_ Q\nQ _", True),
        ("n_queens", CD, "[['_', 'Q'], ['Q', '_']]", True),
        ("n_queens", CD, "Q", False),
        ("n_queens", CD, "_Q _", False),
        ("n_queens", CD, "[[_, Q]]", False),
        ("n_queens", CD, "[b'_']", False),
        ("n_queens", CD, "[f'{Q}']", False),
        ("n_queens", CD, "['\\x41']", False),
        ("string_insertion", {"answer": "ABCDE"}, "ABCDE", True),
        ("string_insertion", {"answer": "ABCDE"}, "ABCDD", False),
        ("string_insertion", {"answer": "ABCDE"}, "['A', 'B', \"C\"]", True),
        ("string_insertion", {"answer": "ABCDE"}, "''.join('ABCDE')", False),
        ("number_sorting", CD, "['-1.5', '2', \"3e2\"]", True),
        ("number_sorting", CD, "[-1.5, 2, 3]", True),
        ("number_sorting", CD, "['a']", False),
        ("bitwise_arithmetic", CD, "-0x1f", True),
        ("bitwise_arithmetic", CD, "0b101", True),
        ("bitwise_arithmetic", CD, "31", True),
        ("bitwise_arithmetic", CD, "0x1f + 1", False),
        ("basic_arithmetic", CD, "__import__('os')", True),  # its scorer only compares text
    ],
)
def test_grammar(task, entry, answer, ok):
    assert sa.admits(task, answer, entry) is ok


def test_number_grammar_and_odd_inputs():
    for good in ("42", "-3.5", "+7", ".5", "3/4", " 12 "):
        assert sa.NUMBER.admits(good, {})
    for bad in ("1e5", "0x10", "1/2/3", "--1", "1 2", "", "x", "1" * 101):
        assert not sa.NUMBER.admits(bad, {})
    assert sa.admits("countdown", None, CD)  # no text: the scorer handles None itself
    assert not sa.admits("countdown", 12, CD)
    assert not sa.admits("countdown", b"1+2", CD)


def test_composite_uses_the_source_dataset_grammar():
    entry = dict(CD, metadata=dict(CD["metadata"], source_dataset="countdown"))
    assert sa.admits("composite", CD["answer"], entry)
    assert not sa.admits("composite", "__import__('os')", entry)
    loop = dict(CD, metadata={"source_dataset": "composite"})
    assert not sa.admits("composite", "1", loop)


# ---------------------------------------------------------------- unknown tasks: default to safe


def _evil(text: str) -> float:
    return float(eval(text))  # noqa: S307 - the point of the test: never reached


@dataclass
class _FakeConfig:
    seed: int | None = None
    size: int = 2

    def validate(self) -> None:
        pass


class _FakeDataset:
    def __init__(self, config: _FakeConfig) -> None:
        self.config = config
        self.calls: list[Any] = []

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"question": f"what is {i} + 1?", "answer": str(i + 1), "metadata": {}}

    def __len__(self) -> int:
        return self.config.size


class _EvalDataset(_FakeDataset):
    def score_answer(self, answer, entry):
        self.calls.append(answer)
        return 1.0 if self._value(answer) == float(entry["answer"]) else 0.0

    def _value(self, answer):
        return _evil(answer)  # two calls deep: the scan follows self._value and _evil


class _SympyDataset(_FakeDataset):
    def score_answer(self, answer, entry):
        import sympy

        self.calls.append(answer)
        return float(sympy.sympify(answer) == int(entry["answer"]))


class _PlainDataset(_FakeDataset):
    def score_answer(self, answer, entry):
        self.calls.append(answer)
        return 1.0 if answer == entry["answer"] else 0.0


@pytest.mark.parametrize("cls", [_EvalDataset, _SympyDataset])
def test_unknown_task_whose_scorer_evaluates_is_refused(cls, monkeypatch):
    from reasoning_gym.factory import DATASETS

    name = f"fake_{cls.__name__.lower()}_{uuid.uuid4().hex[:8]}"
    monkeypatch.setitem(DATASETS, name, (cls, _FakeConfig))
    assert sa.scorer_risk(cls) is not None
    with pytest.raises(ValueError, match=r"refused.*safe_answers\.py"):
        load_task({"name": name, "size": 2})
    # a scorer built by hand is refused all the same: every answer scores 0.0, unseen
    from mcts.tasks.reasoning_gym import _cached_dataset

    scorer = GymScorer(name, "{}", 0, 2, 0, {"answer": "1", "metadata": {}})
    assert scorer("1") == 0.0 and scorer("__import__('os')") == 0.0
    assert _cached_dataset(name, "{}", 0, 2).calls == []


def test_unknown_task_whose_scorer_compares_text_is_trusted(monkeypatch):
    from reasoning_gym.factory import DATASETS

    name = f"fake_plain_{uuid.uuid4().hex[:8]}"
    monkeypatch.setitem(DATASETS, name, (_PlainDataset, _FakeConfig))
    assert sa.scorer_risk(_PlainDataset) is None
    p = load_task({"name": name, "size": 2})[1]
    assert p.check("2") == 1.0 and p.check("__import__('os')") == 0.0


# ---------------------------------------------------------------- pickling (Ray)


def test_guarded_scorer_survives_pickle():
    p = problems("countdown")[0]
    q = pickle.loads(pickle.dumps(p))
    assert isinstance(q.check, GymScorer)
    assert q.check(p.answer) == 1.0
    assert q.check("__import__('os').system('true')") == 0.0

"""Model text is never executed, also through a task's own checker.

Several reasoning-gym scorers hand the answer text to Python's `eval`, or to sympy's
`parse_expr` (which is `eval` underneath), so an answer such as
`__import__('os').system(...)` would run on the machine that scores it. `GymScorer` asks
`admits(task, answer, entry)` first: an answer outside its task's grammar scores 0.0 and the
dataset's `score_answer` never sees it. The grammars below are checked by a small tokenizer
and a recursive-descent parser written here; the answer is never compiled, `ast`-parsed or
evaluated in order to be checked.

Policy (default to safe):

* `RISKY_TASKS` is the audit of reasoning-gym 0.1.25 (`AUDITED_VERSION`): every task whose
  `score_answer`, or a helper it calls, evaluates the answer. Each has a grammar in `GRAMMARS`.
  `number_sorting` and `bitwise_arithmetic` have one too: their scorers read the answer with
  `json.loads` / `int(answer, 0)` (safe) but call `eval` on their own reference / problem,
  which the source scan below cannot tell apart, so they get a grammar rather than trust.
* Any other task is scanned (`scorer_risk`): the source of its `score_answer` and of the
  functions it calls (methods on `self`, module-level names), looking for eval / exec /
  compile / parse_expr / sympify / parse_latex / `__import__` / any sympy or math-verify call.
  A task that is flagged and has no grammar is refused: `load_reasoning_gym` raises a
  ValueError naming this module, and `GymScorer` scores every answer of it 0.0. A task whose
  scorer only compares strings or parses numbers with float / Decimal / json needs no grammar.
  A task whose source cannot be read is flagged. The scan is what keeps new tasks and newer
  reasoning-gym versions safe; tests/test_task_safety.py also runs every registered task
  under an audit hook and checks that no payload gets compiled through `Problem.check`.
* `composite` entries use the grammar of their `metadata["source_dataset"]`.

What the grammars admit (whitespace is ASCII space / tab, plus newline in the list forms;
digits are ASCII 0-9 only):

* countdown, puzzle24 (`arith`): integers, `+ - * /`, unary signs, balanced parentheses
  (nesting <= 16), at most 200 characters. No `**`, `//`, `=`, names, decimals.
* polynomial_multiplication (`poly`): integers, the entry's variables
  (`metadata["variables"]`), `+ - * /`, parentheses, and `variable**n` with n a literal
  0-999. Length <= max(400, 3 x the reference).
* simple_integration, intermediate_integration (`calculus`): integers and decimals, the
  entry's variable (`metadata["variable"]`), `C`, `E`, `pi`, one-argument calls of
  sin cos tan cot sec csc asin acos atan acot sinh cosh tanh asinh acosh atanh exp log ln
  sqrt Abs, `+ - * /`, parentheses, and powers: a constant exponent must be a literal of at
  most two digits (`3`, `-2`, `(3/2)`, `0.5`) over a base that contains a variable, and the
  constant exponents add up to at most max(60, 2 x the reference's); an exponent that
  contains a variable is admitted only over `E` (`E**(2*x)`); powers never nest. Length <=
  max(300, 3 x the reference). (sympy's simplify needs seconds for `(x+1)**50` and hangs on
  `(x+1)**999` or `x**(x*0 + 999*999*...)`.) `Integral(...)` is refused: differentiating it
  gives back the integrand, so it would make every problem "solved" (41 of 400
  intermediate_integration references are such unevaluated integrals; the explicit
  antiderivative still scores 1.0).
* binary_matrix, spiral_matrix: the plain answer format (integers separated by spaces,
  commas, newlines: as Python it is a syntax error or an int / tuple literal), or a Python
  list literal of integers (nesting <= 2). <= 4000 characters.
* n_queens: the plain board (lines of `_` / `Q` separated by single spaces, at least two
  per line, so as Python it is always a syntax error), or a list literal of quoted words
  (at most 32 of: letters, digits, `_ - .` and space; no backslash, no prefix), nesting <= 2.
* string_insertion: the reference itself (the scorer returns 1.0 before its `eval`; any
  other bare word would reach `eval` as a name lookup and can only score 0.0), or a flat
  list literal of quoted words.
* number_sorting: a list literal of numbers, quoted or not (ints, decimals, exponents).
* bitwise_arithmetic: one signed integer literal, decimal or 0x / 0b / 0o, <= 200 characters.
* `NUMBER` (a signed int, decimal or fraction, <= 100 characters) is ready for number-answer
  tasks whose scorer uses sympy; reasoning-gym 0.1.25 has none.

Powers, nesting and length are bounded so that an admitted answer cannot make sympy build
huge numbers either (`9**9**9**9`, `((2)**99)**99`, `2**(x*0 + 999*999*...)`).
"""

from __future__ import annotations

import ast
import builtins
import inspect
import re
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

AUDITED_VERSION = "0.1.25"

RISKY_TASKS: dict[str, str] = {
    "countdown": "score_answer: sympy parse_expr(answer)",
    "puzzle24": "score_answer: sympy parse_expr(answer)",
    "polynomial_multiplication": "score_answer: sympy parse_expr(answer)",
    "simple_integration": "score_answer: sympy parse_expr(answer, local_dict=...)",
    "intermediate_integration": "score_answer: sympy parse_expr(answer, local_dict=...)",
    "binary_matrix": "score_answer: eval(answer) when it is not the reference",
    "n_queens": "score_answer: eval(answer) when it is not a valid board",
    "spiral_matrix": "score_answer: eval(answer) when it is not the reference",
    "string_insertion": "score_answer: eval(answer) when it is not the reference",
}
"""reasoning-gym tasks whose scorer evaluates the model's answer text (audit of 0.1.25)."""


class _Refuse(Exception):
    """The answer is outside the grammar."""


def _refuse() -> None:
    raise _Refuse


class Grammar:
    """A per-task answer grammar: `admits(answer, entry)` is True when the scorer may see it."""

    def admits(self, answer: str, entry: dict[str, Any]) -> bool:  # pragma: no cover
        raise NotImplementedError


class _RefuseAll(Grammar):
    def admits(self, answer: str, entry: dict[str, Any]) -> bool:
        return False

    def __repr__(self) -> str:
        return "REFUSE"


REFUSE = _RefuseAll()
"""The grammar of a task whose scorer may evaluate the answer and that has no grammar here."""


# ---------------------------------------------------------------- expressions

_BLANK = re.compile(r"[ \t]*")
_EXPR_TOKEN = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?)|(?P<name>[A-Za-z]+)|(?P<op>\*\*|[-+*/()])")
_SMALL_CONSTANT = re.compile(
    r"[-+]?[0-9]{1,2}(?:\.[0-9]{1,3})?|\([-+]?[0-9]{1,2}(?:\.[0-9]{1,3})?(?:/[0-9]{1,2})?\)"
)
_FIRST_INT = re.compile(r"[0-9]+")
_EXPONENTS = re.compile(r"\*\*\(?[-+]?([0-9]+)")
_SMALL_INT = re.compile(r"[0-9]{1,3}")
_VARIABLE = re.compile(r"[A-Za-z]{1,8}")


def _expr_tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos, n = 0, len(text)
    while True:
        pos = _BLANK.match(text, pos).end()  # type: ignore[union-attr]
        if pos == n:
            return out
        m = _EXPR_TOKEN.match(text, pos)
        if m is None:
            _refuse()
        assert m is not None and m.lastgroup is not None
        out.append((m.lastgroup, m.group()))
        pos = m.end()


# What a parsed sub-expression holds: (mentions a variable or constant, contains a power,
# is one bare name).
_Info = tuple[bool, bool, bool]


class _ExprParser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ;
    unary := ('+'|'-')* power ; power := atom ['**' ('+'|'-')* atom] ;
    atom := NUMBER | NAME | FUNCTION '(' expr ')' | '(' expr ')'"""

    def __init__(
        self, tokens: list[tuple[str, str]], g: ExprGrammar, names: frozenset[str], budget: int
    ):
        self.t = tokens
        self.i = 0
        self.g = g
        self.names = names
        self.depth = 0
        self.budget = budget  # what constant exponents may add up to

    def peek(self) -> str | None:
        return self.t[self.i][1] if self.i < len(self.t) else None

    def take(self) -> tuple[str, str]:
        if self.i >= len(self.t):
            _refuse()
        self.i += 1
        return self.t[self.i - 1]

    def parse(self) -> None:
        if not self.t:
            _refuse()
        self.expr()
        if self.i != len(self.t):
            _refuse()

    def expr(self) -> _Info:
        info = self.term()
        while self.peek() in ("+", "-"):
            self.take()
            info = _join(info, self.term())
        return info

    def term(self) -> _Info:
        info = self.unary()
        while self.peek() in ("*", "/"):
            self.take()
            info = _join(info, self.unary())
        return info

    def signs(self) -> int:
        n = 0
        while self.peek() in ("+", "-"):
            self.take()
            n += 1
        if n > 2:
            _refuse()
        return n

    def unary(self) -> _Info:
        n = self.signs()
        name, pow_, bare = self.power()
        return name, pow_, bare and n == 0

    def power(self) -> _Info:
        base = self.atom()
        if self.peek() != "**":
            return base
        if self.g.powers == "none":
            _refuse()
        self.take()
        start = self.i
        self.signs()
        exp = self.atom()
        if self.peek() == "**":  # a ** b ** c
            _refuse()
        text = "".join(tok for _, tok in self.t[start : self.i])
        if base[1] or exp[1]:  # powers never nest
            _refuse()
        if self.g.powers == "integer":
            if not base[2] or not _SMALL_INT.fullmatch(text):
                _refuse()
        elif exp[0]:
            # only E**(2*x): x**(x*0 + 10**9) would make sympy's simplify run for ever
            if not base[2] or self.t[start - 2][1] not in self.g.exp_bases:
                _refuse()
        elif not base[0] or not _SMALL_CONSTANT.fullmatch(text):
            _refuse()  # constant ** constant, or a big exponent
        if not exp[0]:
            self.budget -= int(_FIRST_INT.search(text).group())  # type: ignore[union-attr]
            if self.budget < 0:
                _refuse()
        return base[0] or exp[0], True, False

    def atom(self) -> _Info:
        kind, text = self.take()
        if kind == "num":
            if "." in text and not self.g.decimals:
                _refuse()
            return False, False, False
        if kind == "name":
            if text in self.g.functions:
                if self.peek() != "(":
                    _refuse()
                self.take()
                name, pow_, _ = self.group()
                return name, pow_, False
            if text in self.names or text in self.g.constants:
                return True, False, True
            _refuse()
        if text == "(":
            name, pow_, _ = self.group()
            return name, pow_, False
        _refuse()
        raise AssertionError("unreachable")

    def group(self) -> _Info:
        self.depth += 1
        if self.depth > self.g.max_depth:
            _refuse()
        info = self.expr()
        if self.peek() != ")":
            _refuse()
        self.take()
        self.depth -= 1
        return info


def _join(a: _Info, b: _Info) -> _Info:
    return a[0] or b[0], a[1] or b[1], False


def _entry_names(entry: dict[str, Any], key: str) -> frozenset[str]:
    if not key:
        return frozenset()
    value = (entry.get("metadata") or {}).get(key)
    values: Iterable[Any] = [value] if isinstance(value, str) else (value or [])
    return frozenset(v for v in values if isinstance(v, str) and _VARIABLE.fullmatch(v))


def _limit(entry: dict[str, Any], floor: int, per_reference: int) -> int:
    return max(floor, per_reference * len(str(entry.get("answer") or "")))


@dataclass(frozen=True)
class ExprGrammar(Grammar):
    """Arithmetic over numbers, the entry's variables, named constants and 1-argument calls."""

    max_len: int = 200
    len_per_reference: int = 0  # the bound grows to this many times the reference's length
    decimals: bool = False
    variables: str = ""  # the entry["metadata"] key naming the variable(s)
    constants: frozenset[str] = frozenset()
    functions: frozenset[str] = frozenset()
    powers: Literal["none", "integer", "symbolic"] = "none"
    exp_bases: frozenset[str] = frozenset()  # bare names a non-constant exponent may sit on
    power_budget: int = 0  # constant exponents add up to max(this, 2 x the reference's); 0: any
    max_depth: int = 16

    def admits(self, answer: str, entry: dict[str, Any]) -> bool:
        if len(answer) > _limit(entry, self.max_len, self.len_per_reference):
            return False
        names = _entry_names(entry, self.variables) - self.functions
        budget = 1 << 62
        if self.power_budget:
            ref = str(entry.get("answer") or "")
            budget = max(self.power_budget, 2 * sum(int(n) for n in _EXPONENTS.findall(ref)))
        try:
            _ExprParser(_expr_tokens(answer), self, names, budget).parse()
        except _Refuse:
            return False
        return True


# ---------------------------------------------------------------- list literals, plain formats

_LIST_TOKEN = re.compile(
    r"[ \t\n]*(?:(?P<open>\[)|(?P<close>\])|(?P<comma>,)"
    r"|(?P<num>-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]{1,3})?)"
    r"|(?P<str>'[-A-Za-z0-9_ .]{0,32}'|\"[-A-Za-z0-9_ .]{0,32}\"))"
)
_TRAILING = re.compile(r"[ \t\n]*")
_INT = re.compile(r"-?[0-9]+")
_QUOTED_NUMBER = re.compile(r"""(['"])[ ]*-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]{1,3})?[ ]*\1""")


def _list_tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos, n = 0, len(text)
    while True:
        m = _LIST_TOKEN.match(text, pos)
        if m is None:
            if _TRAILING.match(text, pos).end() == n:  # type: ignore[union-attr]
                return out
            _refuse()
        assert m is not None and m.lastgroup is not None
        out.append((m.lastgroup, m.group().lstrip(" \t\n")))
        pos = m.end()


@dataclass(frozen=True)
class ListGrammar(Grammar):
    """A Python list literal of atoms (ints, numbers or short quoted words), `depth` deep at most.

    As Python such text can only build lists of literals: no name, call, attribute or operator
    other than a number's sign. `plain` / `plain_if_reference` admit the task's plain format.
    """

    atoms: frozenset[str] = frozenset({"int"})  # "int", "num", "str", "quoted_num"
    depth: int = 2
    max_len: int = 4000
    plain: re.Pattern[str] | None = None
    plain_if_reference: re.Pattern[str] | None = None  # admitted only when == the reference

    def admits(self, answer: str, entry: dict[str, Any]) -> bool:
        if len(answer) > self.max_len:
            return False
        if self.plain is not None and self.plain.fullmatch(answer):
            return True
        if self.plain_if_reference is not None and self.plain_if_reference.fullmatch(answer):
            return answer == entry.get("answer")
        try:
            tokens = _list_tokens(answer)
            if not tokens or tokens[0][0] != "open":
                _refuse()
            end = self._value(tokens, 0, 0)
            if end != len(tokens):
                _refuse()
        except _Refuse:
            return False
        return True

    def _atom_ok(self, kind: str, text: str) -> bool:
        if kind == "num":
            return "num" in self.atoms or ("int" in self.atoms and bool(_INT.fullmatch(text)))
        if kind == "str":
            return "str" in self.atoms or (
                "quoted_num" in self.atoms and bool(_QUOTED_NUMBER.fullmatch(text))
            )
        return False

    def _value(self, tokens: list[tuple[str, str]], i: int, depth: int) -> int:
        if i >= len(tokens):
            _refuse()
        kind, text = tokens[i]
        if kind != "open":
            if not self._atom_ok(kind, text):
                _refuse()
            return i + 1
        if depth >= self.depth:
            _refuse()
        i += 1
        if i < len(tokens) and tokens[i][0] == "close":
            return i + 1
        while True:
            i = self._value(tokens, i, depth + 1)
            if i >= len(tokens):
                _refuse()
            if tokens[i][0] == "close":
                return i + 1
            if tokens[i][0] != "comma":
                _refuse()
            i += 1
            if i < len(tokens) and tokens[i][0] == "close":  # trailing comma
                return i + 1


@dataclass(frozen=True)
class RegexGrammar(Grammar):
    """The whole answer must match `pattern` and be at most `max_len` characters."""

    pattern: re.Pattern[str]
    max_len: int = 100

    def admits(self, answer: str, entry: dict[str, Any]) -> bool:
        return len(answer) <= self.max_len and self.pattern.fullmatch(answer) is not None


NUMBER = RegexGrammar(re.compile(r"[ \t]*[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:/[0-9]+)?[ \t]*"))
"""A signed integer, decimal or fraction: for number-answer tasks whose scorer uses sympy."""

INTEGER_LITERAL = RegexGrammar(
    re.compile(r"[ \t]*[-+]?(?:0[xX][0-9a-fA-F]+|0[bB][01]+|0[oO][0-7]+|[0-9]+)[ \t]*"),
    max_len=200,
)
"""A signed integer literal as `int(text, 0)` reads it: decimal, 0x hex, 0b binary, 0o octal."""

_INT_ROWS = re.compile(r"[ \t\n]*-?[0-9]+(?:[ \t\n,]+-?[0-9]+)*[ \t\n,]*")
_BOARD = re.compile(r"[ \t\n]*[_Q](?: [_Q])+(?:[ \t]*\n[ \t]*[_Q](?: [_Q])+)*[ \t\n]*")
_LETTERS = re.compile(r"[A-Za-z]+")

ARITH = ExprGrammar(max_len=200)
POLY = ExprGrammar(max_len=400, len_per_reference=3, variables="variables", powers="integer")
CALCULUS = ExprGrammar(
    max_len=300,
    len_per_reference=3,
    decimals=True,
    variables="variable",
    constants=frozenset({"C", "E", "pi"}),
    functions=frozenset(
        "sin cos tan cot sec csc asin acos atan acot sinh cosh tanh asinh acosh atanh "
        "exp log ln sqrt Abs".split()
    ),
    powers="symbolic",
    exp_bases=frozenset({"E"}),
    power_budget=60,
)

GRAMMARS: dict[str, Grammar] = {
    "countdown": ARITH,
    "puzzle24": ARITH,
    "polynomial_multiplication": POLY,
    "simple_integration": CALCULUS,
    "intermediate_integration": CALCULUS,
    "binary_matrix": ListGrammar(atoms=frozenset({"int"}), depth=2, plain=_INT_ROWS),
    "spiral_matrix": ListGrammar(atoms=frozenset({"int"}), depth=2, plain=_INT_ROWS),
    "n_queens": ListGrammar(atoms=frozenset({"str"}), depth=2, plain=_BOARD),
    "string_insertion": ListGrammar(atoms=frozenset({"str"}), depth=1, plain_if_reference=_LETTERS),
    "bitwise_arithmetic": INTEGER_LITERAL,
    "number_sorting": ListGrammar(atoms=frozenset({"num", "quoted_num"}), depth=1),
}
"""Per-task answer grammars; see the module docstring for what each admits."""


# ---------------------------------------------------------------- the source scan

_RISKY_SOURCE = re.compile(
    r"(?<![\w.])(?:eval|exec|compile)\s*\("
    r"|\b(?:parse_expr|sympify|parse_latex|__import__|import_module|sympy|math_verify"
    r"|latex2sympy\w*)\b"
)
_RISKY_MODULES = ("sympy", "math_verify", "latex2sympy2_extended", "latex2sympy2")


def _callees(fn: Callable[..., Any], cls: type, tree: ast.AST) -> Iterable[Any]:
    glb = getattr(fn, "__globals__", {})
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name):
            yield glb.get(f.id, getattr(builtins, f.id, None))
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            if f.value.id in ("self", "cls"):
                yield getattr(cls, f.attr, None)
            else:
                yield getattr(glb.get(f.value.id), f.attr, None)


def scorer_risk(cls: type) -> str | None:
    """Why `cls.score_answer` may evaluate the answer text (None when the scan finds nothing).

    Reads the source of `score_answer` and, transitively, of the functions it calls on
    `self` or by a module-level name that live in the dataset's own package. A function whose
    source cannot be read counts as risky.
    """
    root = cls.__module__.split(".")[0]
    todo: list[Any] = [getattr(cls, "score_answer", None)]
    seen: set[int] = set()
    while todo:
        fn = todo.pop()
        if inspect.isfunction(fn):
            fn = inspect.unwrap(fn)
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        label = getattr(fn, "__qualname__", repr(fn))
        if fn in (eval, exec, compile, __import__):
            return f"calls {fn.__name__}()"
        module = getattr(fn, "__module__", None) or ""
        if module.split(".")[0] in _RISKY_MODULES:
            return f"calls {module}.{getattr(fn, '__name__', '?')}"
        if not inspect.isfunction(fn) or module.split(".")[0] not in (root, "reasoning_gym"):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(fn))
            tree = ast.parse(src)  # the package's own source, never model text
        except (OSError, TypeError, SyntaxError):
            return f"{label}: source not readable"
        hit = _RISKY_SOURCE.search(src)
        if hit:
            return f"{label} mentions {hit.group().strip()!r}"
        todo.extend(c for c in _callees(fn, cls, tree) if c is not None)
    return None


@lru_cache(maxsize=512)
def _task_risk(name: str) -> str | None:
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        return "not a registered reasoning-gym task"
    return scorer_risk(DATASETS[name][0])


def grammar_for(task: str, entry: dict[str, Any] | None = None) -> Grammar | None:
    """The grammar answers of `task` must pass; None when its scorer only compares text."""
    if task == "composite" and entry is not None:
        task = str((entry.get("metadata") or {}).get("source_dataset", ""))
        if task == "composite":
            return REFUSE
    if task in GRAMMARS:
        return GRAMMARS[task]
    return REFUSE if _task_risk(task) is not None else None


def admits(task: str, answer: Any, entry: dict[str, Any]) -> bool:
    """True when the scorer of `task` may see `answer` (None: nothing to execute)."""
    if answer is None:
        return True
    if not isinstance(answer, str):
        return False
    g = grammar_for(task, entry)
    return g is None or g.admits(answer, entry)


def ensure_guarded(name: str, params: dict[str, Any] | None = None) -> None:
    """Raise ValueError when task `name` (or a composite's part) would be refused outright."""
    names = [name]
    if name == "composite":
        names = [
            d.get("name") if isinstance(d, dict) else getattr(d, "name", None)
            for d in (params or {}).get("datasets") or []
        ]
    for n in names:
        if n in GRAMMARS:
            continue
        why = _task_risk(str(n))
        if why is not None:
            raise ValueError(
                f"reasoning-gym task {n!r} is refused: its score_answer may evaluate the "
                f"model's answer text ({why}) and mcts/tasks/safe_answers.py has no grammar "
                "for it; add one to GRAMMARS (audited for reasoning-gym "
                f"{AUDITED_VERSION}) before using this task"
            )

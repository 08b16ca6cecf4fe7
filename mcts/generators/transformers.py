"""transformers backend: any HF causal LM (CPU or GPU), one left-padded batch per wave.

Used where a user has HF weights but no vLLM. Sampling runs in our own decode loop (KV cache,
left padding, explicit position ids) so every sample draws from its own RNG derived from
(request.seed, sample index): a seeded request reproduces its samples whatever else is in the
wave (up to float reassociation of differently padded batches). There is no prefix cache:
`cached_prompt_tokens` is always 0.

Step features (`TransformersGenerator(..., features=True)` or `enable_features()`): every Step carries the hidden state the
lm_head read at the end of the step (the model's final-norm output; see mcts.types.Step and
`feature_identity`), taken by a forward pre-hook on the output embedding during the same
forward passes that give the logits.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mcts.generators.base import (
    GenerationError,
    StepBuilder,
    Wave,
    check_prompt_fits,
    continuation_sequences,
    log_softmax,
    messages_as_dicts,
    model_source,
    run_wave,
    sample_rng,
    sample_token,
    validate_continuation_requests,
    validate_step_requests,
)
from mcts.types import ContinuationRequest, Generation, Message, Step, StepRequest, Usage


@dataclass
class TransformersConfig:
    """Hydra config (configs/generator/transformers.yaml).

    model: HF id or local folder; None = the embedded SmolLM2 GGUF, loaded by transformers.
    gguf_file: a GGUF file name inside `model` (transformers dequantizes it).
    n_ctx: context window; None = the model's max_position_embeddings.
    batch_size: most sequences (samples) per forward pass.
    """

    backend: str = "transformers"
    model: str | None = None
    gguf_file: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    n_ctx: int | None = None
    batch_size: int = 32
    seed: int = 0
    trust_remote_code: bool = False


def _cache_of(out: Any) -> Any:
    """The KV cache of a forward output, whatever this transformers version calls it."""
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else out.cache


@dataclass
class _Row:
    """One sample being decoded: which request, its prompt ids and its own RNG."""

    req: int
    prompt: list[int]
    rng: Any
    builder: StepBuilder
    temperature: float
    top_p: float
    max_tokens: int
    stop: str = "\n\n"
    done: bool = False
    # Features on: the hidden state whose logits chose the last sampled token, and (to_end)
    # the states that chose each token completing a delimiter (Step.features rows).
    state: Any = None
    delims: list[Any] = field(default_factory=list)


class TransformersGenerator:
    """Generator over a HF model + tokenizer. Build with `from_config` or pass objects."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        n_ctx: int | None = None,
        batch_size: int = 32,
        seed: int = 0,
        features: bool = False,
    ) -> None:
        import torch

        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "tokenizer has no chat_template: requests are rendered with the model's own "
                "template; use an instruct/chat model or set tokenizer.chat_template"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.n_ctx = int(n_ctx or getattr(model.config, "max_position_embeddings", 2048))
        self.device = next(model.parameters()).device
        self._rng = np.random.default_rng(seed)
        self._seed = seed  # for identity()
        self.features = bool(features)
        self._torch = torch
        # transformers 5.x renamed `past_key_values` to `cache`; accept both.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        eos = set()
        for src in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, list | tuple):
                eos.update(int(x) for x in src)
        if not eos:
            raise ValueError("the tokenizer/model defines no eos_token_id")
        self.eos_ids = frozenset(eos)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids))

    @classmethod
    def from_config(cls, cfg: TransformersConfig) -> TransformersGenerator:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir, gguf_file = cfg.model, cfg.gguf_file
        if model_dir is None:
            from mcts.generators.base import embedded_model_path

            path = embedded_model_path()
            model_dir, gguf_file = str(path.parent), path.name
        if gguf_file is not None and not (Path(model_dir) / gguf_file).is_file():
            raise FileNotFoundError(f"model: no GGUF file {gguf_file!r} in {model_dir!r}")
        dtype = getattr(torch, cfg.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch dtype name like 'float32', got {cfg.dtype!r}")
        kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
        if gguf_file is not None:
            kw["gguf_file"] = gguf_file
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or model_dir, **kw)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kw).to(cfg.device)
        gen = cls(model, tokenizer, n_ctx=cfg.n_ctx, batch_size=cfg.batch_size, seed=cfg.seed)
        gen._weights = str(Path(model_dir) / gguf_file) if gguf_file else str(model_dir)
        return gen

    def identity(self) -> dict[str, Any]:
        """What results depend on: the weights (hashed when local), the chat template,
        dtype, device type, n_ctx and the fallback seed. batch_size is left out (samples are
        seeded per request)."""
        import hashlib

        # `or None`: a model built in memory has name_or_path "" (which would hash the cwd).
        weights = (
            getattr(self, "_weights", None) or getattr(self.model, "name_or_path", None) or None
        )
        template = str(getattr(self.tokenizer, "chat_template", "") or "")
        return {
            "backend": "transformers",
            **model_source(weights),
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "dtype": str(getattr(self.model, "dtype", "")),
            "device": self.device.type,
            "n_ctx": self.n_ctx,
            "seed": getattr(self, "_seed", None),
        }

    # ------------------------------------------------------------------ features

    def enable_features(self) -> None:
        """From now on every returned Step carries `features`; samples do not change."""
        self.features = True

    def feature_identity(self) -> dict[str, Any]:
        """What a value head trained on Step.features depends on. layer "output_norm": the
        input of the output embedding (lm_head), i.e. the last layer's output after the final
        norm, at the last token fed before the step ended ("last_token_of_step")."""
        src = {k: v for k, v in self.identity().items() if k != "model_path"}
        return {
            "backend": "transformers",
            **{k: src[k] for k in ("model", "model_sha256") if k in src},
            "dtype": src["dtype"],
            "layer": "output_norm",
            "pooling": "last_token_of_step",
            "dim": int(self.model.get_output_embeddings().in_features),
        }

    def features_of(self, texts: Sequence[tuple[Sequence[Message], str]]) -> np.ndarray:
        """The state (as in Step.features) at the LAST token of render(messages) + prefix, by
        a forward pass per pair (prefix = steps joined by the delimiter, no trailing one).
        Returns float32 (len(texts), dim)."""
        if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
            raise TypeError("features_of() takes a sequence of (messages, prefix) pairs")
        torch = self._torch
        dim = int(self.model.get_output_embeddings().in_features)
        out = np.empty((len(texts), dim), dtype=np.float32)
        for i, pair in enumerate(texts):
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise TypeError(f"texts[{i}] must be a (messages, prefix) pair")
            messages, prefix = pair
            if (
                not isinstance(prefix, str)
                or not isinstance(messages, list | tuple)
                or not all(isinstance(m, Message) for m in messages)
            ):
                raise TypeError(f"texts[{i}] must be (sequence of Message, str)")
            ids = self.encode(self.render(messages, prefix))
            check_prompt_fits(i, len(ids), 0, self.n_ctx)
            with self._capture() as seen, torch.inference_mode():
                self.model(input_ids=torch.tensor([ids], device=self.device), logits_to_keep=1)
            out[i] = seen[0][0]
        return out

    @contextlib.contextmanager
    def _capture(self) -> Iterator[list[Any]]:
        """While open, `seen[0]` is the lm_head input at the last position of the latest
        forward pass, a float32 numpy copy (batch, dim)."""
        seen: list[Any] = [None]

        def pre_hook(_module: Any, args: tuple[Any, ...]) -> None:
            seen[0] = args[0][:, -1, :].float().cpu().numpy().copy()

        handle = self.model.get_output_embeddings().register_forward_pre_hook(pre_hook)
        try:
            yield seen
        finally:
            handle.remove()

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

    # ------------------------------------------------------------------ generate

    def generate(self, requests: Sequence[StepRequest]) -> list[Generation]:
        """Sample `n` steps for every request of the wave, batched across requests."""
        validate_step_requests(requests)
        prompts = run_wave(requests, lambda i, r: self.encode(self.render(r.messages, r.prefix)))
        for i, (r, ids) in enumerate(zip(requests, prompts, strict=True)):
            check_prompt_fits(i, len(ids), r.max_tokens, self.n_ctx)
        rows = [
            _Row(
                req=i,
                prompt=prompts[i],
                rng=sample_rng(r.seed, j, self._rng),
                builder=StepBuilder(r.stop, r.to_end),
                temperature=float(r.temperature),
                top_p=float(r.top_p),
                max_tokens=r.max_tokens,
                stop=r.stop,
            )
            for i, r in enumerate(requests)
            for j in range(r.n)
        ]
        # Similar lengths share a batch: less padding.
        order = sorted(range(len(rows)), key=lambda k: len(rows[k].prompt))
        for start in range(0, len(order), self.batch_size):
            batch = [rows[k] for k in order[start : start + self.batch_size]]
            try:
                self._decode(batch)
            except GenerationError:
                raise
            except Exception as exc:
                raise GenerationError(
                    f"requests[{batch[0].req}] (batch of {len(batch)} samples) failed in the "
                    f"model ({type(exc).__name__}: {exc}); no result of this wave was returned",
                    request_index=batch[0].req,
                ) from exc
        steps: list[list[Step]] = [[] for _ in requests]
        usages = [Usage(prompt_tokens=len(p)) for p in prompts]
        for row in rows:  # rows are in (request, sample) order
            step = row.builder.build()
            if self.features:
                n = len(step.text.split(row.stop))
                feats = [*row.delims[: n - 1], row.state]
                if len(feats) != n:
                    raise GenerationError(f"internal: {len(feats)} feature rows for {n} pieces")
                step = replace(step, features=np.stack(feats))
            steps[row.req].append(step)
            usages[row.req].generated_tokens += step.n_tokens
        return Wave(steps, usages).generations()

    def _decode(self, batch: list[_Row]) -> None:
        if not self.features:
            return self._decode_loop(batch, None)
        with self._capture() as seen:
            return self._decode_loop(batch, seen)

    def _decode_loop(self, batch: list[_Row], seen: list[Any] | None) -> None:
        torch = self._torch
        width = max(len(r.prompt) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[b, width - len(r.prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
            )
            last_pos = pos[:, -1]
            for _ in range(max(r.max_tokens for r in batch)):
                logits = out.logits[:, -1, :].float().cpu().numpy()
                states = seen[0] if seen is not None else None
                nxt = []
                for b, r in enumerate(batch):
                    if r.done:
                        nxt.append(self.pad_id)
                        continue
                    tok, lp = sample_token(logits[b], r.temperature, r.top_p, r.rng)
                    nxt.append(tok)
                    if states is not None:
                        r.state = states[b]  # the state whose logits chose `tok`
                    if tok in self.eos_ids:
                        r.builder.add_eos(tok, lp)
                        r.done = True
                    else:
                        text = self.tokenizer.decode(
                            r.builder.token_ids + [tok], skip_special_tokens=False
                        )
                        r.done = r.builder.add_decoded(tok, lp, text)
                        if states is not None and r.builder.to_end:
                            # Delimiters of step.text (= text.strip()), left to right as
                            # str.split finds them; this token completed any new one.
                            n_delims = text.lstrip().count(r.stop)
                            r.delims.extend([r.state] * (n_delims - len(r.delims)))
                    if len(r.builder.token_ids) >= r.max_tokens:
                        r.done = True
                if all(r.done for r in batch):
                    break
                step_ids = torch.tensor(nxt, dtype=torch.long, device=self.device)[:, None]
                mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
                last_pos = last_pos + 1
                out = self.model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=last_pos[:, None],
                    use_cache=True,
                    **{self._cache_kw: _cache_of(out)},
                )

    # ------------------------------------------------------------------ logprob_of

    def logprob_of(self, requests: Sequence[ContinuationRequest]) -> tuple[np.ndarray, list[Usage]]:
        """Summed logprob of each fixed continuation after each rendered prompt.

        Usage.prompt_tokens counts every token fed to the model: the prompt once plus each
        continuation's tokens.
        """
        validate_continuation_requests(requests)
        if not requests:
            return np.zeros((0, 0)), []
        prompts = run_wave(requests, lambda i, r: self.encode(self.render(r.messages, r.prefix)))
        seqs, usages = continuation_sequences(requests, prompts, self.encode, self.n_ctx)
        out = np.full((len(requests), len(requests[0].continuations)), np.nan)
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start : start + self.batch_size]
            try:
                vals = self._score(chunk)
            except Exception as exc:
                raise GenerationError(
                    f"requests[{chunk[0][0]}] failed in logprob_of ({type(exc).__name__}: {exc})",
                    request_index=chunk[0][0],
                ) from exc
            for (i, j, _, _), v in zip(chunk, vals, strict=True):
                out[i, j] = v
        if not np.isfinite(out).all():
            raise GenerationError("logprob_of produced non-finite values")
        return out, usages

    def _score(self, chunk: list[tuple[int, int, list[int], int]]) -> list[float]:
        torch = self._torch
        width = max(len(s[2]) for s in chunk)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, (_, _, seq, _) in enumerate(chunk):
            ids[b, width - len(seq) :] = torch.tensor(seq)
            mask[b, width - len(seq) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=pos.to(self.device),
            ).logits
        vals = []
        for b, (_, _, seq, n_prompt) in enumerate(chunk):
            off = width - len(seq)
            # Only the positions that predict continuation tokens (full-vocab rows are large).
            rows = logits[b, off + n_prompt - 1 : off + len(seq) - 1].float().cpu().numpy()
            lp = log_softmax(rows)
            cont = seq[n_prompt:]
            vals.append(float(sum(lp[k, t] for k, t in enumerate(cont))))
        return vals

"""Hugging Face process reward models (transformers + torch), scored per step in one forward.

Two families, one code path:
* Math-Shepherd style (`MathShepherdPRM`): a causal LM; a step tag ("ки") follows each step
  and the step's score is P("+") / (P("+") + P("-")) from the logits AT the tag token.
* Classification-head PRMs in the Qwen2.5-Math-PRM style (`ClassifierPRM`): a separator
  token ("<extra_0>") follows each step and the step's score is softmax(head logits)[1] there.

The text is tokenized whole (so BPE merges match training) and each tag's token is found
through the fast tokenizer's offset mapping, so a tag-looking string inside the question or a
step is never mistaken for a tag. Causal attention and right padding make a step's score
depend only on the text up to its tag. Sequences longer than `max_length` keep their LAST
tokens (the scored step); tags cut off on the left simply do not take part in aggregation
(counted in `truncated`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mcts.types import ScoreItem
from rewards.base import (
    AGGREGATIONS,
    RewardError,
    aggregate_steps,
    finite_scores,
    validate_items,
)

__all__ = ["HFPRM", "MathShepherdPRM", "ClassifierPRM"]


def _torch_dtype(torch: Any, name: str) -> Any:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"prm.dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


class HFPRM:
    """Shared machinery: tokenize with offsets, batch forward, gather the tag positions."""

    name = "prm"
    requires_reference = False

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        aggregate: str = "last",
        batch_size: int = 8,
        max_length: int = 4096,
        device: str = "cpu",
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ) -> None:
        import torch

        if aggregate not in AGGREGATIONS and aggregate != "product":
            raise ValueError(f"prm.aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"prm.batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"prm.max_length must be an int >= 2, got {max_length!r}")
        self._torch = torch
        self.aggregate = aggregate
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        if isinstance(model, str):
            from transformers import AutoTokenizer

            self.model = self._load(model, _torch_dtype(torch, dtype), trust_remote_code)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(
                model, trust_remote_code=trust_remote_code
            )
        else:
            self.model = model
            if tokenizer is None:
                raise ValueError("prm: pass `tokenizer` along with a preloaded model object")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "prm needs a fast (Rust) tokenizer for its offset mapping; load it with "
                "AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        self.tokenizer = tokenizer
        self.model.to(device)
        self.model.eval()
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.truncated = 0
        self.last_tokens = np.zeros(0, dtype=np.int64)
        self.last_step_scores: list[np.ndarray] = []

    # -- subclass hooks ------------------------------------------------------------------
    def _load(self, path: str, dtype: Any, trust_remote_code: bool) -> Any:
        raise NotImplementedError

    def format(self, item: ScoreItem) -> tuple[str, list[int]]:
        """(text, char offset of each step's tag); one tag per step, in order."""
        raise NotImplementedError

    def _probs(self, logits: Any) -> Any:
        """Per-position P(step correct) from the model's output logits (B, T, ...)."""
        raise NotImplementedError

    def _logits(self, ids: Any, mask: Any) -> Any:
        out = self.model(input_ids=ids, attention_mask=mask)
        return out.logits if hasattr(out, "logits") else out[0]

    # -- scoring ---------------------------------------------------------------------------
    def _encode(self, item: ScoreItem, index: int) -> tuple[list[int], list[int]]:
        text, tag_chars = self.format(item)
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids: list[int] = list(enc["input_ids"])
        offsets = enc["offset_mapping"]
        positions: list[int] = []
        t = 0
        for c in tag_chars:
            while t < len(offsets) and not (offsets[t][0] <= c < offsets[t][1]):
                t += 1
            if t == len(offsets):
                raise RewardError(
                    f"{self.name}: the step tag of items[{index}] maps to no token "
                    "(check the tag string against the tokenizer)",
                    self.name,
                    index,
                )
            positions.append(t)
            t += 1
        if len(ids) > self.max_length:
            cut = len(ids) - self.max_length
            ids = ids[cut:]
            positions = [p - cut for p in positions if p >= cut]
            self.truncated += 1
            if not positions:
                raise RewardError(
                    f"{self.name}: items[{index}] last step alone exceeds max_length="
                    f"{self.max_length} tokens; raise prm.max_length",
                    self.name,
                    index,
                )
        return ids, positions

    def step_scores(self, items: Sequence[ScoreItem]) -> list[np.ndarray]:
        """Per-step scores of every item (scores for steps cut off by truncation omitted)."""
        validate_items(items, self.name)
        torch = self._torch
        encoded = [self._encode(it, i) for i, it in enumerate(items)]
        self.last_tokens = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
        result: list[np.ndarray] = [np.zeros(0)] * len(items)
        # Sort by length so each batch pads little; results go back to their slots.
        order = sorted(range(len(items)), key=lambda i: len(encoded[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(encoded[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), int(self.pad_id), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, i in enumerate(chunk):
                seq = encoded[i][0]
                ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[b, : len(seq)] = 1
            with torch.inference_mode():
                logits = self._logits(ids.to(self.device), mask.to(self.device))
                probs = self._probs(logits.float()).cpu().numpy().astype(np.float64)
            for b, i in enumerate(chunk):
                vals = probs[b, encoded[i][1]]
                bad = np.flatnonzero(~np.isfinite(vals))
                if bad.size:
                    raise RewardError(
                        f"{self.name}: the model produced a non-finite step score for "
                        f"items[{i}] (step {int(bad[0])}); not used",
                        self.name,
                        i,
                    )
                result[i] = vals
        self.last_step_scores = result
        return result

    def score(self, items: Sequence[ScoreItem]) -> np.ndarray:
        steps = self.step_scores(items)
        agg = [aggregate_steps(s, self.aggregate) for s in steps]
        return finite_scores(agg, self.name, len(items))


class MathShepherdPRM(HFPRM):
    """Causal-LM PRM: "question step1 ки\\nstep2 ки\\n..." ; score = P(good) vs P(bad) at each tag."""

    name = "prm_shepherd"

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        step_tag: str = "ки",
        good: str = "+",
        bad: str = "-",
        **kw: Any,
    ) -> None:
        super().__init__(model, tokenizer, **kw)
        if not step_tag or step_tag.isspace():
            raise ValueError("prm.step_tag must be a non-blank string (Math-Shepherd uses 'ки')")
        self.step_tag = step_tag
        ids = []
        for label, tok in (("good", good), ("bad", bad)):
            enc = self.tokenizer.encode(tok, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(
                    f"prm.{label}={tok!r} is {len(enc)} tokens for this tokenizer; it must be "
                    "exactly one (Math-Shepherd uses '+' and '-')"
                )
            ids.append(enc[0])
        self.label_ids = ids

    def _load(self, path: str, dtype: Any, trust_remote_code: bool) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code
        )

    def format(self, item: ScoreItem) -> tuple[str, list[int]]:
        text = item.question.strip() + " "
        tags = []
        for s in item.steps:
            text += s.strip() + " "
            tags.append(len(text))
            text += self.step_tag + "\n"
        return text, tags

    def _probs(self, logits: Any) -> Any:
        two = logits[..., self.label_ids]
        return self._torch.softmax(two, dim=-1)[..., 0]


class ClassifierPRM(HFPRM):
    """Token-classification PRM (Qwen2.5-Math-PRM style): P(label 1) at each step separator.

    head="token_classification" loads AutoModelForTokenClassification; head="auto" loads
    AutoModel (e.g. Qwen2.5-Math-PRM with trust_remote_code=True) and reads outputs[0].
    With a tokenizer chat template, the question is the user turn and the steps the assistant
    turn, as those models were trained.
    """

    name = "prm_classifier"

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        separator: str = "<extra_0>",
        system: str
        | None = "Please reason step by step, and put your final answer within \\boxed{}.",
        head: str = "token_classification",
        positive_label: int = 1,
        **kw: Any,
    ) -> None:
        if head not in ("token_classification", "auto"):
            raise ValueError(f"prm.head must be 'token_classification' or 'auto', got {head!r}")
        self.head = head
        super().__init__(model, tokenizer, **kw)
        if not separator:
            raise ValueError("prm.separator must be a non-empty string such as '<extra_0>'")
        self.separator = separator
        self.system = system
        self.positive_label = int(positive_label)
        self._use_chat = bool(getattr(self.tokenizer, "chat_template", None))

    def _load(self, path: str, dtype: Any, trust_remote_code: bool) -> Any:
        from transformers import AutoModel, AutoModelForTokenClassification

        cls = AutoModelForTokenClassification if self.head == "token_classification" else AutoModel
        return cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)

    def format(self, item: ScoreItem) -> tuple[str, list[int]]:
        body = ""
        rel = []
        for s in item.steps:
            body += s.strip()
            rel.append(len(body))
            body += self.separator
        if self._use_chat:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + [
                {"role": "user", "content": item.question},
                {"role": "assistant", "content": body},
            ]
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False)
            base = text.rfind(body)
            if base < 0:
                raise RewardError(
                    f"{self.name}: the chat template altered the steps text; cannot locate "
                    "the separators",
                    self.name,
                )
        else:
            head = item.question.strip() + "\n"
            text, base = head + body, len(head)
        return text, [base + r for r in rel]

    def _probs(self, logits: Any) -> Any:
        if logits.shape[-1] <= self.positive_label:
            raise RewardError(
                f"{self.name}: the head has {logits.shape[-1]} labels; positive_label="
                f"{self.positive_label} is out of range",
                self.name,
            )
        return self._torch.softmax(logits, dim=-1)[..., self.positive_label]

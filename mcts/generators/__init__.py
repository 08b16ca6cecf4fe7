"""Generator backends (llama.cpp embedded, transformers, vLLM) behind one small protocol.

Backends load lazily: `make_generator(cfg)` imports only the one asked for, so importing this
package never pulls torch, llama_cpp or vllm.
"""

from __future__ import annotations

from typing import Any

from mcts.generators.base import (
    ChatTemplate,
    GenerationError,
    PromptTooLongError,
    embedded_model_path,
    merge_duplicates,
)

__all__ = [
    "ChatTemplate",
    "GenerationError",
    "PromptTooLongError",
    "embedded_model_path",
    "make_generator",
    "merge_duplicates",
]


def __getattr__(name: str) -> Any:
    if name == "make_generator":
        from mcts.generators.factory import make_generator

        return make_generator
    raise AttributeError(f"module 'mcts.generators' has no attribute {name!r}")

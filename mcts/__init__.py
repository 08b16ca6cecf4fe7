"""mcts: batched Monte Carlo tree search for LLM reasoning.

`from mcts import search` is the library entry point; the heavy modules load lazily so
`import mcts` stays cheap (the numba kernels compile, or load from cache, on first use).
"""

from __future__ import annotations

from typing import Any

__all__ = ["search", "Forest"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "search":
        from mcts.search import search

        return search
    if name == "Forest":
        from mcts.tree import Forest

        return Forest
    raise AttributeError(f"module 'mcts' has no attribute {name!r}")

"""mcts: batched Monte Carlo tree search for LLM reasoning.

`from mcts import search` is the library entry point. It is imported eagerly: the function
shares its name with the module `mcts.search`, and a lazy lookup would hand out the module
whenever the submodule had been imported first.
"""

from __future__ import annotations

from typing import Any

from mcts.search import search

__all__ = ["search", "Forest"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Forest":
        from mcts.tree import Forest

        return Forest
    raise AttributeError(f"module 'mcts' has no attribute {name!r}")

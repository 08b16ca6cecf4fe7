"""The state of one batch of problems under search: what the loop and the policies share.

Its own module so that the policies (mcts.algorithms) and the loop (mcts.search) both import
it and neither imports the other.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mcts.config import SearchConfig
from mcts.prompts import join_steps
from mcts.types import Problem, Usage

if TYPE_CHECKING:
    from mcts.tree import Forest


def request_seed(cfg_seed: int, problem_id: str, node: int, wave: int) -> int:
    """A request seed that depends only on what is asked, not on wave composition."""
    return zlib.crc32(f"{cfg_seed}:{problem_id}:{node}:{wave}".encode()) & 0x7FFFFFFF


@dataclass
class NodeData:
    """The Python side of a node: what the numba forest must not hold.

    Sampled tokens. A plain step's node keeps exactly the generator's Step.token_ids /
    Step.token_logprobs: the raw sampled tokens (and the policy's own logprob of each),
    although `text` is the stripped step. Where identical siblings were merged (count > 1)
    they are the first sample's. A `to_end` sample (a full solution) is split into pieces
    at the delimiter by characters, and its tokens cannot be split exactly: its pieces carry
    no per-step `token_ids` / `token_logprobs` (empty); instead the LAST node of the chain
    carries the whole sample's ids / logprobs in `sample_token_ids` /
    `sample_token_logprobs`, and `sample_head` names the chain's first node (-1 elsewhere).
    """

    text: str
    n_tokens: int = 0
    finish: str = ""
    count: int = 1  # identical sibling samples merged into this node
    mean_logprob: float = float("nan")
    features: np.ndarray | None = None  # policy hidden state at the step's end (if returned)
    token_ids: tuple[int, ...] = ()  # this step's sampled tokens (plain steps only)
    token_logprobs: tuple[float, ...] = ()  # their logprobs under the sampling policy
    sample_token_ids: tuple[int, ...] = ()  # a to_end sample's tokens, on its chain's tail
    sample_token_logprobs: tuple[float, ...] = ()
    sample_head: int = -1  # node id of the first piece of that sample's chain

    def token_attrs(self) -> dict[str, Any]:
        """The sampled-token node attributes of the tree (mcts.export.trees), only the
        non-empty ones: token_ids / token_logprobs, or sample_token_ids /
        sample_token_logprobs / sample_head on a to_end sample's last node."""
        out: dict[str, Any] = {}
        if self.token_ids:
            out["token_ids"] = [int(x) for x in self.token_ids]
            out["token_logprobs"] = [float(x) for x in self.token_logprobs]
        if self.sample_token_ids:
            out["sample_token_ids"] = [int(x) for x in self.sample_token_ids]
            out["sample_token_logprobs"] = [float(x) for x in self.sample_token_logprobs]
            out["sample_head"] = int(self.sample_head)
        return out


@dataclass
class BatchState:
    """Everything a policy may read or change while a batch of problems is searched."""

    cfg: SearchConfig
    problems: list[Problem]
    forest: Forest
    nodes: list[dict[int, NodeData]]
    usage: list[Usage]
    live: np.ndarray  # bool per tree
    started: list[float]
    wave: int = 0
    policy_state: dict[str, Any] = field(default_factory=dict)
    # Full solutions (to_end expansions) wait here with their scores and are attached in
    # one block when the tree retires: a node's children are one contiguous block in the
    # forest, so the root cannot grow a second block wave after wave.
    pending: dict[int, list[tuple[list, np.ndarray]]] = field(default_factory=dict)

    def spent(self, tree: int) -> int:
        """Tokens charged to the budget so far (search.budget_counts)."""
        u = self.usage[tree]
        if self.cfg.budget_counts == "total":
            return u.generated_tokens + u.reward_tokens + u.prompt_tokens - u.cached_prompt_tokens
        return u.generated_tokens

    def remaining(self, tree: int) -> int:
        return self.cfg.token_budget - self.spent(tree)

    def steps(self, tree: int, node: int) -> list[str]:
        path = self.forest.path_to_root(tree, node)
        return [self.nodes[tree][int(n)].text for n in path[1:]]

    def solution_text(self, tree: int, node: int) -> str:
        return join_steps(self.steps(tree, node), self.cfg.delimiter).rstrip()

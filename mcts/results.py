"""What a search returns per problem, in the shape the exporters read.

The searched tree travels as a networkx DiGraph (built by `Forest.to_networkx` plus the
search's annotations), so exporters, users' notebooks and plots all read one structure and
never touch the numba arrays.

Graph attributes: problem_id, question, reference, algorithm.
Node attributes (node 0 is the root, its text is ""):
  text (str, the step without delimiter), depth (int), visits (int), q (float, NaN if unvisited),
  reward (float, NaN if unscored), prior (float), terminal (bool), n_tokens (int),
  value_target (float, NaN where none), answer (str | None, extracted on terminal nodes),
  correct (bool | None: None where not a terminal with a checked answer), selected (bool: on the
  path of the selected answer); where recorded (mcts.state.NodeData): token_ids /
  token_logprobs (a plain step's sampled tokens), or sample_token_ids / sample_token_logprobs /
  sample_head on the last node of a to_end sample's chain.
Edges go parent -> child.

`extra` adds policy-specific columns to the results.jsonl row; best-of-N and
self-consistency add `picks`: {aggregation: {"answer", "correct"}} for every aggregation the
run's scores allow, chosen from the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from mcts.types import Problem, Usage


@dataclass
class ProblemResult:
    problem: Problem
    algorithm: str
    selected_answer: str | None  # the ONE answer the algorithm picks
    selected_text: str  # the full solution text it picked
    correct: bool  # whether selected_answer is right (this is what accuracy counts)
    pass_at_k: bool  # any terminal (or the pick) right: reported beside, never as accuracy
    n_candidates: int  # answers pass@k was taken over (terminals, plus a non-terminal pick)
    usage: Usage
    seconds: float
    tree: nx.DiGraph
    extra: dict[str, Any] = field(default_factory=dict)
    # (n_nodes, dim) float32: the policy's hidden state at each node's step end (row = node
    # id, NaN where none), when the generator returned features; saved beside the tree.
    features: Any = None

    def row(self) -> dict[str, Any]:
        """The results.jsonl record."""
        depth = max((d for _, d in self.tree.nodes(data="depth")), default=0)
        return {
            "id": self.problem.id,
            "task": self.problem.task,
            "question": self.problem.question,
            "reference": self.problem.answer,
            "selected_answer": self.selected_answer,
            "correct": bool(self.correct),
            "pass_at_k": bool(self.pass_at_k),
            "k": int(self.n_candidates),
            "algorithm": self.algorithm,
            **{f"tokens_{k}": v for k, v in self.usage.as_dict().items()},
            "seconds": round(float(self.seconds), 4),
            "tree_size": self.tree.number_of_nodes(),
            "tree_depth": int(depth or 0),
            **self.extra,
        }

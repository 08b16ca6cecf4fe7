"""Plain-Python node-object MCTS: the textbook formulas, written for clarity, not speed.

It is the oracle the numba Forest is checked against (tests/test_kernels_reference.py) and
the baseline of benchmarks/core_throughput.py. It follows the same conventions as
mcts.kernels (virtual loss = extra visits of value vl_value, fpu, lowest-index ties, mean
backup, distinct leaves per wave) but implements them the obvious way: a wave restarts
each descent from the root and skips children that cannot lead to a fresh leaf.
"""

from __future__ import annotations

import math


class Node:
    __slots__ = (
        "id",
        "parent",
        "children",
        "visits",
        "value_sum",
        "prior",
        "reward",
        "terminal",
        "depth",
        "vloss",
        "pending",
    )

    def __init__(self, id: int, parent: Node | None, prior: float, reward: float, terminal: bool):
        self.id = id
        self.parent = parent
        self.children: list[Node] = []
        self.visits = 0
        self.value_sum = 0.0
        self.prior = prior
        self.reward = reward
        self.terminal = terminal
        self.depth = 0 if parent is None else parent.depth + 1
        self.vloss = 0
        self.pending = False


class Tree:
    """One tree; `nodes[i]` is the node with id i (ids in creation order, root = 0)."""

    def __init__(self) -> None:
        self.nodes = [Node(0, None, 1.0, math.nan, False)]

    @property
    def root(self) -> Node:
        return self.nodes[0]

    # -- selection ----------------------------------------------------------
    def score(self, parent: Node, child: Node, cfg: dict) -> float:
        n_p = parent.visits + parent.vloss
        n_c = child.visits + child.vloss
        vl = cfg["vl_value"]
        if cfg["rule"] == "puct":
            if n_c > 0:
                q = (child.value_sum + vl * child.vloss) / float(n_c)
            elif cfg["fpu"] == "parent":
                q = (parent.value_sum + vl * parent.vloss) / float(n_p) if n_p > 0 else 0.0
            else:
                q = float(cfg["fpu"])
            c_s = (math.log((1.0 + n_p + cfg["c_base"]) / cfg["c_base"]) + cfg["c_init"]) * cfg[
                "c_puct"
            ]
            return q + c_s * math.sqrt(n_p) * child.prior / (1.0 + n_c)
        if n_c == 0:
            return math.inf
        log_np = math.log(n_p) if n_p > 0 else 0.0
        return (child.value_sum + vl * child.vloss) / float(n_c) + cfg["c_puct"] * math.sqrt(
            log_np / float(n_c)
        )

    def select(self, want: int, cfg: dict) -> list[int]:
        blocked: set[int] = set()

        def available(n: Node) -> bool:
            return n.id not in blocked and not (not n.children and n.vloss > 0)

        picked: list[int] = []
        while len(picked) < want and 0 not in blocked:
            node = self.root
            if not node.children and node.vloss > 0:
                break
            while node.children:
                best, best_score = None, -math.inf
                for c in node.children:
                    if not available(c):
                        continue
                    s = self.score(node, c, cfg)
                    if best is None or s > best_score:
                        best, best_score = c, s
                if best is None:
                    blocked.add(node.id)  # dead end: restart from the root
                    node = None
                    break
                node = best
            if node is None:
                continue
            blocked.add(node.id)
            node.pending = True
            picked.append(node.id)
            n = node
            while n is not None:
                n.vloss += 1
                n = n.parent
        return picked

    # -- expansion / backup ---------------------------------------------------
    def expand(self, node_id: int, priors, rewards, terms) -> int:
        node = self.nodes[node_id]
        assert not node.children and not node.terminal and len(priors) > 0
        first = len(self.nodes)
        for p, r, t in zip(priors, rewards, terms, strict=True):
            child = Node(len(self.nodes), node, float(p), float(r), bool(t))
            node.children.append(child)
            self.nodes.append(child)
        return first

    def backup(self, node_id: int, value: float) -> None:
        n = self.nodes[node_id]
        clearing = False
        while n is not None:
            n.visits += 1
            n.value_sum += value
            if not clearing and n.pending:
                n.pending = False
                clearing = True
            if clearing:
                n.vloss -= 1
            n = n.parent


class ReferenceForest:
    """B reference trees behind the same wave-level calls as mcts.tree.Forest."""

    def __init__(self, n_trees: int) -> None:
        self.trees = [Tree() for _ in range(n_trees)]

    def select(self, want: int | list[int], **cfg) -> tuple[list[int], list[int]]:
        full = {
            "rule": "puct",
            "c_puct": 1.0,
            "c_base": 19652.0,
            "c_init": 1.25,
            "vl_value": 0.0,
            "fpu": "parent",
        }
        full.update(cfg)
        trees, nodes = [], []
        for b, t in enumerate(self.trees):
            w = want if isinstance(want, int) else want[b]
            for n in t.select(w, full):
                trees.append(b)
                nodes.append(n)
        return trees, nodes

    def expand(self, trees, nodes, counts, priors, rewards=None, terminal=None) -> list[int]:
        out, o = [], 0
        for b, n, k in zip(trees, nodes, counts, strict=True):
            k = int(k)
            rw = [math.nan] * k if rewards is None else rewards[o : o + k]
            te = [False] * k if terminal is None else terminal[o : o + k]
            out.append(self.trees[b].expand(int(n), priors[o : o + k], rw, te))
            o += k
        return out

    def backup(self, trees, nodes, values) -> None:
        for b, n, v in zip(trees, nodes, values, strict=True):
            self.trees[int(b)].backup(int(n), float(v))

    def mark_terminal(self, tree: int, node: int) -> None:
        self.trees[tree].nodes[node].terminal = True

    def clear_virtual_loss(self) -> None:
        for t in self.trees:
            for n in t.nodes:
                n.vloss = 0
                n.pending = False

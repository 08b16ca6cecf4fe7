"""The Forest: B independent search trees as a struct of numpy arrays, driven by numba kernels.

Why a struct of arrays: the statistics PUCT reads while descending (visits, value sums,
priors) of one node's children sit in one contiguous block per array, so a descent touches
a few cache lines per level, and a whole wave over all trees is one numba call. What a
descent, an expand check and a backup touch per node (visits, vloss, the terminal flag,
value_sum, first_child, n_children) is interleaved in one 24-byte record per node (each
field exposed as a strided view): the scan of a node's children also brings in the chosen
child's links, and a backup updates a node on one line (measured: backup ~25% and select
~10% faster per wave than separate arrays). Priors stay apart: with them in the record,
expand's writes spread over more lines and it got slower. Text never enters here:
`NodeStore` keeps it on the Python side, keyed by (tree, node).

Node ids are per-tree indices; node 0 is each tree's root. Children of a node are the
contiguous block ``first_child .. first_child + n_children - 1`` (variable branching).
Growth reallocates all arrays (capacity doubles) but node ids never change, so indices a
caller holds stay valid; array views taken before a growth are stale: re-read the
properties after `expand`. The public views are (B, capacity): slots past size[b] read as
a fresh leaf (0, first_child -1, reward NaN).

Backup rule (mean backup): ``visits[n] == (number of backup entries that started at n)
+ sum(visits of n's children)`` and ``value_sum`` likewise sums the backed-up values.
Values may be any finite float (rewards are in [0, 1] by convention); NaN/inf are errors.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numba
import numpy as np

from mcts import kernels as K

PARALLEL_MIN_TREES = 64
"""Below this many trees the kernels run on one thread (see Forest._run)."""
AUTO_PROBE = 16
"""With threads="auto", select re-times the choice not in use after AUTO_PROBE calls
(then after ever longer periods while the choice holds)."""

PARENT_TERM_N = 4096
"""Parent visit counts below this take select's per-parent score factor from a table."""

if TYPE_CHECKING:
    import networkx

_INT_MAX = np.iinfo(np.int32).max
MAX_IN_FLIGHT = int(np.iinfo(np.int16).max)
"""Most picks one tree may have in flight (selected, not yet backed up): vloss is int16."""
_FIELDS = (
    ("parent", np.int32),
    ("first_child", np.int32),
    ("n_children", np.int32),
    ("visits", np.int32),
    ("value_sum", np.float64),
    ("prior", np.float64),
    ("reward", np.float64),
    ("terminal", np.bool_),
    ("depth", np.int32),
    ("vloss", np.int16),
    ("_pending", np.uint8),
    ("_epoch", np.int32),
)
_STATS = ("visits", "vloss", "terminal", "_pending", "value_sum", "first_child", "n_children")
"""Fields stored interleaved, one 24-byte record per node (see the module docstring); vloss
is int16 so the terminal and pending flags fit in it (expand checks the one, select and
backup set and clear the other) and it stays 24 bytes: see MAX_IN_FLIGHT."""
_STATS_DTYPE = np.dtype([(name, dict(_FIELDS)[name]) for name in _STATS])
_FRESH = {"first_child": -1, "reward": np.nan}
"""What an unused slot holds where it is not 0: a fresh child is already a leaf with no
reward, so expand writes neither (fewer cold lines per new child)."""
_NO_F64 = np.empty(0, np.float64)
_NO_BOOL = np.empty(0, np.bool_)
_BY = {"visits": K.BY_VISITS, "value": K.BY_VALUE, "reward": K.BY_REWARD}


def _new_fields(rows: int, cap: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every field for rows x cap unused slots: (the _STATS record array, name -> array).

    Unused slots hold _FRESH values, else 0 (np.zeros: lazily mapped zero pages, so
    capacity that is never used costs nothing); the _STATS fields are views of the record.
    """
    stats = np.zeros((rows, cap), dtype=_STATS_DTYPE)
    fields = {}
    for name, dt in _FIELDS:
        if name in _STATS:
            a = stats[name]
            if name in _FRESH:
                a[...] = _FRESH[name]
        elif name in _FRESH:
            a = np.full((rows, cap), _FRESH[name], dtype=dt)
        else:
            a = np.zeros((rows, cap), dtype=dt)
        fields[name] = a
    return stats, fields


class ForestFullError(RuntimeError):
    """A tree would exceed `max_nodes` and the forest was built with on_full="raise"."""


@dataclass
class NodeInfo:
    """What the Python side knows about a node: its step text, token ids and free extras."""

    text: str
    token_ids: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


class NodeStore:
    """Dict-backed side store of node text/tokens keyed by (tree, node).

    Why separate: strings and token lists cannot live in numba arrays, and most nodes'
    text is only needed when building prompts and exports.
    """

    def __init__(self) -> None:
        self._d: dict[tuple[int, int], NodeInfo] = {}

    def set(
        self, tree: int, node: int, text: str, token_ids: Sequence[int] = (), **extra: Any
    ) -> None:
        if not isinstance(text, str):
            raise TypeError(f"NodeStore.set: text must be str, got {type(text).__name__}")
        self._d[(int(tree), int(node))] = NodeInfo(text, tuple(int(t) for t in token_ids), extra)

    def get(self, tree: int, node: int) -> NodeInfo | None:
        return self._d.get((int(tree), int(node)))

    def text(self, tree: int, node: int, default: str | None = None) -> str | None:
        info = self._d.get((int(tree), int(node)))
        return default if info is None else info.text

    def clear(self, tree: int | None = None) -> None:
        """Forget everything, or only one tree's nodes (when that tree is reset)."""
        if tree is None:
            self._d.clear()
        else:
            t = int(tree)
            for key in [k for k in self._d if k[0] == t]:
                del self._d[key]

    def __contains__(self, key: tuple[int, int]) -> bool:
        return (int(key[0]), int(key[1])) in self._d

    def __len__(self) -> int:
        return len(self._d)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._d)


def _as_1d(x: Any, dtype: Any, name: str) -> np.ndarray:
    if type(x) is np.ndarray and x.dtype == dtype and x.ndim == 1 and x.flags.c_contiguous:
        return x  # the common case (what select returns): no conversion, no checks to run
    a = np.asarray(x)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}")
    if dtype is np.int64 and a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=dtype)


def _select_params(
    rule: str, c_puct: float, c_base: float, c_init: float, vl_value: float, fpu: str | float
) -> tuple[int, float, float, float, float, int, float]:
    """Validate select's scoring options; returns the kernel's (rule, floats..., fpu) args."""
    if rule == "puct":
        r = K.RULE_PUCT
    elif rule == "uct":
        r = K.RULE_UCT
    else:
        raise ValueError(f'rule must be "puct" or "uct", got {rule!r}')
    if isinstance(fpu, str):
        if fpu != "parent":
            raise ValueError(f'fpu must be "parent" or a float, got {fpu!r}')
        fmode, fval = K.FPU_PARENT, 0.0
    else:
        fmode, fval = K.FPU_CONST, float(fpu)
    for name, x in (("c_puct", c_puct), ("c_init", c_init), ("vl_value", vl_value)):
        if not np.isfinite(x):
            raise ValueError(f"{name} must be finite, got {x}")
    if not np.isfinite(fval):
        raise ValueError(f"fpu must be finite, got {fpu}")
    if not (np.isfinite(c_base) and c_base > 0):
        raise ValueError(f"c_base must be a positive finite float, got {c_base}")
    if c_puct < 0 or c_init < 0:
        raise ValueError("c_puct and c_init must be >= 0")
    return r, float(c_puct), float(c_base), float(c_init), float(vl_value), fmode, fval


class Forest:
    """B trees of node statistics; see the module docstring for the rules it keeps."""

    def __init__(
        self,
        n_trees: int,
        capacity: int = 256,
        max_nodes: int | None = None,
        on_full: Literal["raise", "stop"] = "raise",
    ) -> None:
        if int(n_trees) < 1:
            raise ValueError(f"n_trees must be >= 1, got {n_trees}")
        if int(capacity) < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_nodes is not None and not 1 <= int(max_nodes) <= _INT_MAX:
            raise ValueError(f"max_nodes must be in [1, {_INT_MAX}] or None, got {max_nodes}")
        if on_full not in ("raise", "stop"):
            raise ValueError(f'on_full must be "raise" or "stop", got {on_full!r}')
        self.max_nodes = None if max_nodes is None else int(max_nodes)
        self.on_full = on_full
        self._limit = _INT_MAX if max_nodes is None else int(max_nodes)
        self._cap = min(int(capacity), self._limit)
        self._rows = 0
        self._epoch = 0
        self._want_cache: dict[int, np.ndarray] = {}
        self._param_cache: dict[tuple, tuple] = {}
        # Use of numba's threads: "auto" (measured on select, see _select_chunks), "serial"
        # (one thread) or "parallel" (one chunk of trees per numba thread). expand and backup
        # follow the choice select made for the same wave.
        self.threads: Literal["auto", "serial", "parallel"] = "auto"
        self._auto_cost: list[float | None] | None = None
        self._auto_calls = self._auto_next = self._auto_period = self._probe_left = 0
        self.reset(int(n_trees))

    # ------------------------------------------------------------------ storage
    def _allocate(self, rows: int, cap: int) -> None:
        self._stats, fields = _new_fields(rows, cap)
        for name, a in fields.items():
            setattr(self, "_a" + name, a)
        self._rows = rows
        self._cap = cap

    def _bind(self) -> None:
        """Cache per-field row views [:n_trees] for kernel calls."""
        b = self.n_trees
        self._v = {name: getattr(self, "_a" + name)[:b] for name, _ in _FIELDS}
        self._size = self._asize[:b]
        self._ones = np.ones(b, dtype=np.bool_)
        self._want_cache = {}

    def _run(self, kernel: Any, *args: Any) -> Any:
        """Call a parallel kernel; with few trees on one thread.

        Handing a few trees to the thread pool costs more than the work, and on an
        oversubscribed machine a parallel step waits for a descheduled thread (measured:
        7 ms per select of 4 small trees at load 10 vs 0.1 ms on one thread).
        """
        if self.n_trees >= PARALLEL_MIN_TREES:
            return kernel(*args)
        prev = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            return kernel(*args)
        finally:
            numba.set_num_threads(prev)

    def _grow(self, needed: int) -> None:
        new_cap = min(max(int(needed), 2 * self._cap), self._limit)
        used = int(self._asize[: self.n_trees].max())
        self._stats, fields = _new_fields(self._rows, new_cap)
        for name, a in fields.items():
            a[:, :used] = getattr(self, "_a" + name)[:, :used]
            setattr(self, "_a" + name, a)
        self._cap = new_cap
        self._bind()

    def reset(self, n_trees: int | None = None) -> None:
        """Keep the allocation, drop every node but the roots (and optionally resize B)."""
        n = self.n_trees if n_trees is None else int(n_trees)
        if n < 1:
            raise ValueError(f"n_trees must be >= 1, got {n_trees}")
        if n > self._rows:
            self._allocate(n, self._cap)
            self._asize = np.zeros(n, dtype=np.int32)
        else:  # clear what the previous search used: slots past size[b] always read fresh
            used = int(self._asize.max())
            for name, _ in _FIELDS:
                getattr(self, "_a" + name)[:, :used] = _FRESH.get(name, 0)
        self.n_trees = n
        v = {name: getattr(self, "_a" + name) for name, _ in _FIELDS}
        v["parent"][:n, 0] = -1
        v["first_child"][:n, 0] = -1
        v["n_children"][:n, 0] = 0
        v["visits"][:n, 0] = 0
        v["value_sum"][:n, 0] = 0.0
        v["prior"][:n, 0] = 1.0
        v["reward"][:n, 0] = np.nan
        v["terminal"][:n, 0] = False
        v["depth"][:n, 0] = 0
        v["vloss"][:n, 0] = 0
        v["_pending"][:n, 0] = 0
        v["_epoch"][:n, 0] = 0
        self._asize[:n] = 1
        self._epoch = 0
        self._pool_chunks = 1  # threads for expand/backup: set by each select (see there)
        self._inflight = 0  # picks whose virtual loss is not cleared yet (= pending marks)
        self._bind()

    @property
    def capacity(self) -> int:
        return self._cap

    def _ro(self, name: str) -> np.ndarray:
        a = self._v[name].view()
        a.flags.writeable = False
        return a

    size = property(lambda self: self._ro_size(), doc="(B,) nodes used per tree")

    def _ro_size(self) -> np.ndarray:
        a = self._size.view()
        a.flags.writeable = False
        return a

    parent = property(lambda self: self._ro("parent"))
    first_child = property(lambda self: self._ro("first_child"))
    n_children = property(lambda self: self._ro("n_children"))
    visits = property(lambda self: self._ro("visits"))
    value_sum = property(lambda self: self._ro("value_sum"))
    prior = property(lambda self: self._ro("prior"))
    reward = property(lambda self: self._ro("reward"), doc="last reward score, NaN = unscored")
    terminal = property(lambda self: self._ro("terminal"))
    depth = property(lambda self: self._ro("depth"))
    vloss = property(lambda self: self._ro("vloss"))

    # ------------------------------------------------------------------ checks
    def _check_tree(self, tree: int) -> int:
        t = int(tree)
        if not 0 <= t < self.n_trees:
            raise ValueError(f"tree id {tree} out of range [0, {self.n_trees})")
        return t

    def _check_node(self, tree: int, node: int) -> tuple[int, int]:
        t = self._check_tree(tree)
        n = int(node)
        if not 0 <= n < self._size[t]:
            raise ValueError(f"node id {node} out of range [0, {self._size[t]}) for tree {t}")
        return t, n

    def _check_pairs(self, trees: Any, nodes: Any) -> tuple[np.ndarray, np.ndarray]:
        tr = _as_1d(trees, np.int64, "trees")
        nd = _as_1d(nodes, np.int64, "nodes")
        if tr.shape != nd.shape:
            raise ValueError(f"trees and nodes must have equal length, got {tr.size} and {nd.size}")
        if tr.size:
            bad = (tr < 0) | (tr >= self.n_trees)
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(f"trees[{i}] = {tr[i]} out of range [0, {self.n_trees})")
            bad = (nd < 0) | (nd >= self._size[tr])
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(
                    f"nodes[{i}] = {nd[i]} out of range [0, {self._size[tr[i]]}) for tree {tr[i]}"
                )
        return tr, nd

    # ------------------------------------------------------------------ kernels
    def select(
        self,
        leaves_per_tree: int | np.ndarray = 1,
        *,
        rule: str = "puct",
        c_puct: float = 1.0,
        c_base: float = 19652.0,
        c_init: float = 1.25,
        vl_value: float = 0.0,
        fpu: str | float = "parent",
        active: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pick distinct selectable leaves per tree, applying virtual loss along their paths.

        Returns (trees, nodes) int64 arrays ordered by tree. A tree yields fewer leaves than
        asked when it has no more distinct selectable leaves (no children and not already
        in flight); trees with active[b] False are skipped. A terminal leaf may be returned.
        """
        b = self.n_trees
        if isinstance(leaves_per_tree, int | np.integer):
            w = int(leaves_per_tree)
            if w < 0:
                raise ValueError(f"leaves_per_tree must be >= 0, got {w}")
            want = self._want_cache.get(w)
            if want is None:
                want = self._want_cache[w] = np.full(b, w, dtype=np.int64)
            top = w
        else:
            want = _as_1d(leaves_per_tree, np.int64, "leaves_per_tree")
            if want.shape != (b,):
                raise ValueError(f"leaves_per_tree must have shape ({b},), got {want.shape}")
            if (want < 0).any():
                raise ValueError("leaves_per_tree must be >= 0 everywhere")
            top = int(want.max()) if want.size else 0
        if self._inflight + top > MAX_IN_FLIGHT:  # cheap bound first, then tree by tree
            room = MAX_IN_FLIGHT - self._v["vloss"][:, 0].astype(np.int64)
            if (want > room).any():
                t = int(np.argmax(want > room))
                raise ValueError(
                    f"tree {t} would have more than MAX_IN_FLIGHT={MAX_IN_FLIGHT} picks in "
                    "flight; back up (or clear_virtual_loss) what is in flight first, or ask "
                    "for fewer leaves_per_tree"
                )
        if active is None:
            act = self._ones
        else:
            act = np.asarray(active)
            if act.shape != (b,) or act.dtype != np.bool_:
                raise ValueError(f"active must be a bool array of shape ({b},)")
            act = np.ascontiguousarray(act)
        key = (rule, c_puct, c_base, c_init, vl_value, fpu)
        try:
            params = self._param_cache.get(key)
        except TypeError:  # unhashable argument: validate (and convert) it below
            key, params = None, None
        if params is None:
            params = _select_params(*(rule, c_puct, c_base, c_init, vl_value, fpu))
            params = (K.parent_term_table(PARENT_TERM_N, *params[:4]), *params)
            if key is not None:
                if len(self._param_cache) > 64:
                    self._param_cache.clear()
                self._param_cache[key] = params
        # No pick in flight and <= 1 leaf per tree: the kernel may skip vloss/epoch reads.
        clean = self._inflight == 0 and (want is self._want_cache.get(1) or want.max() <= 1)
        self._epoch += 1
        if self._epoch >= _INT_MAX:
            self._v["_epoch"][:, :] = 0
            self._epoch = 1
        v = self._v
        chunks = self._select_chunks()
        self._pool_chunks = chunks  # expand/backup of this wave follow select's choice
        t0 = time.perf_counter()
        picked = K.select_kernel(
            v["parent"],
            v["first_child"],
            v["n_children"],
            v["visits"],
            v["value_sum"],
            v["prior"],
            v["vloss"],
            v["_pending"],
            v["_epoch"],
            self._epoch,
            want,
            act,
            *params,
            chunks,
            clean,
        )
        if self.threads == "auto" and self._auto_cost is not None:
            self._auto_update(chunks > 1, (time.perf_counter() - t0) / (picked[0].size + 1))
        self._inflight += picked[0].size
        return picked

    def _select_chunks(self) -> int:
        """How many per-thread chunks select splits the trees into (1 = serial, no pool).

        "auto": below PARALLEL_MIN_TREES or with one numba thread, 1. Otherwise whichever
        of serial and parallel measured faster per pick (moving average), re-trying the
        other one now and then (see _auto_update). Why: a parallel region must wait for its
        worker thread, and on a busy machine (here: other jobs on both cores) its wake-up
        cost more than the work (measured at B=1024: 2 threads 2-3x slower than 1 under
        load, faster when idle). Results never depend on the choice: chunks are whole trees.
        """
        if self.threads not in ("auto", "serial", "parallel"):
            raise ValueError(
                f'Forest.threads must be "auto", "serial" or "parallel", got {self.threads!r}'
            )
        nt = numba.get_num_threads()
        if self.n_trees < PARALLEL_MIN_TREES or nt == 1 or self.threads == "serial":
            self._auto_cost = None
            return 1
        if self.threads == "parallel":
            self._auto_cost = None
            return nt
        if self._auto_cost is None:
            self._auto_cost = [None, None]
            self._auto_calls = 0
            self._auto_period = AUTO_PROBE
            self._auto_next = AUTO_PROBE
            self._probe_left = 0
        self._auto_calls += 1
        serial, par = self._auto_cost
        if serial is None:
            return 1
        if not self._probe_left and (par is None or self._auto_calls >= self._auto_next):
            self._probe_left = 2  # probe the other choice: a warm-up call, then a measured one
        best_par = par is not None and par < serial
        use_par = not best_par if self._probe_left else best_par
        return nt if use_par else 1

    def _auto_update(self, parallel: bool, dt: float) -> None:
        """Fold one select's time per pick into its choice's cost.

        The choice in use keeps a moving average. A probe of the other choice runs two
        calls: the first is not counted (after a stretch of serial calls the pool's workers
        are asleep, and waking them is not what steady parallel use pays), the second
        replaces that choice's cost. A probe that confirms the current choice doubles the
        probe period (up to 64x AUTO_PROBE), so a choice that keeps losing costs ever less;
        a flip resets it.
        """
        cost = self._auto_cost
        if self._probe_left:
            self._probe_left -= 1
            if self._probe_left:
                return  # the warm-up call
            was_par = cost[1] is not None and cost[1] < cost[0]
            cost[int(parallel)] = dt
            if (cost[1] < cost[0]) == was_par:
                self._auto_period = min(2 * self._auto_period, 64 * AUTO_PROBE)
            else:
                self._auto_period = AUTO_PROBE
            self._auto_next = self._auto_calls + self._auto_period
            return
        old = cost[int(parallel)]  # (capped: one slow outlier, e.g. a compile, fades fast)
        cost[int(parallel)] = dt if old is None else 0.75 * min(old, 4 * dt) + 0.25 * dt

    def expand(
        self,
        trees: np.ndarray,
        nodes: np.ndarray,
        counts: np.ndarray,
        priors: np.ndarray,
        rewards: np.ndarray | None = None,
        terminal: np.ndarray | None = None,
    ) -> np.ndarray:
        """Attach counts[i] children to each leaf; returns the first child id per leaf.

        priors/rewards/terminal are flat (len == counts.sum()) in leaf order. Priors must be
        finite and >= 0 (used as given: normalise them yourself); rewards may be NaN
        (unscored) but not inf. A leaf with no children to add must go to `mark_terminal`.
        With on_full="stop" leaves that do not fit get -1 and stay leaves.
        """
        tr = _as_1d(trees, np.int64, "trees")
        nd = _as_1d(nodes, np.int64, "nodes")
        ct = _as_1d(counts, np.int64, "counts")
        if not tr.shape == nd.shape == ct.shape:
            raise ValueError(
                f"trees, nodes, counts must have equal length, got {tr.size}, {nd.size}, {ct.size}"
            )
        pr = _as_1d(priors, np.float64, "priors")
        # not given: an empty array and a flag (fresh slots already hold NaN / False)
        rw = _NO_F64 if rewards is None else _as_1d(rewards, np.float64, "rewards")
        te = _NO_BOOL if terminal is None else _as_1d(terminal, np.bool_, "terminal")
        out = np.empty(tr.size, dtype=np.int64)
        while True:
            v = self._v
            code, info = K.expand_kernel(
                v["parent"],
                v["first_child"],
                v["n_children"],
                v["visits"],
                v["value_sum"],
                v["prior"],
                v["reward"],
                v["terminal"],
                v["depth"],
                v["vloss"],
                v["_pending"],
                v["_epoch"],
                self._size,
                tr,
                nd,
                ct,
                pr,
                rw,
                te,
                self._limit,
                self.on_full == "raise",
                out,
                self._pool_chunks,
                rewards is not None,
                terminal is not None,
            )
            if code != K.ERR_GROW:
                break
            self._grow(info)
        if code == K.OK:
            return out
        i = int(info)
        if code == K.ERR_COUNT and i < 0:  # a flat array's length is not counts.sum()
            total = int(ct.sum()) if ct.size else 0
            for name, a, given in (
                ("priors", pr, True),
                ("rewards", rw, rewards is not None),
                ("terminal", te, terminal is not None),
            ):
                if given and a.size != total:
                    raise ValueError(
                        f"{name} must have counts.sum() = {total} entries, got {a.size}"
                    )
        if code == K.ERR_TREE:
            raise ValueError(f"trees[{i}] = {tr[i]} out of range [0, {self.n_trees})")
        if code == K.ERR_NODE:
            raise ValueError(
                f"nodes[{i}] = {nd[i]} out of range [0, {self._size[tr[i]]}) for tree {tr[i]}"
            )
        if code == K.ERR_COUNT:
            raise ValueError(
                f"counts[{i}] = {ct[i]}: a leaf needs >= 1 child; "
                "call mark_terminal(trees, nodes, reward) for a leaf with nothing to add"
            )
        if code == K.ERR_TERMINAL:
            raise ValueError(f"node {nd[i]} of tree {tr[i]} is terminal and cannot be expanded")
        if code == K.ERR_EXPANDED:
            raise ValueError(
                f"node {nd[i]} of tree {tr[i]} already has children or appears twice "
                "(expand each leaf once)"
            )
        if code == K.ERR_PRIOR:
            raise ValueError(f"priors[{i}] = {pr[i]}: priors must be finite and >= 0")
        if code == K.ERR_REWARD:
            raise ValueError(f"rewards[{i}] = {rw[i]}: rewards must be finite (NaN = unscored)")
        if code == K.ERR_FULL:
            raise ForestFullError(
                f"tree {i} would exceed max_nodes={self.max_nodes}; "
                'raise max_nodes or build the Forest with on_full="stop"'
            )
        raise RuntimeError(f"expand_kernel returned unknown code {code}")  # pragma: no cover

    def backup(
        self, trees: np.ndarray, nodes: np.ndarray, values: np.ndarray, rule: str = "mean"
    ) -> None:
        """Add one visit and its value to each start node and all its ancestors.

        Also clears the virtual loss of the pick each path goes through (once per pick).
        Entries may share trees and overlap; within a tree they apply in the given order.
        `rule` is "mean" (value_sum / visits); other backups (max) would slot in here.
        """
        if rule != "mean":
            raise ValueError(f'rule must be "mean" (the only backup implemented), got {rule!r}')
        tr = _as_1d(trees, np.int64, "trees")
        nd = _as_1d(nodes, np.int64, "nodes")
        va = _as_1d(values, np.float64, "values")
        if not tr.shape == nd.shape == va.shape:
            raise ValueError(
                f"trees, nodes, values must have equal length, got {tr.size}, {nd.size}, {va.size}"
            )
        v = self._v
        code, info = K.backup_kernel(
            v["parent"],
            v["visits"],
            v["value_sum"],
            v["vloss"],
            v["_pending"],
            self._size,
            tr,
            nd,
            va,
            self._pool_chunks,
        )
        if code == K.OK:
            self._inflight -= int(info)
            return
        i = int(info)
        if code == K.ERR_TREE:
            raise ValueError(f"trees[{i}] = {tr[i]} out of range [0, {self.n_trees})")
        if code == K.ERR_NODE:
            raise ValueError(
                f"nodes[{i}] = {nd[i]} out of range [0, {self._size[tr[i]]}) for tree {tr[i]}"
            )
        raise ValueError(f"values[{i}] = {va[i]}: backup values must be finite")

    def clear_virtual_loss(self) -> None:
        """Drop all virtual loss (for leaves selected and then abandoned)."""
        m = int(self._size.max())
        self._v["vloss"][:, :m] = 0
        self._v["_pending"][:, :m] = 0
        self._inflight = 0

    def mark_terminal(self, trees: Any, nodes: Any, reward: Any = None) -> None:
        """Mark leaves terminal (e.g. the LLM produced no next step), optionally with reward."""
        tr, nd = self._check_pairs(trees, nodes)
        if (self._v["n_children"][tr, nd] != 0).any():
            i = int(np.argmax(self._v["n_children"][tr, nd] != 0))
            raise ValueError(
                f"node {nd[i]} of tree {tr[i]} has children: only leaves can be terminal"
            )
        if reward is not None:
            rw = np.broadcast_to(np.asarray(reward, dtype=np.float64), tr.shape)
            if not np.isfinite(rw).all():
                raise ValueError("mark_terminal: reward must be finite")
            self._v["reward"][tr, nd] = rw
        self._v["terminal"][tr, nd] = True

    # ------------------------------------------------------------------ reading
    def q(self, tree: int, nodes: Any) -> np.ndarray:
        """Mean value value_sum / visits per node; NaN where unvisited."""
        t = self._check_tree(tree)
        _, nd = self._check_pairs(np.full(np.size(nodes), t), np.ravel(nodes))
        n = self._v["visits"][t, nd]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, self._v["value_sum"][t, nd] / np.maximum(n, 1), np.nan)

    def children(self, tree: int, node: int) -> np.ndarray:
        t, n = self._check_node(tree, node)
        f = int(self._v["first_child"][t, n])
        return np.arange(f, f + int(self._v["n_children"][t, n]), dtype=np.int64)

    def path_to_root(self, tree: int, node: int) -> np.ndarray:
        """Node ids root..node."""
        t, n = self._check_node(tree, node)
        flat, _ = K.paths_kernel(self._v["parent"], self._v["depth"], t, np.array([n], np.int64))
        return flat

    def best_leaves(self, by: str = "visits") -> np.ndarray:
        """(B,) leaf at the end of each tree's best path (see `best_path`)."""
        if by not in _BY:
            raise ValueError(f'by must be one of "visits", "value", "reward"; got {by!r}')
        out = np.empty(self.n_trees, dtype=np.int64)
        v = self._v
        self._run(
            K.best_leaf_kernel,
            v["first_child"],
            v["n_children"],
            v["visits"],
            v["value_sum"],
            v["reward"],
            _BY[by],
            out,
        )
        return out

    def best_path(self, tree: int, by: str = "visits") -> np.ndarray:
        """Root-to-leaf path taking the child with max visits / mean value / reward.

        Unvisited (value) and unscored (reward) children rank lowest; ties go to the lowest
        child index, so the path always ends at a leaf.
        """
        t = self._check_tree(tree)
        return self.path_to_root(t, int(self.best_leaves(by)[t]))

    def leaf_paths(self, tree: int, terminal_only: bool = False) -> list[np.ndarray]:
        """Every root-to-leaf path of one tree (in leaf id order), for exports."""
        t = self._check_tree(tree)
        s = int(self._size[t])
        mask = self._v["n_children"][t, :s] == 0
        if terminal_only:
            mask &= self._v["terminal"][t, :s]
        leaves = np.flatnonzero(mask).astype(np.int64)
        flat, off = K.paths_kernel(self._v["parent"], self._v["depth"], t, leaves)
        return [flat[off[i] : off[i + 1]] for i in range(leaves.size)]

    def add_dirichlet_noise(
        self, trees: Any, alpha: float, eps: float, rng: np.random.Generator
    ) -> None:
        """Mix Dir(alpha) noise into the roots' children priors: (1-eps)*P + eps*noise."""
        if not (np.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps must be in [0, 1], got {eps}")
        tr = _as_1d(trees, np.int64, "trees")
        for t in tr:
            t = self._check_tree(t)
            kids = self.children(t, 0)
            if kids.size == 0:
                raise ValueError(f"tree {t}: expand the root before adding Dirichlet noise")
            noise = rng.dirichlet(np.full(kids.size, float(alpha)))
            p = self._v["prior"]
            p[t, kids] = (1.0 - eps) * p[t, kids] + eps * noise

    def to_networkx(self, tree: int, store: NodeStore | None = None) -> networkx.DiGraph:
        """One tree as a DiGraph (edges parent -> child), every statistic a node attribute."""
        import networkx as nx

        t = self._check_tree(tree)
        s = int(self._size[t])
        v = self._v
        cols = {
            name: v[name][t, :s].tolist()
            for name in (
                "parent",
                "depth",
                "visits",
                "value_sum",
                "prior",
                "reward",
                "terminal",
                "n_children",
                "vloss",
            )
        }
        qs = self.q(t, np.arange(s)).tolist()
        nodes = []
        for i in range(s):
            attrs = {name: col[i] for name, col in cols.items()}
            attrs["q"] = qs[i]
            info = store.get(t, i) if store is not None else None
            if info is not None:
                attrs["text"] = info.text
                attrs["token_ids"] = info.token_ids
                attrs["n_tokens"] = len(info.token_ids)
                attrs.update(info.extra)
            elif i == 0:
                attrs["text"] = ""
            nodes.append((i, attrs))
        g = nx.DiGraph(tree=t)
        g.add_nodes_from(nodes)
        par = cols["parent"]
        g.add_edges_from((par[i], i) for i in range(1, s))
        return g

"""numba kernels over the Forest's struct-of-arrays: select, expand, backup, extract.

Why kernels and not methods: one numba call costs ~2 us to dispatch, so every kernel here
handles a whole wave (all trees, all leaves) per call, validates its input before it writes
anything (an error code comes back, never a half-applied wave). select, the writes of
expand and backup can each run on `n_chunks` threads (`prange` over slices of whole trees
or of leaves, so results never depend on it); the Forest decides per wave whether the pool
pays (Forest.threads: on a busy machine a parallel region waits for a descheduled thread,
and serial is faster; measured either way, see Forest._select_chunks). expand's checks and
id allocation run in the same tree slices as its writes; backup's checks stay serial.

Memory: at B=1024 x 256 simulations the arrays (~110 MB) outgrow the L3, so a descent is a
chain of cache misses. `select` therefore runs LANES descents per thread in lockstep and
software-prefetches what each lane reads next (`_prefetch`, an LLVM intrinsic); `expand`
prefetches the slots it writes a few leaves ahead. When no pick is in flight and each tree
wants one leaf (the common wave), select also skips the vloss/epoch arrays entirely.

Threads: libgomp, the OpenMP runtime of numba's "omp" layer and of llama.cpp's ggml, spins
300k iterations (~3 ms) before a waiting thread sleeps, which on a busy machine starves the
very thread it waits for (measured: numba, 2 threads at load ~5: ~15k simulations/s vs ~400k
on 1 thread; llama.cpp, `mcts.run task.size=8` on 2 threads at load ~6: 2 of 8 problems in
990 s, vs all 8 in 280 s with 10k spins; benchmarks/RESULTS.md). We use GOMP_SPINCOUNT=10000
(~0.1 ms), scoped to this process's libgomp:

- libgomp reads GOMP_SPINCOUNT once, in its load-time constructor (libgomp/env.c,
  initialize_env), and has no call to change it later; numba has no spin setting of its own.
  So importing this module imports numba's omp pool library (`numba.np.ufunc.omppool`, which
  loads libgomp; the pool is not launched, so a fork before the first parallel call stays
  safe) with the variable set, then deletes it: child processes (vLLM's engine, Ray and joblib
  workers, subprocesses) never see it. A GOMP_SPINCOUNT the user set is left alone
  (GOMP_SPINCOUNT=300000 restores libgomp's default).
- That one libgomp serves the process: ggml binds it too (LlamaCppGenerator imports this
  module before llama_cpp; until then mcts.run loaded llama_cpp first, so the old process-wide
  `setdefault` reached only child processes), as does torch when imported afterwards (same
  soname). They run parallel regions from the calling thread one after another, numba's and
  ggml's in one shared thread pool, and the starvation argument holds for each. A libgomp
  loaded before this module (torch imported first, or llama_cpp used directly) keeps its own
  setting.
- Not chosen: numba's "workqueue" layer (its threads would run beside ggml's libgomp worker,
  still spinning ~3 ms after each decode; and the layer is process-wide numba config), "tbb"
  (not installed).

Arrays are 2-D, (n_trees, capacity), rows contiguous or strided (the Forest interleaves
the hot per-node fields in one record; prefetch steps follow each array's stride); node
ids are per-tree row indices and node 0 is each tree's root. Conventions shared with
`mcts.tree`:

- visit/value statistics: ``visits[n] == (backups that started at n) + sum(visits[children])``.
- virtual loss: ``vloss[n]`` counts in-flight picks whose root-to-leaf path contains n; each
  counts as one extra visit of value ``vl_value`` while scoring. ``pending[leaf] = 1`` marks
  the picked leaf itself, so a backup knows where that pick's virtual loss starts.
- a leaf is *selectable* when it has no children and is not already in flight
  (``vloss == 0``); a terminal leaf is selectable (the search re-backs its terminal value).
- unvisited children (visits + vloss == 0): with ``fpu_mode == FPU_PARENT`` their Q is the
  parent's Q (with its virtual loss; 0.0 if the parent is unvisited too), with
  ``FPU_CONST`` it is ``fpu_value``. Under UCT unvisited children score +inf (tried first).
- ties go to the lowest child index (strict ``>`` while scanning children in order).
"""

from __future__ import annotations

import math
import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

GOMP_SPINCOUNT = "10000"
"""libgomp's busy-wait spins before a waiting thread sleeps (~0.1 ms; its default is 300k)."""


def _load_libgomp() -> None:
    """Load libgomp, through numba's omp pool, with GOMP_SPINCOUNT set only while it loads."""
    if "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    try:
        import numba.np.ufunc.omppool  # noqa: F401  (its libgomp reads the variable now, once)
    except ImportError:  # numba without its omp layer: nothing to tune
        pass
    finally:
        del os.environ["GOMP_SPINCOUNT"]


_load_libgomp()

RULE_PUCT = 0
RULE_UCT = 1
FPU_PARENT = 0
FPU_CONST = 1
BY_VISITS = 0
BY_VALUE = 1
BY_REWARD = 2

# Error codes returned by the validating kernels (the Python side turns them into messages).
OK = 0
ERR_TREE = 1  # tree id out of range
ERR_NODE = 2  # node id out of range for its tree
ERR_COUNT = 3  # children count <= 0
ERR_EXPANDED = 4  # node already has children (or appears twice in one call)
ERR_TERMINAL = 5  # node is terminal
ERR_PRIOR = 6  # prior NaN/inf/negative
ERR_REWARD = 7  # reward +-inf
ERR_VALUE = 8  # backup value NaN/inf
ERR_GROW = 9  # capacity too small: info = largest size needed by one tree
ERR_FULL = 10  # hard cap (max_nodes) exceeded and on_full == "raise": info = tree id


@njit(cache=True, error_model="numpy", inline="always")
def _parent_term_calc(n_p, rule, c_puct, c_base, c_init):
    """The factor of a child's score that depends only on its parent's visit count n_p.

    PUCT: c(n_p) * sqrt(n_p) with c(n) = (log((1 + n + c_base) / c_base) + c_init) * c_puct;
    UCT: log(n_p) (0 for an unvisited parent).
    """
    np_f = float(n_p)
    if rule == RULE_PUCT:
        return (math.log((1.0 + np_f + c_base) / c_base) + c_init) * c_puct * math.sqrt(np_f)
    return math.log(np_f) if n_p > 0 else 0.0


@njit(cache=True, error_model="numpy")
def parent_term_table(n, rule, c_puct, c_base, c_init):
    """`_parent_term_calc` for n_p = 0..n-1, computed once per set of select options.

    Why: the log and sqrt of every scan were a quarter of a scan's cost (measured ~11 of
    ~40 ns at K=8); a lookup gives the very same doubles, so picks do not change.
    """
    tab = np.empty(n, np.float64)
    for i in range(n):
        tab[i] = _parent_term_calc(i, rule, c_puct, c_base, c_init)
    return tab


@njit(cache=True, error_model="numpy", inline="always")
def _parent_term(n_p, tab, rule, c_puct, c_base, c_init):
    """`_parent_term_calc` from the table when n_p is inside it."""
    if n_p < tab.shape[0]:
        return tab[n_p]
    return _parent_term_calc(n_p, rule, c_puct, c_base, c_init)


@njit(cache=True, error_model="numpy", inline="always")
def _blocked(b, c, n_children, vloss, epoch, cur):
    """A child is unavailable when picked (or dead-ended) this wave or an in-flight leaf."""
    if epoch[b, c] == cur:
        return True
    return vloss[b, c] > 0 and n_children[b, c] == 0


@njit(cache=True, error_model="numpy")
def _best_child(
    b,
    p,
    first_child,
    n_children,
    visits,
    value_sum,
    prior,
    vloss,
    epoch,
    cur,
    tab,
    rule,
    c_puct,
    c_base,
    c_init,
    vl_value,
    fpu_mode,
    fpu_value,
):
    """Highest-scoring available child of p, or -1 when every child is blocked."""
    n_p = visits[b, p] + vloss[b, p]
    np_f = float(n_p)
    fc = first_child[b, p]
    k = n_children[b, p]
    if fpu_mode == FPU_PARENT:
        if n_p > 0:
            fpu_q = (value_sum[b, p] + vl_value * vloss[b, p]) / np_f
        else:
            fpu_q = 0.0
    else:
        fpu_q = fpu_value
    best = -1
    best_score = -np.inf
    if rule == RULE_PUCT:
        explore = _parent_term(n_p, tab, rule, c_puct, c_base, c_init)
        for j in range(k):
            c = fc + j
            if _blocked(b, c, n_children, vloss, epoch, cur):
                continue
            vl = vloss[b, c]
            n_c = visits[b, c] + vl
            if n_c > 0:
                q = (value_sum[b, c] + vl_value * vl) / float(n_c)
            else:
                q = fpu_q
            score = q + explore * prior[b, c] / (1.0 + n_c)
            if best < 0 or score > best_score:
                best = c
                best_score = score
    else:
        log_np = _parent_term(n_p, tab, rule, c_puct, c_base, c_init)
        for j in range(k):
            c = fc + j
            if _blocked(b, c, n_children, vloss, epoch, cur):
                continue
            vl = vloss[b, c]
            n_c = visits[b, c] + vl
            if n_c > 0:
                score = (value_sum[b, c] + vl_value * vl) / float(n_c) + c_puct * math.sqrt(
                    log_np / float(n_c)
                )
            else:
                score = np.inf
            if best < 0 or score > best_score:
                best = c
                best_score = score
    return best


def _prefetch_intrinsic(write: int, doc: str):
    def impl(typingctx, ary, i, j):
        def codegen(context, builder, sig, args):
            aryty = sig.args[0]
            arr = context.make_array(aryty)(context, builder, args[0])
            inds = [
                context.cast(builder, args[1], sig.args[1], types.intp),
                context.cast(builder, args[2], sig.args[2], types.intp),
            ]
            ptr = cgutils.get_item_pointer2(
                context,
                builder,
                data=arr.data,
                shape=cgutils.unpack_tuple(builder, arr.shape),
                strides=cgutils.unpack_tuple(builder, arr.strides),
                layout=aryty.layout,
                inds=inds,
            )
            i8p = builder.bitcast(ptr, ir.IntType(8).as_pointer())
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [i8p.type, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            # (read or write, high locality, data cache)
            rw = ir.Constant(i32, write)
            builder.call(fn, [i8p, rw, ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return types.void(ary, i, j), codegen

    impl.__doc__ = doc
    return intrinsic(impl)


_prefetch = _prefetch_intrinsic(
    0,
    """Hint the CPU to load the cache line of ary[i, j] (a 2-D C array); no effect on results.

    Why: a descent is a chain of dependent cache misses once the trees outgrow the L3;
    issuing the loads of one tree's next level and then working on other trees lets the
    misses of many trees overlap instead of queueing one after another.
    """,
)
_prefetch_w = _prefetch_intrinsic(
    1,
    """`_prefetch` with intent to write: the line arrives owned, so the stores that follow
    (expand filling fresh slots) do not each wait for an ownership request.""",
)


@njit(cache=True, error_model="numpy", inline="always")
def _best_child_clean(
    b,
    p,
    first_child,
    n_children,
    visits,
    value_sum,
    prior,
    tab,
    rule,
    c_puct,
    c_base,
    c_init,
    fpu_mode,
    fpu_value,
):
    """`_best_child` when no virtual loss is in flight and nothing is blocked yet.

    Same scores and tie rule with vloss == 0 and no blocked child (so never -1); it does
    not touch the vloss/epoch arrays, which saves two cold cache lines per level.
    """
    n_p = visits[b, p]
    np_f = float(n_p)
    fc = first_child[b, p]
    k = n_children[b, p]
    if fpu_mode == FPU_PARENT:
        fpu_q = value_sum[b, p] / np_f if n_p > 0 else 0.0
    else:
        fpu_q = fpu_value
    best = fc
    best_score = -np.inf
    if rule == RULE_PUCT:
        explore = _parent_term(n_p, tab, rule, c_puct, c_base, c_init)
        for j in range(k):
            c = fc + j
            n_c = visits[b, c]
            q = value_sum[b, c] / float(n_c) if n_c > 0 else fpu_q
            score = q + explore * prior[b, c] / (1.0 + n_c)
            if j == 0 or score > best_score:
                best = c
                best_score = score
    else:
        log_np = _parent_term(n_p, tab, rule, c_puct, c_base, c_init)
        for j in range(k):
            c = fc + j
            n_c = visits[b, c]
            if n_c > 0:
                score = value_sum[b, c] / float(n_c) + c_puct * math.sqrt(log_np / float(n_c))
            else:
                score = np.inf
            if j == 0 or score > best_score:
                best = c
                best_score = score
    return best


LANES = 16  # trees descended in lockstep per thread (their cache misses overlap)
PF_AHEAD = 8  # entries ahead whose cold lines a streaming loop prefetches


@njit(cache=True, error_model="numpy", inline="always")
def _pf_block(a, b, fc, k):
    """Prefetch the lines of a[b, fc:fc+k] (one per cache line, by the array's stride)."""
    step = max(1, 64 // a.strides[1])
    for j in range(0, k, step):
        _prefetch(a, b, fc + j)
    _prefetch(a, b, fc + k - 1)


@njit(cache=True, error_model="numpy", inline="always")
def _pfw_block(a, b, fc, k):
    """`_pf_block` with intent to write."""
    step = max(1, 64 // a.strides[1])
    for j in range(0, k, step):
        _prefetch_w(a, b, fc + j)
    _prefetch_w(a, b, fc + k - 1)


@njit(cache=True, error_model="numpy", inline="always")
def _take_tree(nxt, t1, offsets, first_child, n_children, visits):
    """The next tree from nxt on (< t1) that wants a leaf, with its root's lines prefetched.

    Returns (tree, next nxt); tree is -1 when none is left.
    """
    while nxt < t1 and offsets[nxt + 1] == offsets[nxt]:
        nxt += 1
    if nxt >= t1:
        return -1, nxt
    _prefetch(first_child, nxt, 0)
    _prefetch(n_children, nxt, 0)
    _prefetch(visits, nxt, 0)
    return nxt, nxt + 1


@njit(cache=True, error_model="numpy")
def _select_chunk(
    t0,
    t1,
    offsets,
    got,
    out,
    parent,
    first_child,
    n_children,
    visits,
    value_sum,
    prior,
    vloss,
    pending,
    epoch,
    cur,
    tab,
    rule,
    c_puct,
    c_base,
    c_init,
    vl_value,
    fpu_mode,
    fpu_value,
    clean,
):
    """Pick leaves for trees t0..t1-1, LANES descents at a time, one level per turn.

    Per tree: up to `want` times, descend from the root by `_best_child` to a selectable
    leaf, mark it picked (blocked for this wave, pending) and add one virtual loss to it
    and every ancestor. A node whose children are all blocked is a dead end: it is
    blocked and the descent re-chooses one level up (what a restart from the root would
    do, since nothing else changed).

    Why lanes: a descent is a chain of dependent cache misses once trees outgrow the L3.
    Each turn of a lane does one step and prefetches what its next step reads (the
    chosen child's links, or its children's statistics), then the other lanes run while
    those lines arrive. A lane that finishes its tree takes the next one.

    `clean` (the caller guarantees: no virtual loss in flight anywhere and at most one
    leaf per tree) hands the chunk to `_select_chunk_clean`, same picks.
    """
    if clean:
        _select_chunk_clean(
            t0,
            t1,
            offsets,
            got,
            out,
            first_child,
            n_children,
            visits,
            value_sum,
            prior,
            vloss,
            pending,
            tab,
            rule,
            c_puct,
            c_base,
            c_init,
            fpu_mode,
            fpu_value,
        )
        return
    lane_tree = np.full(LANES, -1, np.int64)
    lane_node = np.zeros(LANES, np.int64)
    lane_scan = np.zeros(LANES, np.bool_)  # True: children prefetched, scan them next
    nxt = t0
    n_live = 0
    for i in range(LANES):
        lane_tree[i], nxt = _take_tree(nxt, t1, offsets, first_child, n_children, visits)
        if lane_tree[i] >= 0:
            n_live += 1
    while n_live > 0:
        for i in range(LANES):
            b = lane_tree[i]
            if b < 0:
                continue
            nd = lane_node[i]
            done = False
            if lane_scan[i]:
                lane_scan[i] = False
                c = _best_child(
                    b,
                    nd,
                    first_child,
                    n_children,
                    visits,
                    value_sum,
                    prior,
                    vloss,
                    epoch,
                    cur,
                    tab,
                    rule,
                    c_puct,
                    c_base,
                    c_init,
                    vl_value,
                    fpu_mode,
                    fpu_value,
                )
                if c < 0:  # dead end: block it, re-choose one level up (lines are hot)
                    epoch[b, nd] = cur
                    up = parent[b, nd]
                    if up < 0:
                        done = True
                    else:
                        lane_node[i] = up
                        lane_scan[i] = True
                else:
                    lane_node[i] = c
                    _prefetch(first_child, b, c)
                    _prefetch(n_children, b, c)
                    _prefetch(parent, b, c)
            elif nd == 0 and epoch[b, 0] == cur:
                done = True  # the root is blocked: no fresh leaf left in this tree
            else:
                k = n_children[b, nd]
                if k == 0:
                    if vloss[b, nd] > 0:  # the root itself is an in-flight leaf
                        epoch[b, nd] = cur
                        done = True
                    else:
                        epoch[b, nd] = cur
                        pending[b, nd] = 1
                        out[offsets[b] + got[b]] = nd
                        got[b] += 1
                        m = nd
                        while m >= 0:
                            vloss[b, m] += 1
                            m = parent[b, m]
                        lane_node[i] = 0
                        if got[b] >= offsets[b + 1] - offsets[b]:
                            done = True
                else:
                    fc = first_child[b, nd]
                    _pf_block(visits, b, fc, k)
                    _pf_block(vloss, b, fc, k)
                    _pf_block(epoch, b, fc, k)
                    _pf_block(value_sum, b, fc, k)
                    _pf_block(prior, b, fc, k)
                    lane_scan[i] = True
            if done:
                lane_node[i] = 0
                lane_scan[i] = False
                lane_tree[i], nxt = _take_tree(nxt, t1, offsets, first_child, n_children, visits)
                if lane_tree[i] < 0:
                    n_live -= 1


@njit(cache=True, error_model="numpy")
def _select_chunk_clean(
    t0,
    t1,
    offsets,
    got,
    out,
    first_child,
    n_children,
    visits,
    value_sum,
    prior,
    vloss,
    pending,
    tab,
    rule,
    c_puct,
    c_base,
    c_init,
    fpu_mode,
    fpu_value,
):
    """`_select_chunk` for a clean wave: one leaf per tree, nothing in flight.

    Nothing can be blocked, so a descent is a plain argmax at each level (no vloss/epoch
    reads) and always ends in a pick: it stores vloss = 1 on each node as it enters it
    instead of walking back up the parents. A lane's turn is one whole level: scan the
    children (prefetched), enter the best one, read its links (first_child, n_children sit
    in the same per-node record as visits, so the scan brought them in) and either pick it
    or prefetch its children. (With the links in arrays of their own this needed a second
    turn per level to wait for them; one turn per level with the record measured 7-14%
    faster per wave than that.)
    """
    lane_tree = np.full(LANES, -1, np.int64)
    lane_node = np.full(LANES, -1, np.int64)  # -1: the root, prefetched, not entered yet
    nxt = t0
    n_live = 0
    for i in range(LANES):
        lane_tree[i], nxt = _take_tree(nxt, t1, offsets, first_child, n_children, visits)
        if lane_tree[i] >= 0:
            n_live += 1
    while n_live > 0:
        for i in range(LANES):
            b = lane_tree[i]
            if b < 0:
                continue
            c = lane_node[i]
            if c < 0:
                c = 0
            else:
                c = _best_child_clean(
                    b,
                    c,
                    first_child,
                    n_children,
                    visits,
                    value_sum,
                    prior,
                    tab,
                    rule,
                    c_puct,
                    c_base,
                    c_init,
                    fpu_mode,
                    fpu_value,
                )
            vloss[b, c] = 1
            k = n_children[b, c]  # in c's record, which the scan just read
            if k > 0:
                fc = first_child[b, c]
                _pf_block(visits, b, fc, k)  # the records of c's children
                _pf_block(prior, b, fc, k)
                lane_node[i] = c
                continue
            pending[b, c] = 1
            out[offsets[b]] = c
            got[b] = 1
            lane_node[i] = -1
            lane_tree[i], nxt = _take_tree(nxt, t1, offsets, first_child, n_children, visits)
            if lane_tree[i] < 0:
                n_live -= 1


@njit(cache=True, error_model="numpy", parallel=True)
def _select_par(
    n_chunks,
    per,
    offsets,
    got,
    out,
    parent,
    first_child,
    n_children,
    visits,
    value_sum,
    prior,
    vloss,
    pending,
    epoch,
    cur,
    tab,
    rule,
    c_puct,
    c_base,
    c_init,
    vl_value,
    fpu_mode,
    fpu_value,
    clean,
):
    """One `_select_chunk` per thread (chunks of `per` consecutive trees)."""
    n_trees = got.shape[0]
    for g in prange(n_chunks):
        _select_chunk(
            g * per,
            min(n_trees, (g + 1) * per),
            offsets,
            got,
            out,
            parent,
            first_child,
            n_children,
            visits,
            value_sum,
            prior,
            vloss,
            pending,
            epoch,
            cur,
            tab,
            rule,
            c_puct,
            c_base,
            c_init,
            vl_value,
            fpu_mode,
            fpu_value,
            clean,
        )


@njit(cache=True, error_model="numpy")
def select_kernel(
    parent,
    first_child,
    n_children,
    visits,
    value_sum,
    prior,
    vloss,
    pending,
    epoch,
    cur,
    want,
    active,
    tab,
    rule,
    c_puct,
    c_base,
    c_init,
    vl_value,
    fpu_mode,
    fpu_value,
    n_chunks,
    clean,
):
    """Select leaves in every active tree; returns (trees, nodes) ordered by tree then pick.

    Trees are split into `n_chunks` contiguous chunks (one per thread: no per-tree hand-off).
    """
    n_trees = want.shape[0]
    offsets = np.zeros(n_trees + 1, np.int64)
    for b in range(n_trees):
        w = want[b] if active[b] else 0
        offsets[b + 1] = offsets[b] + max(w, 0)
    out = np.empty(offsets[n_trees], np.int64)
    got = np.zeros(n_trees, np.int64)
    n_chunks = max(1, min(n_chunks, n_trees))
    per = (n_trees + n_chunks - 1) // n_chunks
    if n_chunks == 1:  # serial: no parallel region entered at all (a wake-up saved)
        _select_chunk(
            0,
            n_trees,
            offsets,
            got,
            out,
            parent,
            first_child,
            n_children,
            visits,
            value_sum,
            prior,
            vloss,
            pending,
            epoch,
            cur,
            tab,
            rule,
            c_puct,
            c_base,
            c_init,
            vl_value,
            fpu_mode,
            fpu_value,
            clean,
        )
    else:
        _select_par(
            n_chunks,
            per,
            offsets,
            got,
            out,
            parent,
            first_child,
            n_children,
            visits,
            value_sum,
            prior,
            vloss,
            pending,
            epoch,
            cur,
            tab,
            rule,
            c_puct,
            c_base,
            c_init,
            vl_value,
            fpu_mode,
            fpu_value,
            clean,
        )
    total = 0
    for b in range(n_trees):
        total += got[b]
    trees = np.empty(total, np.int64)
    nodes = np.empty(total, np.int64)
    k = 0
    for b in range(n_trees):
        o = offsets[b]
        for j in range(got[b]):
            trees[k] = b
            nodes[k] = out[o + j]
            k += 1
    return trees, nodes


_F64_MAX = np.finfo(np.float64).max


@njit(cache=True, error_model="numpy", inline="always")
def _unmark(n_children, trees, nodes, lo, hi):
    """Undo expand's -1 marks of leaves lo..hi-1 (a failed call leaves no trace)."""
    for i in range(lo, hi):
        n_children[trees[i], nodes[i]] = 0


@njit(cache=True, error_model="numpy")
def expand_kernel(
    parent,
    first_child,
    n_children,
    visits,
    value_sum,
    prior,
    reward,
    terminal,
    depth,
    vloss,
    pending,
    epoch,
    size,
    trees,
    nodes,
    counts,
    priors,
    rewards,
    terms,
    limit,
    raise_on_full,
    out_first,
    n_chunks=1,
    write_rewards=True,
    has_terms=True,
):
    """Attach counts[i] children to leaf (trees[i], nodes[i]); children take fresh ids.

    Returns (code, info). Nothing is written unless the code is OK. `limit` is the hard
    per-tree node cap: while the capacity is below it and a tree needs more room, ERR_GROW
    asks the caller to grow and call again; past it, leaves that do not fit get
    out_first = -1, or with raise_on_full ERR_FULL comes back before any write.
    write_rewards=False / has_terms=False: no rewards / terminal flags were given (the
    arrays may then be empty); fresh slots already hold NaN / False, nothing is stored.
    """
    n_trees, cap = parent.shape
    n = trees.shape[0]
    total = 0
    for i in range(n):
        total += counts[i]
    if (
        priors.shape[0] != total
        or (write_rewards and rewards.shape[0] != total)
        or (has_terms and terms.shape[0] != total)
    ):
        return ERR_COUNT, -1
    # Per leaf checks. n_children of a checked leaf is set to -1 meanwhile, so a leaf that
    # appears twice fails as "already has children"; every return before the writes puts
    # the 0 back (`_unmark`), and the writes store the real count. With threads and leaves
    # ordered by tree (what select returns), slices cut at tree boundaries are checked and
    # written by one thread each, the same thread that selected those trees (its cache
    # holds their lines); a duplicate leaf then always falls in one slice.
    need = size[:n_trees].astype(np.int64)
    cuts = _tree_cuts(trees, n_chunks) if n_chunks > 1 and n >= 2 * n_chunks else _NO_CUTS
    if cuts.shape[0] > 0:
        res = _check_par(cuts, n_children, terminal, depth, size, trees, nodes, counts, need)
        for g in range(cuts.shape[0] - 1):
            if res[g, 0] != OK:  # the first failing slice holds the first bad leaf
                for h in range(cuts.shape[0] - 1):
                    if res[h, 0] == OK:
                        _unmark(n_children, trees, nodes, cuts[h], cuts[h + 1])
                return res[g, 0], res[g, 1]
    else:
        code, info = _check_leaves(
            0, n, n_children, terminal, depth, size, trees, nodes, counts, need
        )
        if code != OK:
            return code, info
    # Priors finite and >= 0, rewards not +-inf: one branch-free pass (it vectorizes), and
    # a second one only to name the first bad entry.
    ok = True
    for j in range(total):
        p = priors[j]
        ok &= (p >= 0.0) & (p <= _F64_MAX)
    if write_rewards:
        for j in range(total):
            ok &= abs(rewards[j]) != np.inf
    if not ok:
        _unmark(n_children, trees, nodes, 0, n)
        for j in range(total):
            p = priors[j]
            if not (p >= 0.0 and p <= _F64_MAX):
                return ERR_PRIOR, j
            if write_rewards and np.isinf(rewards[j]):
                return ERR_REWARD, j
    # Room: grow first if any tree needs more than the capacity allows.
    worst = 0
    for b in range(n_trees):
        if need[b] > worst:
            worst = need[b]
    if worst > cap and cap < limit:
        _unmark(n_children, trees, nodes, 0, n)
        return ERR_GROW, worst
    if raise_on_full:
        for b in range(n_trees):
            if need[b] > limit:
                _unmark(n_children, trees, nodes, 0, n)
                return ERR_FULL, b
    # Allocate ids (leaf order decides who fits) and write the children, per slice.
    child_off = np.empty(n + 1, np.int64)
    child_off[0] = 0
    for i in range(n):
        child_off[i + 1] = child_off[i] + counts[i]
    if cuts.shape[0] > 0:
        _expand_write_par(
            cuts,
            parent,
            first_child,
            n_children,
            prior,
            reward,
            terminal,
            depth,
            size,
            limit,
            trees,
            nodes,
            counts,
            priors,
            rewards,
            terms,
            out_first,
            child_off,
            write_rewards,
            has_terms,
        )
    else:
        _expand_write(
            0,
            n,
            parent,
            first_child,
            n_children,
            prior,
            reward,
            terminal,
            depth,
            size,
            limit,
            trees,
            nodes,
            counts,
            priors,
            rewards,
            terms,
            out_first,
            child_off,
            write_rewards,
            has_terms,
        )
    return OK, 0


_NO_CUTS = np.empty(0, np.int64)


@njit(cache=True, error_model="numpy")
def _tree_cuts(trees, n_chunks):
    """Bounds of n_chunks slices of 0..n that never split a tree's entries, or an empty
    array when trees are not in non-decreasing order (no such slicing exists)."""
    n = trees.shape[0]
    for i in range(1, n):
        if trees[i] < trees[i - 1]:
            return np.empty(0, np.int64)
    cuts = np.empty(n_chunks + 1, np.int64)
    cuts[0] = 0
    cuts[n_chunks] = n
    for g in range(1, n_chunks):
        c = max(cuts[g - 1], g * n // n_chunks)
        while 0 < c < n and trees[c] == trees[c - 1]:
            c += 1
        cuts[g] = c
    return cuts


@njit(cache=True, error_model="numpy")
def _check_leaves(lo, hi, n_children, terminal, depth, size, trees, nodes, counts, need):
    """expand's per-leaf checks of leaves lo..hi-1: marks each (n_children = -1) and adds
    its count to need[tree]. Returns (code, first bad index); on an error the marks of
    this range are undone."""
    n_trees, cap = terminal.shape
    for i in range(lo, hi):
        if i + PF_AHEAD < hi:  # the leaf flags read below are cold: fetch them ahead
            b2 = trees[i + PF_AHEAD]
            n2 = nodes[i + PF_AHEAD]
            if 0 <= b2 < n_trees and 0 <= n2 < cap:
                _prefetch(terminal, b2, n2)
                _prefetch(depth, b2, n2)
        b = trees[i]
        code = OK
        if b < 0 or b >= n_trees:
            code = ERR_TREE
        else:
            nd = nodes[i]
            if nd < 0 or nd >= size[b]:
                code = ERR_NODE
            elif counts[i] <= 0:
                code = ERR_COUNT
            elif terminal[b, nd]:
                code = ERR_TERMINAL
            elif n_children[b, nd] != 0:
                code = ERR_EXPANDED
        if code != OK:
            _unmark(n_children, trees, nodes, lo, i)
            return code, i
        n_children[b, nd] = -1
        need[b] += counts[i]
    return OK, hi


@njit(cache=True, error_model="numpy", parallel=True)
def _check_par(cuts, n_children, terminal, depth, size, trees, nodes, counts, need):
    """`_check_leaves` per slice, one thread each; rows of (code, index)."""
    n_chunks = cuts.shape[0] - 1
    res = np.zeros((n_chunks, 2), np.int64)
    for g in prange(n_chunks):
        code, info = _check_leaves(
            cuts[g], cuts[g + 1], n_children, terminal, depth, size, trees, nodes, counts, need
        )
        res[g, 0] = code
        res[g, 1] = info
    return res


@njit(cache=True, error_model="numpy")
def _expand_write(
    lo,
    hi,
    parent,
    first_child,
    n_children,
    prior,
    reward,
    terminal,
    depth,
    size,
    limit,
    trees,
    nodes,
    counts,
    priors,
    rewards,
    terms,
    out_first,
    child_off,
    write_rewards,
    has_terms,
):
    """Allocate ids for leaves lo..hi-1 (out_first; -1 past `limit`) and write their
    children. The caller gives each tree's leaves to one range, in order."""
    for i in range(lo, hi):
        b = trees[i]
        if size[b] + counts[i] <= limit:
            out_first[i] = size[b]
            size[b] += counts[i]
        else:
            out_first[i] = -1
    for i in range(lo, hi):
        if i + PF_AHEAD < hi and out_first[i + PF_AHEAD] >= 0:  # new slots are cold
            b2 = trees[i + PF_AHEAD]
            f2 = out_first[i + PF_AHEAD]
            k2 = counts[i + PF_AHEAD]
            _pfw_block(parent, b2, f2, k2)
            _pfw_block(depth, b2, f2, k2)
            _pfw_block(prior, b2, f2, k2)
            if write_rewards:
                _pfw_block(reward, b2, f2, k2)
        f = out_first[i]
        b = trees[i]
        nd = nodes[i]
        if f < 0:  # no room: stays a leaf (undo the -1 mark of the checks)
            n_children[b, nd] = 0
            continue
        k = counts[i]
        d = depth[b, nd] + 1
        o = child_off[i]
        # Slots past size hold a fresh leaf (the Forest allocates them so, reset restores
        # what was used, failed calls write nothing): visits, value_sum, n_children, vloss,
        # pending, epoch 0, terminal False, first_child -1 and reward NaN are already there.
        # Write only the rest (the fresh lines are prefetched with intent to write, above).
        for j in range(k):
            c = f + j
            parent[b, c] = nd
            prior[b, c] = priors[o + j]
            if write_rewards:
                reward[b, c] = rewards[o + j]
            if has_terms and terms[o + j]:  # already False: no store unless True
                terminal[b, c] = True
            depth[b, c] = d
        first_child[b, nd] = f
        n_children[b, nd] = k


@njit(cache=True, error_model="numpy", parallel=True)
def _expand_write_par(
    cuts,
    parent,
    first_child,
    n_children,
    prior,
    reward,
    terminal,
    depth,
    size,
    limit,
    trees,
    nodes,
    counts,
    priors,
    rewards,
    terms,
    out_first,
    child_off,
    write_rewards,
    has_terms,
):
    """`_expand_write` over the slices of `cuts` (whole trees each), one per thread."""
    for g in prange(cuts.shape[0] - 1):
        _expand_write(
            cuts[g],
            cuts[g + 1],
            parent,
            first_child,
            n_children,
            prior,
            reward,
            terminal,
            depth,
            size,
            limit,
            trees,
            nodes,
            counts,
            priors,
            rewards,
            terms,
            out_first,
            child_off,
            write_rewards,
            has_terms,
        )


@njit(cache=True, error_model="numpy")
def backup_kernel(
    parent, visits, value_sum, vloss, pending, size, trees, nodes, values, n_chunks=1
):
    """Mean backup: visits += 1 and value_sum += v from each start node up to the root.

    The first pending (picked) node met on the way up loses its pending mark, and the
    virtual loss of that pick is removed from it and every ancestor. Entries run in their
    given order within a tree (bit-identical sums with the reference). With n_chunks > 1
    and entries ordered by tree (what select returns), slices cut at tree boundaries run
    on separate threads: no two threads touch the same tree.
    Returns (OK, number of picks whose virtual loss was cleared) or (code, index of the
    first bad entry).
    """
    n_trees = parent.shape[0]
    n = trees.shape[0]
    for i in range(n):
        b = trees[i]
        if b < 0 or b >= n_trees:
            return ERR_TREE, i
        if nodes[i] < 0 or nodes[i] >= size[b]:
            return ERR_NODE, i
        if not np.isfinite(values[i]):
            return ERR_VALUE, i
    if n_chunks > 1 and n >= 2 * n_chunks:
        cuts = _tree_cuts(trees, n_chunks)
        if cuts.shape[0] > 0:
            return OK, _backup_par(
                parent, visits, value_sum, vloss, pending, trees, nodes, values, cuts
            )
    return OK, _backup_range(0, n, parent, visits, value_sum, vloss, pending, trees, nodes, values)


@njit(cache=True, error_model="numpy")
def _backup_range(lo, hi, parent, visits, value_sum, vloss, pending, trees, nodes, values):
    """Back up entries lo..hi-1 (validated); returns how many picks it cleared.

    The path nodes are mostly still cached from this wave's select.
    """
    cleared = 0
    for i in range(lo, hi):
        if i + 2 * PF_AHEAD < hi:  # the start node's lines, then its parent's: both cold
            b2 = trees[i + 2 * PF_AHEAD]
            n2 = nodes[i + 2 * PF_AHEAD]
            _prefetch_w(visits, b2, n2)
            _prefetch_w(value_sum, b2, n2)
            _prefetch_w(vloss, b2, n2)
            _prefetch(parent, b2, n2)
        if i + PF_AHEAD < hi:
            b2 = trees[i + PF_AHEAD]
            n2 = parent[b2, nodes[i + PF_AHEAD]]
            if n2 >= 0:
                _prefetch_w(visits, b2, n2)
                _prefetch_w(value_sum, b2, n2)
                _prefetch_w(vloss, b2, n2)
                _prefetch(parent, b2, n2)
        b = trees[i]
        v = values[i]
        node = nodes[i]
        clearing = False
        while node >= 0:
            visits[b, node] += 1
            value_sum[b, node] += v
            if not clearing and pending[b, node] != 0:
                pending[b, node] = 0
                clearing = True
                cleared += 1
            if clearing:
                vloss[b, node] -= 1
            node = parent[b, node]
    return cleared


@njit(cache=True, error_model="numpy", parallel=True)
def _backup_par(parent, visits, value_sum, vloss, pending, trees, nodes, values, cuts):
    n_chunks = cuts.shape[0] - 1
    got = np.zeros(n_chunks, np.int64)
    for g in prange(n_chunks):
        got[g] = _backup_range(
            cuts[g], cuts[g + 1], parent, visits, value_sum, vloss, pending, trees, nodes, values
        )
    return got.sum()


@njit(cache=True, error_model="numpy", parallel=True)
def best_leaf_kernel(first_child, n_children, visits, value_sum, reward, by, out):
    """Per tree, descend from the root to a leaf taking the child with the largest key.

    Keys: visits, mean value (value_sum / visits; unvisited = -inf) or reward (NaN = -inf).
    Ties (and all -inf) go to the lowest child index, so the path always reaches a leaf.
    """
    for b in prange(out.shape[0]):
        node = 0
        while n_children[b, node] > 0:
            fc = first_child[b, node]
            best = fc
            best_key = -np.inf
            for j in range(n_children[b, node]):
                c = fc + j
                if by == BY_VISITS:
                    key = float(visits[b, c])
                elif by == BY_VALUE:
                    key = value_sum[b, c] / visits[b, c] if visits[b, c] > 0 else -np.inf
                else:
                    key = reward[b, c]
                    if np.isnan(key):
                        key = -np.inf
                if key > best_key:
                    best = c
                    best_key = key
            node = best
        out[b] = node


@njit(cache=True, error_model="numpy")
def paths_kernel(parent, depth, b, leaves):
    """Root-to-leaf paths of tree b for each leaf, flattened; returns (flat, offsets)."""
    n = leaves.shape[0]
    offsets = np.empty(n + 1, np.int64)
    offsets[0] = 0
    for i in range(n):
        offsets[i + 1] = offsets[i] + depth[b, leaves[i]] + 1
    flat = np.empty(offsets[n], np.int64)
    for i in range(n):
        node = leaves[i]
        k = offsets[i + 1] - 1
        while node >= 0:
            flat[k] = node
            k -= 1
            node = parent[b, node]
    return flat, offsets

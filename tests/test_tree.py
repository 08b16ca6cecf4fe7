"""Forest invariants, growth, extraction, export and bad-input errors."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcts.tree import Forest, ForestFullError, NodeStore


def _grow_random(forest: Forest, rng: np.random.Generator, waves: int, per_tree: int = 3):
    """Run waves of select/expand/backup; returns the backup-start count per (tree, node)."""
    starts: dict[tuple[int, int], int] = {}
    for _ in range(waves):
        trees, nodes = forest.select(per_tree, vl_value=0.0)
        if trees.size == 0:
            break
        counts = rng.integers(1, 5, size=trees.size)
        total = int(counts.sum())
        firsts = forest.expand(trees, nodes, counts, rng.random(total), rng.random(total))
        bt, bn = [], []
        for b, f, k in zip(trees, firsts, counts, strict=True):
            for c in range(f, f + k):
                bt.append(b)
                bn.append(c)
                starts[(int(b), c)] = starts.get((int(b), c), 0) + 1
        forest.backup(np.array(bt), np.array(bn), rng.random(len(bt)))
    return starts


def test_backup_rule_visits_equal_own_starts_plus_children():
    """visits[n] == (backups that started at n) + sum(visits of n's children)."""
    rng = np.random.default_rng(0)
    f = Forest(3, capacity=4)
    starts = _grow_random(f, rng, waves=12)
    # also re-back-up some terminal leaves, as the search does
    leaves = [n for n in range(1, int(f.size[1])) if f.n_children[1, n] == 0][:3]
    f.mark_terminal([1] * len(leaves), leaves, reward=1.0)
    f.backup(np.ones(len(leaves), dtype=np.int64), np.array(leaves), np.ones(len(leaves)))
    for n in leaves:
        starts[(1, n)] = starts.get((1, n), 0) + 1
    for b in range(f.n_trees):
        for n in range(int(f.size[b])):
            kids = f.children(b, n)
            expected = starts.get((b, n), 0) + int(f.visits[b, kids].sum())
            assert f.visits[b, n] == expected
        assert not f.vloss[b].any()
    assert f.visits[:, 0].min() > 10


def test_virtual_loss_gives_distinct_leaves_and_is_cleared():
    f = Forest(2, capacity=16)
    t, n = f.select(1)
    f.expand(t, n, [4, 4], np.full(8, 0.25))
    f.backup(t, n, [0.5, 0.5])
    t, n = f.select(4)
    assert len(set(zip(t.tolist(), n.tolist(), strict=True))) == 8
    assert f.vloss[0, 0] == 4 and f.vloss[1, 0] == 4
    # asking again while all leaves are in flight yields nothing
    t2, _ = f.select(3)
    assert t2.size == 0
    f.clear_virtual_loss()
    assert not f.vloss.any()
    t3, n3 = f.select(2)
    assert t3.size == 4


def test_select_respects_active_and_per_tree_counts():
    f = Forest(3, capacity=8)
    t, n = f.select(np.array([1, 0, 1]), active=np.array([True, True, False]))
    assert t.tolist() == [0] and n.tolist() == [0]


def test_growth_preserves_every_node():
    rng = np.random.default_rng(1)
    f = Forest(2, capacity=2)
    _grow_random(f, rng, waves=3)
    s = f.size.copy()
    snap = {
        name: getattr(f, name)[:, : s.max()].copy()
        for name in ("parent", "visits", "value_sum", "prior", "reward", "depth")
    }
    cap = f.capacity
    _grow_random(f, rng, waves=6)
    assert f.capacity > cap
    for name, old in snap.items():
        new = getattr(f, name)
        for b in range(2):
            if name in ("visits", "value_sum"):
                continue  # these legitimately change along paths
            np.testing.assert_array_equal(new[b, : s[b]], old[b, : s[b]])


def test_max_nodes_raise_and_stop():
    f = Forest(1, capacity=2, max_nodes=6, on_full="raise")
    t, n = f.select(1)
    f.expand(t, n, [4], np.full(4, 0.25))
    f.backup(t, n, [0.5])
    t, n = f.select(1)
    with pytest.raises(ForestFullError, match="max_nodes=6"):
        f.expand(t, n, [3], np.full(3, 0.3))
    assert f.size[0] == 5 and f.n_children[0, n[0]] == 0  # nothing half-written

    g = Forest(1, capacity=2, max_nodes=6, on_full="stop")
    t, n = g.select(1)
    g.expand(t, n, [4], np.full(4, 0.25))
    g.backup(t, n, [0.5])
    t, n = g.select(2)
    first = g.expand(t, n, [3, 1], np.full(4, 0.25))
    assert first.tolist() == [-1, 5]  # the first leaf does not fit, the second does
    assert g.size[0] == 6 and g.capacity == 6


def test_bad_inputs_raise_clear_errors():
    f = Forest(2, capacity=4)
    t, n = f.select(1)
    with pytest.raises(ValueError, match="mark_terminal"):
        f.expand(t, n, [0, 2], np.full(2, 0.5))
    with pytest.raises(ValueError, match="priors"):
        f.expand(t, n, [1, 1], np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match="priors"):
        f.expand(t, n, [1, 1], np.array([0.5, -0.1]))
    with pytest.raises(ValueError, match="rewards"):
        f.expand(t, n, [1, 1], np.ones(2), rewards=np.array([np.inf, 0.0]))
    with pytest.raises(ValueError, match="nodes"):
        f.expand(t, np.array([0, 7]), [1, 1], np.ones(2))
    with pytest.raises(ValueError, match="trees"):
        f.expand(np.array([0, 5]), n, [1, 1], np.ones(2))
    with pytest.raises(ValueError, match="appears twice"):
        f.expand(np.array([0, 0]), np.array([0, 0]), [1, 1], np.ones(2))
    with pytest.raises(ValueError, match="counts.sum"):
        f.expand(t, n, [1, 1], np.ones(3))
    with pytest.raises(TypeError, match="integers"):
        f.expand(t.astype(float), n, [1, 1], np.ones(2))
    assert f.size.tolist() == [1, 1] and not f.n_children[:, 0].any()  # untouched
    f.expand(t, n, [1, 1], np.ones(2))
    with pytest.raises(ValueError, match="already has children"):
        f.expand(t, n, [1, 1], np.ones(2))
    with pytest.raises(ValueError, match="values"):
        f.backup(t, n, np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match="values"):
        f.backup(t, n, np.array([np.inf, 0.5]))
    with pytest.raises(ValueError, match="nodes"):
        f.backup(t, np.array([0, -1]), np.array([0.5, 0.5]))
    assert not f.visits.any()  # a rejected backup writes nothing
    with pytest.raises(ValueError, match="only leaves"):
        f.mark_terminal([0], [0])
    with pytest.raises(ValueError, match="rule"):
        f.select(1, rule="ucb")
    with pytest.raises(ValueError, match="fpu"):
        f.select(1, fpu="zero")
    with pytest.raises(ValueError, match="leaves_per_tree"):
        f.select(-1)
    with pytest.raises(ValueError, match="c_base"):
        f.select(1, c_base=0.0)
    with pytest.raises(ValueError, match="tree id"):
        f.best_path(9)
    with pytest.raises(ValueError, match="node id"):
        f.path_to_root(0, 99)
    with pytest.raises(ValueError, match="n_trees"):
        Forest(0)
    with pytest.raises(ValueError, match="on_full"):
        Forest(1, on_full="drop")  # type: ignore[arg-type]


def test_terminal_leaf_is_reselected_not_expanded():
    f = Forest(1, capacity=8)
    t, n = f.select(1)
    first = f.expand(t, n, [1], np.ones(1), terminal=np.array([True]))
    f.backup(t, first, [1.0])
    t, n = f.select(1)
    assert n.tolist() == [1] and f.terminal[0, 1]
    with pytest.raises(ValueError, match="terminal"):
        f.expand(t, n, [1], np.ones(1))
    f.backup(t, n, [1.0])
    assert f.visits[0, 1] == 2 and f.visits[0, 0] == 2 and f.vloss[0, 0] == 0


def _manual_tree() -> Forest:
    f = Forest(1, capacity=4)
    t, n = f.select(1)
    f.expand(t, n, [3], np.array([0.2, 0.5, 0.3]), rewards=np.array([0.9, 0.1, np.nan]))
    f.backup([0, 0, 0], [1, 2, 3], [0.9, 0.1, 0.4])
    f.backup([0, 0], [2, 2], [0.1, 0.1])  # node 2: most visits, lowest value
    return f


def test_best_path_by_visits_value_reward():
    f = _manual_tree()
    assert f.best_path(0, "visits").tolist() == [0, 2]
    assert f.best_path(0, "value").tolist() == [0, 1]
    assert f.best_path(0, "reward").tolist() == [0, 1]
    assert f.best_leaves("visits").tolist() == [2]
    assert f.q(0, [1, 2, 3]).tolist() == pytest.approx([0.9, 0.1, 0.4])
    assert sorted(p.tolist() for p in f.leaf_paths(0)) == [[0, 1], [0, 2], [0, 3]]
    assert f.leaf_paths(0, terminal_only=True) == []
    with pytest.raises(ValueError, match="by"):
        f.best_path(0, "prior")


def test_puct_textbook_formula_on_a_hand_example():
    f = _manual_tree()
    # Root: N=5. Children: (N, W, P) = (1, .9, .2), (3, .3, .5), (1, .4, .3)
    n_p = 5.0
    c = math.log((1 + n_p + 19652) / 19652) + 1.25
    scores = [
        w / n + c * p * math.sqrt(n_p) / (1 + n)
        for n, w, p in [(1, 0.9, 0.2), (3, 0.3, 0.5), (1, 0.4, 0.3)]
    ]
    expected = 1 + int(np.argmax(scores))
    t, n = f.select(1)
    assert n.tolist() == [expected]


def test_uct_tries_unvisited_first_and_fpu_constant():
    f = Forest(1, capacity=8)
    t, n = f.select(1)
    f.expand(t, n, [3], np.array([0.8, 0.1, 0.1]))
    f.backup(t, [1], [1.0])
    _, n = f.select(1, rule="uct")
    assert n.tolist() == [2]  # unvisited, lowest index
    f.clear_virtual_loss()
    # With PUCT and fpu=0 the visited child (Q=1) beats unvisited ones despite priors.
    _, n = f.select(1, fpu=0.0)
    assert n.tolist() == [1]


def test_dirichlet_noise_keeps_prior_sum():
    f = Forest(2, capacity=8)
    t, n = f.select(1)
    f.expand(t, n, [4, 4], np.full(8, 0.25))
    before = f.prior[:, 1:5].copy()
    f.add_dirichlet_noise([0], alpha=0.3, eps=0.25, rng=np.random.default_rng(0))
    assert f.prior[0, 1:5].sum() == pytest.approx(1.0)
    assert not np.allclose(f.prior[0, 1:5], before[0])
    np.testing.assert_array_equal(f.prior[1, 1:5], before[1])
    with pytest.raises(ValueError, match="eps"):
        f.add_dirichlet_noise([0], alpha=0.3, eps=2.0, rng=np.random.default_rng(0))
    g = Forest(1)
    with pytest.raises(ValueError, match="expand the root"):
        g.add_dirichlet_noise([0], alpha=0.3, eps=0.25, rng=np.random.default_rng(0))


def test_to_networkx_has_every_statistic_and_text():
    f = _manual_tree()
    store = NodeStore()
    store.set(0, 1, "step one", token_ids=[5, 6], answer="4")
    g = f.to_networkx(0, store)
    assert isinstance(g, nx.DiGraph)
    assert g.number_of_nodes() == 4 and sorted(g.edges) == [(0, 1), (0, 2), (0, 3)]
    a = g.nodes[1]
    for key in ("visits", "value_sum", "q", "prior", "reward", "terminal", "depth", "vloss"):
        assert key in a
    assert a["text"] == "step one" and a["n_tokens"] == 2 and a["answer"] == "4"
    assert g.nodes[2]["visits"] == 3 and math.isnan(g.nodes[3]["reward"])
    assert g.nodes[0]["text"] == ""


def test_node_store_get_set_clear():
    s = NodeStore()
    s.set(0, 3, "a")
    s.set(1, 3, "b")
    assert s.text(0, 3) == "a" and s.get(1, 3).text == "b" and len(s) == 2
    s.clear(0)
    assert (0, 3) not in s and (1, 3) in s
    with pytest.raises(TypeError, match="text"):
        s.set(0, 1, 5)  # type: ignore[arg-type]
    s.clear()
    assert len(s) == 0


def test_reset_reuses_allocation_and_can_grow_batch():
    rng = np.random.default_rng(2)
    f = Forest(2, capacity=4)
    _grow_random(f, rng, waves=4)
    cap = f.capacity
    f.reset()
    assert f.size.tolist() == [1, 1] and f.capacity == cap
    assert not f.visits.any() and not f.n_children.any()
    f.reset(5)
    assert f.n_trees == 5 and f.visits.shape == (5, cap)
    t, n = f.select(1)
    assert t.tolist() == [0, 1, 2, 3, 4]
    # reused slots read as fresh leaves again: expand writes neither first_child nor reward
    assert (f.first_child[:, 1:] == -1).all() and np.isnan(f.reward).all()
    first = f.expand(t, n, np.full(5, 2), np.full(10, 0.5))
    kids = np.stack([first, first + 1], axis=1)
    rows = np.arange(5)[:, None]
    assert (f.first_child[rows, kids] == -1).all() and np.isnan(f.reward[rows, kids]).all()


def test_views_are_read_only():
    f = Forest(1)
    with pytest.raises(ValueError):
        f.visits[0, 0] = 3


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_vloss_zero_after_every_backup(n_trees, per_tree, seed):
    rng = np.random.default_rng(seed)
    f = Forest(n_trees, capacity=2)
    for _ in range(5):
        _grow_random(f, rng, waves=1, per_tree=per_tree)
        assert not f.vloss.any()
        assert (f.visits[:, 0] == f.visits[:, 1:].sum(axis=1, where=f.parent[:, 1:] == 0)).all()


def test_thread_policy_never_changes_picks_and_rejects_bad_values():
    """The serial/parallel/auto choice (select, expand's writes, backup) only moves work
    between threads; a backup not ordered by tree falls back to one thread."""
    import numba

    runs = {}
    prev = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        for policy in ("serial", "parallel", "auto"):
            f = Forest(80, capacity=8)
            f.threads = policy
            picks = []
            for w in range(40):  # > 2 * AUTO_PROBE: auto both measures and probes
                t, n = f.select(2, vl_value=0.0)
                f.expand(t, n, np.full(t.size, 3), np.tile([0.2, 0.5, 0.3], t.size))
                order = np.arange(t.size) if w % 2 else np.arange(t.size)[::-1]
                f.backup(t[order], n[order], np.linspace(0.0, 1.0, t.size))
                picks.append(n.copy())
            runs[policy] = (
                np.concatenate(picks),
                f.visits.copy(),
                f.value_sum.copy(),
                f.parent.copy(),
                f.depth.copy(),
                f.prior.copy(),
            )
    finally:
        numba.set_num_threads(prev)
    for policy in ("parallel", "auto"):
        for a, b in zip(runs["serial"], runs[policy], strict=True):
            assert np.array_equal(a, b)
    f = Forest(80, capacity=8)
    f.threads = "many"
    with pytest.raises(ValueError, match="Forest.threads"):
        f.select(1)


@pytest.mark.parametrize("policy", ["serial", "parallel"])
def test_expand_errors_in_any_thread_slice_leave_no_trace(policy):
    """With threads, expand checks leaves in per-thread slices of whole trees: an error in
    either slice must name the first bad leaf and undo every slice's marks."""
    import numba

    prev = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        f = Forest(100, capacity=4)
        f.threads = policy
        t, n = f.select(1)
        f.expand(t, n, np.full(100, 2), np.full(200, 0.5))
        f.backup(t, n, np.full(100, 0.5))
        t, n = f.select(1)  # one fresh leaf per tree, ordered by tree
        f.mark_terminal([t[90]], [n[90]])  # a terminal leaf in the second slice
        size0, kids0 = f.size.copy(), f.n_children.copy()
        with pytest.raises(ValueError, match=f"node {n[90]} of tree 90 is terminal"):
            f.expand(t, n, np.full(100, 2), np.full(200, 0.5))
        t2, n2 = np.insert(t, 11, t[10]), np.insert(n, 11, n[10])  # tree 10's leaf twice
        with pytest.raises(ValueError, match="appears twice"):
            f.expand(t2, n2, np.full(101, 2), np.full(202, 0.5))
        assert np.array_equal(f.size, size0) and np.array_equal(f.n_children, kids0)
        keep = np.arange(100) != 90
        first = f.expand(t[keep], n[keep], np.full(99, 2), np.full(198, 0.25))
        assert (first >= 3).all() and (f.n_children[t[keep], n[keep]] == 2).all()
        assert (f.parent[t[keep], first] == n[keep]).all()
    finally:
        numba.set_num_threads(prev)


def test_in_flight_cap_is_a_clear_error():
    """vloss is int16: asking for more picks in flight than MAX_IN_FLIGHT in one tree is
    refused up front (nothing selected), not wrapped around."""
    from mcts.tree import MAX_IN_FLIGHT

    f = Forest(2, capacity=4)
    with pytest.raises(ValueError, match="tree 1 would have more than MAX_IN_FLIGHT"):
        f.select(np.array([0, MAX_IN_FLIGHT + 1]))
    assert not f.vloss.any() and f.size.tolist() == [1, 1]
    t, n = f.select(np.array([1, 1]))  # still usable
    assert t.tolist() == [0, 1] and f.vloss.dtype == np.int16

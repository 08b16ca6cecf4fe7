"""Property tests: random select/expand/backup sequences on the numba Forest and the
plain-Python reference MCTS must give identical picks, visit counts, values and virtual loss."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcts.tree import Forest
from tests.reference_mcts import ReferenceForest

# Few distinct values make ties frequent, which exercises the lowest-index tie rule.
PRIORS = st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0])
VALUES = st.sampled_from([0.0, 0.125, 0.5, 0.75, 1.0])

CONFIGS = st.fixed_dictionaries(
    {
        "rule": st.sampled_from(["puct", "uct"]),
        "c_puct": st.sampled_from([0.5, 1.0, 2.0]),
        "c_base": st.sampled_from([1.0, 19652.0]),
        "c_init": st.sampled_from([0.0, 1.25]),
        "vl_value": st.sampled_from([0.0, 1.0, -1.0]),
        "fpu": st.sampled_from(["parent", 0.0, 1.0]),
    }
)


def _state(forest: Forest, ref: ReferenceForest) -> None:
    for b, tree in enumerate(ref.trees):
        s = int(forest.size[b])
        assert s == len(tree.nodes)
        assert forest.visits[b, :s].tolist() == [n.visits for n in tree.nodes]
        assert forest.value_sum[b, :s].tolist() == [n.value_sum for n in tree.nodes]
        assert forest.vloss[b, :s].tolist() == [n.vloss for n in tree.nodes]
        assert forest.parent[b, :s].tolist() == [-1] + [n.parent.id for n in tree.nodes[1:]]
        assert forest.terminal[b, :s].tolist() == [n.terminal for n in tree.nodes]
        assert forest.first_child[b, :s].tolist() == [
            n.children[0].id if n.children else -1 for n in tree.nodes
        ]
        assert forest.depth[b, :s].tolist() == [n.depth for n in tree.nodes]
        assert forest.prior[b, :s].tolist() == [n.prior for n in tree.nodes]
        np.testing.assert_array_equal(forest.reward[b, :s], [n.reward for n in tree.nodes])
    # select's vloss-free fast path relies on this count of in-flight picks being exact
    in_flight = sum(n.pending for tree in ref.trees for n in tree.nodes)
    assert forest._inflight == in_flight


@st.composite
def scenarios(draw):
    n_trees = draw(st.integers(1, 4))
    waves = []
    for _ in range(draw(st.integers(1, 8))):
        waves.append(
            {
                "want": draw(st.lists(st.integers(0, 4), min_size=n_trees, max_size=n_trees)),
                "cfg": draw(CONFIGS),
                "seed": draw(st.integers(0, 2**31 - 1)),
                # how picked leaves are finished: expand+backup children, backup the leaf,
                # mark terminal, or abandon (then clear_virtual_loss)
                "mode": draw(st.sampled_from(["children", "leaf", "mixed", "abandon"])),
            }
        )
    return n_trees, waves


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_forest_matches_reference(scenario, data):
    n_trees, waves = scenario
    forest = Forest(n_trees, capacity=2)  # tiny capacity: growth happens along the way
    ref = ReferenceForest(n_trees)
    for wave in waves:
        trees, nodes = forest.select(np.array(wave["want"]), **wave["cfg"])
        rt, rn = ref.select(wave["want"], **wave["cfg"])
        assert trees.tolist() == rt
        assert nodes.tolist() == rn
        assert len(set(zip(rt, rn, strict=True))) == len(rt), "picks must be distinct"
        _state(forest, ref)
        if wave["mode"] == "abandon":
            forest.clear_virtual_loss()
            ref.clear_virtual_loss()
            assert not forest.vloss.any()
            continue
        exp_t, exp_n, counts, bk_t, bk_n, bk_v = [], [], [], [], [], []
        for b, n in zip(rt, rn, strict=True):
            if ref.trees[b].nodes[n].terminal:
                bk_t.append(b)
                bk_n.append(n)
                bk_v.append(data.draw(VALUES))
                continue
            if wave["mode"] == "mixed" and data.draw(st.booleans()):
                forest.mark_terminal([b], [n])
                ref.mark_terminal(b, n)
                bk_t.append(b)
                bk_n.append(n)
                bk_v.append(data.draw(VALUES))
                continue
            exp_t.append(b)
            exp_n.append(n)
            counts.append(data.draw(st.integers(1, 4)))
        total = sum(counts)
        priors = data.draw(st.lists(PRIORS, min_size=total, max_size=total))
        terms = data.draw(st.lists(st.booleans(), min_size=total, max_size=total))
        # rewards given (stored) or not (fresh slots already read NaN, nothing written)
        rewards = data.draw(
            st.none() | st.lists(PRIORS | st.just(np.nan), min_size=total, max_size=total)
        )
        firsts = forest.expand(
            np.array(exp_t, dtype=np.int64),
            np.array(exp_n, dtype=np.int64),
            np.array(counts, dtype=np.int64),
            np.array(priors),
            None if rewards is None else np.array(rewards),
            terminal=np.array(terms, dtype=bool),
        )
        rfirsts = ref.expand(exp_t, exp_n, counts, priors, rewards, terminal=terms)
        assert firsts.tolist() == rfirsts
        for b, n, f, k in zip(exp_t, exp_n, rfirsts, counts, strict=True):
            if wave["mode"] == "leaf":
                bk_t.append(b)
                bk_n.append(n)
                bk_v.append(data.draw(VALUES))
            else:
                bk_t += [b] * k
                bk_n += list(range(f, f + k))
                bk_v += data.draw(st.lists(VALUES, min_size=k, max_size=k))
        # Shuffle so entries of one tree interleave with others (order within a tree kept).
        perm = np.random.default_rng(wave["seed"]).permutation(len(bk_t))
        bk_t = [bk_t[i] for i in perm]
        bk_n = [bk_n[i] for i in perm]
        bk_v = [bk_v[i] for i in perm]
        forest.backup(
            np.array(bk_t, dtype=np.int64), np.array(bk_n, dtype=np.int64), np.array(bk_v)
        )
        ref.backup(bk_t, bk_n, bk_v)
        _state(forest, ref)
        assert not forest.vloss.any(), "virtual loss must be zero once every pick is backed up"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_trees=st.integers(65, 140),
    cfg=CONFIGS,
    seed=st.integers(0, 2**31 - 1),
    threads=st.sampled_from([1, 2]),
)
def test_many_trees_lanes_and_threads_match_reference(n_trees, cfg, seed, threads):
    """Past PARALLEL_MIN_TREES the select kernel runs trees in per-thread chunks, many
    descents interleaved: picks must still be exactly the reference's, tree by tree."""
    import numba

    rng = np.random.default_rng(seed)
    forest = Forest(n_trees, capacity=4)
    forest.threads = "parallel" if threads == 2 else "auto"  # force the thread pool path
    ref = ReferenceForest(n_trees)
    prev = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for wave in range(6):
            # odd waves want <= 1 leaf per tree: select's clean path (nothing in flight)
            want = rng.integers(0, 2 if wave % 2 else 4, n_trees)
            trees, nodes = forest.select(want, **cfg)
            rt, rn = ref.select(want.tolist(), **cfg)
            assert trees.tolist() == rt
            assert nodes.tolist() == rn
            counts = rng.integers(1, 4, len(rt))
            priors = rng.choice([0.0, 0.25, 0.5, 1.0], int(counts.sum()))
            firsts = forest.expand(trees, nodes, counts, priors)
            assert firsts.tolist() == ref.expand(rt, rn, counts.tolist(), priors.tolist())
            values = rng.choice([0.0, 0.5, 1.0], len(rt))
            forest.backup(trees, nodes, values)
            ref.backup(rt, rn, values.tolist())
            _state(forest, ref)
            assert not forest.vloss.any()
    finally:
        numba.set_num_threads(prev)


@given(cfg=CONFIGS, extra=st.integers(0, 3))
@settings(max_examples=10, deadline=None)
def test_parent_visits_past_the_score_table_match_reference(cfg, extra):
    """select takes the parent's score factor from a table below PARENT_TERM_N visits and
    computes it above: both sides of the boundary must pick what the reference picks."""
    from mcts.tree import PARENT_TERM_N

    forest, ref = Forest(1, capacity=8), ReferenceForest(1)
    n = PARENT_TERM_N - 2 + extra  # root visits end up on both sides of the boundary
    tr, nd = forest.select(1)
    ref.select([1])
    forest.backup(np.zeros(n, np.int64), np.zeros(n, np.int64), np.full(n, 0.5))
    ref.backup([0] * n, [0] * n, [0.5] * n)
    forest.expand([0], [0], [3], np.array([0.2, 0.5, 0.3]))
    ref.expand([0], [0], [3], [0.2, 0.5, 0.3])
    for _ in range(4):
        trees, nodes = forest.select(1, **cfg)
        rt, rn = ref.select([1], **cfg)
        assert nodes.tolist() == rn
        forest.backup(trees, nodes, np.array([0.25]))
        ref.backup(rt, rn, [0.25])
    _state(forest, ref)

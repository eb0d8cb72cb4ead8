"""The native (C) plan equals the numpy plan bit for bit, and the tree derivations equal the Python walk.

The numpy side runs on a copy of each tree whose derivations are forced to the Python walk, so a change
in the C code that moves a single index, on any tree shape or plan parameter, fails here.
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import pytest

from deft.kernels import plan_native
from deft.kernels.kv_groups import (
    MODES,
    SECTIONS,
    KVGroups,
    build_groups,
    order_tiles_longest_first,
    small_tile_rows,
    tile_classes,
)
from deft.tree import DecodingTree
from tests.conftest import speculative_tree as _speculative

FIELDS = ("n_tiles", "n_chunks", "n_tokens", "n_partials", "max_parts", "rows", "chunk_size")


# ---------------------------------------------------------------------- helpers
def python_tree(tree: DecodingTree) -> DecodingTree:
    """The same tree as a new object whose DFS order and seen lengths come from the Python code."""
    t = DecodingTree(tree.parent, tree.slot_ptr, tree.slots, tree.query_node, tree.query_visible, tree.n_slots)
    t.__dict__["_native"] = None  # what DecodingTree._native caches when the native code is off
    return t


def assert_same_groups(a: KVGroups, b: KVGroups) -> None:
    assert a.packed.dtype == b.packed.dtype == np.int32
    assert a.offsets == b.offsets and list(a.offsets) == list(SECTIONS)
    assert all(type(x) is int for ab in a.offsets.values() for x in ab)
    for name, (lo, hi) in b.offsets.items():
        assert np.array_equal(a.packed[lo:hi], b.packed[lo:hi]), f"section {name} differs"
    assert a.packed.size == b.packed.size
    for f in FIELDS:
        assert type(getattr(a, f)) is int and getattr(a, f) == getattr(b, f), f


def assert_native_matches_numpy(
    tree, group, mode, chunk_size=0, block_m_max=128, snap=0.0, use_out=False, wide_budget=0, few_split=0,
    fill_tiles=False, fill_small=0, leaf_split=False,
):  # fmt: skip
    """Native plan (``use_out``: into a buffer given by out_alloc) equals the numpy plan of the same tree."""
    bufs = []

    def alloc(n: int) -> np.ndarray:
        bufs.append(np.full(n + 2, -7, dtype=np.int32))
        return bufs[-1][1 : n + 1]

    if tree.n_queries:  # the C code itself, not build_groups' numpy fallback for inputs it declines
        out_alloc = alloc if use_out else None
        nat = plan_native.build_groups_native(
            tree, group, mode, chunk_size, block_m_max, out_alloc, snap, wide_budget, few_split, fill_tiles=fill_tiles,
            fill_small=fill_small, leaf_split=leaf_split,
        )
        assert nat is not None
    else:
        nat = build_groups(
            tree, group, mode, chunk_size, block_m_max, alloc if use_out else None, snap, native=True,
            wide_budget=wide_budget, few_split=few_split, fill_tiles=fill_tiles, fill_small=fill_small,
            leaf_split=leaf_split,
        )  # fmt: skip
    ref = build_groups(
        python_tree(tree), group, mode, chunk_size, block_m_max, None, snap, native=False, wide_budget=wide_budget,
        few_split=few_split, fill_tiles=fill_tiles, fill_small=fill_small, leaf_split=leaf_split,
    )  # fmt: skip
    assert_same_groups(nat, ref)
    if use_out:
        assert len(bufs) == 1 and np.shares_memory(nat.packed, bufs[0])
        assert bufs[0][0] == bufs[0][-1] == -7  # nothing written outside


def random_params(rng, tree: DecodingTree) -> dict:
    n_tok = max(1, int(tree.slots.size))
    return dict(
        group=int(rng.choice([1, 2, 4, 8])),
        mode=str(rng.choice(MODES)),
        chunk_size=int(rng.choice([1, rng.integers(1, 8), rng.integers(1, n_tok + 1), n_tok, 2 * n_tok + 5])),
        block_m_max=int(rng.choice([16, 32, 48, 64, 128])),
        snap=float(rng.choice([0.0, 0.3, 0.49])),
        wide_budget=int(rng.choice([0, 0, 1, 3, 33])),
        few_split=int(rng.choice([0, 0, 4, 16, 64])),
        fill_tiles=bool(rng.random() < 0.5),
        fill_small=int(rng.choice([0, 4, 16, 32])),
    )


def speculative_tree(rng, prompt: int, n_candidates: int, max_len: int = 4) -> DecodingTree:
    """A speculative tree whose node queries come in shuffled ``visible`` order."""
    return _speculative(rng, prompt, n_candidates, max_len, shuffle_visible=True)


def chain_tree(rng, n_nodes: int) -> DecodingTree:
    """A chain (each node the child of the one before), queries at the leaf and at a few inner nodes."""
    lens = rng.integers(1, 6, n_nodes)
    qn = [n_nodes - 1, *rng.integers(0, n_nodes, 5).tolist()]
    qv = [int(rng.integers(1, lens[v] + 1)) for v in qn]
    return DecodingTree.from_arrays(np.arange(-1, n_nodes - 1), lens, np.arange(int(lens.sum())), qn, qv)


def fan_tree(rng, width: int, prompt: int = 300) -> DecodingTree:
    """A prompt with ``width`` children in shuffled id order, one query at the newest token of most."""
    lens = np.concatenate([[prompt], rng.integers(1, 30, width)])
    kids = rng.permutation(np.arange(1, width + 1))[: max(1, width - 7)]
    return DecodingTree.from_arrays([-1] + [0] * width, lens, rng.permutation(int(lens.sum())), kids, lens[kids])


# ---------------------------------------------------------------------- tests
def test_native_plan_is_built_here_unless_disabled():
    """CI has a C compiler: a build or load failure must fail here, not fall back to numpy unseen."""
    assert plan_native.native_available(), plan_native._load_error


@pytest.fixture(autouse=True)
def _native_unless_disabled():
    if os.environ.get("DEFT_NATIVE_PLAN") == "0":
        pytest.skip("DEFT_NATIVE_PLAN=0 set explicitly")


@pytest.mark.parametrize("seed", range(12))
def test_random_trees_native_plan_is_bit_identical_to_numpy(seed, make_random_tree):
    rng = np.random.default_rng(seed)
    for _ in range(250):
        tree = make_random_tree(
            rng, max_nodes=int(rng.integers(1, 40)), max_len=int(rng.integers(1, 50)),
            max_queries=int(rng.integers(1, 16)), spare_slots=int(rng.integers(0, 9)),
        )  # fmt: skip
        assert_native_matches_numpy(tree, **random_params(rng, tree), use_out=bool(rng.random() < 0.5))


@pytest.mark.parametrize("seed", range(4))
def test_speculative_trees_with_many_queries_per_node_are_bit_identical(seed):
    """Many queries in one node with different ``visible`` (more than the C sort's insertion runs)."""
    rng = np.random.default_rng(100 + seed)
    for _ in range(40):
        tree = speculative_tree(rng, int(rng.integers(1, 400)), int(rng.integers(1, 300)), int(rng.choice([4, 80])))
        assert_native_matches_numpy(tree, **random_params(rng, tree))


@pytest.mark.parametrize("mode", MODES)
def test_deep_chains_wide_fans_and_single_nodes_are_bit_identical(mode):
    rng = np.random.default_rng(7)
    chain = chain_tree(rng, 5000)
    for cs, snap in ((1, 0.0), (37, 0.49), (4000, 0.3), (10**6, 0.3)):
        assert_native_matches_numpy(chain, 4, mode, cs, 64, snap)
    fan = fan_tree(rng, 200)
    for cs, snap in ((1, 0.3), (16, 0.49), (300, 0.3), (5000, 0.0)):
        assert_native_matches_numpy(fan, 8, mode, cs, 128, snap)
        assert_native_matches_numpy(fan, 4, mode, cs, 64, snap, wide_budget=33, few_split=16)
    one = DecodingTree.from_arrays([-1], [50], rng.permutation(50), [0] * 20, rng.integers(1, 51, 20))
    for cs in (1, 9, 50, 51):
        assert_native_matches_numpy(one, 8, mode, cs, 16, 0.3)
    one_query = DecodingTree.from_arrays([-1], [1], [3], [0], [1], n_slots=4)
    assert_native_matches_numpy(one_query, 1, mode, 1, 16, 0.49)


@pytest.mark.parametrize("branch,chunk", [(30, 32), (22, 16), (29, 16), (399, 363)])
def test_few_split_edge_moves_are_bit_identical(branch, chunk):
    """Fans whose few runs start beside a branch's Node-Chunk cut (the edge move of ``_split_few_query_chunks``)."""
    from tests.test_deft_kernels import fan_tree as fan

    tree = fan(20 if branch < 100 else 4000, 5 if branch < 100 else 50, branch)
    for use_out in (False, True):
        assert_native_matches_numpy(tree, 4, "flatten", chunk, 16, few_split=16, use_out=use_out)


@pytest.mark.parametrize("seed", range(12))
def test_leaf_split_is_bit_identical(seed, make_random_tree):
    """``leaf_split``: chunks of leaves only count as few; fans of short leaves and random trees."""
    rng = np.random.default_rng(400 + seed)
    tree = fan_tree(rng, int(rng.integers(3, 60)), 40) if seed % 2 else make_random_tree(rng)
    params = {**random_params(rng, tree), "mode": "flatten", "few_split": int(rng.choice([4, 16, 64]))}
    assert_native_matches_numpy(tree, **params, leaf_split=True, use_out=bool(seed % 3 == 0))


@pytest.mark.parametrize("mode", MODES)
def test_unseen_nodes_are_dropped_and_query_free_trees_are_empty(mode):
    rng = np.random.default_rng(11)
    # queries only below node 1: node 2's branch and the unseen tail of node 3 are left out
    tree = DecodingTree.from_arrays([-1, 0, 0, 1, 2], [40, 10, 30, 20, 5], rng.permutation(105), [3, 3], [4, 9])
    for cs in (1, 7, 40, 100):
        assert_native_matches_numpy(tree, 4, mode, cs, 64, 0.3)
    empty = DecodingTree.from_arrays([-1, 0], [5, 3], np.arange(8), [], [])
    g = build_groups(empty, 4, mode, 4, native=True)
    assert_same_groups(g, build_groups(python_tree(empty), 4, mode, 4, native=False))


def test_snap_ties_and_cuts_that_snap_onto_the_ends():
    # root (10) -> a (2) -> b (10): the balanced cut at 11 lies 1 token from both ends of a (the lower wins)
    tie = DecodingTree.from_arrays([-1, 0, 1], [10, 2, 10], np.arange(22), [2], [10])
    g = build_groups(tie, 4, "flatten", 11, 64, snap=0.3, native=True)
    assert g.records("tiles")["tok_hi"].tolist() == [10, 22]
    assert_native_matches_numpy(tie, 4, "flatten", 11, 64, 0.3)
    # a long last node and a short first one: inner cuts snap onto 0 or n_tok and are dropped
    ends = DecodingTree.from_arrays([-1, 0, 1], [2, 3, 2], np.arange(7), [2, 1], [2, 3])
    for cs in range(1, 8):
        for snap in (0.3, 0.49):
            assert_native_matches_numpy(ends, 2, "flatten", cs, 16, snap)


@pytest.mark.parametrize("snap", [0.5, 0.75, 1.0, 3.0])
def test_snaps_of_half_a_chunk_or_more_are_bit_identical(snap, make_random_tree):
    """build_groups takes any snap (DeftAttention keeps it below 0.5): cuts may then land on 0 or the
    last token and are dropped."""
    rng = np.random.default_rng(int(snap * 100))
    for _ in range(150):
        tree = make_random_tree(rng, max_nodes=int(rng.integers(1, 20)), max_len=int(rng.integers(1, 30)))
        assert_native_matches_numpy(tree, 2, "flatten", int(rng.integers(1, 40)), 64, snap)


def test_tree_derivations_equal_the_python_walk(make_random_tree):
    rng = np.random.default_rng(5)
    for _ in range(300):
        tree = make_random_tree(rng, max_nodes=int(rng.integers(1, 60)), max_len=8, max_queries=10)
        order, tin, size, seen, total = plan_native.tree_derive(tree)
        walk = tree._dfs_walk()
        for got, want in zip((order, tin, size), walk, strict=True):
            assert got.dtype == np.int64 and np.array_equal(got, want)
        want_seen = tree._seen_numpy(walk[1], walk[2])
        assert np.array_equal(seen, want_seen) and type(total) is int and total == int(want_seen.sum())
        assert tree.unique_kv_tokens == total
    # invalid parent arrays (validate() asks for the order before it reports them): cycles, two roots,
    # parents outside the nodes; a query outside the nodes leaves the seen lengths to numpy
    for parent in ([-1, 2, 1], [1, 0], [-1, -1, 0], [-1, 5, 0, 7], [-1, -3, 0, 2], [3, -1, 1, 0], [0]):
        n = len(parent)
        t = DecodingTree(np.array(parent), np.arange(n + 1), np.arange(n), np.array([n + 2]), np.array([1]))
        order, tin, size, seen, total = plan_native.tree_derive(t)
        for got, want in zip((order, tin, size), t._dfs_walk(), strict=True):
            assert np.array_equal(got, want), parent
        assert seen is None and total is None


def test_each_thread_grows_its_own_workspace_to_the_plan():
    """A fresh thread starts with a small workspace: the C code asks for more (nodes, then chunks)."""
    rng = np.random.default_rng(3)
    trees = [chain_tree(rng, 3000), fan_tree(rng, 200, 2000), speculative_tree(rng, 3000, 200)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for tree in trees[i:] + trees[:i]:
                for cs in (1, 3, 500):
                    assert_native_matches_numpy(tree, 4, "flatten" if i else "node_chunk", cs, 64, 0.3)
        except BaseException as e:  # noqa: B036 - reported below, from the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_plan_packs_into_the_given_buffer_or_copies_into_an_awkward_one():
    tree = speculative_tree(np.random.default_rng(5), 100, 30)
    ref = build_groups(python_tree(tree), 4, "flatten", 16, 64, snap=0.3, native=False)
    buf = np.full(1 << 14, -1, dtype=np.int32)
    g = build_groups(tree, 4, "flatten", 16, 64, out_alloc=lambda n: buf[:n], snap=0.3, native=True)
    assert np.shares_memory(g.packed, buf)
    assert_same_groups(g, ref)
    strided = np.zeros(2 << 14, dtype=np.int32)  # not contiguous: filled through a copy
    g = build_groups(tree, 4, "flatten", 16, 64, out_alloc=lambda n: strided[: 2 * n : 2], snap=0.3, native=True)
    assert np.shares_memory(g.packed, strided)
    assert_same_groups(g, ref)


def test_arrays_of_other_dtypes_or_read_only_give_the_same_plan():
    tree = speculative_tree(np.random.default_rng(9), 60, 20)
    ref = build_groups(python_tree(tree), 2, "node_chunk", 8, 32, native=False)
    arrays = [tree.parent, tree.slot_ptr, tree.slots, tree.query_node, tree.query_visible]
    ro = [a.copy() for a in arrays]
    for a in ro:
        a.setflags(write=False)
    for other in (
        DecodingTree(*[a.astype(np.int32) for a in arrays]),
        DecodingTree(*ro),
        DecodingTree(*[np.repeat(a, 2)[::2] for a in arrays]),  # not contiguous
    ):
        assert_same_groups(plan_native.build_groups_native(other, 2, "node_chunk", 8, 32, None, 0.0), ref)
        order, tin, size, seen, total = plan_native.tree_derive(other)
        assert np.array_equal(seen, tree.node_seen_len) and np.array_equal(order, tree.dfs_order)
        assert total == python_tree(tree).unique_kv_tokens


def test_native_flag_and_switch(monkeypatch):
    tree = speculative_tree(np.random.default_rng(2), 30, 10)
    monkeypatch.setattr(plan_native, "ENABLED", False)
    assert not plan_native.native_available() and plan_native.tree_derive(tree) is None
    with pytest.raises(RuntimeError, match="native plan requested"):
        build_groups(tree, 4, "flatten", 8, native=True)
    assert_same_groups(build_groups(tree, 4, "flatten", 8), build_groups(python_tree(tree), 4, "flatten", 8))


def test_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(plan_native, "_lib", None)
    monkeypatch.setattr(plan_native, "_load_error", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="native plan unavailable"):
        assert plan_native._load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not plan_native.native_available()
        tree = speculative_tree(np.random.default_rng(2), 30, 10)
        assert build_groups(tree, 4, "flatten", 8).n_tokens == tree.unique_kv_tokens


def test_compiles_into_an_empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    lib = plan_native._compile()
    assert lib.parent == tmp_path / "cache" / "deft" / "native" and lib.exists()
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temporary file left behind
    assert plan_native._compile() == lib  # cached


@pytest.mark.parametrize("seed", range(4))
def test_longest_first_order_in_c_is_bit_identical_to_numpy(seed, make_random_tree):
    """The C merge sort reorders tile records exactly as numpy's stable argsort: random plans, and random
    records with many ties, masked and unmasked, big and small, up to thousands of tiles."""
    rng = np.random.default_rng(300 + seed)
    for _ in range(60):
        tree = make_random_tree(rng, max_nodes=int(rng.integers(1, 60)), max_len=int(rng.integers(1, 80)),
                                max_queries=int(rng.integers(1, 40)))  # fmt: skip
        group, small = int(rng.choice([1, 4, 8])), int(rng.choice([0, 16, 32]))
        mode = str(rng.choice(MODES))
        base = build_groups(tree, group, mode, int(rng.integers(1, 64)) if mode != "node" else 0, 64)
        a = KVGroups(**{**base.__dict__, "packed": base.packed.copy()})
        b = KVGroups(**{**base.__dict__, "packed": base.packed.copy()})
        mix = (0.0, 0.0) if rng.random() < 0.3 else (float(rng.choice([0.5, 1.5, 1e9])), float(rng.uniform(0, 80)))
        assert plan_native.order_tiles_native(a.section("tiles").reshape(-1, 6), group, small, *mix)
        order_tiles_longest_first(b, group, small, *mix)
        assert np.array_equal(a.packed, b.packed)
    for n in (2, 3, 7, 64, 1000, 4097):
        t = np.zeros((n, 6), dtype=np.int32)
        t[:, 0] = rng.integers(0, 50, n)
        t[:, 1] = t[:, 0] + rng.integers(0, 6, n)  # few distinct lengths: many ties
        t[:, 2] = rng.integers(0, 10, n)
        t[:, 3] = t[:, 2] + rng.integers(1, 20, n)
        t[:, 4] = np.arange(n)  # a tile's identity: shows whether ties kept their order
        t[:, 5] = ((t[:, 1] - t[:, 0]) * rng.integers(0, 2, n)) << 2 | rng.integers(0, 4, n)
        g = KVGroups(packed=t.ravel().copy(), offsets={"tiles": (0, t.size)}, n_tiles=n, n_chunks=n, n_tokens=0,
                     n_partials=0, max_parts=0, rows=64, chunk_size=0)  # fmt: skip
        h = KVGroups(**{**g.__dict__, "packed": g.packed.copy()})
        mix = (float(rng.choice([0.0, 1e9])), float(rng.uniform(0, 50)))
        assert plan_native.order_tiles_native(g.section("tiles").reshape(-1, 6), 4, 16, *mix)
        order_tiles_longest_first(h, 4, 16, *mix)
        assert np.array_equal(g.packed, h.packed)
        assert not np.array_equal(g.packed, t.ravel()) or n < 8  # it did reorder something


@pytest.mark.parametrize("seed", range(6))
def test_chunk_size_chosen_in_c_and_tiles_ordered_in_the_same_pass_match_numpy(seed, make_random_tree):
    """``chunk_policy`` (chunk size from the seen tokens, in C) and ``lpt_small_m`` (longest-first order after
    the fill) give the plan numpy gives with the chunk size from ``auto_chunk_size`` and the order applied after."""
    from deft.kernels.kv_groups import auto_chunk_size

    rng = np.random.default_rng(400 + seed)
    seen_classes: set[int] = set()
    for _ in range(80):
        tree = make_random_tree(rng, max_nodes=int(rng.integers(1, 40)), max_len=int(rng.integers(1, 60)),
                                max_queries=int(rng.integers(1, 20)))  # fmt: skip
        p = random_params(rng, tree)
        policy = (int(rng.choice([1, 2, 8])), int(rng.choice([1, 8, 128])), int(rng.choice([4, 64, 4096])),
                  int(rng.choice([0, 1, 100, 528])))  # fmt: skip
        small_m = None if rng.random() < 0.3 else int(rng.choice([0, 16, 32]))
        mix = (float(rng.choice([0.0, 1.0, 1e9])), float(rng.choice([0.5, 8.0, 66.0])))
        chunk = 0 if p["mode"] != "node" else p["chunk_size"]
        nat = build_groups(tree, p["group"], p["mode"], chunk, p["block_m_max"], snap=p["snap"], native=True,
                           few_split=p["few_split"], wide_budget=p["wide_budget"], chunk_policy=policy,
                           fill_tiles=p["fill_tiles"], fill_small=p["fill_small"],
                           lpt_small_m=small_m, lpt_mix=mix)  # fmt: skip
        want = auto_chunk_size(tree.unique_kv_tokens, *policy) if p["mode"] != "node" else p["chunk_size"]
        ref = build_groups(tree, p["group"], p["mode"], want, p["block_m_max"], snap=p["snap"], native=False,
                           few_split=p["few_split"], wide_budget=p["wide_budget"], lpt_small_m=small_m,
                           fill_tiles=p["fill_tiles"], fill_small=p["fill_small"],
                           lpt_mix=mix)  # fmt: skip
        assert_same_groups(nat, ref)
        assert nat.chunk_size == (want if p["mode"] != "node" else 0)
        # the tile classes, found by the C order pass, as numpy finds them (the small rows the order used)
        if small_m is None:
            assert nat.classes == -1
        else:
            small = small_tile_rows(p["group"], nat.rows, small_m)
            assert nat.classes == tile_classes(ref, p["group"], small) > 0
            seen_classes.add(nat.classes)
    assert len(seen_classes) >= 3, seen_classes  # the bits vary with the tree, so a constant answer fails

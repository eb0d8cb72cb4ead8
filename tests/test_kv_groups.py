"""KV-guided grouping (host only): the packed plan equals a plain-Python reference, bit for bit.

``build_groups`` is vectorised for speed; the reference below follows the rules in
``deft/kernels/kv_groups.py`` one node, chunk, tile and query at a time, deriving the DFS order and the
seen lengths itself, so a faster rewrite of either module that changes a single index fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

from deft.kernels.kv_groups import MODES, SECTIONS, build_groups
from deft.tree import DecodingTree
from tests.conftest import speculative_tree


# ---------------------------------------------------------------------- reference
def _dfs(parent: list[int]) -> tuple[list[int], list[int]]:
    """Pre-order (children in increasing id order) and subtree sizes, by an explicit stack."""
    n = len(parent)
    kids: list[list[int]] = [[] for _ in range(n)]
    for v, p in enumerate(parent):
        if p >= 0:
            kids[p].append(v)
    order: list[int] = []
    stack = [parent.index(-1)]
    while stack:
        v = stack.pop()
        order.append(v)
        stack.extend(reversed(kids[v]))
    size = [1] * n
    for v in reversed(order):
        if parent[v] >= 0:
            size[parent[v]] += size[v]
    return order, size


def _tile_rows(max_queries: int, group: int, block_m_max: int) -> int:
    need = 16
    while need < max(1, max_queries) * group:
        need *= 2
    g2 = 1
    while g2 < group:
        g2 *= 2
    return max(min(need, block_m_max), g2, 16)


def reference_groups(tree: DecodingTree, group: int, mode: str, chunk_size: int, block_m_max: int, snap: float):
    """(packed int32 array, offsets, scalar fields) of the plan, one element at a time."""
    parent = tree.parent.tolist()
    lens = tree.node_len.tolist()
    qn, qv = tree.query_node.tolist(), tree.query_visible.tolist()
    nq = len(qn)
    order, size = _dfs(parent)
    tin = {v: i for i, v in enumerate(order)}
    # seen: a node's own queries' visible prefix, or all of it when a query sits strictly below
    seen = [0] * len(parent)
    for q, vis in zip(qn, qv, strict=True):
        seen[q] = max(seen[q], vis)
        p = parent[q]
        while p >= 0:
            seen[p] = lens[p]
            p = parent[p]
    nodes = [v for v in order if seen[v] > 0]
    off = [0]
    for v in nodes:
        off.append(off[-1] + seen[v])
    n_tok = off[-1]
    k = len(nodes)
    qs = sorted(range(nq), key=lambda j: (tin[qn[j]], qv[j]))
    q_tin = [tin[qn[j]] for j in qs]
    q_vis = [qv[j] for j in qs]

    if mode == "node":
        cuts = off[:]
    elif mode == "node_chunk":
        cuts = [off[i] + c for i in range(k) for c in range(0, seen[nodes[i]], chunk_size)] + [n_tok]
    else:
        n_c = -(-n_tok // chunk_size)
        cuts = [i * n_tok // n_c for i in range(n_c + 1)]
        if snap > 0 and n_c > 1:
            tol = snap * n_tok / n_c
            for i in range(1, n_c):
                x = cuts[i]
                lo = max(o for o in off if o < x)
                hi = min(o for o in off if o >= x)
                near = lo if x - lo <= hi - x else hi
                if abs(near - x) <= tol:
                    cuts[i] = near
            cuts = [c for i, c in enumerate(cuts) if i == 0 or c != cuts[i - 1]]

    def node_of(t: int) -> int:
        return max(i for i in range(k) if off[i] <= t)

    chunks = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        f, last = node_of(lo), node_of(hi - 1)
        end = max(tin[nodes[m]] + size[nodes[m]] for m in range(f, last + 1))
        mine = [s for s in range(nq) if tin[nodes[f]] <= q_tin[s] < end]
        assert mine and mine == list(range(mine[0], mine[-1] + 1))  # non-empty and contiguous
        chunks.append((lo, hi, f, last, mine[0], mine[-1] + 1))
    rows = _tile_rows(max(c[5] - c[4] for c in chunks), group, block_m_max)
    per_tile = rows // group

    tok_slot = [int(s) for v in nodes for s in tree.node_slots(v)[: seen[v]]]
    tiles, cpbase, pbase = [], [], 0
    for lo, hi, f, last, a, b in chunks:
        cpbase.append(pbase)
        cnq = b - a
        nt = max(1, -(-cnq // per_tile))
        for j in range(nt):
            ta, tb = a + j * cnq // nt, a + (j + 1) * cnq // nt
            own_short = q_tin[ta] == tin[nodes[f]] and q_vis[ta] < hi - off[f]
            unmasked = hi - lo  # the first phase: tokens every query of the tile sees whole
            if f != last or own_short:
                unmasked, fv = 0, nodes[f]
                if tb > ta and q_tin[tb - 1] < tin[fv] + size[fv]:  # all in f's subtree
                    stop = off[f] + q_vis[ta] if q_tin[ta] == tin[fv] else off[f + 1]
                    unmasked = max(0, min(stop, hi) - lo)
            consecutive = unmasked > 0 and all(tok_slot[t + 1] == tok_slot[t] + 1 for t in range(lo, lo + unmasked - 1))
            tiles += [lo, hi, ta, tb, pbase + ta - a, int(unmasked < hi - lo) | 2 * int(consecutive) | unmasked << 2]
        pbase += cnq
    tok_node = [i for i, v in enumerate(nodes) for _ in range(seen[v])]
    node_rec = [x for i, v in enumerate(nodes) for x in (off[i], tin[v], tin[v] + size[v])]
    query_rec = [x for s in range(nq) for x in (qs[s], q_tin[s], q_vis[s])]
    red_ptr, red_idx = [0], []
    for s in range(nq):
        red_idx += [cpbase[c] + s - ch[4] for c, ch in enumerate(chunks) if ch[4] <= s < ch[5]]
        red_ptr.append(len(red_idx))
    parts = [tiles, tok_slot, tok_node, node_rec, query_rec, red_ptr, red_idx]
    offsets, pos = {}, 0
    for name, p in zip(SECTIONS, parts, strict=True):
        offsets[name] = (pos, pos + len(p))
        pos += len(p)
    counts = np.diff(red_ptr)
    fields = dict(
        n_tiles=len(tiles) // 6, n_chunks=len(chunks), n_tokens=n_tok, n_partials=pbase,
        max_parts=int(counts.max()), rows=rows, chunk_size=chunk_size if mode != "node" else 0,
    )  # fmt: skip
    return np.array([x for p in parts for x in p], dtype=np.int32), offsets, fields


def assert_matches_reference(tree, group, mode, chunk_size=0, block_m_max=128, snap=0.0):
    g = build_groups(tree, group, mode, chunk_size, block_m_max, snap=snap)
    packed, offsets, fields = reference_groups(tree, group, mode, chunk_size, block_m_max, snap)
    assert g.packed.dtype == np.int32
    assert g.offsets == offsets
    for name, (a, b) in offsets.items():
        assert np.array_equal(g.packed[a:b], packed[a:b]), f"section {name} differs"
    assert {f: getattr(g, f) for f in fields} == fields


# ---------------------------------------------------------------------- trees
def reasoning_tree(rng, n_nodes: int, node_len: int) -> DecodingTree:
    """Node ids in creation order (not DFS order), each node's slots contiguous in the pool, one query
    at the newest token of every leaf: the plan copies its slots in a few runs."""
    parent = [-1] + [int(rng.integers(max(0, i - 3), i)) for i in range(1, n_nodes)]
    lens = rng.integers(node_len // 2, node_len + 1, n_nodes)
    leaves = sorted(set(range(n_nodes)) - set(parent))
    return DecodingTree.from_arrays(parent, lens, np.arange(int(lens.sum())), leaves, lens[leaves])


def many_short_nodes(rng, n_nodes: int) -> DecodingTree:
    """Hundreds of 1-3 token nodes with scattered slots: the plan gathers its slots token by token."""
    parent = [-1] + [int(rng.integers(0, i)) for i in range(1, n_nodes)]
    lens = rng.integers(1, 4, n_nodes)
    n_tok = int(lens.sum())
    qn = rng.integers(0, n_nodes, 40)
    return DecodingTree.from_arrays(parent, lens, rng.permutation(n_tok + 9)[:n_tok], qn, lens[qn], n_slots=n_tok + 9)


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(40))
def test_random_trees_pack_exactly_the_reference_plan(mode, seed, make_random_tree):
    rng = np.random.default_rng(seed)
    tree = make_random_tree(rng, max_nodes=int(rng.integers(1, 30)), max_len=int(rng.integers(1, 40)), max_queries=12)
    group = int(rng.choice([1, 2, 4, 8]))
    assert_matches_reference(
        tree, group, mode, int(rng.integers(1, 50)), int(rng.choice([16, 32, 64, 128])), float(rng.choice([0, 0.3, 0.49]))
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(8))
def test_speculative_trees_with_many_queries_per_node_pack_the_reference_plan(mode, seed):
    rng = np.random.default_rng(1000 + seed)
    tree = speculative_tree(rng, int(rng.integers(1, 300)), int(rng.integers(1, 80)))
    assert_matches_reference(tree, 4, mode, int(rng.integers(4, 64)), 64, 0.3)


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: DecodingTree.from_arrays([-1] + [0] * 30, [500] + [7] * 30, np.arange(710), range(1, 31), [7] * 30),
        lambda rng: reasoning_tree(rng, 25, 300),
        lambda rng: many_short_nodes(rng, 300),
    ],
    ids=["one_run", "few_runs", "many_runs"],
)
@pytest.mark.parametrize("mode", MODES)
def test_every_slot_layout_packs_the_reference_plan(make, mode):
    """A fan copies its slots in one piece, ids in creation order in a few runs, many short scattered
    nodes by a gather: each path must give the same plan."""
    rng = np.random.default_rng(7)
    tree = make(rng)
    assert_matches_reference(tree, 4, mode, 37, 64, 0.3)


def test_single_node_and_query_free_trees():
    rng = np.random.default_rng(3)
    one = DecodingTree.from_arrays([-1], [50], rng.permutation(50), [0] * 20, rng.integers(1, 51, 20))
    for mode in MODES:
        assert_matches_reference(one, 8, mode, 9, 16, 0.3)
    empty = build_groups(DecodingTree.from_arrays([-1, 0], [5, 3], np.arange(8), [], []), 4, "flatten", 4)
    assert (empty.n_tiles, empty.n_partials, empty.section("red_ptr").tolist()) == (0, 0, [0])


def test_plan_packs_into_the_given_buffer():
    tree = speculative_tree(np.random.default_rng(5), 100, 30)
    buf = np.full(1 << 14, -1, dtype=np.int32)
    g = build_groups(tree, 4, "flatten", 16, 64, out_alloc=lambda n: buf[:n], snap=0.3)
    assert np.shares_memory(g.packed, buf)
    assert np.array_equal(g.packed, build_groups(tree, 4, "flatten", 16, 64, snap=0.3).packed)


def test_snapped_cut_halfway_between_two_node_boundaries_moves_to_the_lower():
    # root (10 tokens) -> a (2) -> b (10): the balanced cut at 11 lies 1 token from both ends of a
    tree = DecodingTree.from_arrays([-1, 0, 1], [10, 2, 10], np.arange(22), [2], [10])
    g = build_groups(tree, 4, "flatten", 11, 64, snap=0.3)
    assert g.records("tiles")["tok_hi"].tolist() == [10, 22]
    assert_matches_reference(tree, 4, "flatten", 11, 64, 0.3)


def test_a_tree_too_large_for_the_flags_field_is_refused_before_planning(monkeypatch):
    tree = DecodingTree.from_arrays([-1], [8], np.arange(8), [0], [8])
    monkeypatch.setattr(DecodingTree, "unique_kv_tokens", property(lambda self: 1 << 29))
    with pytest.raises(ValueError, match="at most 536870911"):
        build_groups(tree, 1, "flatten", 4, native=False)


def test_the_c_plan_declines_a_tree_too_large_for_the_flags_field():
    """The C sizing pass counts the seen tokens itself and declines (-7) at 2**29, so build_groups falls back
    to numpy, which raises; a node of 2**29 tokens is described without its slots (the pass reads none)."""
    import ctypes

    from deft.kernels import plan_native

    lib = plan_native._load()
    if lib is None:
        pytest.skip(f"native plan unavailable: {plan_native._load_error}")
    i64 = lambda a: ctypes.c_int64.from_buffer(a)  # noqa: E731
    parent, qn = np.array([-1], np.int64), np.array([0], np.int64)
    slots = np.zeros(1, np.int64)
    ws = np.zeros(4096, np.int64)
    for n_tok, want in ((1 << 29, -7), ((1 << 29) - 1, 0)):
        slot_ptr, qv = np.array([0, n_tok], np.int64), np.array([n_tok], np.int64)
        rc = lib.deft_plan_size(1, i64(parent), i64(slot_ptr), 1 << 30, i64(slots), 1, i64(qn), i64(qv), 1, 0,
                                1 << 20, 64, 0.0, 0, 0, 0, None, 0, 0, i64(ws), ws.size)  # fmt: skip
        assert rc == want

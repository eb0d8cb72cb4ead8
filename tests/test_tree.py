"""DecodingTree: validation names the offender, structure queries, and counts against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deft.tree import DecodingTree, TreeError


def small_tree() -> DecodingTree:
    """root(4) -> a(2) -> c(3); root -> b(1). Queries: c newest, b newest, a's first token, c's first two."""
    #            0: root     1: a    2: b   3: c
    return DecodingTree.from_lists(
        [-1, 0, 0, 1],
        [[0, 1, 2, 3], [10, 11], [20], [30, 31, 32]],
        [(3, 3), (2, 1), (1, 1), (3, 2)],
        n_slots=40,
    )


def test_small_tree_structure_queries():
    t = small_tree()
    assert t.root == 0
    assert t.dfs_order.tolist() == [0, 1, 3, 2]
    assert t.depth.tolist() == [0, 1, 1, 2]
    assert t.prefix_len.tolist() == [0, 4, 4, 6]
    assert t.is_ancestor(0, 3) and t.is_ancestor(1, 3) and t.is_ancestor(3, 3)
    assert not t.is_ancestor(2, 3) and not t.is_ancestor(3, 1)
    assert t.path(3).tolist() == [0, 1, 3]
    assert t.query_slots(0).tolist() == [0, 1, 2, 3, 10, 11, 30, 31, 32]
    assert t.query_slots(2).tolist() == [0, 1, 2, 3, 10]
    assert t.query_slot.tolist() == [32, 20, 10, 31]
    assert [c.tolist() for c in t.children] == [[1, 2], [3], [], []]


def test_small_tree_counts():
    t = small_tree()
    assert t.node_seen_len.tolist() == [4, 2, 1, 3]
    assert t.unique_kv_tokens == 10
    assert t.query_path_len.tolist() == [9, 5, 5, 8]
    assert t.path_kv_tokens == 27
    assert t.queries_per_node.tolist() == [4, 3, 1, 2]
    assert t.total_tokens == 10


def test_unseen_tokens_are_not_unique_kv():
    # node 1 has 3 tokens but its only query sees 1 of them; node 2 has no query at all
    t = DecodingTree.from_lists([-1, 0, 0], [[0, 1], [2, 3, 4], [5]], [(1, 1)])
    assert t.node_seen_len.tolist() == [2, 1, 0]
    assert t.unique_kv_tokens == 3


@pytest.mark.parametrize(
    ("parent", "slots", "queries", "n_slots", "match"),
    [
        ([], [], [], None, "no nodes"),
        ([-1, -1], [[0], [1]], [], None, r"exactly one root.*nodes \[0, 1\]"),
        ([-1, 5], [[0], [1]], [], None, "node 1 has parent 5, which is not a node"),
        ([-1, 1], [[0], [1]], [], None, "node 1 is its own parent"),
        ([-1, 2, 1], [[0], [1], [2]], [], None, "node 1 does not reach the root.*cycle"),
        ([-1, 0], [[0], []], [], None, "node 1 has length 0"),
        ([-1, 0], [[0], [0]], [], None, r"slot 0 is owned twice \(nodes \[0, 1\]\)"),
        ([-1, 0], [[0], [-3]], [], None, "negative slot index -3 in node 1"),
        ([-1, 0], [[0], [7]], [], 4, "node 1 uses slot 7, outside the pool of 4 slots"),
        ([-1, 0], [[0], [1, 2]], [(2, 1)], None, "query 0 belongs to node 2, which is not a node"),
        ([-1, 0], [[0], [1, 2]], [(1, 3)], None, r"query 0 in node 1 sees 3 tokens; visible must lie in 1..2"),
        ([-1, 0], [[0], [1, 2]], [(1, 1), (1, 0)], None, r"query 1 in node 1 sees 0 tokens"),
    ],
)
def test_validation_rejects_bad_tree_naming_node_and_rule(parent, slots, queries, n_slots, match):
    with pytest.raises(TreeError, match=match):
        DecodingTree.from_lists(parent, slots, queries, n_slots=n_slots)


def test_validation_rejects_bad_arrays():
    with pytest.raises(TreeError, match="one-dimensional"):
        DecodingTree.from_arrays([[-1]], [1], [0], [], [])
    with pytest.raises(TreeError, match="integers"):
        DecodingTree.from_arrays([-1.0], [1], [0], [], [])
    with pytest.raises(TreeError, match="slot_ptr ends at 2 but there are 1 slots"):
        DecodingTree.from_arrays([-1], [2], [0], [], [])
    with pytest.raises(TreeError, match="query_node and query_visible differ"):
        DecodingTree.from_arrays([-1], [1], [0], [0], [])


def test_validate_false_skips_checks():
    t = DecodingTree.from_lists([-1, -1], [[0], [0]], [], validate=False)
    with pytest.raises(TreeError):
        t.validate()


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_counts_match_brute_force_visibility(seed, make_random_tree):
    t = make_random_tree(np.random.default_rng(seed))
    slot, tok_node, pos = t.token_table()
    vis = t.visibility(tok_node, pos)
    # brute force: a query sees its own node's first `visible` tokens and every token of its strict ancestors
    brute = np.zeros_like(vis)
    for j in range(t.n_queries):
        seen = set(t.query_slots(j).tolist())
        brute[j] = [s in seen for s in slot.tolist()]
    assert (vis == brute).all()
    assert t.unique_kv_tokens == int(vis.any(axis=0).sum())
    assert t.path_kv_tokens == int(vis.sum())
    assert t.query_path_len.tolist() == vis.sum(axis=1).tolist()
    per_node = np.array([vis[:, tok_node == v].any(axis=1).sum() for v in range(t.n_nodes)])
    assert t.queries_per_node.tolist() == per_node.tolist()
    for j in range(t.n_queries):
        assert t.query_slot[j] == t.query_slots(j)[-1]
    # dfs order: a permutation with every parent before its children
    order = t.dfs_order
    assert sorted(order.tolist()) == list(range(t.n_nodes))
    where = np.empty(t.n_nodes, dtype=np.int64)
    where[order] = np.arange(t.n_nodes)
    kids = np.flatnonzero(t.parent >= 0)
    assert (where[t.parent[kids]] < where[kids]).all()
    # depth and ancestry agree with walking up the parents
    for v in range(t.n_nodes):
        p = t.path(v)
        assert t.depth[v] == p.size - 1
        assert all(t.is_ancestor(int(a), v) for a in p)


def _stack_preorder(parent: list[int]) -> tuple[list[int], list[int]]:
    kids: list[list[int]] = [[] for _ in parent]
    for v, p in enumerate(parent):
        if p >= 0:
            kids[p].append(v)
    order, stack = [], [parent.index(-1)]
    while stack:
        v = stack.pop()
        order.append(v)
        stack.extend(reversed(kids[v]))
    size = [1] * len(parent)
    for v in reversed(order):
        if parent[v] >= 0:
            size[parent[v]] += size[v]
    return order, size


@pytest.mark.parametrize("seed", range(30))
def test_dfs_order_entry_and_subtree_size_match_a_stack_preorder(seed, make_random_tree):
    t = make_random_tree(np.random.default_rng(seed), max_nodes=int(np.random.default_rng(seed).integers(1, 80)))
    order, size = _stack_preorder(t.parent.tolist())
    assert t.dfs_order.tolist() == order
    assert t.tin[order].tolist() == list(range(t.n_nodes))
    assert t.subtree_size.tolist() == size


def test_deep_chain_and_nodes_off_the_root():
    n = 5000
    perm = np.random.default_rng(0).permutation(n)  # a chain whose ids are shuffled
    parent = np.empty(n, dtype=np.int64)
    parent[perm] = np.concatenate([[-1], perm[:-1]])
    t = DecodingTree.from_arrays(parent, np.ones(n, dtype=np.int64), np.arange(n), [perm[-1]], [1])
    assert t.dfs_order.tolist() == perm.tolist()
    assert t.subtree_size[perm].tolist() == list(range(n, 0, -1))
    assert t.unique_kv_tokens == n
    # 1 and 2 are each other's parent: the walk never reaches them, and validate() names them
    cyc = DecodingTree.from_lists([-1, 2, 1], [[0], [1], [2]], [], validate=False)
    assert cyc.dfs_order_unchecked.tolist() == [0]
    with pytest.raises(TreeError, match="cycle"):
        cyc.validate()

"""Decoding tree: nodes that own spans of KV-cache slots, and the queries decoded against them.

Host-side only (numpy). Every count is computed per node, never per token in Python, so a tree
with a 20k-token prompt costs the same to describe as one with a 1k-token prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


class TreeError(ValueError):
    """An invalid decoding tree; the message names the node or query and the rule broken."""


def _as_i64(name: str, a) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise TreeError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TreeError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


@dataclass(frozen=True, eq=False)
class DecodingTree:
    """A decoding tree in CSR form, with its queries.

    - ``parent[i]``: parent node of node ``i``; ``-1`` for the single root (the prompt).
    - ``slot_ptr`` (``n_nodes + 1``) and ``slots``: node ``i`` owns the KV-pool slots
      ``slots[slot_ptr[i]:slot_ptr[i+1]]``, in token order. Descendants share them; they are never copied.
    - ``query_node[j]``, ``query_visible[j]``: query ``j`` belongs to that node and sees its first
      ``visible`` tokens plus the full spans of all the node's ancestors. Row ``j`` of ``q`` and ``out``
      is query ``j``.
    - ``n_slots``: capacity of the KV pool the slots index into (``None``: not checked).
    """

    parent: np.ndarray
    slot_ptr: np.ndarray
    slots: np.ndarray
    query_node: np.ndarray
    query_visible: np.ndarray
    n_slots: int | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_lists(
        cls,
        parent: list[int] | np.ndarray,
        node_slots: list[list[int] | np.ndarray],
        queries: list[tuple[int, int]],
        n_slots: int | None = None,
        validate: bool = True,
    ) -> DecodingTree:
        """Build from a parent list, one slot list per node and ``(node, visible)`` queries."""
        lens = np.array([len(s) for s in node_slots], dtype=np.int64)
        ptr = np.zeros(len(node_slots) + 1, dtype=np.int64)
        np.cumsum(lens, out=ptr[1:])
        flat = (
            np.concatenate([np.asarray(s, dtype=np.int64) for s in node_slots])
            if len(node_slots) and ptr[-1] > 0
            else np.zeros(0, dtype=np.int64)
        )
        qn = np.array([q[0] for q in queries], dtype=np.int64)
        qv = np.array([q[1] for q in queries], dtype=np.int64)
        tree = cls(_as_i64("parent", parent), ptr, flat, qn, qv, n_slots)
        if validate:
            tree.validate()
        return tree

    @classmethod
    def from_arrays(
        cls,
        parent,
        node_len,
        slots,
        query_node,
        query_visible,
        n_slots: int | None = None,
        validate: bool = True,
    ) -> DecodingTree:
        """Build from per-node lengths and the concatenated slot array."""
        lens = _as_i64("node_len", node_len)
        ptr = np.zeros(lens.size + 1, dtype=np.int64)
        np.cumsum(lens, out=ptr[1:])
        tree = cls(
            _as_i64("parent", parent),
            ptr,
            _as_i64("slots", slots),
            _as_i64("query_node", query_node),
            _as_i64("query_visible", query_visible),
            n_slots,
        )
        if validate:
            tree.validate()
        return tree

    def validate(self) -> DecodingTree:
        """Check every structural rule; raise :class:`TreeError` naming the offender."""
        n = self.parent.size
        if n == 0:
            raise TreeError("tree has no nodes: it needs a root (the prompt)")
        if self.slot_ptr.size != n + 1:
            raise TreeError(f"slot_ptr has {self.slot_ptr.size} entries, expected n_nodes + 1 = {n + 1}")
        lens = np.diff(self.slot_ptr)
        if (lens <= 0).any():
            bad = int(np.flatnonzero(lens <= 0)[0])
            raise TreeError(f"node {bad} has length {int(lens[bad])}: every node needs at least one token")
        if self.slot_ptr[-1] != self.slots.size:
            raise TreeError(f"slot_ptr ends at {int(self.slot_ptr[-1])} but there are {self.slots.size} slots")
        roots = np.flatnonzero(self.parent == -1)
        if roots.size != 1:
            raise TreeError(f"tree must have exactly one root (parent -1), found {roots.size}: nodes {roots[:8].tolist()}")
        bad = np.flatnonzero((self.parent < -1) | (self.parent >= n))
        if bad.size:
            i = int(bad[0])
            raise TreeError(f"node {i} has parent {int(self.parent[i])}, which is not a node (0..{n - 1})")
        self_loop = np.flatnonzero(self.parent == np.arange(n))
        if self_loop.size:
            raise TreeError(f"node {int(self_loop[0])} is its own parent (cycle)")
        # every node must reach the root; nodes left unreached by a BFS from the root sit on a cycle
        reached = np.zeros(n, dtype=bool)
        reached[self.dfs_order_unchecked] = True
        if not reached.all():
            i = int(np.flatnonzero(~reached)[0])
            raise TreeError(f"node {i} does not reach the root: its ancestors form a cycle")
        if self.slots.size:
            if self.slots.min() < 0:
                raise TreeError(f"negative slot index {int(self.slots.min())} in node {self._node_of_slot_pos(int(np.argmin(self.slots)))}")
            if self.n_slots is not None and self.slots.max() >= self.n_slots:
                pos = int(np.argmax(self.slots))
                raise TreeError(
                    f"node {self._node_of_slot_pos(pos)} uses slot {int(self.slots[pos])}, outside the pool of {self.n_slots} slots"
                )
            uniq, counts = np.unique(self.slots, return_counts=True)
            if (counts > 1).any():
                s = int(uniq[np.argmax(counts > 1)])
                owners = sorted({self._node_of_slot_pos(int(p)) for p in np.flatnonzero(self.slots == s)})
                raise TreeError(f"slot {s} is owned twice (nodes {owners}): KV is shared by ancestry, never duplicated")
        if self.query_node.size != self.query_visible.size:
            raise TreeError("query_node and query_visible differ in length")
        if self.query_node.size:
            bad = np.flatnonzero((self.query_node < 0) | (self.query_node >= n))
            if bad.size:
                j = int(bad[0])
                raise TreeError(f"query {j} belongs to node {int(self.query_node[j])}, which is not a node")
            vis_max = lens[self.query_node]
            bad = np.flatnonzero((self.query_visible < 1) | (self.query_visible > vis_max))
            if bad.size:
                j = int(bad[0])
                raise TreeError(
                    f"query {j} in node {int(self.query_node[j])} sees {int(self.query_visible[j])} tokens; "
                    f"visible must lie in 1..{int(vis_max[j])} (the node's length)"
                )
        return self

    def _node_of_slot_pos(self, pos: int) -> int:
        return int(np.searchsorted(self.slot_ptr, pos, side="right") - 1)

    # ------------------------------------------------------------------ structure
    @property
    def n_nodes(self) -> int:
        return int(self.parent.size)

    @property
    def n_queries(self) -> int:
        return int(self.query_node.size)

    @cached_property
    def node_len(self) -> np.ndarray:
        """Tokens per node."""
        return self.slot_ptr[1:] - self.slot_ptr[:-1]

    @cached_property
    def root(self) -> int:
        return int(np.flatnonzero(self.parent == -1)[0])

    @cached_property
    def children(self) -> list[np.ndarray]:
        """Children of every node, in increasing id order."""
        n = self.n_nodes
        kids = np.flatnonzero(self.parent >= 0)
        order = kids[np.argsort(self.parent[kids], kind="stable")]
        counts = np.bincount(self.parent[kids], minlength=n)
        return np.split(order, np.cumsum(counts)[:-1])

    @cached_property
    def _native(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int | None] | None:
        """DFS order, entry index, subtree size, seen lengths and their sum from one call of the plan's C
        code (:mod:`deft.kernels.plan_native`), or None where it is off; the same values as the Python below."""
        return _native_derive(self)

    @cached_property
    def _dfs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pre-order DFS (children in increasing id order), DFS entry index and subtree size of every
        node. Nodes the walk does not reach (invalid trees only) get entry 0 and size 1."""
        native = self._native
        return native[:3] if native is not None else self._dfs_walk()

    def _dfs_walk(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:attr:`_dfs` in one walk over plain Python lists: per node, never per token, and a few small
        trees' numpy calls would cost more than the walk."""
        par = self.parent.tolist()
        n = len(par)
        # first child and next sibling, both in increasing id order; sized for out-of-range parents,
        # which validate() reports after asking for the order
        m = max(n, max(par, default=-1) + 1)
        first = [-1] * m
        nxt = [-1] * m
        root = -1
        for v in range(n - 1, -1, -1):
            p = par[v]
            if p >= 0:
                nxt[v] = first[p]
                first[p] = v
            elif p == -1:
                root = v  # the first root, if there are several
        order: list[int] = []
        tin = [0] * n
        size = [1] * n
        push = order.append
        pos = 0
        v = root
        while v >= 0:  # each node has one parent, so the walk enters each node at most once
            tin[v] = pos
            pos += 1
            push(v)
            c = first[v]
            if c >= 0:
                v = c
                continue
            while v >= 0:  # a leaf: close its subtree and every subtree it is the last node of
                size[v] = pos - tin[v]
                s = nxt[v]
                if s >= 0:
                    v = s
                    break
                v = par[v]
        return np.array(order, dtype=np.int64), np.array(tin, dtype=np.int64), np.array(size, dtype=np.int64)

    @property
    def dfs_order_unchecked(self) -> np.ndarray:
        """The DFS order without validation: nodes not reachable from the (first) root are left out."""
        return self._dfs[0]

    @property
    def dfs_order(self) -> np.ndarray:
        """Nodes in pre-order DFS (children in increasing id order)."""
        return self._dfs[0]

    @property
    def _euler(self) -> tuple[np.ndarray, np.ndarray]:
        """Pre-order entry index and subtree size: ``a`` is an ancestor-or-self of ``b`` iff
        ``tin[a] <= tin[b] < tin[a] + size[a]``."""
        return self._dfs[1], self._dfs[2]

    @property
    def tin(self) -> np.ndarray:
        return self._euler[0]

    @property
    def subtree_size(self) -> np.ndarray:
        return self._euler[1]

    def is_ancestor(self, a, b) -> np.ndarray | bool:
        """Whether node(s) ``a`` is an ancestor of, or equal to, node(s) ``b`` (broadcasts)."""
        tin, size = self._euler
        a = np.asarray(a)
        b = np.asarray(b)
        res = (tin[a] <= tin[b]) & (tin[b] < tin[a] + size[a])
        return bool(res) if res.ndim == 0 else res

    @cached_property
    def depth(self) -> np.ndarray:
        """Depth of every node (root 0)."""
        d = np.zeros(self.n_nodes, dtype=np.int64)
        for v in self.dfs_order[1:]:
            d[v] = d[self.parent[v]] + 1
        return d

    @cached_property
    def prefix_len(self) -> np.ndarray:
        """Tokens in the full spans of each node's strict ancestors."""
        pre = np.zeros(self.n_nodes, dtype=np.int64)
        lens = self.node_len
        for v in self.dfs_order[1:]:
            p = self.parent[v]
            pre[v] = pre[p] + lens[p]
        return pre

    def path(self, node: int) -> np.ndarray:
        """Nodes from the root down to ``node`` (inclusive)."""
        out = []
        v = int(node)
        while v >= 0:
            out.append(v)
            v = int(self.parent[v])
        return np.asarray(out[::-1], dtype=np.int64)

    def node_slots(self, node: int) -> np.ndarray:
        return self.slots[self.slot_ptr[node] : self.slot_ptr[node + 1]]

    def query_slots(self, j: int) -> np.ndarray:
        """KV slots query ``j`` attends to, root first."""
        node = int(self.query_node[j])
        parts = [self.node_slots(int(v)) for v in self.path(node)[:-1]]
        parts.append(self.node_slots(node)[: int(self.query_visible[j])])
        return np.concatenate(parts)

    @cached_property
    def query_slot(self) -> np.ndarray:
        """Slot of each query's own token (the last one it sees): where that step writes its K/V."""
        return self.slots[self.slot_ptr[self.query_node] + self.query_visible - 1]

    # ------------------------------------------------------------------ counts
    @cached_property
    def node_seen_len(self) -> np.ndarray:
        """Tokens of each node seen by at least one query (full length if a query sits below it)."""
        native = self._native
        if native is not None and native[3] is not None:
            return native[3]
        return self._seen_numpy(*self._euler)

    def _seen_numpy(self, tin: np.ndarray, size: np.ndarray) -> np.ndarray:
        """:attr:`node_seen_len` in numpy, from the DFS entry index and subtree size of every node."""
        n = self.n_nodes
        seen = np.zeros(n, dtype=np.int64)
        if not self.n_queries:
            return seen
        np.maximum.at(seen, self.query_node, self.query_visible)
        # a node with a query strictly below it is seen in full: queries at DFS entry indices
        # tin + 1 .. tin + size - 1, counted from a running count of queries per entry index
        upto = np.add.accumulate(np.bincount(tin[self.query_node], minlength=n))
        last = tin + size
        last -= 1
        below = upto[last] > upto[tin]
        seen[below] = self.node_len[below]
        return seen

    @property
    def unique_kv_tokens(self) -> int:
        """Distinct KV tokens some query sees: what a tree-aware method must read once per layer."""
        native = self._native
        if native is not None and native[4] is not None:
            return native[4]
        return int(self.node_seen_len.sum())

    @property
    def total_tokens(self) -> int:
        """Tokens held by the tree's nodes (seen or not)."""
        return int(self.slots.size)

    @cached_property
    def query_path_len(self) -> np.ndarray:
        """Tokens each query sees (its ancestors' spans plus its visible prefix)."""
        return self.prefix_len[self.query_node] + self.query_visible

    @property
    def path_kv_tokens(self) -> int:
        """Sum over queries of the tokens each sees: what a sequence-based method reads."""
        return int(self.query_path_len.sum())

    @cached_property
    def queries_per_node(self) -> np.ndarray:
        """Number of queries that see at least one token of each node."""
        counts = np.zeros(self.n_nodes, dtype=np.int64)
        if self.n_queries:
            np.add.at(counts, self.query_node, 1)
        for v in self.dfs_order[::-1]:
            p = self.parent[v]
            if p >= 0:
                counts[p] += counts[v]
        return counts

    # ------------------------------------------------------------------ dense views (small trees)
    def token_table(self, nodes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slot, node, position-in-node) of every token of ``nodes`` (default: DFS order), flattened."""
        nodes = self.dfs_order if nodes is None else np.asarray(nodes, dtype=np.int64)
        lens = self.node_len[nodes]
        tok_node = np.repeat(nodes, lens)
        starts = np.repeat(np.cumsum(lens) - lens, lens)
        pos = np.arange(int(lens.sum()), dtype=np.int64) - starts
        slot = self.slots[self.slot_ptr[tok_node] + pos]
        return slot, tok_node, pos

    def visibility(self, tok_node: np.ndarray, tok_pos: np.ndarray) -> np.ndarray:
        """Boolean ``[n_queries, n_tokens]``: which query sees which token (given by node and position)."""
        qn = self.query_node[:, None]
        anc = self.is_ancestor(tok_node[None, :], qn)
        own = tok_node[None, :] == qn
        return anc & (~own | (tok_pos[None, :] < self.query_visible[:, None]))

    def __repr__(self) -> str:
        return (
            f"DecodingTree(nodes={self.n_nodes}, tokens={self.total_tokens}, queries={self.n_queries}, "
            f"unique_kv={self.unique_kv_tokens}, path_kv={self.path_kv_tokens})"
        )


_plan_native = None


def _native_derive(tree: DecodingTree):
    """:func:`deft.kernels.plan_native.tree_derive`, imported on first use (that module imports this one)."""
    global _plan_native
    if _plan_native is None:
        from deft.kernels import plan_native

        _plan_native = plan_native
    return _plan_native.tree_derive(tree)

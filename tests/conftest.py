"""Shared test fixtures: the traces directory and a random decoding-tree builder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from deft.tree import DecodingTree

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def traces_root() -> Path:
    """The traces directory the workloads would use; skips (with how to get it) when there is none."""
    from workloads.files import traces_dir
    from workloads.trace import TraceError

    try:
        return traces_dir(None)
    except TraceError as e:
        pytest.skip(f"trace files absent: {e}")


def random_tree(
    rng: np.random.Generator,
    max_nodes: int = 8,
    max_len: int = 6,
    max_queries: int = 6,
    spare_slots: int = 8,
) -> DecodingTree:
    """A random valid tree: shuffled node ids, scattered slots, and queries of three kinds mixed:
    a node's newest token, a partial prefix of a node, and every token of a node (speculative-style)."""
    n = int(rng.integers(1, max_nodes + 1))
    topo_parent = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n)], dtype=np.int64)
    perm = rng.permutation(n)  # node ids need not be topological
    parent = np.empty(n, dtype=np.int64)
    parent[perm] = np.where(topo_parent >= 0, perm[np.maximum(topo_parent, 0)], -1)
    lens = rng.integers(1, max_len + 1, size=n)
    n_slots = int(lens.sum()) + spare_slots
    slots = rng.permutation(n_slots)[: lens.sum()]
    queries: list[tuple[int, int]] = []
    for _ in range(int(rng.integers(1, max_queries + 1))):
        v = int(rng.integers(0, n))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            queries.append((v, int(lens[v])))
        elif kind == 1:
            queries.append((v, int(rng.integers(1, lens[v] + 1))))
        else:
            queries.extend((v, k) for k in range(1, int(lens[v]) + 1))
    ptr = np.concatenate([[0], np.cumsum(lens)])
    return DecodingTree.from_lists(parent, [slots[ptr[i] : ptr[i + 1]] for i in range(n)], queries, n_slots=n_slots)


def speculative_tree(
    rng: np.random.Generator,
    prompt: int,
    n_candidates: int,
    max_len: int = 4,
    shuffle_visible: bool = False,
    spare_slots: int = 0,
) -> DecodingTree:
    """A prompt and a random tree of 1..``max_len``-token candidate nodes, every candidate token a query
    (``visible`` 1..len, in shuffled order with ``shuffle_visible``); slots scattered over the tokens plus
    ``spare_slots`` (the pool size when there are spare slots)."""
    parent, lens, qn, qv = [-1], [prompt], [], []
    while n_candidates > 0:
        ln = int(min(n_candidates, rng.integers(1, max_len + 1)))
        parent.append(int(rng.integers(0, len(parent))))
        lens.append(ln)
        vis = list(range(1, ln + 1))
        if shuffle_visible:
            rng.shuffle(vis)
        qn += [len(lens) - 1] * ln
        qv += vis
        n_candidates -= ln
    n_tok = sum(lens)
    slots = rng.permutation(n_tok + spare_slots)[:n_tok]
    return DecodingTree.from_arrays(parent, lens, slots, qn, qv, n_slots=n_tok + spare_slots if spare_slots else None)


@pytest.fixture(scope="session")
def make_random_tree() -> Callable[..., DecodingTree]:
    """``make_random_tree(rng, max_nodes=, max_len=, max_queries=, spare_slots=)`` -> a random valid tree."""
    return random_tree

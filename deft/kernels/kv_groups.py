"""KV-guided grouping: cut a decoding tree's KV into chunks, attach each chunk's queries, split into tiles.

Host-side and vectorised (numpy, no per-token Python). The three DeFT variants differ only in where
chunks are cut; everything after that (queries per chunk, tiles, partial rows, the reduction's lists)
is shared.

Layout. The tree's *seen* tokens (``node_seen_len``) are laid out flat in DFS order of their nodes.
Queries are sorted by (DFS entry index of their node, visible); because a run of DFS-consecutive nodes
covers a contiguous range of DFS entry indices with its subtrees, the queries that see any token of a
chunk are a contiguous range of that sorted order. A tile is (chunk token range, a slice of that query
range of at most ``rows // group`` queries); the kernel runs one program per (tile, KV head).

Per token the plan stores its pool slot and its node (two int32); the kernel tests visibility from
three int32 per node and two per query: query ``j`` sees flat token ``t`` (node ``n``, position
``t - off[n]``) iff
``tin[n] <= qtin[j] < end[n]`` (ancestor-or-self) and (``qtin[j] != tin[n]`` or ``t - off[n] < qvis[j]``)
(strict ancestor, or own node within the visible prefix: causal inside a speculative node).
Tiles where every query sees every token (one node, no partial own-node query) skip the mask loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from deft.tree import DecodingTree

MODES = ("flatten", "node", "node_chunk")

#: the int32 sections packed into one host array, in this order; ``tiles``, ``nodes`` and ``queries``
#: are row-major records of the fields below
SECTIONS = ("tiles", "tok_slot", "tok_node", "nodes", "queries", "red_ptr", "red_idx")
TILE_FIELDS = ("tok_lo", "tok_hi", "q_lo", "q_hi", "pbase", "mask")
NODE_FIELDS = ("off", "tin", "end")
QUERY_FIELDS = ("idx", "tin", "vis")


@dataclass(frozen=True, eq=False)
class KVGroups:
    """The host side of a DeFT plan: one packed int32 array and where each section sits in it."""

    packed: np.ndarray
    offsets: dict[str, tuple[int, int]]
    n_tiles: int
    n_chunks: int
    n_tokens: int
    n_partials: int
    max_parts: int
    rows: int  # tile rows (BLOCK_M) the plan was cut for
    chunk_size: int  # the chunk size used (0 for node mode)

    def section(self, name: str) -> np.ndarray:
        a, b = self.offsets[name]
        return self.packed[a:b]

    def records(self, name: str) -> dict[str, np.ndarray]:
        """Columns of a record section (``tiles``, ``nodes``, ``queries``) as int64 arrays."""
        fields = {"tiles": TILE_FIELDS, "nodes": NODE_FIELDS, "queries": QUERY_FIELDS}[name]
        rec = self.section(name).reshape(-1, len(fields)).astype(np.int64)
        return {f: rec[:, i] for i, f in enumerate(fields)}


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x - 1).bit_length())


def flatten_chunk_count(n_tokens: int, n_kv_heads: int, chunk_min: int, chunk_max: int, target_ctas: int) -> int:
    """Chunks for DeFT-Flatten: enough programs to fill the GPU, chunks between ``chunk_min`` and ``chunk_max``."""
    want = -(-target_ctas // n_kv_heads)
    lo = -(-n_tokens // chunk_max)
    hi = max(1, -(-n_tokens // chunk_min))
    return int(max(1, lo, min(hi, want)))


def build_groups(
    tree: DecodingTree,
    group: int,
    mode: str,
    chunk_size: int = 0,
    block_m_max: int = 128,
    out_alloc: Callable[[int], np.ndarray] | None = None,
    snap: float = 0.0,
) -> KVGroups:
    """Group the tree's KV for one step.

    ``group``: query heads per KV head (tile rows per query). ``mode``: ``flatten`` cuts the DFS-flat
    tokens into ``ceil(T / chunk_size)`` near-equal chunks; ``node`` makes one chunk per node;
    ``node_chunk`` cuts each node every ``chunk_size`` tokens. ``block_m_max``: the most tile rows; the
    plan takes the smallest power of two (>= 16) that holds a chunk's queries up to that, and a chunk
    with more queries than ``rows // group`` is split into near-equal query slices. ``out_alloc(n)``
    gives the int32 array to pack into (a pinned staging buffer), default a fresh one. ``snap``
    (flatten only): move each cut to the nearest node boundary when one lies within ``snap`` x
    ``chunk_size`` tokens of it, so fewer chunks straddle two nodes (fewer masked tiles and partial
    rows) while chunks stay within about ``1 +- 2 snap`` of the balanced size; 0 is the paper's cut.
    """
    if mode not in MODES:
        raise ValueError(f"unknown grouping mode {mode!r}; use one of {MODES}")
    if mode != "node" and chunk_size <= 0:
        raise ValueError(f"mode {mode} needs a positive chunk_size, got {chunk_size}")
    i32 = np.int32
    if tree.n_queries == 0:
        return _empty_groups(tree, out_alloc)

    seen = tree.node_seen_len
    order = tree.dfs_order
    nodes = order[seen[order] > 0]
    lens = seen[nodes]
    k = nodes.size
    noff = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(lens, out=noff[1:])
    n_tok = int(noff[-1])
    tin_all = tree.tin
    ntin = tin_all[nodes]
    nend = ntin + tree.subtree_size[nodes]

    # per token (DFS-flat): pool slot and kept-node index
    tok_node = np.repeat(np.arange(k, dtype=i32), lens)
    if n_tok == tree.slots.size and k == tree.n_nodes and bool((nodes[1:] > nodes[:-1]).all()):
        tok_slot = tree.slots  # every token seen and DFS order = node order (a fan, a chain): no gather
    elif k <= 256:
        starts = tree.slot_ptr[nodes]
        tok_slot = np.concatenate([tree.slots[a : a + n] for a, n in zip(starts.tolist(), lens.tolist(), strict=True)])
    else:
        tok_slot = tree.slots[np.repeat(tree.slot_ptr[nodes] - noff[:-1], lens) + np.arange(n_tok)]

    # queries sorted by (node entry index, visible)
    nq = tree.n_queries
    qtin_raw = tin_all[tree.query_node]
    q_idx = np.lexsort((tree.query_visible, qtin_raw))
    q_tin = qtin_raw[q_idx]
    q_vis = tree.query_visible[q_idx]

    # chunk boundaries in flat token space
    if mode == "node":
        bounds = noff
    elif mode == "node_chunk":
        per = -(-lens // chunk_size)
        first_of = np.repeat(np.cumsum(per) - per, per)
        bounds = np.append(np.repeat(noff[:-1], per) + (np.arange(int(per.sum())) - first_of) * chunk_size, n_tok)
    else:
        n_chunks = max(1, -(-n_tok // chunk_size))
        bounds = (np.arange(n_chunks + 1, dtype=np.int64) * n_tok) // n_chunks
        if snap > 0 and n_chunks > 1:
            bounds = _snap_to_nodes(bounds, noff, snap * n_tok / n_chunks)
    c_lo, c_hi = bounds[:-1], bounds[1:]
    n_chunks = c_lo.size
    first = np.searchsorted(noff, c_lo, side="right") - 1
    last = np.searchsorted(noff, c_hi - 1, side="right") - 1
    maxend = np.maximum(np.maximum.reduceat(nend, first), nend[last])
    cq_lo = np.searchsorted(q_tin, ntin[first], side="left")
    cq_hi = np.searchsorted(q_tin, maxend, side="left")
    cnq = cq_hi - cq_lo
    cpbase = np.cumsum(cnq) - cnq
    n_part = int(cnq.sum())

    # tiles: near-equal query slices of each chunk
    block_m = tile_rows(int(cnq.max()) if n_chunks else 1, group, block_m_max)
    qt_max = block_m // group
    nt = np.maximum(1, -(-cnq // qt_max))
    n_tiles = int(nt.sum())
    t_chunk = np.repeat(np.arange(n_chunks), nt)
    t_j = np.arange(n_tiles) - np.repeat(np.cumsum(nt) - nt, nt)
    t_nt = nt[t_chunk]
    t_cnq = cnq[t_chunk]
    rel_lo = (t_j * t_cnq) // t_nt
    rel_hi = ((t_j + 1) * t_cnq) // t_nt
    tq_lo = cq_lo[t_chunk] + rel_lo
    tq_hi = cq_lo[t_chunk] + rel_hi
    t_pbase = cpbase[t_chunk] + rel_lo
    # a tile needs no mask if it lies in one node and its first query (least visible of the node's own
    # queries, by the sort) sees past the chunk's end, or is not in that node at all
    t_first = first[t_chunk]
    safe_q = np.minimum(tq_lo, max(nq - 1, 0))
    if nq:
        own_short = (q_tin[safe_q] == ntin[t_first]) & (q_vis[safe_q] < c_hi[t_chunk] - noff[t_first])
    else:
        own_short = np.zeros(n_tiles, dtype=bool)
    t_mask = (t_first != last[t_chunk]) | own_short

    # global reduction: sorted query s -> its partial rows
    part_q = np.arange(n_part) - np.repeat(cpbase - cq_lo, cnq)
    # stable sort by query; small integer keys take numpy's radix sort (several times faster than int64's)
    red_idx = np.argsort(part_q.astype(np.int16) if nq < 2**15 else part_q, kind="stable")
    counts = np.bincount(part_q, minlength=nq)
    red_ptr = np.zeros(nq + 1, dtype=np.int64)
    np.cumsum(counts, out=red_ptr[1:])
    max_parts = int(counts.max()) if nq else 0

    tiles = np.empty((n_tiles, len(TILE_FIELDS)), dtype=i32)
    for i, col in enumerate((c_lo[t_chunk], c_hi[t_chunk], tq_lo, tq_hi, t_pbase, t_mask)):
        tiles[:, i] = col
    node_rec = np.empty((k, len(NODE_FIELDS)), dtype=i32)
    for i, col in enumerate((noff[:-1], ntin, nend)):
        node_rec[:, i] = col
    query_rec = np.empty((nq, len(QUERY_FIELDS)), dtype=i32)
    for i, col in enumerate((q_idx, q_tin, q_vis)):
        query_rec[:, i] = col
    pieces = (tiles.ravel(), tok_slot, tok_node, node_rec.ravel(), query_rec.ravel(), red_ptr, red_idx)
    offsets, end = {}, 0
    for name, p in zip(SECTIONS, pieces, strict=True):
        offsets[name] = (end, end + p.size)
        end += p.size
    packed = np.empty(end, dtype=i32) if out_alloc is None else out_alloc(end)
    np.concatenate(pieces, out=packed, casting="same_kind")
    return KVGroups(
        packed=packed,
        offsets=offsets,
        n_tiles=n_tiles,
        n_chunks=int(n_chunks),
        n_tokens=n_tok,
        n_partials=n_part,
        max_parts=max_parts,
        rows=block_m,
        chunk_size=int(chunk_size) if mode != "node" else 0,
    )


def _snap_to_nodes(bounds: np.ndarray, noff: np.ndarray, tol: float) -> np.ndarray:
    """Move inner cuts to the nearest node boundary within ``tol`` tokens; drop cuts that coincide.
    A cut moves by less than half a chunk, so the cuts stay sorted and equal ones are neighbours."""
    inner = bounds[1:-1]
    j = np.searchsorted(noff, inner)
    lo = noff[j - 1]  # inner cuts lie strictly inside (0, n_tok): 1 <= j <= len(noff) - 1
    hi = noff[j]
    near = np.where(inner - lo <= hi - inner, lo, hi)
    out = bounds.copy()
    out[1:-1] = np.where(np.abs(near - inner) <= tol, near, inner)
    keep = np.empty(out.size, dtype=bool)
    keep[0] = True
    np.not_equal(out[1:], out[:-1], out=keep[1:])
    return out[keep]


def _empty_groups(tree: DecodingTree, out_alloc) -> KVGroups:
    """A plan with no work: no queries means nothing to attend."""
    sizes = [0] * len(SECTIONS)
    sizes[SECTIONS.index("red_ptr")] = 1
    ends = np.cumsum(sizes)
    packed = np.zeros(int(ends[-1]), dtype=np.int32) if out_alloc is None else out_alloc(int(ends[-1]))
    packed[:] = 0
    offsets = {name: (int(e - s), int(e)) for name, s, e in zip(SECTIONS, sizes, ends, strict=True)}
    return KVGroups(packed, offsets, 0, 0, 0, 0, 0, 16, 0)


def tile_rows(max_queries_per_chunk: int, group: int, block_m_max: int) -> int:
    """Tile rows for a plan: the smallest power of two >= 16 holding a chunk's queries, at most ``block_m_max``."""
    need = max(16, _next_pow2(max(1, max_queries_per_chunk) * group), _next_pow2(group))
    return int(max(min(need, block_m_max), _next_pow2(group), 16))

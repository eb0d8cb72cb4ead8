"""KV-guided grouping: cut a decoding tree's KV into chunks, attach each chunk's queries, split into tiles.

Host-side and vectorised (numpy, no per-token Python). The three DeFT variants differ only in where
chunks are cut; everything after that (queries per chunk, tiles, partial rows, the reduction's lists)
is shared. The paper's trees have tens of nodes, queries and chunks but thousands of tokens, so a plan
costs its numpy calls' fixed overhead, not their work: each step is a few calls over whole node, chunk
or tile arrays, written straight into the packed array (a Python loop over ~60 chunks costs about three
times the numpy calls it would replace).

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
Tiles where every query sees every token (one node, no partial own-node query) skip the mask loads; a
tile across nodes runs the part of its first node that all its queries see without them (a shared
prompt's tail in a chunk that also holds branches), and tokens in consecutive pool slots (a prefilled
prompt) skip the per-token slot loads.
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
#: a tile's ``flags``: its tokens run in two phases, ``[tok_lo, tok_lo + (flags >> FLAG_SHIFT))`` seen whole
#: by every query of the tile (no visibility test), then the rest with the test; bit 0 (``FLAG_MASK``):
#: the second phase is not empty; bit 1 (``FLAG_CONTIG``): the first phase's pool slots are consecutive
TILE_FIELDS = ("tok_lo", "tok_hi", "q_lo", "q_hi", "pbase", "flags")
FLAG_MASK = 1
FLAG_CONTIG = 2
FLAG_SHIFT = 2
NODE_FIELDS = ("off", "tin", "end")
QUERY_FIELDS = ("idx", "tin", "vis")
#: Flatten's few-query re-cut moves a run's edge onto a Node-Chunk cut of its node at most ``chunk_size //
#: SLIVER_DIV`` tokens away (:func:`_split_few_query_chunks`); the C plan uses the same number
SLIVER_DIV = 16


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
    classes: int = -1  # the tile classes it holds (tile_classes), when the C plan found them while ordering; -1: not

    def section(self, name: str) -> np.ndarray:
        a, b = self.offsets[name]
        return self.packed[a:b]

    def records(self, name: str) -> dict[str, np.ndarray]:
        """Columns of a record section (``tiles``, ``nodes``, ``queries``) as int64 arrays."""
        fields = {"tiles": TILE_FIELDS, "nodes": NODE_FIELDS, "queries": QUERY_FIELDS}[name]
        rec = self.section(name).reshape(-1, len(fields)).astype(np.int64)
        return {f: rec[:, i] for i, f in enumerate(fields)}


def tile_tokens(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and masked-phase tokens of each tile, from tile records (rows of ``TILE_FIELDS``); an unmasked
    tile's flags hold its whole length as the unmasked phase, so the difference is 0 there."""
    n_tok = t[:, 1].astype(np.int64) - t[:, 0]
    return n_tok, n_tok - (t[:, 5] >> FLAG_SHIFT)


#: longest-first tile order: estimated cost = (tokens + masked tokens) x (3 for a big tile, 2 for a small one)
#: + a fixed per-program cost; masked tokens count twice (the visibility test), big tiles 1.5x (4x the rows)
LPT_BIG, LPT_SMALL, LPT_PROGRAM = 3, 2, 128


def order_tiles_longest_first(
    g: KVGroups, group: int, small_rows: int, mix: float = 0.0, slots: float = 0.0
) -> None:
    """Reorder ``g``'s tile records in place, the most estimated work first (stable: ties keep DFS order).

    Only the launch order changes: every record carries its own token range, query range and partial rows,
    so the reduction and the IO are the same. A tile's rows are its queries x ``group``; it is small (runs
    the small tile) when they fit ``small_rows``. The cost model is a heuristic (see ``LPT_*``).

    ``mix`` > 0: then alternate big and small tiles (each kind in its longest-first order, the longer kind's
    rest at the end) when the costliest big tile is at most ``mix`` times the average load of the ``slots``
    programs per KV head that run at once (total cost / ``slots``): the big tiles (tensor-bound) are then not
    the step's critical path, and an SM that runs one of each kind finishes sooner than one running two big or
    two small ones (H100, session 8: few-shot 4k 6-7 % faster; 16k, where the big tiles are the critical
    path, up to 23 % slower). This is the numpy reference; the C plan orders its tiles itself
    (``build_groups(..., lpt_small_m=..., lpt_mix=...)``, bit-identical)."""
    t = g.section("tiles").reshape(-1, len(TILE_FIELDS))
    if t.shape[0] < 2:
        return
    n_tok, masked = tile_tokens(t)
    big = (t[:, 3] - t[:, 2]) * group > small_rows
    cost = (n_tok + masked) * np.where(big, LPT_BIG, LPT_SMALL) + LPT_PROGRAM
    order = np.argsort(-cost, kind="stable")
    if mix > 0 and big.any() and not big.all() and float(cost[big].max()) * slots <= mix * float(cost.sum()):
        order = alternate(order[big[order]], order[~big[order]])
    t[...] = t[order]


#: tile classes of a plan (:func:`tile_classes`, a bitmask): a big tile (rows over the small tile's) without a
#: masked phase over consecutive slots (affine addresses, with ``contiguous``), one without a masked phase otherwise
#: (the plain gathered loop), a big tile with a masked phase, and the small tile's unmasked and masked
CLASS_BIG_AFFINE, CLASS_BIG_PLAIN, CLASS_BIG_MASKED, CLASS_SMALL_PLAIN, CLASS_SMALL_MASKED = 1, 2, 4, 8, 16


def tile_classes(g: KVGroups, group: int, small_rows: int, contiguous: bool = True) -> int:
    """Which tile classes (``CLASS_*`` bits) plan ``g`` holds, tiles of at most ``small_rows`` rows being small: what
    the partial kernel must compile for it. ``CLASS_BIG_PLAIN`` marks the tiles whose plain gathered loop a kernel
    with ``unified_mask`` replaces by its slower tested loop; a plan of ``CLASS_BIG_AFFINE`` and
    ``CLASS_SMALL_PLAIN`` tiles alone runs the kernel with the affine loop as the big tile's only one
    (``DeftAttention.specialise``). The C plan finds the same bits as it orders the tiles (``KVGroups.classes``;
    with ``contiguous`` on)."""
    t = g.section("tiles").reshape(-1, len(TILE_FIELDS))
    big = (t[:, 3] - t[:, 2]).astype(np.int64) * group > small_rows
    masked = (t[:, 5] & FLAG_MASK) != 0
    affine = ((t[:, 5] & FLAG_CONTIG) != 0) & contiguous
    out = 0
    for bit, sel in (
        (CLASS_BIG_AFFINE, big & ~masked & affine),
        (CLASS_BIG_PLAIN, big & ~masked & ~affine),
        (CLASS_BIG_MASKED, big & masked),
        (CLASS_SMALL_PLAIN, ~big & ~masked),
        (CLASS_SMALL_MASKED, ~big & masked),
    ):
        out |= bit if sel.any() else 0
    return out


def partition_small_last(g: KVGroups, group: int, small_rows: int) -> int:
    """Reorder ``g``'s tile records in place, big tiles (rows over ``small_rows``) first and small ones after, each
    kind in its current order (stable), for a plan whose small tiles run in a launch of their own
    (``DeftAttention.split_launch``); returns the number of big tiles."""
    t = g.section("tiles").reshape(-1, len(TILE_FIELDS))
    big = (t[:, 3] - t[:, 2]).astype(np.int64) * group > small_rows
    n_big = int(np.count_nonzero(big))
    if 0 < n_big < len(t):
        t[...] = np.concatenate([t[big], t[~big]])
    return n_big


def rest_all_small(g: KVGroups, first: int, group: int, small_rows: int) -> bool:
    """Whether every tile record from ``first`` on has at most ``small_rows`` rows (``DeftAttention.small_rest``: the
    launch after the prompt kernel's tiles can then be compiled for the small tile alone)."""
    t = g.section("tiles").reshape(-1, len(TILE_FIELDS))[first:]
    return bool(((t[:, 3] - t[:, 2]).astype(np.int64) * group <= small_rows).all())


def rest_small_unmasked(g: KVGroups, first: int, group: int, small_rows: int) -> bool:
    """Whether every tile record from ``first`` on has at most ``small_rows`` rows and no masked phase
    (``DeftAttention.branch_heads``: the launch after the prompt kernel's tiles can then be the branches' kernel)."""
    t = g.section("tiles").reshape(-1, len(TILE_FIELDS))[first:]
    return bool((((t[:, 3] - t[:, 2]).astype(np.int64) * group <= small_rows) & ((t[:, 5] & FLAG_MASK) == 0)).all())


def split_long_small_tiles(
    g: KVGroups, group: int, small_rows: int, max_len: int, out_alloc: Callable[[int], np.ndarray] | None = None
) -> KVGroups:
    """Cut every small unmasked tile (rows at most ``small_rows``) longer than ``max_len`` tokens into near-equal
    pieces of at most ``max_len`` (``DeftAttention.rest_chunk``); returns a new plan, ``g`` when none is that long.

    The tile a filled chunk's rest runs in (``fill_tiles``: a shared prompt's last few queries) spans the prompt's
    long chunk at the small tile's rate, and would end last; in pieces it runs beside the rest. Each piece after the
    first gets partial rows of its own (after the plan's others), and the reduction's lists are rebuilt (a query
    keeps its partials in row order). A piece of an unmasked tile is unmasked, and a piece of a run of consecutive
    slots is one too, so the flags carry over with the piece's length. The tile order is the caller's to redo."""
    t = g.section("tiles").reshape(-1, len(TILE_FIELDS)).astype(np.int64)
    n_tok = t[:, 1] - t[:, 0]
    nq_t = t[:, 3] - t[:, 2]
    cut = (nq_t * group <= small_rows) & ((t[:, 5] & FLAG_MASK) == 0) & (n_tok > max_len)
    if max_len <= 0 or not cut.any():
        return g
    sel = cut.nonzero()[0]
    pieces = -(-n_tok[sel] // max_len)
    src = t[sel].repeat(pieces, axis=0)  # one row per piece, pieces of a tile together
    first = np.add.accumulate(pieces) - pieces
    j = np.arange(int(pieces.sum())) - first.repeat(pieces)  # piece number within its tile
    p = pieces.repeat(pieces)
    length = n_tok[sel].repeat(pieces)
    lo = src[:, 0] + j * length // p
    hi = src[:, 0] + (j + 1) * length // p
    # partial rows: the first piece keeps its tile's, the others take new ones after the plan's
    nq_p = src[:, 3] - src[:, 2]
    extra = np.where(j > 0, nq_p, 0)
    new_base = g.n_partials + np.add.accumulate(extra) - extra
    pieces_rec = np.stack(
        [lo, hi, src[:, 2], src[:, 3], np.where(j > 0, new_base, src[:, 4]), ((hi - lo) << FLAG_SHIFT) | (src[:, 5] & FLAG_CONTIG)],
        axis=1,
    )  # fmt: skip
    new = j > 0
    return _repack(g, np.concatenate([t[~cut], pieces_rec]), src[new, 2], nq_p[new], out_alloc)


def spread_rest_tiles(
    g: KVGroups, first: int, n_programs: int, out_alloc: Callable[[int], np.ndarray] | None = None
) -> KVGroups:
    """Cut the tile records from ``first`` on (small unmasked tiles: one-query branches beside the prompt kernel) into
    pieces so that ``n_programs`` programs, each taking a run of consecutive records, get near-equal token counts
    (``DeftAttention.branch_heads``: the branches' kernel, :mod:`deft.kernels.branch_heads`). The records' tokens,
    laid end to end in record order, are cut into ``n_programs`` equal ranges; a record crossing a cut becomes two
    pieces (or more), each piece after a record's first with partial rows of its own, as
    :func:`split_long_small_tiles` makes them. Adds a section ``progs``: ``n_programs + 1`` record indices, counted
    from ``first``; program ``p`` runs records ``[progs[p], progs[p + 1])`` (so a program never waits on a tile longer
    than its share, whatever the branches' lengths and the number of SMs the prompt leaves)."""
    t = g.section("tiles").reshape(-1, len(TILE_FIELDS)).astype(np.int64)
    rest = t[first:]
    n_tok = rest[:, 1] - rest[:, 0]
    total = int(n_tok.sum())
    n_prog = max(1, min(int(n_programs), total))
    start = np.add.accumulate(n_tok) - n_tok  # each record's first token, records end to end
    cuts = np.arange(1, n_prog, dtype=np.int64) * total // n_prog
    bounds = np.union1d(start, cuts)  # every piece's first token
    ends = np.r_[bounds[1:], total]
    rec = np.searchsorted(start, bounds, side="right") - 1
    src = rest[rec]
    lo = src[:, 0] + bounds - start[rec]
    hi = lo + (ends - bounds)
    new = bounds != start[rec]  # not a record's first piece: partial rows of its own
    nq_p = src[:, 3] - src[:, 2]
    extra = np.where(new, nq_p, 0)
    new_base = g.n_partials + np.add.accumulate(extra) - extra
    pieces = np.stack(
        [lo, hi, src[:, 2], src[:, 3], np.where(new, new_base, src[:, 4]), ((hi - lo) << FLAG_SHIFT) | (src[:, 5] & FLAG_CONTIG)],
        axis=1,
    )  # fmt: skip
    prog = np.searchsorted(cuts, bounds, side="right")  # the program of each piece
    progs = np.searchsorted(prog, np.arange(n_prog + 1), side="left")
    return _repack(g, np.concatenate([t[:first], pieces]), src[new, 2], nq_p[new], out_alloc, progs)


def one_rest_tile_per_query(g: KVGroups, first: int, n_queries: int) -> bool:
    """Whether every query is in exactly one tile record from ``first`` on (``DeftAttention.branch_merge``: that
    tile's program is then the one to merge the query's partials, all others being the records before ``first``)."""
    t = g.section("tiles").reshape(-1, len(TILE_FIELDS))[first:]
    if n_queries == 0 or len(t) == 0:
        return False
    edges = np.bincount(t[:, 2], minlength=n_queries + 1) - np.bincount(t[:, 3], minlength=n_queries + 1)
    return bool((np.add.accumulate(edges[:n_queries]) == 1).all())


def _repack(
    g: KVGroups,
    tiles: np.ndarray,
    new_q_lo: np.ndarray,
    new_cnt: np.ndarray,
    out_alloc: Callable[[int], np.ndarray] | None,
    progs: np.ndarray | None = None,
) -> KVGroups:
    """``g`` with new tile records whose pieces after the first took new partial rows, in order after ``g``'s: the
    ``k``-th new piece has ``new_cnt[k]`` rows, for the sorted queries from ``new_q_lo[k]`` on. Rebuilds the
    reduction's lists (a query keeps its partials in row order); ``progs``, if given, goes in a last section."""
    n_part = g.n_partials + int(new_cnt.sum())
    ptr = g.section("red_ptr").astype(np.int64)
    nq = ptr.size - 1
    part_q = np.empty(n_part, dtype=np.int64)
    part_q[g.section("red_idx")] = np.arange(nq).repeat(np.diff(ptr))
    part_q[g.n_partials :] = new_q_lo.repeat(new_cnt) + np.arange(int(new_cnt.sum())) - (np.add.accumulate(new_cnt) - new_cnt).repeat(new_cnt)
    counts = np.bincount(part_q, minlength=nq)
    sizes = {name: b - a for name, (a, b) in g.offsets.items() if name in SECTIONS}
    sizes["tiles"] = tiles.size
    sizes["red_idx"] = n_part
    names = SECTIONS + (("progs",) if progs is not None else ())
    if progs is not None:
        sizes["progs"] = progs.size
    offsets, end = {}, 0
    for name in names:
        offsets[name] = (end, end + sizes[name])
        end += sizes[name]
    old = g.packed.copy()  # the caller's buffer may be the one handed out again
    packed = np.empty(end, dtype=np.int32) if out_alloc is None else out_alloc(end)
    for name in SECTIONS[1:-2]:
        a, b = g.offsets[name]
        packed[offsets[name][0] : offsets[name][1]] = old[a:b]
    packed[offsets["tiles"][0] : offsets["tiles"][1]] = tiles.ravel()
    a, b = offsets["red_ptr"]
    packed[a] = 0
    packed[a + 1 : b] = np.add.accumulate(counts)
    a, b = offsets["red_idx"]
    packed[a:b] = part_q.argsort(kind="stable")
    if progs is not None:
        a, b = offsets["progs"]
        packed[a:b] = progs
    return KVGroups(
        packed=packed, offsets=offsets, n_tiles=len(tiles), n_chunks=g.n_chunks, n_tokens=g.n_tokens,
        n_partials=n_part, max_parts=int(counts.max()), rows=g.rows, chunk_size=g.chunk_size, classes=g.classes,
    )  # fmt: skip


def alternate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a[0], b[0], a[1], b[1], ...``, then the rest of the longer one."""
    k = min(a.size, b.size)
    out = np.empty(a.size + b.size, dtype=a.dtype)
    out[0 : 2 * k : 2], out[1 : 2 * k : 2] = a[:k], b[:k]
    out[2 * k :] = a[k:] if a.size > k else b[k:]
    return out


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
    native: bool | None = None,
    few_split: int = 0,
    wide_budget: int = 0,
    chunk_policy: tuple[int, int, int, int] | None = None,
    lpt_small_m: int | None = None,
    lpt_mix: tuple[float, float] = (0.0, 0.0),
    fill_tiles: bool = False,
    fill_small: int = 0,
    leaf_split: bool = False,
) -> KVGroups:
    """Group the tree's KV for one step.

    ``group``: query heads per KV head (tile rows per query). ``mode``: ``flatten`` cuts the DFS-flat
    tokens into ``ceil(T / chunk_size)`` near-equal chunks; ``node`` makes one chunk per node;
    ``node_chunk`` cuts each node every ``chunk_size`` tokens. ``block_m_max``: the most tile rows; the
    plan takes the smallest power of two (>= 16) that holds a chunk's queries up to that, and a chunk
    with more queries than ``rows // group`` is split into near-equal query slices (``fill_tiles``: slices of
    ``rows // group`` queries, the rest in the last, which runs as a small tile when it fits ``fill_small`` rows,
    and then is not counted in ``wide_budget``). ``out_alloc(n)``
    gives the int32 array to pack into (a pinned staging buffer), default a fresh one. ``snap``
    (flatten only): move each cut to the nearest node boundary when one lies within ``snap`` x
    ``chunk_size`` tokens of it, so fewer chunks straddle two nodes (fewer masked tiles and partial
    rows) while chunks stay within about ``1 +- 2 snap`` of the balanced size; 0 is the paper's cut.
    ``native``: build it with the C code of :mod:`deft.kernels.plan_native` (bit-identical, a few
    microseconds instead of a hundred numpy calls); ``None`` uses it when it is available, ``True``
    raises without it, ``False`` uses numpy (the reference; also taken for inputs the C code declines).
    ``few_split`` (flatten only): a chunk whose queries x ``group`` fit this many rows and that spans
    several nodes is *few*; runs of few chunks are re-cut as Node-Chunk cuts them (node starts, then every
    ``chunk_size`` tokens inside a node), so a fan's branches run unmasked one-node programs instead of
    masked tiles over two branches; 0 is off (see :func:`_split_few_query_chunks`). ``leaf_split`` (with
    ``few_split``): a chunk of leaves only is few too, whatever its queries (each reads only its own leaf there).
    ``wide_budget`` (flatten and node_chunk): cut nodes that need two or more row
    tiles into long chunks, at most this many (chunk x tile) programs per KV head (see
    :func:`_wide_node_bounds`); 0 is off.
    ``chunk_policy`` ``(kv_heads, chunk_min, chunk_max, target_programs)``: with ``chunk_size`` 0 (chunked
    modes), the chunk size comes from the tree's seen tokens (:func:`auto_chunk_size`). ``lpt_small_m``: the
    tiles in longest-first order (:func:`order_tiles_longest_first`, small tiles as :func:`small_tile_rows` gives
    them for this ``small_m``), else in DFS order; ``lpt_mix`` ``(mix, slots)``: then big and small tiles alternate
    under :func:`order_tiles_longest_first`'s rule.
    """
    if mode not in MODES:
        raise ValueError(f"unknown grouping mode {mode!r}; use one of {MODES}")
    auto = mode != "node" and chunk_size == 0 and chunk_policy is not None
    if mode != "node" and chunk_size <= 0 and not auto:
        raise ValueError(f"mode {mode} needs a positive chunk_size (or 0 with a chunk_policy), got {chunk_size}")
    if tree.n_queries == 0:
        return _empty_groups(tree, out_alloc)
    few_split = int(few_split) if mode == "flatten" else 0
    wide_budget = int(wide_budget) if mode != "node" else 0
    if native is not False:  # the C code checks the token limit below itself and declines (None) past it
        pn = _plan_native()
        if native and not pn.native_available():
            raise RuntimeError("native plan requested but unavailable (no C compiler, or DEFT_NATIVE_PLAN=0)")
        g = pn.build_groups_native(tree, group, mode, chunk_size, block_m_max, out_alloc, snap, wide_budget, few_split,
                                   chunk_policy if auto else None, lpt_small_m, lpt_mix, fill_tiles,
                                   fill_small, leaf_split)  # fmt: skip
        if g is not None:
            return g
    if tree.unique_kv_tokens >= 1 << (31 - FLAG_SHIFT):  # a tile's flags hold its unmasked length above 2 bits
        raise ValueError(
            f"the tree has {tree.unique_kv_tokens} KV tokens; a DeFT plan holds at most {(1 << (31 - FLAG_SHIFT)) - 1}"
        )
    if auto:
        chunk_size = auto_chunk_size(tree.unique_kv_tokens, *chunk_policy)
    g = _build_groups_numpy(tree, group, mode, chunk_size, block_m_max, out_alloc, snap, few_split, wide_budget,
                            fill_tiles, fill_small, leaf_split)  # fmt: skip
    if lpt_small_m is not None:
        order_tiles_longest_first(g, group, small_tile_rows(group, g.rows, lpt_small_m), *lpt_mix)
    return g


def auto_chunk_size(n_tokens: int, kv_heads: int, chunk_min: int, chunk_max: int, target_programs: int) -> int:
    """Chunk size for ``n_tokens`` seen tokens: :func:`flatten_chunk_count` chunks of near-equal size."""
    n_tok = max(1, int(n_tokens))
    return -(-n_tok // flatten_chunk_count(n_tok, kv_heads, chunk_min, chunk_max, target_programs))


_native_module = None


def _plan_native():
    """:mod:`deft.kernels.plan_native`, imported on first use (it imports this module)."""
    global _native_module
    if _native_module is None:
        from deft.kernels import plan_native

        _native_module = plan_native
    return _native_module


def _build_groups_numpy(
    tree: DecodingTree,
    group: int,
    mode: str,
    chunk_size: int,
    block_m_max: int,
    out_alloc: Callable[[int], np.ndarray] | None,
    snap: float,
    few_split: int = 0,
    wide_budget: int = 0,
    fill_tiles: bool = False,
    fill_small: int = 0,
    leaf_split: bool = False,
) -> KVGroups:
    """:func:`build_groups` in numpy, for a tree with queries: the reference the C code matches."""
    nq = tree.n_queries

    # kept nodes (a seen token or more) in DFS order: a node's DFS entry index is its place in the order
    order = tree.dfs_order
    seen = tree.node_seen_len[order]
    ntin = seen.nonzero()[0]
    k = ntin.size
    nodes, lens = (order, seen) if k == order.size else (order[ntin], seen[ntin])
    n_end = np.add.accumulate(lens)  # flat token range of kept node i: [n_off[i], n_end[i])
    n_off = n_end - lens
    n_tok = int(n_end[-1])
    nend = ntin + tree.subtree_size[nodes]  # end of its subtree's entry indices

    # queries sorted by (node entry index, visible)
    qtin = tree.tin[tree.query_node]
    q_idx = np.lexsort((tree.query_visible, qtin))
    q_tin = qtin[q_idx]
    q_vis = tree.query_visible[q_idx]

    # chunks: flat token ranges [c_lo, c_hi), the kept nodes of their first and last token
    if mode == "node":
        c_lo, c_hi = n_off, n_end
        first = last = np.arange(k)
    else:
        if mode == "node_chunk":
            per = (lens + (chunk_size - 1)) // chunk_size  # chunks per node
            per_end = np.add.accumulate(per)
            n_c = int(per_end[-1])
            bounds = np.empty(n_c + 1, dtype=np.int64)
            bounds[n_c] = n_tok
            # chunk i of a node whose chunks are numbered from f on starts at off + (i - f) * chunk_size
            start = (n_off - (per_end - per) * chunk_size).repeat(per)
            np.add(start, np.arange(0, n_c * chunk_size, chunk_size), out=bounds[:n_c])
        else:
            n_c = max(1, -(-n_tok // chunk_size))
            bounds = np.arange(0, (n_c + 1) * n_tok, n_tok) // n_c
            if snap > 0 and n_c > 1:
                bounds = _snap_to_nodes(bounds, n_off, n_end, snap * n_tok / n_c)
        if wide_budget > 0:
            nq_sub = q_tin.searchsorted(nend) - q_tin.searchsorted(ntin)  # queries below each kept node
            bounds = _wide_node_bounds(
                bounds, n_off, n_end, nq_sub, group, block_m_max, chunk_size, wide_budget, mode == "flatten",
                fill_small if fill_tiles else -1,
            )
        if few_split > 0:  # after the wide nodes' re-cut, which re-cuts the rest of the tree too
            bounds = _split_few_query_chunks(
                bounds, n_off, n_end, ntin, nend, q_tin, group, few_split, chunk_size, leaf_split
            )
        c_lo, c_hi = bounds[:-1], bounds[1:]
        first = n_end.searchsorted(c_lo, "right")
        last = n_end.searchsorted(c_hi)
    n_chunks = c_lo.size

    # a chunk's queries: those below its nodes, a contiguous range [cq_lo, cq_hi) of the sorted order
    maxend = np.maximum.reduceat(nend, first)
    np.maximum(maxend, nend[last], out=maxend)
    c_tin = ntin[first]
    cq_lo = q_tin.searchsorted(c_tin)
    cq_hi = q_tin.searchsorted(maxend)
    cnq = cq_hi - cq_lo
    cp_end = np.add.accumulate(cnq)
    cpbase = cp_end - cnq  # first partial row of each chunk
    n_part = int(cp_end[-1])
    # A tile needs the mask unless it lies in one node and its first query sees past the chunk's end,
    # or is not in that node at all. The first node's own queries that stop inside the chunk come first
    # in its range (sorted by visible): they are the queries below ``thr``, counted on one sort key,
    # entry * big + visible, against (first node's entry, chunk end within that node).
    big = n_tok + 1  # above every visible count
    q_key = q_tin * big
    q_key += q_vis
    thr = q_key.searchsorted(c_tin * big + (c_hi - n_off[first]))
    if mode == "flatten":
        thr[first != last] = nq + 1  # a chunk across two nodes always needs it

    # tiles: each chunk's queries in near-equal slices, or (fill_tiles) in slices of qt_max and the rest last
    block_m = tile_rows(int(cnq.max()), group, block_m_max)
    qt_max = block_m // group
    nt = np.maximum(cnq, 1)
    nt += qt_max - 1
    nt //= qt_max  # tiles per chunk
    t_end = np.add.accumulate(nt)
    n_tiles = int(t_end[-1])

    sizes = (n_tiles * len(TILE_FIELDS), n_tok, n_tok, k * len(NODE_FIELDS), nq * len(QUERY_FIELDS), nq + 1, n_part)
    offsets, end = {}, 0
    for name, size in zip(SECTIONS, sizes, strict=True):
        offsets[name] = (end, end + size)
        end += size
    packed = np.empty(end, dtype=np.int32) if out_alloc is None else out_alloc(end)

    tiles = packed[: sizes[0]].reshape(n_tiles, len(TILE_FIELDS))
    pq_off = cpbase - cq_lo  # a chunk's partial row for sorted query s is s + pq_off
    if n_tiles == n_chunks:  # one tile per chunk
        tiles[:, 0] = c_lo
        tiles[:, 1] = c_hi
        tiles[:, 2] = cq_lo
        tiles[:, 3] = cq_hi
        tiles[:, 4] = cpbase
        tiles[:, 5] = cq_lo < thr
    else:
        t_chunk = np.arange(n_chunks).repeat(nt)
        t_cnq = cnq[t_chunk]
        t_nt = nt[t_chunk]
        t_j = np.arange(n_tiles) - (t_end - nt)[t_chunk]  # tile number within its chunk
        if fill_tiles:
            tq_lo = t_j * qt_max
            t_j = np.minimum(tq_lo + qt_max, t_cnq)  # now the tile's query end, relative to the chunk's
        else:
            t_j *= t_cnq
            tq_lo = t_j // t_nt
            t_j += t_cnq
            t_j //= t_nt  # now the tile's query end, relative to the chunk's
        t_qlo = cq_lo[t_chunk]
        tq_lo += t_qlo
        t_j += t_qlo
        tiles[:, 0] = c_lo[t_chunk]
        tiles[:, 1] = c_hi[t_chunk]
        tiles[:, 2] = tq_lo
        tiles[:, 3] = t_j
        tiles[:, 4] = tq_lo + pq_off[t_chunk]
        tiles[:, 5] = tq_lo < thr[t_chunk]

    # per token (DFS-flat): pool slot and kept-node index. Slots come in runs of nodes that follow each
    # other in the pool (one run for a fan or a chain): one copy per run, or one gather when runs are
    # many and short (a copy costs about as much as gathering 30 tokens)
    a, b = offsets["tok_slot"]
    s_lo = tree.slot_ptr[nodes]
    s_hi = s_lo + lens
    brk = (s_lo[1:] != s_hi[:-1]).nonzero()[0]
    if brk.size == 0:
        packed[a:b] = tree.slots[int(s_lo[0]) : int(s_hi[-1])]
    elif brk.size * 32 < n_tok:
        run_lo = [int(s_lo[0]), *s_lo[brk + 1].tolist()]
        run_hi = [*s_hi[brk].tolist(), int(s_hi[-1])]
        runs = [tree.slots[x:y] for x, y in zip(run_lo, run_hi, strict=True)]
        np.concatenate(runs, out=packed[a:b], casting="same_kind")
    else:
        idx = (s_lo - n_off).repeat(lens)
        idx += np.arange(n_tok)
        packed[a:b] = tree.slots[idx]
    tok_slot = packed[a:b]
    a, b = offsets["tok_node"]
    packed[a:b] = np.arange(k, dtype=np.int32).repeat(lens)
    _finish_flags(tiles, tok_slot, packed[a:b], n_off, n_end, ntin, nend, q_tin, q_vis)

    a, b = offsets["nodes"]
    node_rec = packed[a:b].reshape(k, len(NODE_FIELDS))
    node_rec[:, 0] = n_off
    node_rec[:, 1] = ntin
    node_rec[:, 2] = nend
    a, b = offsets["queries"]
    query_rec = packed[a:b].reshape(nq, len(QUERY_FIELDS))
    query_rec[:, 0] = q_idx
    query_rec[:, 1] = q_tin
    query_rec[:, 2] = q_vis

    # global reduction: sorted query s -> its partial rows, in chunk order
    part_q = np.arange(n_part) - pq_off.repeat(cnq)
    counts = np.bincount(part_q, minlength=nq)
    a, b = offsets["red_ptr"]
    packed[a] = 0
    packed[a + 1 : b] = np.add.accumulate(counts)
    # stable sort by query; small integer keys take numpy's radix sort (several times faster than int64's)
    a, b = offsets["red_idx"]
    packed[a:b] = (part_q.astype(np.int16) if nq < 2**15 else part_q).argsort(kind="stable")
    return KVGroups(
        packed=packed,
        offsets=offsets,
        n_tiles=n_tiles,
        n_chunks=n_chunks,
        n_tokens=n_tok,
        n_partials=n_part,
        max_parts=int(counts.max()),
        rows=block_m,
        chunk_size=int(chunk_size) if mode != "node" else 0,
    )


def _finish_flags(tiles, tok_slot, tok_node, n_off, n_end, ntin, nend, q_tin, q_vis) -> None:
    """Turn each tile's mask bit into its final flags, in place (see ``TILE_FIELDS``).

    A masked tile keeps an unmasked prefix: the tokens of its chunk's first node ``f`` when every one of
    its queries lies in ``f``'s subtree, up to where the first of them that sits in ``f`` itself stops
    seeing (queries are sorted by (entry, visible), so that one is the tile's first). The prefix runs
    without the visibility test; a tile whose prefix is the whole chunk is unmasked. Then bit 1 says
    whether the prefix's slots are consecutive."""
    lo, hi = tiles[:, 0].astype(np.int64), tiles[:, 1].astype(np.int64)
    qlo, qhi = tiles[:, 2].astype(np.int64), tiles[:, 3].astype(np.int64)
    masked = (tiles[:, 5] & FLAG_MASK) != 0
    unmasked_len = hi - lo
    if masked.any():
        m = masked & (qhi > qlo)
        f = tok_node[lo[m]]
        first, last = qlo[m], qhi[m] - 1
        own = q_tin[first] == ntin[f]
        stop = np.minimum(hi[m], np.where(own, n_off[f] + q_vis[first], n_end[f]))
        prefix = np.where(q_tin[last] < nend[f], np.maximum(stop - lo[m], 0), 0)
        unmasked_len[masked] = 0
        unmasked_len[m] = prefix
    flags = (unmasked_len < hi - lo).astype(np.int64)
    # no break (a slot step other than +1) between the prefix's first and last token
    brk = (np.diff(tok_slot) != 1).nonzero()[0]
    end = lo + unmasked_len
    contig = (brk.searchsorted(end - 1) == brk.searchsorted(lo)) & (unmasked_len > 0)
    flags |= contig.astype(np.int64) << 1
    flags |= unmasked_len << 2
    tiles[:, 5] = flags


def _wide_node_bounds(
    bounds: np.ndarray,
    n_off: np.ndarray,
    n_end: np.ndarray,
    nq_sub: np.ndarray,
    group: int,
    block_m: int,
    chunk_size: int,
    budget: int,
    flatten: bool,
    fill_small: int = -1,
) -> np.ndarray:
    """Re-cut the *wide* nodes (their queries x ``group`` need two tiles or more: a shared prompt) into few,
    long chunks: together at most ``budget`` (chunk x tile) programs per KV head, shared in proportion to
    each node's tokens x tiles, never shorter than ``chunk_size``. Everything else keeps its cuts, cut again
    at the wide nodes' edges: Flatten re-cuts each run of other nodes into equal chunks of about
    ``chunk_size``; Node-Chunk keeps its per-node cuts. So a prompt that every query reads runs as about one
    wave of long programs (the probe's best case, notes/deft_kernels.md) and the branches keep short ones.
    ``fill_small`` >= 0 (filled tiles): a node's last slice, when its rows fit ``fill_small``, runs as a small
    tile and is not counted."""
    lens = n_end - n_off
    tiles = -(-(nq_sub * group) // block_m)
    wide = (tiles >= 2).nonzero()[0]
    if wide.size == 0:
        return bounds
    counted = tiles[wide]
    if fill_small >= 0:
        rest = nq_sub[wide] % max(1, block_m // group)
        counted = counted - ((rest != 0) & (rest * group <= fill_small))
    work = lens[wide] * counted
    n_w = np.maximum(1, (budget * lens[wide]) // max(1, int(work.sum())))
    n_w = np.minimum(n_w, -(-lens[wide] // chunk_size))
    pieces, pos = [np.zeros(1, dtype=np.int64)], 0
    for j, n in zip(wide.tolist(), n_w.tolist(), strict=True):
        lo, hi = int(n_off[j]), int(n_end[j])
        if lo > pos:
            pieces.append(_light_cuts(bounds, pos, lo, chunk_size, flatten))
        pieces.append(lo + np.arange(1, n + 1, dtype=np.int64) * (hi - lo) // n)
        pos = hi
    n_tok = int(n_end[-1])
    if pos < n_tok:
        pieces.append(_light_cuts(bounds, pos, n_tok, chunk_size, flatten))
    return np.concatenate(pieces)


def _light_cuts(bounds: np.ndarray, a: int, b: int, chunk_size: int, flatten: bool) -> np.ndarray:
    """Cut points in ``(a, b]`` for a run of non-wide nodes: equal chunks of about ``chunk_size`` (Flatten),
    or the existing cuts inside the run (Node-Chunk, whose cuts already fall on every node boundary)."""
    if flatten:
        n = max(1, -(-(b - a) // chunk_size))
        return a + np.arange(1, n + 1, dtype=np.int64) * (b - a) // n
    inner = bounds[(bounds > a) & (bounds < b)]
    return np.append(inner, b).astype(np.int64)


def _split_few_query_chunks(
    bounds: np.ndarray,
    n_off: np.ndarray,
    n_end: np.ndarray,
    ntin: np.ndarray,
    nend: np.ndarray,
    q_tin: np.ndarray,
    group: int,
    rows: int,
    chunk_size: int,
    leaf_split: bool = False,
) -> np.ndarray:
    """Cut the few-query part of the tree as Node-Chunk does. A chunk that spans several nodes and whose
    queries x ``group`` fit ``rows`` (the same query ranges the plan derives next) is *few*, and so, with
    ``leaf_split``, is one whose nodes are all leaves (each query there reads only its own leaf's tokens); each
    run of few chunks is merged and re-cut at its node boundaries and every ``chunk_size`` tokens inside a node
    (counted from the node's start), so its tiles need no visibility mask (branches, one query each)."""
    c_lo, c_hi = bounds[:-1], bounds[1:]
    first = n_end.searchsorted(c_lo, "right")
    last = n_end.searchsorted(c_hi)
    maxend = np.maximum.reduceat(nend, first)
    np.maximum(maxend, nend[last], out=maxend)
    cnq = q_tin.searchsorted(maxend) - q_tin.searchsorted(ntin[first])
    fit = cnq * group <= rows
    if leaf_split:  # no inner node among first..last: a prefix count of inner nodes
        inner = np.concatenate(([0], np.add.accumulate((nend - ntin != 1).astype(np.int64))))
        fit |= inner[last + 1] == inner[first]
    few = fit & (first != last)
    if not few.any():
        return bounds
    per = (n_end - n_off + (chunk_size - 1)) // chunk_size  # Node-Chunk's cuts: node starts, then every chunk
    # an edge between a few run and a kept chunk, strictly inside a node, moves to that node's nearest Node-Chunk
    # cut (or its end) when that is within SLIVER_DIV-th of a chunk: else the re-cut leaves a sliver beside it
    # (few-shot 4k step 399: a branch of 399 as 362 + 1 + 36, not 363 + 36)
    edge = np.flatnonzero(few[:-1] != few[1:]) + 1
    if edge.size:
        e = bounds[edge]
        j = n_end.searchsorted(e, "right")
        o = e - n_off[j]
        near = np.minimum((o + chunk_size // 2) // chunk_size * chunk_size, n_end[j] - n_off[j])
        to = n_off[j] + near
        ok = (o > 0) & (np.abs(to - e) <= chunk_size // SLIVER_DIV) & (to > bounds[edge - 1]) & (to < bounds[edge + 1])
        if ok.any():
            bounds = bounds.copy()
            bounds[edge[ok]] = to[ok]
    keep = np.ones(bounds.size, dtype=bool)
    keep[1:-1] = ~(few[:-1] & few[1:])  # merge runs of few chunks
    merged = bounds[keep]
    merged_few = few[keep[:-1]]  # a merged region is few iff its first chunk is
    first_cut = np.add.accumulate(per) - per
    nc = n_off.repeat(per) + (np.arange(int(per.sum())) - first_cut.repeat(per)) * chunk_size
    region = merged.searchsorted(nc, "right") - 1
    inside = (nc > merged[region]) & merged_few[region]
    return np.union1d(merged, nc[inside])


def _snap_to_nodes(bounds: np.ndarray, n_off: np.ndarray, n_end: np.ndarray, tol: float) -> np.ndarray:
    """Move inner cuts to the nearest node boundary within ``tol`` tokens (the lower one on a tie), in
    place; drop cuts that coincide. A cut moves by less than half a chunk, so the cuts stay sorted and
    equal ones are neighbours."""
    inner = bounds[1:-1]
    j = n_end.searchsorted(inner)  # n_off[j] < cut <= n_end[j]: inner cuts lie strictly inside (0, n_tok)
    lo = n_off[j]
    hi = n_end[j]
    d_lo = inner - lo
    d_hi = hi - inner
    # distances are integers: comparing them with int(tol) is the same test, without a float cast
    np.putmask(inner, np.minimum(d_lo, d_hi) <= int(tol), np.where(d_lo <= d_hi, lo, hi))
    keep = bounds[1:] != bounds[:-1]
    if np.count_nonzero(keep) < keep.size:
        bounds = np.append(bounds[0], bounds[1:][keep])
    return bounds


def _empty_groups(tree: DecodingTree, out_alloc) -> KVGroups:
    """A plan with no work: no queries means nothing to attend."""
    sizes = [0] * len(SECTIONS)
    sizes[SECTIONS.index("red_ptr")] = 1
    ends = np.cumsum(sizes)
    packed = np.zeros(int(ends[-1]), dtype=np.int32) if out_alloc is None else out_alloc(int(ends[-1]))
    packed[:] = 0
    offsets = {name: (int(e - s), int(e)) for name, s, e in zip(SECTIONS, sizes, ends, strict=True)}
    return KVGroups(packed, offsets, 0, 0, 0, 0, 0, 16, 0)


def small_tile_rows(group: int, block_m: int, small_m: int) -> int:
    """Rows of the kernel's small tile (``small_m`` rounded up to hold one query's heads; 16 at least), or
    ``block_m`` when there is none (``small_m`` 0, or not smaller than ``block_m``)."""
    if small_m <= 0:
        return block_m
    need = max(16, int(small_m), group)
    rows = 1 << (need - 1).bit_length()
    return rows if rows < block_m else block_m


def tile_rows(max_queries_per_chunk: int, group: int, block_m_max: int) -> int:
    """Tile rows for a plan: the smallest power of two >= 16 holding a chunk's queries, at most ``block_m_max``."""
    need = max(16, _next_pow2(max(1, max_queries_per_chunk) * group))
    return int(max(min(need, block_m_max), _next_pow2(group), 16))

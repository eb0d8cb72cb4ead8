"""PyTorch FlexAttention with the tree as a ``mask_mod`` and a block mask: how a researcher would prototype it.

Layout. K/V are indexed in place: the key sequence is the pool itself, ``k_pool[:kv_len]`` viewed as
``[1, n_kv_heads, kv_len, head_dim]`` (``kv_len`` = highest slot used + 1, or its bucket: see below), so nothing
is gathered. The mask works in DFS token coordinates: the tree's tokens in DFS order get positions ``0..T-1``, node
``v`` owns ``[start(v), start(v) + len(v))`` and its subtree ends at ``end(v)``. Query ``j`` (node ``n``,
``visible``) sees slot ``s`` iff ``pos(s) < start(n) + visible`` and ``start(n) < end(node(s))``: the second
test keeps ancestors (and the node itself) and drops earlier branches, the first drops everything after the
visible prefix (later branches, descendants, the rest of the node). Slots the tree does not own get
``pos = INT_MAX``. ``create_block_mask`` turns it into a block-sparse mask in ``plan`` (on the device; KV blocks of 128
slots, query blocks of 128, or taller for the decoding kernel: see ``q_block``); KV blocks no query sees are
skipped, fully visible blocks skip the ``mask_mod``. GQA through ``enable_gqa=True``.

Kernel choice (``force_flex_attention``). PyTorch picks its flex-decoding kernel for fewer than 128 queries,
but that kernel packs queries x group heads into one tile and, when that exceeds the mask's 128-row query
block, finds no configuration (``NoValidChoicesError``, torch 2.11). ``None`` (default) therefore keeps the
decoding kernel only where the tile fits (``n_q * group <= 128``) and otherwise forces the main flex-attention
kernel; ``False`` always decodes, with a taller query block (``q_block``): correct, but on the H100 the tall
tile spills (few-shot 4k, 50 queries: 9.4 ms against 0.43 ms for the main kernel); ``True`` never decodes.

On CUDA ``flex_attention`` runs compiled (``torch.compile``, static shapes by default: the first call of each
input shape compiles, so warm it up before timing; dynamo's recompile limit is raised so that a sweep never
drops to the eager path). Elsewhere it runs eagerly (PyTorch's dense fallback: correct, slow, small trees).

Shape buckets (``bucket=True``, default). Every input the compiled call guards on has a shape set by two
numbers, the query count and the key length, so both are padded to buckets and trees of one bucket share a
compile: queries to the next power of two (at least 16) up to 128, then to a multiple of 128 (``query_bucket``:
never an extra query block); keys to a multiple of ``2**floor(log2 kv_len) / kv_buckets_per_octave``, at least
128 (``kv_bucket``; the default 8 per octave pads less than 1/8), capped at the tree's pool (``n_slots``). The
mask tables are padded with them: padded slots belong to no node (``pos = INT_MAX``, never visible), padded
queries repeat the last query's visible range, so they fall in its query block, see only what it sees (no
fully masked row, no NaN; their outputs are dropped) and leave every block's visit and full/partial status as
it was. The block mask is built per tree at the padded sizes (its tensors' shapes depend on them only); the
``mask_mod`` is a new closure per tree, which dynamo does not recompile for (same code, tensors of the same
shapes).

IO model (the compiled kernels' tiling; assumptions stated):

- The flex-decoding kernel: one program per (KV head, split) packs all the group's query heads and all
  queries, so every KV block with a visible token is read once (whole block). The main flex-attention
  kernel runs one program per (query block, query head): each block is read once per query head and query
  block.
- ``mask``: partially visible blocks evaluate the ``mask_mod``, reading two int32 tables per key per program.
- ``meta``: block-mask indices (int32) per visited block per program, plus the per-query tables.
- ``partial`` (decoding only): ``num_sms // n_kv_heads * 2`` splits (PyTorch's heuristic, ``num_sms=132``
  assumed) each write an fp32 partial output and running max/sum per query head, read back by a reduction.
- Padding (``bucket``): KV blocks holding only padded slots are never visited, so they cost nothing; the last
  visited block is read whole (128 slots) once the padding fills it, where unpadded it stops at ``kv_len``.
  Queries: padding ``q`` is one more kernel (read ``n_q`` rows, write ``q_len``), and the kernels read
  ``q_len`` query rows and write ``q_len`` output rows (and partials); the per-query tables are ``q_len`` long.
  The decoding kernel splits the padded key length, not the visited blocks, into its splits (torch 2.11 with
  full blocks), so up to 1/8 of its splits (with 8 buckets per octave) may find no visited block: a time cost
  the IO model does not show. The main kernel walks only the visited blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from baselines.path_decode import path_slots
from deft.attention import AttentionMethod, AttentionShape, IOCounts, Plan, UnsupportedInput, check_inputs
from deft.tree import DecodingTree

BLOCK = 128
_INT_MAX = np.iinfo(np.int32).max
_compiled: dict[bool | None, Any] = {}


def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def _compiled_flex(dynamic: bool | None):
    if dynamic not in _compiled:
        # static shapes compile once per tree shape; past dynamo's default limit of 8 it would silently
        # fall back to the eager (dense) path, so a sweep over many trees raises the limit
        cfg = torch._dynamo.config
        for name, least in (("recompile_limit", 1024), ("accumulated_recompile_limit", 4096)):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), least))
        _compiled[dynamic] = torch.compile(_flex(), dynamic=dynamic)
    return _compiled[dynamic]


MIN_QUERIES = 16


def query_bucket(n_q: int) -> int:
    """Padded query count: the next power of two (at least ``MIN_QUERIES``) up to 128, then the next multiple
    of 128, the main kernel's query block (so the padding never adds a query block)."""
    if n_q <= BLOCK:
        return max(MIN_QUERIES, 1 << max(0, n_q - 1).bit_length())
    return -(-n_q // BLOCK) * BLOCK


def kv_bucket(kv_len: int, per_octave: int = 8) -> int:
    """Padded key length: a multiple of ``2**floor(log2 kv_len) / per_octave`` (a power of two) and of the 128-slot
    block: ``per_octave`` lengths per octave, padding less than ``kv_len / per_octave`` (and than one block)."""
    step = max(BLOCK, (1 << (kv_len.bit_length() - 1)) // per_octave)
    return -(-kv_len // step) * step


def q_block(n_q: int, shape: AttentionShape) -> int:
    """Query block of the block mask. The flex-decoding kernel (fewer than 128 queries) packs all queries times
    the group's heads into one tile of ``next_pow2(n_q * group)`` rows and takes only configurations whose tile
    divides the mask's query block, so that block must be at least as tall (with 128, 50 queries x 4 heads
    leave no configuration: ``NoValidChoicesError``)."""
    if n_q >= 128:
        return BLOCK
    return max(BLOCK, 1 << max(0, n_q * shape.group_size - 1).bit_length())


@dataclass(frozen=True)
class TreeMaskTables:
    """Per-slot DFS position and subtree end, per-query start and end of the visible DFS range (int32)."""

    slot_pos: np.ndarray
    slot_end: np.ndarray
    q_start: np.ndarray
    q_end: np.ndarray


def tree_mask_tables(tree: DecodingTree) -> TreeMaskTables:
    """Tables for the mask ``slot_pos[s] < q_end[j] and q_start[j] < slot_end[s]`` over slots ``0..kv_len-1``."""
    order = tree.dfs_order
    cum = np.zeros(tree.n_nodes + 1, dtype=np.int64)
    np.cumsum(tree.node_len[order], out=cum[1:])
    start = cum[tree.tin]
    end = cum[tree.tin + tree.subtree_size]
    slot, tok_node, _ = tree.token_table()
    kv_len = int(slot.max()) + 1 if slot.size else 0
    slot_pos = np.full(kv_len, _INT_MAX, dtype=np.int64)
    slot_end = np.zeros(kv_len, dtype=np.int64)
    slot_pos[slot] = np.arange(slot.size)
    slot_end[slot] = end[tok_node]
    q_start = start[tree.query_node]
    return TreeMaskTables(
        slot_pos.astype(np.int32),
        slot_end.astype(np.int32),
        q_start.astype(np.int32),
        (q_start + tree.query_visible).astype(np.int32),
    )


def pad_mask_tables(t: TreeMaskTables, q_len: int, kv_len: int) -> TreeMaskTables:
    """The tables at the padded sizes: padded slots belong to no node (never visible); padded queries repeat
    the last query's visible range."""
    slots = kv_len - t.slot_pos.size
    queries = q_len - t.q_start.size
    return TreeMaskTables(
        np.pad(t.slot_pos, (0, slots), constant_values=_INT_MAX),
        np.pad(t.slot_end, (0, slots)),
        np.pad(t.q_start, (0, queries), mode="edge"),
        np.pad(t.q_end, (0, queries), mode="edge"),
    )


def tree_mask_mod(tables: dict[str, torch.Tensor]):
    """The tree as a FlexAttention ``mask_mod`` over (query, slot) pairs."""
    slot_pos, slot_end = tables["slot_pos"], tables["slot_end"]
    q_start, q_end = tables["q_start"], tables["q_end"]

    def tree_mask(b, h, q_idx, kv_idx):
        return (slot_pos[kv_idx] < q_end[q_idx]) & (q_start[q_idx] < slot_end[kv_idx])

    return tree_mask


@dataclass(frozen=True)
class FlexAttentionPlan(Plan):
    """The block mask and the (padded) query and key lengths of the ``flex_attention`` call."""

    block_mask: Any
    q_len: int
    kv_len: int
    force: bool  # FORCE_USE_FLEX_ATTENTION: the main kernel, not flex-decoding
    compiled: bool


class FlexAttention(AttentionMethod):
    """``torch.nn.attention.flex_attention`` with the tree as a block-sparse ``mask_mod``, compiled on CUDA."""

    name = "flex_attention"

    def __init__(
        self,
        compile: bool = True,
        dynamic: bool | None = False,
        force_flex_attention: bool | None = None,
        bucket: bool = True,
        kv_buckets_per_octave: int = 8,
    ) -> None:
        if kv_buckets_per_octave < 1 or kv_buckets_per_octave & (kv_buckets_per_octave - 1):
            raise ValueError(f"kv_buckets_per_octave must be a power of two, got {kv_buckets_per_octave}")
        self.compile = compile
        self.dynamic = dynamic  # torch.compile's dynamic=; False: one compile per input shape
        # None: the flex-decoding kernel only where its tile fits PyTorch's 128-row query block
        self.force_flex_attention = force_flex_attention
        self.bucket = bucket  # pad queries and keys to shape buckets: one compile per bucket, not per tree
        self.kv_buckets_per_octave = kv_buckets_per_octave  # fewer: fewer compiles, more padded keys

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            _flex()
        except ImportError:
            return f"needs torch.nn.attention.flex_attention (torch >= 2.5; this is torch {torch.__version__})"
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "compile": self.compile,
            "dynamic": self.dynamic,
            "force_flex_attention": self.force_flex_attention,
            "bucket": self.bucket,
            "kv_buckets_per_octave": self.kv_buckets_per_octave,
            "block": BLOCK,
            "kv": "pool in place",
        }

    def _force(self, n_q: int, shape: AttentionShape) -> bool:
        if self.force_flex_attention is None:
            return n_q * shape.group_size > BLOCK
        return self.force_flex_attention

    def _decoding(self, n_q: int, shape: AttentionShape) -> bool:
        return n_q < 128 and not self._force(n_q, shape)

    def lengths(self, tree: DecodingTree) -> tuple[int, int]:
        """Query and key lengths of the ``flex_attention`` call: the tree's, or their buckets (``bucket``)."""
        n_q = tree.n_queries
        kv_len = int(tree.slots.max()) + 1 if tree.slots.size else 0
        if not self.bucket or n_q == 0 or kv_len == 0:
            return n_q, kv_len
        kv_pad = kv_bucket(kv_len, self.kv_buckets_per_octave)
        if tree.n_slots is not None:
            kv_pad = min(kv_pad, tree.n_slots)  # never past the pool the tree indexes
        return query_bucket(n_q), kv_pad

    def plan(self, tree: DecodingTree, shape: AttentionShape, device: str | torch.device = "cuda") -> FlexAttentionPlan:
        self.check_available()
        from torch.nn.attention.flex_attention import create_block_mask

        device = torch.device(device)
        q_len, kv_len = self.lengths(tree)
        if kv_len == 0 or q_len == 0:
            raise UnsupportedInput(f"{self.name}: the tree has no tokens or no queries")
        t = pad_mask_tables(tree_mask_tables(tree), q_len, kv_len)
        tables = {k: torch.from_numpy(getattr(t, k)).to(device) for k in ("slot_pos", "slot_end", "q_start", "q_end")}
        q_blk = q_block(q_len, shape) if self._decoding(q_len, shape) else BLOCK
        mask_mod = tree_mask_mod(tables)
        bm = create_block_mask(mask_mod, None, None, q_len, kv_len, device=device, BLOCK_SIZE=(q_blk, BLOCK))
        force, compiled = self._force(q_len, shape), self.compile and device.type == "cuda"
        return FlexAttentionPlan(tree.n_queries, shape, str(device), bm, q_len, kv_len, force, compiled)

    def run(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: FlexAttentionPlan) -> torch.Tensor:
        check_inputs(q, k_pool, v_pool)
        if q.shape[0] != plan.n_queries:
            raise UnsupportedInput(f"{self.name}: q has {q.shape[0]} queries, the plan was made for {plan.n_queries}")
        if k_pool.shape[0] < plan.kv_len:
            raise UnsupportedInput(
                f"{self.name}: pool has {k_pool.shape[0]} slots, the plan reads keys 0..{plan.kv_len - 1} (padded to a"
                f" bucket; a pool of the tree's n_slots, or bucket=false, fits)"
            )
        fn = _compiled_flex(self.dynamic) if plan.compiled else _flex()
        out = flex_call(fn, q, k_pool, v_pool, plan)
        return out[0, :, : plan.n_queries].transpose(0, 1)

    def io(self, tree: DecodingTree, shape: AttentionShape, num_sms: int = 132) -> IOCounts:
        n_q = tree.n_queries
        q_len, kv_len = self.lengths(tree)
        n_kv_blocks = -(-kv_len // BLOCK)
        block_len = np.minimum(BLOCK, kv_len - BLOCK * np.arange(n_kv_blocks))
        decoding = self._decoding(q_len, shape)
        programs = shape.n_kv_heads if decoding else shape.n_heads  # programs that read each visited block
        kv = mask = meta = 0
        visited_blocks = 0
        indptr, path = path_slots(tree)
        for q0 in range(0, n_q, BLOCK):  # per block of 128 queries
            rows = np.arange(q0, min(q0 + BLOCK, n_q))
            slots = path[indptr[q0] : indptr[rows[-1] + 1]]
            seen = np.bincount(slots // BLOCK, minlength=n_kv_blocks)
            hit = seen > 0
            partial_blk = hit & (seen < rows.size * block_len)
            visited_blocks += int(hit.sum())
            kv += int(block_len[hit].sum()) * shape.kv_token_bytes * (1 if decoding else shape.group_size)
            mask += int(block_len[partial_blk].sum()) * 8 * programs
        meta = visited_blocks * 4 * programs + q_len * 8
        row = shape.q_row_bytes
        pad = (n_q + q_len) * row if q_len > n_q else 0  # the padding copy of q
        if decoding:
            split = max(num_sms // shape.n_kv_heads * 2, 1)
            q_bytes = split * q_len * row  # each split's program loads the group's queries
            partial = 2 * split * q_len * shape.n_heads * (shape.head_dim + 2) * 4
        else:
            q_bytes, partial = q_len * row, 0
        return IOCounts(kv=kv, q=q_bytes + pad, o=q_len * row, partial=partial, mask=mask, meta=meta)


def flex_call(
    fn: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    plan: FlexAttentionPlan,
) -> torch.Tensor:
    """``fn`` (``flex_attention``, compiled or not) on the plan's padded inputs: ``[1, n_heads, q_len, head_dim]``,
    rows past ``n_queries`` being padding."""
    pad = plan.q_len - q.shape[0]
    qf = (torch.nn.functional.pad(q, (0, 0, 0, 0, 0, pad)) if pad else q).transpose(0, 1).unsqueeze(0)
    kf = k_pool[: plan.kv_len].transpose(0, 1).unsqueeze(0)
    vf = v_pool[: plan.kv_len].transpose(0, 1).unsqueeze(0)
    opts = {"FORCE_USE_FLEX_ATTENTION": True} if plan.force else None
    return fn(qf, kf, vf, block_mask=plan.block_mask, scale=plan.shape.sm_scale, enable_gqa=True, kernel_options=opts)

"""Tree attention with a tree mask, fused: flash-attention over the tree's token sequence, mask as bit tiles.

The sequence is the tree's seen tokens in DFS order (as in :mod:`baselines.tree_mask`); every query is
a row. Queries are sorted by (DFS entry of their node, visible) so a block of neighbouring queries
shares most of its visible tiles, and cut into blocks of ``max(1, block_m // G)`` queries; a program
serves one (query block, KV head) with the block's queries x the group's heads as tile rows (GQA
packed into rows, so each K/V tile is loaded once per block, not per head).

Mask tiles. The plan classifies every (query block, ``BLOCK_N``-token tile): *skipped* (no query of
the block sees a token of it -- never loaded), *full* (every query sees every token -- no mask load),
or *partial* (the kernel loads the block's bit-packed mask words, 32 tokens per int32, and masks the
logits). Each block walks only its listed tiles, in sequence order, with the online softmax.

IO (one layer, bytes): per (block, KV head) program: q and o rows of its queries once; K and V rows of
every listed tile's tokens; the tile's slot indices (4 B per token) and its list entry (8 B); for
partial tiles the block's mask words (``BLOCK_N / 8`` B per query); per block its query indices and
tile range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from baselines.path_decode import INTERPRET, LOG2E, check_run, check_shape, mma, next_pow2, pack_upload
from baselines.tree_mask import tree_sequence
from deft.attention import AttentionMethod, AttentionShape, IOCounts, Plan
from deft.tree import DecodingTree


@dataclass(frozen=True, eq=False)
class MaskTiles:
    """Host side of the fused plan: sorted queries, per-block tile lists, bit-packed mask words."""

    sections: dict[str, np.ndarray]
    n_tokens: int
    n_blocks: int
    queries_per_block: int
    block_rows: int
    words_per_query: int
    # for the IO model
    block_queries: np.ndarray  # valid queries per block
    tile_tokens: np.ndarray  # tokens of each listed tile
    tile_block: np.ndarray  # block of each listed tile
    tile_full: np.ndarray  # listed tile needs no mask


def mask_tiles(tree: DecodingTree, group: int, block_m: int, block_n: int) -> MaskTiles:
    """Sort queries, cut blocks, classify tiles and bit-pack the mask (vectorised numpy)."""
    slot, tok_node, pos = tree_sequence(tree)
    n_tok = slot.size
    nq = tree.n_queries
    qb = max(1, block_m // group)
    rows = max(16, next_pow2(qb * group))
    q_idx = np.lexsort((tree.query_visible, tree.tin[tree.query_node]))
    n_blocks = -(-nq // qb)
    n_tiles = -(-n_tok // block_n)
    q_pad = n_blocks * qb
    t_pad = n_tiles * block_n
    vis = np.zeros((q_pad, t_pad), dtype=bool)
    vis[:nq, :n_tok] = tree.visibility(tok_node, pos)[q_idx]

    tile_tok = np.minimum(block_n, n_tok - np.arange(n_tiles) * block_n)
    seen = vis.reshape(q_pad, n_tiles, block_n).sum(-1)  # [Q, tiles]
    seen[nq:] = tile_tok  # padded rows do not constrain "full"
    seen = seen.reshape(n_blocks, qb, n_tiles)
    real = (np.arange(q_pad) < nq).reshape(n_blocks, qb, 1)
    listed = ((seen > 0) & real).any(1)  # [blocks, tiles]
    full = (seen == tile_tok).all(1)
    t_block, t_id = np.nonzero(listed)  # block-major, tiles ascending
    tile_ptr = np.zeros(n_blocks + 1, dtype=np.int64)
    np.cumsum(listed.sum(1), out=tile_ptr[1:])
    words = np.packbits(vis, axis=1, bitorder="little").view("<i4")  # [Q_pad, t_pad / 32]
    sections = {
        "tok_slot": slot,
        "q_idx": np.concatenate([q_idx, np.zeros(q_pad - nq, dtype=np.int64)]),
        "tile_ptr": tile_ptr,
        "tile_id": t_id,
        "tile_full": full[t_block, t_id].astype(np.int64),
        "mask_words": words.reshape(-1),
    }
    return MaskTiles(
        sections=sections,
        n_tokens=n_tok,
        n_blocks=n_blocks,
        queries_per_block=qb,
        block_rows=rows,
        words_per_query=words.shape[1],
        block_queries=np.minimum(qb, nq - np.arange(n_blocks) * qb),
        tile_tokens=tile_tok[t_id],
        tile_block=t_block,
        tile_full=full[t_block, t_id],
    )


@dataclass(frozen=True, eq=False)
class FusedTreeMaskPlan(Plan):
    tensors: dict[str, torch.Tensor]
    device_tensor: torch.Tensor
    n_tokens: int
    n_blocks: int
    queries_per_block: int
    block_rows: int
    words_per_query: int
    max_slot: int


@triton.jit
def _tree_mask_fused_kernel(
    Q, K, V, Out,
    tok_slot, q_idx, tile_ptr, tile_id, tile_full, mask_words,
    n_q, n_tok, words_per_q,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    qk_scale,
    G: tl.constexpr, QB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    F32: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0)
    kvh = tl.program_id(1)
    r = tl.arange(0, BLOCK_M)
    qpos = blk * QB + r // G  # position in the sorted query order
    valid = (r < QB * G) & (qpos < n_q)
    head = kvh * G + r % G
    qrow = tl.load(q_idx + qpos, mask=valid, other=0).to(tl.int64)
    rd = tl.arange(0, D)
    q = tl.load(Q + qrow[:, None] * stride_qn + head[:, None] * stride_qh + rd[None, :], mask=valid[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    t0 = tl.load(tile_ptr + blk)
    t1 = tl.load(tile_ptr + blk + 1)
    for t in range(t0, t1):
        tile = tl.load(tile_id + t)
        full = tl.load(tile_full + t)
        offs = tile * BLOCK_N + cols
        nmask = offs < n_tok
        slot = tl.load(tok_slot + offs, mask=nmask, other=0).to(tl.int64)
        k = tl.load(K + slot[:, None] * stride_kn + kvh * stride_kh + rd[None, :], mask=nmask[:, None], other=0.0)
        s = mma(q, tl.trans(k), F32) * qk_scale
        if full != 0:
            vis = valid[:, None] & nmask[None, :]
        else:
            w = tl.load(
                mask_words + qpos[:, None].to(tl.int64) * words_per_q + tile * (BLOCK_N // 32) + (cols // 32)[None, :],
                mask=valid[:, None],
                other=0,
            )
            vis = ((w >> (cols % 32)[None, :]) & 1) != 0
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vn + kvh * stride_vh + rd[None, :], mask=nmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, F32)
        m_i = m_new
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        Out + qrow[:, None] * stride_on + head[:, None] * stride_oh + rd[None, :],
        o.to(Out.dtype.element_ty),
        mask=valid[:, None],
    )


class FusedTreeMaskAttention(AttentionMethod):
    """Fused Triton tree attention: one flash-attention pass over the DFS token sequence with mask tiles."""

    name = "tree_mask_fused"

    def __init__(self, block_m: int = 16, block_n: int = 64, num_warps: int = 4, num_stages: int = 2) -> None:
        if block_n % 32 or block_n < 32:
            raise ValueError(f"tree_mask_fused: block_n must be a multiple of 32 (mask words), got {block_n}")
        self.block_m = block_m
        self.block_n = block_n
        self.num_warps = num_warps
        self.num_stages = num_stages

    def _tiles(self, tree: DecodingTree, shape: AttentionShape) -> MaskTiles:
        return mask_tiles(tree, shape.group_size, self.block_m, self.block_n)

    def plan(self, tree: DecodingTree, shape: AttentionShape, device: str | torch.device = "cuda") -> FusedTreeMaskPlan:
        check_shape(shape, self.name)
        mt = self._tiles(tree, shape)
        t = pack_upload(mt.sections, device)
        return FusedTreeMaskPlan(
            n_queries=tree.n_queries,
            shape=shape,
            device=str(device),
            tensors=t,
            device_tensor=t["tok_slot"],
            n_tokens=mt.n_tokens,
            n_blocks=mt.n_blocks,
            queries_per_block=mt.queries_per_block,
            block_rows=mt.block_rows,
            words_per_query=mt.words_per_query,
            max_slot=int(mt.sections["tok_slot"].max()) if mt.n_tokens else -1,
        )

    def run(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: FusedTreeMaskPlan) -> torch.Tensor:
        check_run(q, k_pool, v_pool, plan, self.name)
        nq, h, d = q.shape
        kvh = k_pool.shape[1]
        out = torch.empty_like(q)
        if nq == 0:
            return out
        t = plan.tensors
        _tree_mask_fused_kernel[(plan.n_blocks, kvh)](
            q, k_pool, v_pool, out,
            t["tok_slot"], t["q_idx"], t["tile_ptr"], t["tile_id"], t["tile_full"], t["mask_words"],
            nq, plan.n_tokens, plan.words_per_query,
            q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
            out.stride(0), out.stride(1),
            (d**-0.5) * LOG2E,
            G=h // kvh, QB=plan.queries_per_block, BLOCK_M=plan.block_rows, BLOCK_N=self.block_n, D=d, F32=INTERPRET,
            num_warps=self.num_warps, num_stages=self.num_stages,
        )  # fmt: skip
        return out

    def io(self, tree: DecodingTree, shape: AttentionShape) -> IOCounts:
        mt = self._tiles(tree, shape)
        kvh = shape.n_kv_heads
        toks = int(mt.tile_tokens.sum())
        partial_q = int(mt.block_queries[mt.tile_block[~mt.tile_full]].sum())
        return IOCounts(
            kv=toks * shape.kv_token_bytes,
            q=tree.n_queries * shape.q_row_bytes,
            o=tree.n_queries * shape.q_row_bytes,
            mask=kvh * partial_q * (self.block_n // 8),
            meta=kvh * (4 * toks + 8 * mt.tile_tokens.size + 4 * tree.n_queries + 8 * mt.n_blocks),
        )

    def describe(self) -> dict[str, Any]:
        return {"block_m": self.block_m, "block_n": self.block_n, "num_warps": self.num_warps}

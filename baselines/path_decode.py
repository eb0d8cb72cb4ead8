"""Sequence-based decode attention: every query reads its own root-to-node path, gathered by slot index.

Shared by ``radix`` (SGLang's split-KV decode kernel) and ``flash_decoding`` (split-K with a
GPU-filling split size); they differ only in how a query's path is cut into work items.

A *work item* is (query, path token range ``[lo, hi)``). Stage 1 runs one program per (work item, KV
head); the program holds the KV group's query heads as the rows of its tile (GQA-aware: each K/V row is
loaded once per item, not once per query head) and walks ``BLOCK_N`` path tokens at a time, gathering
K/V rows through the flat ``kv_indices`` array (page size 1, as SGLang's token pool). An item either
writes the normalised output directly (``dst < 0``) or a partial row (fp32 output + log2-sum-exp) that
stage 2 merges: one program per (query, head) combining the query's partial rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from deft.attention import AttentionMethod, AttentionShape, IOCounts, Plan, UnsupportedInput, check_inputs, to_device
from deft.tree import DecodingTree

#: head dims the kernels take (tl.dot needs powers of two >= 16)
HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634
#: the Triton interpreter multiplies bf16 as raw uint16; under it, tile products are taken in fp32
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x - 1).bit_length())


def head_rows(group: int) -> int:
    """Tile rows for one KV group's query heads (tl.dot needs at least 16)."""
    return max(16, next_pow2(group))


def check_shape(shape: AttentionShape, method: str) -> None:
    """Reject shapes the Triton kernels cannot take, before any launch."""
    if shape.head_dim not in HEAD_DIMS:
        raise UnsupportedInput(f"{method}: head_dim {shape.head_dim} not supported; supported: {HEAD_DIMS}")
    if shape.torch_dtype not in DTYPES:
        raise UnsupportedInput(f"{method}: dtype {shape.dtype} not supported; supported: float16, bfloat16")


def path_segments(tree: DecodingTree) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every query's path as node segments, root first: (``seg_start`` into ``tree.slots``, ``seg_len``,
    ``indptr [Q+1]`` of the path tokens). One numpy pass per tree depth level, nothing per token."""
    qn = tree.query_node
    nq = qn.size
    depth = tree.depth
    qd = depth[qn]
    max_d = int(qd.max()) if nq else 0
    seg = np.full((nq, max_d + 1), -1, dtype=np.int64)
    cur = qn.copy()
    rows = np.arange(nq)
    for up in range(max_d + 1):  # per depth level, not per token
        alive = cur >= 0
        seg[rows[alive], qd[alive] - up] = cur[alive]
        cur[alive] = tree.parent[cur[alive]]
    valid = seg >= 0
    seg_node = seg[valid]  # row-major: query by query, root first
    seg_len = tree.node_len[seg_node].copy()
    last = np.cumsum(qd + 1) - 1  # each query's own node is its last segment
    seg_len[last] = tree.query_visible
    return tree.slot_ptr[seg_node], seg_len, path_indptr(tree)


def path_indptr(tree: DecodingTree) -> np.ndarray:
    """``path_slots``' ``indptr`` alone (per-query path lengths, cumulated): no per-token work."""
    indptr = np.zeros(tree.n_queries + 1, dtype=np.int64)
    np.cumsum(tree.query_path_len, out=indptr[1:])
    return indptr


def path_slots(tree: DecodingTree) -> tuple[np.ndarray, np.ndarray]:
    """CSR (``indptr [Q+1]``, ``indices``) of every query's path slots, root first (SGLang's kv_indices)."""
    seg_start, seg_len, indptr = path_segments(tree)
    return indptr, tree.slots[_expand(seg_start, seg_len, np)]


def _expand(seg_start, seg_len, xp, total: int | None = None, device=None):
    """Positions in ``tree.slots`` of all path tokens: ``seg_start[i] + 0 .. seg_len[i]-1``, concatenated.
    ``xp`` is numpy or torch (torch: on ``device``, with the known ``total`` so nothing syncs)."""
    if xp is np:
        seg_off = np.cumsum(seg_len) - seg_len
        total = int(seg_len.sum())
        return np.repeat(seg_start - seg_off, seg_len) + np.arange(total, dtype=np.int64)
    seg_off = torch.cumsum(seg_len, 0) - seg_len
    base = torch.repeat_interleave(seg_start - seg_off, seg_len, output_size=total)
    return base + torch.arange(total, dtype=torch.int64, device=device)


def device_path_slots(tree: DecodingTree, device: torch.device) -> torch.Tensor:
    """The path slots (``path_slots``' indices, int32) built on ``device``: only the per-segment arrays and
    the tree's own slot array are copied, the per-path-token expansion (Q x path tokens) runs there,
    as SGLang keeps its ``req_to_token`` table on the GPU."""
    seg_start, seg_len, _ = path_segments(tree)
    host = np.concatenate([seg_start, seg_len]).astype(np.int64)
    segs = to_device(host, device)
    slots = to_device(np.asarray(tree.slots, dtype=np.int32), device)
    n = seg_start.size
    pos = _expand(segs[:n], segs[n:], torch, tree.path_kv_tokens, device)
    return slots[pos]


def pack_upload(pieces: dict[str, np.ndarray], device: str | torch.device) -> dict[str, torch.Tensor]:
    """Concatenate int32 sections into one host array, copy it to ``device`` once, return views."""
    sizes = [int(p.size) for p in pieces.values()]
    host = np.empty(max(1, sum(sizes)), dtype=np.int32)
    off = 0
    for p, n in zip(pieces.values(), sizes, strict=True):
        host[off : off + n] = p
        off += n
    buf = to_device(host, device)
    views, off = {}, 0
    for name, n in zip(pieces, sizes, strict=True):
        views[name] = buf[off : off + n]
        off += n
    return views


@triton.jit
def mma(a, b, F32: tl.constexpr):
    """``tl.dot(a, b)`` with fp32 accumulation (operands upcast under the interpreter, see ``INTERPRET``)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _split_decode_kernel(
    Q, K, V, Out, Part, Lse,
    kv_indices, item_q, item_lo, item_hi, item_dst,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    qk_scale,
    G: tl.constexpr, H: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    F32: tl.constexpr,
):  # fmt: skip
    item = tl.program_id(0)
    kvh = tl.program_id(1)
    qi = tl.load(item_q + item)
    lo = tl.load(item_lo + item)
    hi = tl.load(item_hi + item)
    dst = tl.load(item_dst + item)
    rh = tl.arange(0, BLOCK_H)
    rd = tl.arange(0, D)
    hmask = rh < G
    heads = kvh * G + rh
    q = tl.load(Q + qi.to(tl.int64) * stride_qn + heads[:, None] * stride_qh + rd[None, :], mask=hmask[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        nmask = offs < hi
        slot = tl.load(kv_indices + offs, mask=nmask, other=0).to(tl.int64)
        k = tl.load(K + slot[:, None] * stride_kn + kvh * stride_kh + rd[None, :], mask=nmask[:, None], other=0.0)
        s = mma(q, tl.trans(k), F32) * qk_scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vn + kvh * stride_vh + rd[None, :], mask=nmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, F32)
        m_i = m_new
    o = acc / l_i[:, None]
    if dst < 0:
        tl.store(
            Out + qi.to(tl.int64) * stride_on + heads[:, None] * stride_oh + rd[None, :],
            o.to(Out.dtype.element_ty),
            mask=hmask[:, None],
        )
    else:
        prow = dst.to(tl.int64) * H + heads
        tl.store(Part + prow[:, None] * D + rd[None, :], o, mask=hmask[:, None])
        tl.store(Lse + prow, m_i + tl.log2(l_i), mask=hmask)


@triton.jit
def _merge_kernel(
    Out, Part, Lse, merge_q, merge_ptr, stride_on, stride_oh,
    H: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    mq = tl.program_id(0)
    h = tl.program_id(1)
    qi = tl.load(merge_q + mq)
    p0 = tl.load(merge_ptr + mq)
    p1 = tl.load(merge_ptr + mq + 1)
    rd = tl.arange(0, D)
    m = float("-inf")
    lsum = 0.0
    acc = tl.zeros([D], tl.float32)
    for p in range(p0, p1):
        row = (p * H + h).to(tl.int64)
        lse = tl.load(Lse + row)
        o = tl.load(Part + row * D + rd)
        m_new = tl.maximum(m, lse)
        a = tl.exp2(m - m_new)
        b = tl.exp2(lse - m_new)
        acc = acc * a + o * b
        lsum = lsum * a + b
        m = m_new
    tl.store(Out + qi.to(tl.int64) * stride_on + h * stride_oh + rd, (acc / lsum).to(Out.dtype.element_ty))


def split_items(path_len: np.ndarray, n_splits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut query ``j``'s path into ``n_splits[j]`` pieces of ``ceil(len / n_splits)`` tokens (last shorter).

    Returns (item query, item lo, item hi) in path-local token offsets, empty pieces dropped.
    """
    nq = path_len.size
    per = -(-path_len // n_splits)
    cnt = -(-path_len // per)  # non-empty pieces
    iq = np.repeat(np.arange(nq, dtype=np.int64), cnt)
    k = np.arange(int(cnt.sum()), dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    lo = k * per[iq]
    hi = np.minimum(lo + per[iq], path_len[iq])
    return iq, lo, hi


def item_sections(
    tree: DecodingTree, iq: np.ndarray, lo: np.ndarray, hi: np.ndarray, merged: np.ndarray, host_indices: bool = True
) -> dict[str, np.ndarray]:
    """Host arrays of a split plan. ``merged[j]``: query ``j`` goes through partial rows and stage 2.
    ``host_indices=False`` leaves out ``kv_indices`` (built on the device instead)."""
    if host_indices:
        indptr, indices = path_slots(tree)
    else:
        indptr = np.zeros(tree.n_queries + 1, dtype=np.int64)
        np.cumsum(tree.query_path_len, out=indptr[1:])
    item_merged = merged[iq]
    dst = np.full(iq.size, -1, dtype=np.int64)
    dst[item_merged] = np.arange(int(item_merged.sum()))
    mq = np.flatnonzero(merged)
    per_q = np.bincount(iq[item_merged], minlength=tree.n_queries)[mq]
    mptr = np.zeros(mq.size + 1, dtype=np.int64)
    np.cumsum(per_q, out=mptr[1:])
    base = indptr[iq]
    return {
        **({"kv_indices": indices} if host_indices else {}),
        "item_q": iq,
        "item_lo": base + lo,
        "item_hi": base + hi,
        "item_dst": dst,
        "merge_q": mq,
        "merge_ptr": mptr,
    }


def split_io(tree: DecodingTree, shape: AttentionShape, iq: np.ndarray, merged: np.ndarray) -> IOCounts:
    """HBM bytes of the two kernels for a given cut (every path token read once per KV head by one item).

    kv: each item's program loads its tokens' K and V rows for its KV head (masked tail lanes move
    nothing) -> path tokens x K/V bytes per token. q: each item loads its query's heads. partial: every
    merged item writes ``H x (D + 1)`` fp32 (output + lse) and stage 2 reads them back. meta: slot
    indices (4 B per path token per KV head) plus 16 B per item per KV head, and stage 2's 12 B per query.
    """
    e = shape.elem_bytes
    kvh = shape.n_kv_heads
    n_items = int(iq.size)
    n_merged_items = int(merged[iq].sum())
    n_merged_q = int(merged.sum())
    part_row = shape.n_heads * (shape.head_dim + 1) * 4
    return IOCounts(
        kv=tree.path_kv_tokens * shape.kv_token_bytes,
        q=n_items * shape.n_heads * shape.head_dim * e,
        o=tree.n_queries * shape.q_row_bytes,
        partial=2 * n_merged_items * part_row,
        meta=kvh * (4 * tree.path_kv_tokens + 16 * n_items) + shape.n_heads * 12 * n_merged_q,
    )

@dataclass(frozen=True, eq=False)
class SplitPlan(Plan):
    """Work items and merge lists of a sequence-based split decode, on the device."""

    tensors: dict[str, torch.Tensor]
    device_tensor: torch.Tensor
    n_items: int
    n_merged_items: int
    n_merged_q: int
    max_slot: int


def make_split_plan(
    tree: DecodingTree, shape: AttentionShape, device, iq: np.ndarray, lo: np.ndarray, hi: np.ndarray, merged: np.ndarray
) -> SplitPlan:
    """Pack the host arrays of a cut, upload them in one copy; on a GPU the per-path-token slot list is
    expanded there from per-segment arrays (see :func:`device_path_slots`)."""
    on_gpu = torch.device(device).type == "cuda"
    sec = item_sections(tree, iq, lo, hi, merged, host_indices=not on_gpu)
    t = pack_upload(sec, device)
    if on_gpu:
        t["kv_indices"] = device_path_slots(tree, torch.device(device))
    return SplitPlan(
        n_queries=tree.n_queries,
        shape=shape,
        device=str(device),
        tensors=t,
        device_tensor=t["item_q"],
        n_items=int(iq.size),
        n_merged_items=int(merged[iq].sum()),
        n_merged_q=int(merged.sum()),
        max_slot=int(tree.slots.max()) if tree.slots.size else -1,
    )


def check_run(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan, method: str) -> None:
    """Host-only checks (no device sync) that q and the pools fit the plan."""
    check_inputs(q, k_pool, v_pool, head_dims=HEAD_DIMS, dtypes=DTYPES)
    s = plan.shape
    if q.shape[0] != plan.n_queries:
        raise UnsupportedInput(f"{method}: q has {q.shape[0]} queries, the plan was made for {plan.n_queries}")
    if (q.shape[1], k_pool.shape[1], q.shape[2]) != (s.n_heads, s.n_kv_heads, s.head_dim):
        raise UnsupportedInput(
            f"{method}: q/pool heads {q.shape[1]}/{k_pool.shape[1]}, head_dim {q.shape[2]} differ from the plan's "
            f"{s.n_heads}/{s.n_kv_heads}/{s.head_dim}"
        )
    if plan.max_slot >= k_pool.shape[0]:
        raise UnsupportedInput(f"{method}: the tree uses slot {plan.max_slot} but the pool has {k_pool.shape[0]} slots")
    if q.device != plan.device_tensor.device:
        raise UnsupportedInput(f"{method}: q is on {q.device}, the plan on {plan.device_tensor.device}")
    if q.stride(2) != 1 or k_pool.stride(2) != 1 or v_pool.stride(2) != 1:
        raise UnsupportedInput(f"{method}: q and the pools need a contiguous head_dim")


def launch_split_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    t: dict[str, torch.Tensor],
    n_items: int,
    n_merged_items: int,
    n_merged_q: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    """Stage 1 over all work items, then stage 2 over the merged queries (skipped when there are none)."""
    nq, h, d = q.shape
    g = h // k_pool.shape[1]
    out = torch.empty_like(q)
    part = torch.empty((max(1, n_merged_items), h, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((max(1, n_merged_items), h), dtype=torch.float32, device=q.device)
    if n_items:
        _split_decode_kernel[(n_items, k_pool.shape[1])](
            q, k_pool, v_pool, out, part, lse,
            t["kv_indices"], t["item_q"], t["item_lo"], t["item_hi"], t["item_dst"],
            q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
            out.stride(0), out.stride(1),
            (d**-0.5) * LOG2E,
            G=g, H=h, BLOCK_H=head_rows(g), BLOCK_N=block_n, D=d, F32=INTERPRET,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    if n_merged_q:
        _merge_kernel[(n_merged_q, h)](
            out, part, lse, t["merge_q"], t["merge_ptr"], out.stride(0), out.stride(1), H=h, D=d, num_warps=1
        )
    return out


class SplitDecodeMethod(AttentionMethod):
    """A sequence-based method run by the split-decode kernels: subclasses choose the cut (``_cut``:
    item query, path-local lo and hi, and which queries merge) and the tile settings (``block_n``,
    ``num_warps``, ``num_stages``); plan, run and io follow from it."""

    block_n: int
    num_warps: int
    num_stages: int

    def _cut(self, tree: DecodingTree, shape: AttentionShape) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def plan(self, tree: DecodingTree, shape: AttentionShape, device: str | torch.device = "cuda") -> SplitPlan:
        check_shape(shape, self.name)
        return make_split_plan(tree, shape, device, *self._cut(tree, shape))

    def run(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: SplitPlan) -> torch.Tensor:
        check_run(q, k_pool, v_pool, plan, self.name)
        return launch_split_decode(
            q, k_pool, v_pool, plan.tensors, plan.n_items, plan.n_merged_items, plan.n_merged_q,
            self.block_n, self.num_warps, self.num_stages,
        )  # fmt: skip

    def io(self, tree: DecodingTree, shape: AttentionShape) -> IOCounts:
        iq, _, _, merged = self._cut(tree, shape)
        return split_io(tree, shape, iq, np.asarray(merged))

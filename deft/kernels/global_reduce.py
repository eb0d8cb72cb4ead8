"""Tree-topology-aware global reduction: merge each query's partials from every chunk on its path.

The plan lists, per query, the partial rows its chunks wrote (CSR ``red_ptr``/``red_idx``); one program
per (query, head) loads up to ``BLOCK_P`` of them at once (no serial dependency between loads), weights
them by ``exp2(lse - max)`` and writes the final row in the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["off_red_ptr", "off_red_idx", "off_queries"])
def global_reduce_kernel(
    out_ptr,
    part_o,
    part_lse,
    meta,
    off_red_ptr,
    off_red_idx,
    off_queries,
    stride_on,
    stride_oh,
    stride_pn,
    stride_ph,
    stride_ln,
    BLOCK_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    s = tl.program_id(0)
    h = tl.program_id(1)
    red_idx = meta + off_red_idx
    lo = tl.load(meta + off_red_ptr + s)
    hi = tl.load(meta + off_red_ptr + s + 1)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([1], -1.0e30, dtype=tl.float32)
    l_sum = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_P):
        j = j0 + offs_p
        ok = j < hi
        prow = tl.load(red_idx + j, mask=ok, other=0).to(tl.int64)
        lse = tl.load(part_lse + prow * stride_ln + h, mask=ok, other=float("-inf"))
        o = tl.load(part_o + prow[:, None] * stride_pn + h * stride_ph + offs_d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        w = tl.exp2(lse - m_new)
        alpha = tl.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(o.to(tl.float32) * w[:, None], 0)
        m = m_new
    qid = tl.load(meta + off_queries + s * 3).to(tl.int64)
    tl.store(out_ptr + qid * stride_on + h * stride_oh + offs_d, (acc / l_sum).to(out_ptr.dtype.element_ty))


def launch_reduce(
    out: torch.Tensor,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    meta: torch.Tensor,
    offsets: dict[str, tuple[int, int]],
    block_p: int,
    warmup: bool = False,
) -> None:
    """One program per (query, query head) merges the query's partial rows. ``warmup``: compile only."""
    n_q, n_heads, d = out.shape
    args = (
        out, part_o, part_lse, meta, offsets["red_ptr"][0], offsets["red_idx"][0], offsets["queries"][0],
        out.stride(0), out.stride(1), part_o.stride(0), part_o.stride(1), part_lse.stride(0),
    )  # fmt: skip
    consts = dict(BLOCK_P=block_p, HEAD_DIM=d, num_warps=4 if d >= 128 else 2)
    if warmup:
        global_reduce_kernel.warmup(*args, grid=(max(n_q, 1), n_heads), **consts)
    else:
        global_reduce_kernel[(n_q, n_heads)](*args, **consts)

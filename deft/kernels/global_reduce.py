"""Tree-topology-aware global reduction: merge each query's partials from every chunk on its path.

The plan lists, per query, the partial rows its chunks wrote (CSR ``red_ptr``/``red_idx``); one program per
(query, group of ``HEADS`` query heads) loads up to ``BLOCK_P`` of them at once (no serial dependency between
loads), weights them by ``exp2(lse - max)`` and writes the final rows in the output dtype. A group's heads are
adjacent in the partial rows, so one program reads a contiguous ``HEADS x head_dim`` span per partial row.

With ``PDL`` (Hopper and later) the kernel is launched as a programmatic dependent of the partial kernel,
which lets it go as soon as every partial program has started: its programs load their lists and query
index (plan data, not written by the partial kernel) while the last partial programs still run, then wait
(``griddepcontrol.wait``: the partial kernel has finished and its stores are visible) before reading a
partial row. That hides the second launch's latency and the list loads behind the partial kernel's tail.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

#: most elements of partial output one program loads at once (BLOCK_P x HEADS x head_dim): 32 per thread with 4
#: warps. At 8192 the kernel took 196-255 registers (sm_90, ptxas), two or three programs per SM.
MAX_TILE = 4096


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
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PDL: tl.constexpr,
):
    s = tl.program_id(0)
    h0 = tl.program_id(1) * HEADS
    red_idx = meta + off_red_idx
    lo = tl.load(meta + off_red_ptr + s)
    hi = tl.load(meta + off_red_ptr + s + 1)
    qid = tl.load(meta + off_queries + s * 3).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    offs_h = h0 + tl.arange(0, HEADS)
    offs_d = tl.arange(0, HEAD_DIM)
    j = lo + offs_p
    prow = tl.load(red_idx + j, mask=j < hi, other=0).to(tl.int64)  # the first block's rows, before the wait
    if PDL:
        tl.extra.cuda.gdc_wait()  # the partial kernel is done and its stores are visible
    m = tl.full([HEADS], -1.0e30, dtype=tl.float32)
    l_sum = tl.zeros([HEADS], dtype=tl.float32)
    acc = tl.zeros([HEADS, HEAD_DIM], dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_P):
        ok = j0 + offs_p < hi
        lse = tl.load(part_lse + prow[:, None] * stride_ln + offs_h[None, :], mask=ok[:, None], other=float("-inf"))
        o = tl.load(
            part_o + prow[:, None, None] * stride_pn + offs_h[None, :, None] * stride_ph + offs_d[None, None, :],
            mask=ok[:, None, None],
            other=0.0,
        )
        j = j0 + BLOCK_P + offs_p  # the next block's rows (most queries have one block)
        prow = tl.load(red_idx + j, mask=j < hi, other=0).to(tl.int64)
        m, l_sum, acc = merge_partials(m, l_sum, acc, lse, o)
    out = out_ptr + qid * stride_on + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(out, (acc / l_sum[:, None]).to(out_ptr.dtype.element_ty))


@triton.jit
def merge_partials(m, l_sum, acc, lse, o):
    """One online-softmax merge step: the running max ``m``, sum ``l_sum`` ([heads]) and weighted output ``acc``
    ([heads, head_dim]) with a block of partial rows (``lse`` [rows, heads] in the log2 domain, ``o`` [rows, heads,
    head_dim] normalised). Shared by the reduction and ``branch_heads``' merge."""
    m_new = tl.maximum(m, tl.max(lse, 0))
    w = tl.exp2(lse - m_new[None, :])
    alpha = tl.exp2(m - m_new)
    l_sum = l_sum * alpha + tl.sum(w, 0)
    acc = acc * alpha[:, None] + tl.sum(o.to(tl.float32) * w[:, :, None], 0)
    return m_new, l_sum, acc


def reduce_heads(n_heads: int, head_dim: int, block_p: int, heads: int = 0) -> int:
    """Query heads per reduction program: ``heads`` if given (it must divide ``n_heads``), else the most (a power
    of two dividing ``n_heads``) whose ``block_p x heads x head_dim`` tile stays within :data:`MAX_TILE`."""
    if heads:
        if n_heads % heads:
            raise ValueError(f"reduce_heads {heads} must divide the {n_heads} query heads")
        return heads
    h = 1
    while n_heads % (2 * h) == 0 and block_p * 2 * h * head_dim <= MAX_TILE:
        h *= 2
    return h


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch needs a Hopper-or-later GPU (not the interpreter). Cached: asked once per plan."""
    return (
        device.type == "cuda"
        and os.environ.get("TRITON_INTERPRET") != "1"
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


def launch_reduce(
    out: torch.Tensor,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    meta: torch.Tensor,
    offsets: dict[str, tuple[int, int]],
    block_p: int,
    warmup: bool = False,
    heads: int = 1,
    pdl: bool = False,
    num_warps: int = 0,
) -> None:
    """One program per (query, ``heads`` query heads) merges the query's partial rows. ``pdl``: launch as a
    programmatic dependent of the kernel before it on the stream (Hopper; the partial kernel triggers it early,
    see the module docstring). ``num_warps``: 0 picks by tile size. ``warmup``: compile only."""
    n_q, n_heads, d = out.shape
    if n_heads % heads:
        raise ValueError(f"heads {heads} must divide the {n_heads} query heads")
    args = (
        out, part_o, part_lse, meta, offsets["red_ptr"][0], offsets["red_idx"][0], offsets["queries"][0],
        out.stride(0), out.stride(1), part_o.stride(0), part_o.stride(1), part_lse.stride(0),
    )  # fmt: skip
    # one warp for tiles up to 4096 elements: H100, the reduction alone at few-shot 16k step 200 (50 queries x 32
    # heads, 16 partials wide) 6.4 us with L2 warm against 7.7 with 2 warps and 13.9 with 4 (scripts/reduce_probe.py);
    # 64-260 registers at head_dim 128 (sm_90, no spills); two warps at 8192 (one spills)
    warps = num_warps or max(1, min(8, block_p * heads * d // 4096))
    consts = dict(BLOCK_P=block_p, HEADS=heads, HEAD_DIM=d, PDL=bool(pdl), num_warps=warps)
    if pdl:
        consts["launch_pdl"] = True
    grid = (n_q, n_heads // heads)
    if warmup:
        global_reduce_kernel.warmup(*args, grid=(max(n_q, 1), grid[1]), **consts)
    else:
        global_reduce_kernel[grid](*args, **consts)

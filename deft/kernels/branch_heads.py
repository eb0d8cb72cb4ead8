"""The branches' kernel: one program per (small unmasked tile, block of KV heads), every head of the block at once.

In a few-shot or speculative step past the first, what the shared prompt's kernel leaves is one small tile per branch
node: a query or two (``n_q x group`` rows per KV head, at most the small tile's 16) over the node's gathered tokens,
seen whole. The fused kernel runs such a tile as ``n_kv`` programs, one per KV head, each gathering 256 bytes per
token (head_dim 128, bf16) and making one dependent HBM round trip per K/V block; the programs are short and
latency-bound (session 18: 13 µs for 200 tokens, 0.98 TB/s on the SMs the prompt leaves). Here one program loads a
token's K and V rows for ``BLOCK_H`` heads at once (2 KB each for Llama-3-8B's 8 KV heads: the whole row of the
pool), so each round trip moves ``BLOCK_H`` times the bytes, the slot indices are loaded once for all heads, and the
launch has ``BLOCK_H`` times fewer programs. The scores and the P·V product are batched ``tl.dot`` over the heads
(``[heads, rows, head_dim] x [heads, head_dim, tokens]``); the partials go where the fused kernel's would, so the
reduction is the same.

With ``MERGE`` (``DeftAttention.branch_merge``) a program whose tile is the only one after the prompt kernel's for its
queries does the global reduction of its queries (for its block of heads) itself: it stores its partial rows as
without, waits until the prompt kernel has counted every one of its warpgroups done (``sync[0]``, raised with release
semantics after their partial stores: :func:`~deft.kernels.prompt_gluon.prompt_partial_kernel`'s ``SIGNAL``), merges
each of its queries' partial rows (:data:`MERGE_ROWS` at a time, every head of its block at once) and writes the final
rows, so the step has no reduction launch. The last program past the wait (``sync[1]``) sets both words back to zero
for the next step; a wait that gives up (:data:`WAIT_LIMIT` polls) raises ``sync[2]``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from deft.kernels.global_reduce import merge_partials
from deft.kernels.tree_attention import LOG2E, _dot_f32, _globaltimer, _write_timeline

#: fp32 accumulator elements a program holds (heads x rows x head_dim): 8 heads x 16 rows x 128 at 8 warps is 64 per
#: thread, as the fused kernel's 64-row tile at 4 warps
ACC_ELEMS = 16384
#: polls of the prompt kernel's count before a merging program gives up and raises the error word (``sync[2]``); each
#: poll is an L2 round trip (about half a microsecond), so this is about two seconds, far beyond any step
WAIT_LIMIT = tl.constexpr(1 << 22)
#: partial rows a merging program loads per iteration (all its query heads x head_dim each)
MERGE_ROWS = 1


@triton.jit(
    do_not_specialize=["off_tok_slot", "off_queries", "off_progs", "off_red_ptr", "off_red_idx", "sync_target", "n_programs"],
    do_not_specialize_on_alignment=["meta"],
)
def branch_heads_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    part_o,
    part_lse,
    meta,
    off_tok_slot,
    off_queries,
    off_progs,
    out_ptr,
    sync,
    off_red_ptr,
    off_red_idx,
    sync_target,
    n_programs,
    stride_on,
    stride_oh,
    stride_qn,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_pn,
    stride_ph,
    stride_ln,
    qk_scale,
    timeline,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    N_KV: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
    DOT_F32: tl.constexpr,
    SPREAD: tl.constexpr,
    TIMELINE: tl.constexpr,
    MERGE: tl.constexpr = False,
    MERGE_H: tl.constexpr = 1,
    MERGE_P: tl.constexpr = 1,
):
    """Partial attention of small unmasked tiles for KV heads ``[program_id(1) x BLOCK_H, + BLOCK_H)``: tile record
    ``program_id(0)`` of ``meta``, or with ``SPREAD`` the records ``[progs[p], progs[p + 1])`` of the plan's ``progs``
    section (:func:`~deft.kernels.kv_groups.spread_rest_tiles`), one after the other. ``MERGE`` (one tile per
    program): the tile's rows merged with the prompt kernel's partials into ``out`` instead (module docstring)."""
    tl.static_assert(not (MERGE and SPREAD), "MERGE runs one tile per program")
    if TIMELINE:  # diagnostics only: start, end (global ns) and SM at 4 int64 per program
        t_start = _globaltimer(q_ptr)
    if SPREAD:
        r_lo = tl.load(meta + off_progs + tl.program_id(0))
        r_hi = tl.load(meta + off_progs + tl.program_id(0) + 1)
        for tile in range(r_lo, r_hi):
            _branch_tile(
                q_ptr, k_ptr, v_ptr, part_o, part_lse, meta, off_tok_slot, off_queries, stride_qn, stride_qh,
                stride_ks, stride_kh, stride_vs, stride_vh, stride_pn, stride_ph, stride_ln, qk_scale, tile,
                out_ptr, sync, off_red_ptr, off_red_idx, sync_target, n_programs, stride_on, stride_oh,
                GROUP, ROWS, N_KV, BLOCK_H, HEAD_DIM, BLOCK_N, STAGES, DOT_F32, False, MERGE_H, MERGE_P, timeline, False,
            )  # fmt: skip
    else:
        _branch_tile(
            q_ptr, k_ptr, v_ptr, part_o, part_lse, meta, off_tok_slot, off_queries, stride_qn, stride_qh,
            stride_ks, stride_kh, stride_vs, stride_vh, stride_pn, stride_ph, stride_ln, qk_scale, tl.program_id(0),
            out_ptr, sync, off_red_ptr, off_red_idx, sync_target, n_programs, stride_on, stride_oh,
            GROUP, ROWS, N_KV, BLOCK_H, HEAD_DIM, BLOCK_N, STAGES, DOT_F32, MERGE, MERGE_H, MERGE_P, timeline, TIMELINE,
        )  # fmt: skip
    if TIMELINE:
        _write_timeline(timeline, t_start, q_ptr)


@triton.jit
def _branch_tile(
    q_ptr, k_ptr, v_ptr, part_o, part_lse, meta, off_tok_slot, off_queries, stride_qn, stride_qh,
    stride_ks, stride_kh, stride_vs, stride_vh, stride_pn, stride_ph, stride_ln, qk_scale, tile,
    out_ptr, sync, off_red_ptr, off_red_idx, sync_target, n_programs, stride_on, stride_oh,
    GROUP: tl.constexpr, ROWS: tl.constexpr, N_KV: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, STAGES: tl.constexpr, DOT_F32: tl.constexpr, MERGE: tl.constexpr,
    MERGE_H: tl.constexpr, MERGE_P: tl.constexpr, timeline, TIMELINE: tl.constexpr,
):  # fmt: skip
    """One tile record's partials for this program's block of KV heads: rows are (local query, query head of the KV
    head), ``ROWS`` per KV head; the record's tokens are seen whole by its queries (no visibility test)."""
    rec = meta + tile * 6
    t_lo = tl.load(rec)
    t_hi = tl.load(rec + 1)
    q_lo = tl.load(rec + 2)
    n_q = tl.load(rec + 3) - q_lo
    pbase = tl.load(rec + 4)

    kvh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None, None]  # [H, 1, 1]
    r = tl.arange(0, ROWS)[None, :, None]  # [1, R, 1]
    offs_d = tl.arange(0, HEAD_DIM)[None, None, :]  # [1, 1, D]
    lq = r // GROUP
    head = kvh * GROUP + r % GROUP  # [H, R, 1]
    row_ok = (lq < n_q) & (kvh < N_KV)  # [H, R, 1]
    qid = tl.load(meta + off_queries + (q_lo + lq) * 3, mask=lq < n_q, other=0).to(tl.int64)  # [1, R, 1]
    q = tl.load(q_ptr + qid * stride_qn + head * stride_qh + offs_d, mask=row_ok, other=0.0)  # [H, R, D]
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh + offs_d  # [H, 1, D]
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh + offs_d
    h_ok = kvh < N_KV
    acc = tl.zeros([BLOCK_H, ROWS, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_H, ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H, ROWS], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    tok_slot = meta + off_tok_slot
    for start in tl.range(t_lo, t_hi, BLOCK_N, num_stages=STAGES):
        t = start + offs_n
        valid = t < t_hi
        slot = tl.load(tok_slot + t, mask=valid, other=0).to(tl.int64)[None, :, None]  # [1, N, 1]
        ok = valid[None, :, None] & h_ok
        k = tl.load(k_base + slot * stride_ks, mask=ok, other=0.0)  # [H, N, D]
        v = tl.load(v_base + slot * stride_vs, mask=ok, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.permute(k, (0, 2, 1)))  # [H, R, N]; the scale is folded into the exponent below
        s = tl.where(valid[None, None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 2) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, :, None])
        l_i = l_i * alpha + tl.sum(p, 2)
        acc = acc * alpha[:, :, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    prow = (pbase + lq).to(tl.int64)  # [1, R, 1]
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, :, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(part_o + prow * stride_pn + head * stride_ph + offs_d, o.to(part_o.dtype.element_ty), mask=row_ok)
    lrow = tl.reshape(prow, [1, ROWS])
    lhead = tl.reshape(head, [BLOCK_H, ROWS])
    tl.store(part_lse + lrow * stride_ln + lhead, lse, mask=tl.reshape(row_ok, [BLOCK_H, ROWS]))
    if MERGE:  # the reduction of this tile's queries, for this program's heads, once the prompt's partials are stored
        offs_p = tl.arange(0, MERGE_P)  # partial rows merged at once
        hb = tl.arange(0, MERGE_H)  # this program's query heads (a power of two at least)
        heads = tl.program_id(1) * BLOCK_H * GROUP + hb
        h_ok = (hb < BLOCK_H * GROUP) & (heads < N_KV * GROUP)
        d1 = tl.arange(0, HEAD_DIM)
        tl.debug_barrier()  # this program's own partial rows, stored above by all its threads, are read below
        lo = tl.load(meta + off_red_ptr + q_lo)
        hi = tl.load(meta + off_red_ptr + q_lo + 1)
        rows = tl.load(meta + off_red_idx + lo + offs_p, mask=lo + offs_p < hi, other=0).to(tl.int64)
        _wait_prompt(sync, sync_target, n_programs)
        if TIMELINE:  # diagnostics: when the wait ended, in the program's fourth timeline word
            pid = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * 4
            tl.store(timeline + pid + 3, _globaltimer(q_ptr))
        for lq1 in range(0, n_q):  # one query in a few-shot branch's tile
            if lq1 > 0:
                lo = tl.load(meta + off_red_ptr + q_lo + lq1)
                hi = tl.load(meta + off_red_ptr + q_lo + lq1 + 1)
                rows = tl.load(meta + off_red_idx + lo + offs_p, mask=lo + offs_p < hi, other=0).to(tl.int64)
            m = tl.full([MERGE_H], -1.0e30, dtype=tl.float32)
            l_sum = tl.zeros([MERGE_H], dtype=tl.float32)
            acc2 = tl.zeros([MERGE_H, HEAD_DIM], dtype=tl.float32)
            for j0 in range(lo, hi, MERGE_P):
                ok = (j0 + offs_p < hi)[:, None] & h_ok[None, :]  # [MP, NH]
                lse_p = tl.load(part_lse + rows[:, None] * stride_ln + heads[None, :], mask=ok, other=float("-inf"),
                                cache_modifier=".cg")  # fmt: skip
                o_p = tl.load(part_o + rows[:, None, None] * stride_pn + heads[None, :, None] * stride_ph
                              + d1[None, None, :], mask=ok[:, :, None], other=0.0, cache_modifier=".cg")  # fmt: skip
                j = j0 + MERGE_P + offs_p  # the next block's rows (a few-shot branch's query has one or two blocks)
                rows = tl.load(meta + off_red_idx + j, mask=j < hi, other=0).to(tl.int64)
                m, l_sum, acc2 = merge_partials(m, l_sum, acc2, lse_p, o_p)
            qid1 = tl.load(meta + off_queries + (q_lo + lq1) * 3).to(tl.int64)
            dst = out_ptr + qid1 * stride_on + heads[:, None] * stride_oh + d1[None, :]
            tl.store(dst, (acc2 / tl.where(l_sum > 0.0, l_sum, 1.0)[:, None]).to(out_ptr.dtype.element_ty),
                     mask=h_ok[:, None])  # fmt: skip


@triton.jit
def _wait_prompt(sync, target, n_programs):
    """Wait until ``sync[0]`` (the prompt kernel's warpgroups done, each counted after its partial stores with release
    semantics) reaches ``target``; acquire, so this program's loads after it see those stores. The last of the
    ``n_programs`` merging programs to get past it zeroes ``sync[0]`` and ``sync[1]`` for the next step. Gives up after
    :data:`WAIT_LIMIT` polls, raising ``sync[2]`` (a plan whose prompt never signals: a bug, reported, not a hang)."""
    seen = tl.load(sync, volatile=True)
    polls = 0
    while (seen < target) & (polls < WAIT_LIMIT):  # plain (volatile) loads while waiting: lighter on L2 than atomics
        seen = tl.load(sync, volatile=True)
        polls += 1
    seen = tl.atomic_add(sync, 0, sem="acquire", scope="gpu")  # then one acquire, for the loads after it
    if seen < target:
        tl.atomic_add(sync + 2, 1, sem="relaxed", scope="gpu")
    if tl.atomic_add(sync + 1, 1, sem="acq_rel", scope="gpu") == n_programs - 1:
        tl.atomic_xchg(sync, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sync + 1, 0, sem="relaxed", scope="gpu")


def heads_per_program(n_kv: int, rows: int, head_dim: int, most: int = 0) -> int:
    """KV heads one program runs: all of them (a power of two at least) while the accumulator stays within
    :data:`ACC_ELEMS` (8 at head_dim 128 and 16 rows, 16 at 64), and at most ``most`` (a power of two; 0: no cap)."""
    h = max(1, min(triton.next_power_of_2(n_kv), ACC_ELEMS // (rows * head_dim)))
    return min(h, most) if most > 0 else h


def launch_branch_heads(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    meta: torch.Tensor,
    offsets: dict[str, tuple[int, int]],
    n_tiles: int,
    rows: int,
    n_programs: int = 0,
    block_n: int = 16,
    stages: int = 3,
    num_warps: int = 8,
    timeline: torch.Tensor | None = None,
    warmup: bool = False,
    launch_pdl: bool = False,
    merge: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    block_h: int = 0,
    maxnreg: int = 0,
):
    """Launch one program per (tile record of ``meta``, block of KV heads) over ``n_tiles`` records, every one of them
    unmasked with at most ``rows`` rows per KV head (the plan checks: ``kv_groups.rest_small_unmasked``); with
    ``n_programs`` > 0, that many programs per block of heads, each over its run of records in ``offsets["progs"]``
    (:func:`~deft.kernels.kv_groups.spread_rest_tiles`; ``n_tiles`` is then unused). ``block_n``
    tokens per K/V block, the loop pipelined ``stages`` deep. ``timeline`` (diagnostics, GPU only): int64, 4 per
    program, as :func:`~deft.kernels.tree_attention.launch_partials`'. ``warmup``: compile without running. ``launch_pdl``:
    a programmatic dependent of the kernel before it on the stream (its programs read nothing that kernel writes, or
    with ``merge`` only after its count). ``merge`` = (``out``, ``sync``, target): one program per tile (no ``n_programs``),
    each the only one after the prompt kernel's for its queries, merges its rows with the other partial rows of its
    queries (the prompt kernel's, stored once ``sync[0]`` reaches target) into ``out`` (module docstring); ``sync``: three
    int32 words, zero before the launch, zero after it. ``block_h``: at most that many KV heads per program (0: as many
    as :func:`heads_per_program` allows). ``maxnreg``: registers per thread the compiler may use (0: its choice; 128 at 8
    warps lets two programs share an SM's registers). Returns the compiled kernel."""
    n_kv, d = k_pool.shape[1], k_pool.shape[2]
    if rows < 16 or rows & (rows - 1):
        raise ValueError(f"rows must be a power of two of at least 16 (tl.dot), got {rows}")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two of at least 16 (tl.dot), got {block_n}")
    if merge is not None and n_programs > 0:
        raise ValueError("merge runs one program per tile (n_programs must be 0)")
    block_h = heads_per_program(n_kv, rows, d, block_h)
    grid = (n_programs if n_programs > 0 else n_tiles, triton.cdiv(n_kv, block_h))
    out, sync, target = merge if merge is not None else (q, part_lse, 0)
    args = (
        q, k_pool, v_pool, part_o, part_lse, meta, offsets["tok_slot"][0], offsets["queries"][0],
        offsets["progs"][0] if n_programs > 0 else 0, out, sync, offsets["red_ptr"][0], offsets["red_idx"][0], target,
        grid[0] * grid[1], out.stride(0), out.stride(1), q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
        v_pool.stride(0), v_pool.stride(1),
        part_o.stride(0), part_o.stride(1), part_lse.stride(0), LOG2E / math.sqrt(d),
        part_lse if timeline is None else timeline,
    )  # fmt: skip
    consts = dict(
        GROUP=q.shape[1] // n_kv, ROWS=rows, N_KV=n_kv, BLOCK_H=block_h, HEAD_DIM=d, BLOCK_N=block_n, STAGES=stages,
        DOT_F32=_dot_f32(q.dtype), SPREAD=n_programs > 0, TIMELINE=timeline is not None, MERGE=merge is not None,
        num_warps=num_warps, num_stages=stages,
    )  # fmt: skip
    if merge is not None:  # the merge's tile: the program's query heads x up to MERGE_P partial rows x head_dim
        consts["MERGE_H"] = triton.next_power_of_2(block_h * (q.shape[1] // n_kv))
        # one partial row per iteration: H100, session 21, few-shot 16k step 200, the merge after the wait took 3.5 µs
        # so against 20 µs loading four rows at once ([4, 32 heads, 128]), with or without .cg loads
        consts["MERGE_P"] = MERGE_ROWS
    if maxnreg:
        consts["maxnreg"] = int(maxnreg)
    if launch_pdl:
        consts["launch_pdl"] = True
    if warmup:
        return branch_heads_kernel.warmup(*args, grid=tuple(max(x, 1) for x in grid), **consts)
    return branch_heads_kernel[grid](*args, **consts)

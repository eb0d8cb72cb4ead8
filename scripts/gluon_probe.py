"""Probe: Gluon (Hopper) split-K attention kernels for the many query rows of one shared prompt, how far below
Triton's ``tl.dot`` kernel they go on the work that bounds the few-shot 16k snapshots (``notes/deft_kernels.md``,
session 12: 40 µs for the 16k prompt's partials at best, against Triton's 44 µs; neither near the bandwidth floor).

One CTA per (chunk, KV head, tile of NUM_WG*64 rows) streams the chunk's K/V blocks through a STAGES-deep
TMA ring in shared memory; NUM_WG consumer warpgroups (64 rows each, ``warpgroup_mma`` with M=64) read the same
tiles, so with NUM_WG=4 the 200 rows of 50 queries x 4 heads of a KV head need one CTA and K/V leave HBM once
(with NUM_WG=2, two CTAs per chunk, the second read mostly from L2).
Output: per-chunk partials (normalised O in bf16, log2-sum-exp in fp32) that the host merges.

MODE 1 ``ws``: ``gl.warp_specialize`` with a 1-warp TMA producer partition and one partition per consumer
warpgroup (each releases a stage by itself, so warpgroups drift and one's softmax overlaps another's MMA).
MODE 2 ``wgpart``: one partition per warpgroup, no producer (warpgroup 0 refills the ring): no registers go to a
producer warpgroup. MODE 0 ``inline``: one partition of 4*NUM_WG warps issuing its own TMA, in lockstep.
MODES 3-6 (two consumer warpgroups): like ``ws`` with asynchronous wgmma so that a warpgroup's tensor-core work
overlaps its own softmax (FlashAttention-3 style), separate K and V rings: ``async`` keeps S_{i+1} = Q K_{i+1}^T
and O += P_{i-1} V_{i-1} in flight during block i's softmax, ``asyncpv`` (the FA3 paper's order) only the PV
GEMM; ``asyncpp`` / ``asyncpvpp`` add a ping-pong (two mbarriers) that alternates the warpgroups' GEMM issues.

``python -m scripts.gluon_probe --aot``: compile every variant for sm_90 here (no GPU) and print registers,
spills, shared memory and SASS size. ``python -m scripts.gluon_probe`` on an H100: check and time every variant
and the Triton probe's best configurations; writes ``$OUT/gluon_probe_<date>.csv``. A measurement, not library code.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# the block update and the turn-taking are the DeFT prompt kernel's (deft/kernels/prompt_gluon.py), which this probe became
from deft.kernels.prompt_gluon import _softmax_step
from deft.kernels.prompt_gluon import _turn_pass as pg_turn_pass
from deft.kernels.prompt_gluon import _turn_wait as pg_turn_wait

HEAD_DIM = 128
LOG2E = 1.4426950408889634
SMEM_LIMIT = 232448  # bytes of dynamic shared memory one CTA may use on sm_90
PRODUCER_REGS = gl.constexpr(24)  # the least setmaxnreg allows
MODE_NAMES = {0: "inline", 1: "ws", 2: "wgpart", 3: "async", 4: "asyncpp", 5: "asyncpv", 6: "asyncpvpp"}
PRODUCER_MODES = (1, 3, 4, 5, 6)  # modes with a 1-warp TMA producer partition


@gluon.jit
def _issue(k_desc, v_desc, k_bufs, v_bufs, ready, j, n_iter, t_lo, col, BLOCK_N: gl.constexpr,
           STAGES: gl.constexpr):  # fmt: skip
    """Load K/V block j into stage j % STAGES if j < n_iter; the lowering elects the issuing threads."""
    nbytes: gl.constexpr = 2 * BLOCK_N * k_desc.block_type.shape[1] * 2
    ok = j < n_iter
    bar = ready.index(j % STAGES)
    mbarrier.expect(bar, nbytes, pred=ok)  # a box partly past n_tok is zero-filled and still counts in full
    tma.async_copy_global_to_shared(k_desc, [t_lo + j * BLOCK_N, col], bar, k_bufs.index(j % STAGES), pred=ok)
    tma.async_copy_global_to_shared(v_desc, [t_lo + j * BLOCK_N, col], bar, v_bufs.index(j % STAGES), pred=ok)


@gluon.jit
def _producer(args, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA partition (1 warp): fill stage i % STAGES with block i once every consumer warpgroup released it."""
    k_desc, v_desc, k_bufs, v_bufs, ready, empty, t_lo, n_iter, col = args
    for i in range(n_iter):
        # A fresh mbarrier counts as having completed the phase before phase 0: parity 1 passes at once.
        mbarrier.wait(empty.index(i % STAGES), ((i // STAGES) & 1) ^ 1)
        _issue(k_desc, v_desc, k_bufs, v_bufs, ready, i, n_iter, t_lo, col, BLOCK_N, STAGES)


@gluon.jit
def _load_q(q_ptr, q_smem, row0, n_rows, head0, stride_qn, stride_qh, GROUP: gl.constexpr):
    """Q rows -> shared memory once, by the calling partition's warps; padding rows (>= n_rows) are zeros."""
    NW: gl.constexpr = gl.num_warps()
    ROWS: gl.constexpr = q_smem.type.shape[0]
    D: gl.constexpr = q_smem.type.shape[1]
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [NW, 1], [1, 0])
    r = row0 + gl.arange(0, ROWS, gl.SliceLayout(1, ld_layout))
    dq = gl.arange(0, D, gl.SliceLayout(0, ld_layout))
    q_off = (r // GROUP).to(gl.int64) * stride_qn + (head0 + r % GROUP) * stride_qh
    q_ptrs = q_ptr + gl.expand_dims(q_off, 1) + gl.expand_dims(dq, 0)
    q_smem.store(gl.load(q_ptrs, mask=gl.expand_dims(r < n_rows, 1), other=0.0))
    fence_async_shared()  # generic-proxy stores -> async-proxy (wgmma) reads
    gl.thread_barrier()


@gluon.jit
def _store_partials(part_o, part_lse, o, m_i, l_i, row0, prow0, n_rows):
    """Normalised O (bf16) and log2-sum-exp (fp32) of the rows [row0, row0 + ROWS) that exist (< n_rows)."""
    ROWS: gl.constexpr = o.type.shape[0]
    D: gl.constexpr = o.type.shape[1]
    row_o: gl.constexpr = gl.SliceLayout(1, o.type.layout)
    l_o = gl.convert_layout(l_i, row_o)
    out = o / gl.expand_dims(l_o, 1)
    ro = gl.arange(0, ROWS, row_o)
    do = gl.arange(0, D, gl.SliceLayout(0, o.type.layout))
    prow = (prow0 + ro).to(gl.int64)
    ok = (row0 + ro) < n_rows
    o_ptrs = part_o + gl.expand_dims(prow * D, 1) + gl.expand_dims(do, 0)
    gl.store(o_ptrs, out.to(gl.bfloat16), mask=gl.expand_dims(ok, 1))
    gl.store(part_lse + prow, gl.convert_layout(m_i, row_o) + gl.log2(l_o), mask=ok)


@gluon.jit
def _consumer(common, q_smem, row0, prow0, GROUP: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              ROLE: gl.constexpr):  # fmt: skip
    """Online-softmax attention of the rows in ``q_smem`` over the chunk's K/V blocks, by this partition's warps.

    ROLE 0: a producer partition loads K/V; release each stage with one arrival on ``empty``.
    ROLE 1: the only partition: refill a stage itself once all its warps passed a barrier after reading it.
    ROLE 2: warpgroup 0 of per-warpgroup partitions: release like ROLE 0, and refill block i-1's stage once
    every warpgroup has released it (one block of slack, so it seldom waits)."""
    (q_ptr, part_o, part_lse, k_desc, v_desc, k_bufs, v_bufs, ready, empty, n_rows, head0, t_lo, t_hi, n_iter, col,
     stride_qn, stride_qh, qk_scale) = common
    NW: gl.constexpr = gl.num_warps()
    ROWS: gl.constexpr = q_smem.type.shape[0]
    D: gl.constexpr = q_smem.type.shape[1]
    # wgmma accumulators: warps stacked along M (16 rows each); instr N = the full tile width.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, D, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)  # A in registers
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    if ROLE != 0:  # fill the ring before the Q load so the two overlap
        for j in gl.static_range(STAGES):
            _issue(k_desc, v_desc, k_bufs, v_bufs, ready, j, n_iter, t_lo, col, BLOCK_N, STAGES)

    _load_q(q_ptr, q_smem, row0, n_rows, head0, stride_qn, stride_qh, GROUP)

    o = gl.zeros([ROWS, D], gl.float32, o_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([ROWS], gl.float32, row_s)
    cols = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
    for i in range(n_iter):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        kt = k_bufs.index(s).permute((1, 0))  # [D, BLOCK_N] view: wgmma reads K^T from the K-major tile
        sc = warpgroup_mma(q_smem, kt, gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False)
        sc = sc * qk_scale
        if t_lo + (i + 1) * BLOCK_N > t_hi:  # the chunk's last block: tokens past its end get no weight
            sc = gl.where(gl.expand_dims(t_lo + i * BLOCK_N + cols < t_hi, 0), sc, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(sc, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(sc - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        o = o * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        pa = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        o = warpgroup_mma(pa, v_bufs.index(s), o)  # synchronous: returns after the wgmma group completed
        gl.thread_barrier()  # every warp of this partition has finished reading stage s
        if ROLE == 1:
            _issue(k_desc, v_desc, k_bufs, v_bufs, ready, i + STAGES, n_iter, t_lo, col, BLOCK_N, STAGES)
        else:
            mbarrier.arrive(empty.index(s))  # thread 0 of the partition: one arrival per warpgroup
            if ROLE == 2:
                if i > 0:
                    mbarrier.wait(empty.index((i - 1) % STAGES), ((i - 1) // STAGES) & 1)
                    _issue(k_desc, v_desc, k_bufs, v_bufs, ready, i - 1 + STAGES, n_iter, t_lo, col, BLOCK_N,
                           STAGES)  # fmt: skip

    _store_partials(part_o, part_lse, o, m_i, l_i, row0, prow0, n_rows)


@gluon.jit
def _producer_kv(args, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA partition (1 warp) of MODES 3-6: separate K and V rings, K one block ahead (K_j, then V_{j-1}).

    The async consumers free K_j once its S GEMM retired, before block j's softmax, but V_j only once the PV GEMM
    retired, an iteration or two later; a shared K+V stage would wait for V, and with two stages AHEAD could not
    advance at all (it reads K_{i+1} while V_{i-1} is still in use)."""
    k_desc, v_desc, k_bufs, v_bufs, ready_k, ready_v, empty_k, empty_v, t_lo, n_iter, col = args
    nbytes: gl.constexpr = BLOCK_N * k_desc.block_type.shape[1] * 2
    for j in range(n_iter + 1):
        if j < n_iter:
            sk = j % STAGES
            mbarrier.wait(empty_k.index(sk), ((j // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1 at once
            mbarrier.expect(ready_k.index(sk), nbytes)
            tma.async_copy_global_to_shared(k_desc, [t_lo + j * BLOCK_N, col], ready_k.index(sk), k_bufs.index(sk))
        if j > 0:
            jv = j - 1
            sv = jv % STAGES
            mbarrier.wait(empty_v.index(sv), ((jv // STAGES) & 1) ^ 1)
            mbarrier.expect(ready_v.index(sv), nbytes)
            tma.async_copy_global_to_shared(v_desc, [t_lo + jv * BLOCK_N, col], ready_v.index(sv), v_bufs.index(sv))


@gluon.jit
def _turn_wait(turn, k, W: gl.constexpr, PINGPONG: gl.constexpr):
    """Ping-pong (the DeFT prompt kernel's turn-taking, :mod:`deft.kernels.prompt_gluon`), when PINGPONG."""
    if PINGPONG:
        pg_turn_wait(turn, k, W)


@gluon.jit
def _turn_pass(turn, W: gl.constexpr, PINGPONG: gl.constexpr):
    """Ping-pong: this warpgroup issued its GEMMs; the other may issue its next ones (when PINGPONG)."""
    if PINGPONG:
        pg_turn_pass(turn, W)


@gluon.jit
def _consumer_async(common, q_smem, row0, prow0, GROUP: gl.constexpr, BLOCK_N: gl.constexpr,
                    STAGES: gl.constexpr, W: gl.constexpr, AHEAD: gl.constexpr, PINGPONG: gl.constexpr):  # fmt: skip
    """MODES 3-6: one consumer warpgroup (W = its index) with asynchronous wgmma, FlashAttention-3 style.

    AHEAD (MODES 3, 4): iteration i (0 <= i < n_iter - 1) issues S_{i+1} = Q K_{i+1}^T and O += P_{i-1} V_{i-1}
    (two wgmma groups), runs block i's softmax on S_i (complete since the previous iteration) while both run,
    waits for both (wait(0)), frees K_{i+1} and V_{i-1} and rescales O by block i's alpha. Live across the
    softmax: S_{i+1}, O, P_{i-1} (the A operand is read from registers, so it is a dep of the wait) and S_i.
    i = 0 has no P_{-1}: it multiplies zeros by V_0 (one wasted PV GEMM per CTA instead of a branch around an
    async group). The last block's softmax (with the chunk-end mask), PV_{n-2} and PV_{n-1} follow the loop.
    Not AHEAD (MODES 5, 6; the FlashAttention-3 paper's order, fewer live registers): iteration i (1 <= i <
    n_iter) issues S_i and O += P_{i-1} V_{i-1}, waits for S_i alone (wait(1): groups retire in order), frees
    K_i, runs block i's softmax while the PV GEMM runs, waits for it, frees V_{i-1} and rescales O.
    PINGPONG (MODES 4, 6): GEMM issues alternate between the two warpgroups (mbarriers ``turn``), so one's
    softmax tends to run while the other's GEMMs do."""
    (q_ptr, part_o, part_lse, k_bufs, v_bufs, ready_k, ready_v, empty_k, empty_v, turn, n_rows, head0, t_lo, t_hi,
     n_iter, stride_qn, stride_qh, qk_scale) = common
    NW: gl.constexpr = gl.num_warps()
    ROWS: gl.constexpr = q_smem.type.shape[0]
    D: gl.constexpr = q_smem.type.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, D, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    cols = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))

    _load_q(q_ptr, q_smem, row0, n_rows, head0, stride_qn, stride_qh, GROUP)

    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    o = gl.zeros([ROWS, D], gl.float32, o_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([ROWS], gl.float32, row_s)

    # S_0, then free K_0 (K stage s is free once every warp of the warpgroup retired the group reading it).
    mbarrier.wait(ready_k.index(0), 0)
    _turn_wait(turn, 0, W, PINGPONG)
    s_tok = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    _turn_pass(turn, W, PINGPONG)
    sc = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
    gl.thread_barrier()
    mbarrier.arrive(empty_k.index(0))

    if AHEAD:
        p_prev = gl.zeros([ROWS, BLOCK_N], gl.bfloat16, p_layout)  # P_{-1}
        for i in range(n_iter - 1):
            j = i + 1
            sk = j % STAGES
            jv = gl.maximum(i - 1, 0)  # i = 0: V_0 times P_{-1} = 0
            sv = jv % STAGES
            mbarrier.wait(ready_k.index(sk), (j // STAGES) & 1)
            mbarrier.wait(ready_v.index(sv), (jv // STAGES) & 1)
            _turn_wait(turn, j, W, PINGPONG)
            s_tok = warpgroup_mma(q_smem, k_bufs.index(sk).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            o_tok = warpgroup_mma(p_prev, v_bufs.index(sv), o, is_async=True)
            _turn_pass(turn, W, PINGPONG)
            # block i is not the chunk's last, so none of its tokens lies past t_hi: no mask
            p, alpha, m_i, l_i = _softmax_step(sc, m_i, l_i, qk_scale)
            pa = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            sc, o, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok, o_tok, p_prev])
            gl.thread_barrier()
            mbarrier.arrive(empty_k.index(sk))
            mbarrier.arrive(empty_v.index(sv), pred=i > 0)
            o = o * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p_prev = pa

        # The last block (n_iter - 1): the PV GEMM of the block before it during its softmax.
        i = n_iter - 1
        jv = gl.maximum(i - 1, 0)
        sv = jv % STAGES
        mbarrier.wait(ready_v.index(sv), (jv // STAGES) & 1)
        _turn_wait(turn, n_iter, W, PINGPONG)
        o_tok = warpgroup_mma(p_prev, v_bufs.index(sv), o, is_async=True)
        _turn_pass(turn, W, PINGPONG)
        if t_lo + n_iter * BLOCK_N > t_hi:  # tokens past the chunk's end get no weight
            sc = gl.where(gl.expand_dims(t_lo + i * BLOCK_N + cols < t_hi, 0), sc, float("-inf"))
        p, alpha, m_i, l_i = _softmax_step(sc, m_i, l_i, qk_scale)
        pa = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        o, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, p_prev])
        gl.thread_barrier()
        mbarrier.arrive(empty_v.index(sv), pred=i > 0)
        o = o * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        n_issue = n_iter + 1
    else:
        if t_lo + BLOCK_N > t_hi:  # block 0 is the chunk's last
            sc = gl.where(gl.expand_dims(t_lo + cols < t_hi, 0), sc, float("-inf"))
        p, alpha, m_i, l_i = _softmax_step(sc, m_i, l_i, qk_scale)
        pa = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        for i in range(1, n_iter):
            sk = i % STAGES
            jv = i - 1
            sv = jv % STAGES
            mbarrier.wait(ready_k.index(sk), (i // STAGES) & 1)
            mbarrier.wait(ready_v.index(sv), (jv // STAGES) & 1)
            _turn_wait(turn, i, W, PINGPONG)
            s_tok = warpgroup_mma(q_smem, k_bufs.index(sk).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            o_tok = warpgroup_mma(pa, v_bufs.index(sv), o, is_async=True)
            _turn_pass(turn, W, PINGPONG)
            sc = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])  # S_i retired; P_{i-1} V_{i-1} may run on
            gl.thread_barrier()
            mbarrier.arrive(empty_k.index(sk))
            if t_lo + (i + 1) * BLOCK_N > t_hi:  # the chunk's last block
                sc = gl.where(gl.expand_dims(t_lo + i * BLOCK_N + cols < t_hi, 0), sc, float("-inf"))
            p, alpha, m_i, l_i = _softmax_step(sc, m_i, l_i, qk_scale)
            pa_next = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            o, pa = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, pa])
            gl.thread_barrier()
            mbarrier.arrive(empty_v.index(sv))
            o = o * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            pa = pa_next
        i = n_iter - 1
        n_issue = n_iter

    # The last block's PV GEMM. V_{n-1} is not freed: the producer loads nothing after it.
    sl = i % STAGES
    mbarrier.wait(ready_v.index(sl), (i // STAGES) & 1)
    _turn_wait(turn, n_issue, W, PINGPONG)
    o_tok = warpgroup_mma(pa, v_bufs.index(sl), o, is_async=True)
    _turn_pass(turn, W, PINGPONG)
    o, pa = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, pa])

    _store_partials(part_o, part_lse, o, m_i, l_i, row0, prow0, n_rows)


@gluon.jit
def gluon_partial_kernel(q_ptr, k_desc, v_desc, part_o, part_lse, n_tok, chunk, n_rows, n_rt,
                         stride_qn, stride_qh, qk_scale,
                         GROUP: gl.constexpr, NUM_WG: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                         MODE: gl.constexpr, CONS_REGS: gl.constexpr):  # fmt: skip
    """Grid (n_chunks * n_rt, n_kv): partials of rows [rt*BLOCK_M, (rt+1)*BLOCK_M) of one KV head over one chunk.

    MODE 0: one partition of 4*NUM_WG warps issues its own TMA; 1: 1-warp TMA producer partition plus one
    partition per consumer warpgroup; 2: one partition per warpgroup, warpgroup 0 issues the TMA loads;
    3-6: like 1 with asynchronous wgmma (``_consumer_async``) and separate K and V rings: 3 S_{i+1} in flight
    during block i's softmax, 4: 3 plus ping-pong, 5: only O += P_{i-1} V_{i-1} in flight, 6: 5 plus ping-pong."""
    D: gl.constexpr = k_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = NUM_WG * 64
    pid = gl.program_id(0)
    kvh = gl.program_id(1)
    n_kv = gl.num_programs(1)
    c = pid // n_rt
    rt = pid % n_rt
    t_lo = c * chunk
    t_hi = gl.minimum(t_lo + chunk, n_tok)
    n_iter = gl.cdiv(t_hi - t_lo, BLOCK_N)
    col = kvh * D
    head0 = kvh * GROUP
    row0 = rt * BLOCK_M
    prow0 = (c * n_kv + kvh) * (n_rt * BLOCK_M) + row0

    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, D], gl.bfloat16)
    k_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D], v_desc.layout)
    if MODE >= 3:
        gl.static_assert(NUM_WG == 2, "the async modes have two consumer warpgroups")
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        ready_k = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        ready_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        empty_k = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        empty_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        for s in gl.static_range(STAGES):
            mbarrier.init(ready_k.index(s), count=1)
            mbarrier.init(ready_v.index(s), count=1)
            mbarrier.init(empty_k.index(s), count=NUM_WG)
            mbarrier.init(empty_v.index(s), count=NUM_WG)
        for w in gl.static_range(2):
            mbarrier.init(turn.index(w), count=1)  # one arrival by the other warpgroup
        fence_async_shared()
        q_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_WG, 64, D], q_layout)
        common_a = (q_ptr, part_o, part_lse, k_bufs, v_bufs, ready_k, ready_v, empty_k, empty_v, turn, n_rows,
                    head0, t_lo, t_hi, n_iter, stride_qn, stride_qh, qk_scale)  # fmt: skip
        ap = (k_desc, v_desc, k_bufs, v_bufs, ready_k, ready_v, empty_k, empty_v, t_lo, n_iter, col)
        AH: gl.constexpr = MODE == 3 or MODE == 4
        PP: gl.constexpr = MODE == 4 or MODE == 6
        gl.warp_specialize([
            (_consumer_async, (common_a, q_smem.index(0), row0, prow0, GROUP, BLOCK_N, STAGES, 0, AH, PP)),
            (_consumer_async, (common_a, q_smem.index(1), row0 + 64, prow0 + 64, GROUP, BLOCK_N, STAGES, 1, AH,
                               PP)),
            (_producer_kv, (ap, BLOCK_N, STAGES)),
        ], [4, 1], [CONS_REGS, PRODUCER_REGS])  # fmt: skip
    else:
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)  # the expect-tx arrival; the TMA bytes complete the phase
            mbarrier.init(empty.index(s), count=NUM_WG)  # one arrival per consumer warpgroup
        fence_async_shared()

        common = (q_ptr, part_o, part_lse, k_desc, v_desc, k_bufs, v_bufs, ready, empty, n_rows, head0, t_lo, t_hi,
                  n_iter, col, stride_qn, stride_qh, qk_scale)  # fmt: skip
        if MODE == 0:
            q_all = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, D], q_layout)
            _consumer(common, q_all, row0, prow0, GROUP, BLOCK_N, STAGES, 1)
        else:
            q_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_WG, 64, D], q_layout)
            R0: gl.constexpr = 0 if MODE == 1 else 2  # the default partition (warpgroup 0)
            ap = (k_desc, v_desc, k_bufs, v_bufs, ready, empty, t_lo, n_iter, col)
            if NUM_WG == 2:
                if MODE == 1:
                    gl.warp_specialize([
                        (_consumer, (common, q_smem.index(0), row0, prow0, GROUP, BLOCK_N, STAGES, R0)),
                        (_consumer, (common, q_smem.index(1), row0 + 64, prow0 + 64, GROUP, BLOCK_N, STAGES, 0)),
                        (_producer, (ap, BLOCK_N, STAGES)),
                    ], [4, 1], [CONS_REGS, PRODUCER_REGS])  # fmt: skip
                else:
                    gl.warp_specialize([
                        (_consumer, (common, q_smem.index(0), row0, prow0, GROUP, BLOCK_N, STAGES, R0)),
                        (_consumer, (common, q_smem.index(1), row0 + 64, prow0 + 64, GROUP, BLOCK_N, STAGES, 0)),
                    ], [4], [CONS_REGS])  # fmt: skip
            else:
                gl.static_assert(NUM_WG == 4, "NUM_WG is 2 or 4")
                if MODE == 1:
                    gl.warp_specialize([
                        (_consumer, (common, q_smem.index(0), row0, prow0, GROUP, BLOCK_N, STAGES, R0)),
                        (_consumer, (common, q_smem.index(1), row0 + 64, prow0 + 64, GROUP, BLOCK_N, STAGES, 0)),
                        (_consumer, (common, q_smem.index(2), row0 + 128, prow0 + 128, GROUP, BLOCK_N, STAGES, 0)),
                        (_consumer, (common, q_smem.index(3), row0 + 192, prow0 + 192, GROUP, BLOCK_N, STAGES, 0)),
                        (_producer, (ap, BLOCK_N, STAGES)),
                    ], [4, 4, 4, 1], [CONS_REGS, CONS_REGS, CONS_REGS, PRODUCER_REGS])  # fmt: skip
                else:
                    gl.warp_specialize([
                        (_consumer, (common, q_smem.index(0), row0, prow0, GROUP, BLOCK_N, STAGES, R0)),
                        (_consumer, (common, q_smem.index(1), row0 + 64, prow0 + 64, GROUP, BLOCK_N, STAGES, 0)),
                        (_consumer, (common, q_smem.index(2), row0 + 128, prow0 + 128, GROUP, BLOCK_N, STAGES, 0)),
                        (_consumer, (common, q_smem.index(3), row0 + 192, prow0 + 192, GROUP, BLOCK_N, STAGES, 0)),
                    ], [4, 4, 4], [CONS_REGS, CONS_REGS, CONS_REGS])  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Host side


def launch_config(num_wg: int, mode: int) -> dict:
    """num_warps / maxnreg / consumer registers so that one CTA fits an SM's 64K registers.

    Registers go by warpgroup, so the 1-warp producer (MODES 1, 3-6) takes a whole one (4*NUM_WG + 4 warps). ``maxnreg``
    (a multiple of 8; times all threads <= 64K) is what each warp holds at launch; inside ``warp_specialize``,
    ``setmaxnreg`` gives each worker partition its requested count (producer 24, consumers CONS_REGS) and the
    default partition (warpgroup 0) what is left: 120 for MODE 1 with NUM_WG=4, the others 112."""
    if mode == 0:
        return dict(num_warps=4 * num_wg, maxnreg=None, cons_regs=0)
    warps = 4 * num_wg + (4 if mode in PRODUCER_MODES else 0)
    maxnreg = min(65536 // (32 * warps) // 8 * 8, 248)
    spare = 4 * PRODUCER_REGS.value if mode in PRODUCER_MODES else 0
    cons = min((maxnreg * warps - spare) // (4 * num_wg) // 8 * 8, 248)
    return dict(num_warps=4, maxnreg=maxnreg, cons_regs=cons)


def variants() -> list[dict]:
    """Every (mode, num_wg, block_n, stages) combination (the async modes 3-6: two consumer warpgroups only)."""
    return [dict(mode=m, num_wg=w, block_n=bn, stages=st)
            for m, w, bn, st in itertools.product((1, 2, 0, 3, 4, 5, 6), (4, 2), (64, 128), (2, 3))
            if m < 3 or w == 2]  # fmt: skip


def vname(v: dict) -> str:
    """Short name of a variant, e.g. ``ws_wg4_n64_s3``."""
    return f"{MODE_NAMES[v['mode']]}_wg{v['num_wg']}_n{v['block_n']}_s{v['stages']}"


def desc_layout(block_n: int) -> gl.NVMMASharedLayout:
    """The NVMMA shared layout of a [block_n, HEAD_DIM] bf16 TMA box (128-byte swizzle)."""
    return gl.NVMMASharedLayout.get_default_for([block_n, HEAD_DIM], gl.bfloat16)


def _constexprs(v: dict, group: int) -> tuple[dict, dict]:
    """The kernel's constexpr arguments and compile options for one variant."""
    cfg = launch_config(v["num_wg"], v["mode"])
    const = dict(GROUP=group, NUM_WG=v["num_wg"], BLOCK_N=v["block_n"], STAGES=v["stages"], MODE=v["mode"],
                 CONS_REGS=cfg["cons_regs"])  # fmt: skip
    opts = {"num_warps": cfg["num_warps"]} | ({"maxnreg": cfg["maxnreg"]} if cfg["maxnreg"] else {})
    return const, opts


def compile_sm90(v: dict, group: int = 4):
    """Ahead-of-time compile of one variant for sm_90 (no GPU needed); ptxas's reproducer dump is swallowed."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from scripts.kernel_aot import launch_hints

    # A Gluon host descriptor specialises as "tensordesc<dtype[block], layout>", the layout as its repr.
    td = f"tensordesc<bf16[{v['block_n']}, {HEAD_DIM}],{desc_layout(v['block_n'])!r}>"
    sig = {"q_ptr": "*bf16", "k_desc": td, "v_desc": td, "part_o": "*bf16", "part_lse": "*fp32", "n_tok": "i32",
           "chunk": "i32", "n_rows": "i32", "n_rt": "i32", "stride_qn": "i32", "stride_qh": "i32",
           "qk_scale": "fp32", "GROUP": "constexpr", "NUM_WG": "constexpr", "BLOCK_N": "constexpr",
           "STAGES": "constexpr", "MODE": "constexpr", "CONS_REGS": "constexpr"}  # fmt: skip
    const, opts = _constexprs(v, group)
    src = GluonASTSource(fn=gluon_partial_kernel, signature=sig, constexprs=const, attrs=launch_hints(sig))
    with contextlib.redirect_stdout(io.StringIO()):
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def resource_usage(kernel) -> dict:
    """Registers (cuobjdump), spills and wgmma serialisation (ptxas -v), shared memory, SASS size, setmaxnreg."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptx = kernel.asm["ptx"]
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], capture_output=True, text=True)

    with tempfile.TemporaryDirectory() as tmp:
        p_ptx, p_bin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        p_ptx.write_text(ptx)
        log = run(bin_dir / "ptxas", "-v", f"--gpu-name={arch}", p_ptx, "-o", p_bin).stderr
        p_bin.write_bytes(kernel.asm["cubin"])
        usage = run(bin_dir / "cuobjdump", "-res-usage", p_bin).stdout
        sass = run(bin_dir / "cuobjdump", "-sass", p_bin).stdout
    regs = re.search(r"REG:(\d+)", usage)
    return dict(
        regs=int(regs.group(1)) if regs else -1,
        setmaxnreg=sorted({int(x) for x in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)}),
        spill_st=sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log)),
        spill_ld=sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log)),
        local_ops=len(re.findall(r"\b[LS]TL\b", sass)),
        serialized="C7512" in log,  # "wgmma.mma_async instructions are serialized"
        smem=kernel.metadata.shared,
        sass_instr=len(re.findall(r"/\*[0-9a-f]{4,}\*/", sass)),
        warps=kernel.metadata.num_warps,
    )


def _err(e: Exception) -> str:
    """One line for a failed variant: the ptxas fatal line where there is one."""
    msg = str(e)
    fatal = re.search(r"ptxas fatal\s*:\s*(.*)", msg)
    return f"{type(e).__name__}: {(fatal.group(1) if fatal else msg.strip().splitlines()[0] if msg.strip() else '')[:90]}"


def aot_report() -> list[dict]:
    """Compile every variant for sm_90 and print a table of its resources."""
    rows = []
    for v in variants():
        row = dict(variant=vname(v), **launch_config(v["num_wg"], v["mode"]))
        try:
            row.update(resource_usage(compile_sm90(v)))
            row["fits"] = row["smem"] <= SMEM_LIMIT
        except Exception as e:  # a variant that does not compile is a result too
            row["error"] = _err(e)
        rows.append(row)
    import pandas as pd

    cols = ["variant", "warps", "maxnreg", "cons_regs", "regs", "setmaxnreg", "spill_st", "spill_ld", "local_ops",
            "serialized", "smem", "fits", "sass_instr", "error"]  # fmt: skip
    df = pd.DataFrame(rows, dtype=object)
    with pd.option_context("display.width", 250, "display.max_colwidth", 90):
        print(df[[c for c in cols if c in df]].fillna("").to_string(index=False, justify="left"))
    print("regs: per thread at launch (cuobjdump); warp-specialised partitions then move to their setmaxnreg value. "
          "local_ops: LDL/STL in SASS. serialized: ptxas serialised wgmma for lack of registers. fits: smem <= 227 KiB.")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# GPU harness


def make_launch(q, k, v, part_o, part_lse, var: dict, chunk: int) -> tuple[Callable[[], None], int, int, int]:
    """A callable launching one variant on (q, k, v), and the partials' shape: (n_chunks, n_rt, block_m)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    n_q, n_h, d = q.shape
    n_tok, n_kv = k.shape[0], k.shape[1]
    assert d == HEAD_DIM and q.stride(2) == 1 and k.is_contiguous() and v.is_contiguous()
    group = n_h // n_kv
    n_rows = n_q * group
    block_m = 64 * var["num_wg"]
    n_rt = triton.cdiv(n_rows, block_m)
    n_chunks = triton.cdiv(n_tok, chunk)
    assert part_o.shape[0] >= n_chunks * n_kv * n_rt * block_m
    k2, v2 = k.view(n_tok, n_kv * d), v.view(n_tok, n_kv * d)  # tokens x (head, dim): box [BLOCK_N, d] at kvh*d
    kd = TensorDescriptor.from_tensor(k2, [var["block_n"], d], desc_layout(var["block_n"]))
    vd = TensorDescriptor.from_tensor(v2, [var["block_n"], d], desc_layout(var["block_n"]))
    const, opts = _constexprs(var, group)
    scale = LOG2E / math.sqrt(d)

    def launch() -> None:
        gluon_partial_kernel[(n_chunks * n_rt, n_kv)](
            q, kd, vd, part_o, part_lse, n_tok, chunk, n_rows, n_rt, q.stride(0), q.stride(1), scale, **const, **opts)

    return launch, n_chunks, n_rt, block_m


def merge_partials(part_o, part_lse, n_chunks: int, n_kv: int, n_rt: int, block_m: int, n_q: int, group: int):
    """[n_q, n_kv*group, d] from the partials: weights softmax(lse * ln 2) over chunks."""
    import torch

    n_rows, d = n_q * group, part_o.shape[1]
    rows = n_chunks * n_kv * n_rt * block_m
    o = part_o[:rows].view(n_chunks, n_kv, n_rt * block_m, d)[:, :, :n_rows].float()
    lse = part_lse[:rows].view(n_chunks, n_kv, n_rt * block_m)[:, :, :n_rows]
    w = torch.softmax(lse * math.log(2.0), dim=0)
    res = (w[..., None] * o).sum(0)  # [n_kv, n_rows, d]; row = query * group + head in group
    return res.view(n_kv, n_q, group, d).permute(1, 0, 2, 3).reshape(n_q, n_kv * group, d)


def _wait_or_hang(seconds: float) -> bool:
    """Whether the work queued so far finishes within ``seconds`` (an mbarrier protocol bug hangs, not faults)."""
    import torch

    ev = torch.cuda.Event()
    ev.record()
    t0 = time.monotonic()
    while not ev.query():
        if time.monotonic() - t0 > seconds:
            return False
        time.sleep(0.01)
    return True


def gpu_main() -> None:
    """Check and time the Triton probe's two best configurations, then every Gluon variant and chunk.

    Env: DEFT_PROBE_TOKENS, DEFT_PROBE_QUERIES, DEFT_PROBE_CHUNKS (comma list), DEFT_PROBE_ONLY (comma list of
    variant-name prefixes), OUT. The CSV is rewritten after every row; a hang or a CUDA fault stops the run there."""
    import pandas as pd
    import torch

    from deft.bench.timing import copy_bandwidth, time_device
    from scripts.kernel_probe import run_probe

    dev = torch.device("cuda")
    n_tok = int(os.environ.get("DEFT_PROBE_TOKENS", 16384))
    n_q = int(os.environ.get("DEFT_PROBE_QUERIES", 50))
    n_h, n_kv, d = 32, 8, HEAD_DIM
    group, n_rows = n_h // n_kv, n_q * n_h // n_kv
    torch.manual_seed(0)
    q = torch.randn(n_q, n_h, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(n_tok, n_kv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(n_tok, n_kv, d, device=dev, dtype=torch.bfloat16)
    kr, vr = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    ref = torch.softmax(torch.einsum("qhd,thd->hqt", q.float(), kr) / math.sqrt(d), -1)
    ref = torch.einsum("hqt,thd->qhd", ref, vr)
    del kr, vr
    n_part = triton.cdiv(n_tok, 512) * n_kv * triton.cdiv(n_rows, 64) * 64 * 2
    part_o = torch.empty(n_part, d, device=dev, dtype=torch.bfloat16)
    part_lse = torch.empty(n_part, device=dev, dtype=torch.float32)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    bw = copy_bandwidth(dev)
    kv_bytes = 2 * k.numel() * k.element_size()
    meta = dict(gpu=torch.cuda.get_device_name(dev), torch=torch.__version__, triton=triton.__version__,
                git_commit=os.environ.get("DEFT_GIT_COMMIT", "unknown"), date=datetime.date.today().isoformat(),
                n_tok=n_tok, n_queries=n_q, copy_bw_gbps=bw / 1e9)  # fmt: skip
    out_csv = Path(os.environ.get("OUT", "/tmp")) / f"gluon_probe_{meta['date']}.csv"
    out_csv.parent.mkdir(parents=True, exist_ok=True)

    def measure(row: dict, launch: Callable[[], None], n_chunks: int, n_rt: int, block_m: int) -> None:
        part_o.fill_(float("nan"))
        part_lse.fill_(float("nan"))
        launch()
        if not _wait_or_hang(20.0):
            raise TimeoutError("hang: kernel still running after 20 s")
        got = merge_partials(part_o, part_lse, n_chunks, n_kv, n_rt, block_m, n_q, group)
        row["rel_error"] = ((got - ref).norm() / ref.norm()).item()
        row["ok"] = row["rel_error"] < 1e-2
        st = time_device(launch, reps=50, device=dev)
        t = st.median_ms * 1e-3
        row.update(us=st.median_ms * 1e3, p90_us=st.p90_ms * 1e3, ctas=n_chunks * n_rt * n_kv,
                   tflops_padded=4.0 * n_rt * block_m * n_kv * n_tok * d / t / 1e12,
                   tflops=4.0 * n_rows * n_kv * n_tok * d / t / 1e12, kv_bw_frac=kv_bytes / t / bw)  # fmt: skip

    probe_cfgs = [dict(load="tma", block_m=128, num_warps=8, block_n=128, num_stages=3, chunk=2048, ws=False),
                  dict(load="affine", block_m=64, num_warps=4, block_n=64, num_stages=3, chunk=2048, ws=False)]
    chunks = [int(c) for c in os.environ.get("DEFT_PROBE_CHUNKS", "1024,2048,4096").split(",")]
    only = [x for x in os.environ.get("DEFT_PROBE_ONLY", "").split(",") if x]
    jobs = [("triton", cfg, cfg["chunk"]) for cfg in probe_cfgs]
    jobs += [("gluon", var, c) for var in variants() for c in chunks if not only or vname(var).startswith(tuple(only))]
    slots = torch.arange(n_tok, device=dev, dtype=torch.int32)
    rows: list[dict] = []
    for i, (kind, cfg, chunk) in enumerate(jobs):
        if kind == "gluon":
            row = dict(kernel="gluon", variant=vname(cfg), chunk=chunk, **cfg, **launch_config(cfg["num_wg"], cfg["mode"]))
        else:
            row = dict(kernel="triton", variant=f"probe_{cfg['load']}_m{cfg['block_m']}_n{cfg['block_n']}", chunk=chunk,
                       block_n=cfg["block_n"], stages=cfg["num_stages"])  # fmt: skip
        try:
            if kind == "gluon":
                measure(row, *make_launch(q, k, v, part_o, part_lse, cfg, chunk))
            else:
                measure(row, *run_probe(q, k, v, slots, cfg, part_o, part_lse), cfg["block_m"])
        except Exception as e:  # a variant that fails to compile or launch is a result too
            row["error"] = _err(e)
        rows.append(row | meta)
        print(f"[{i + 1}/{len(jobs)}] {row}", flush=True)
        pd.DataFrame(rows).to_csv(out_csv, index=False)
        if "error" in row and ("hang" in row["error"] or "CUDA" in row["error"]):
            print("stopping: the CUDA context is unusable after a hang or a fault", file=sys.stderr)
            break
    df = pd.DataFrame(rows)
    cols = [c for c in ("variant", "chunk", "ctas", "us", "p90_us", "tflops", "tflops_padded", "kv_bw_frac",
                        "rel_error", "error") if c in df]  # fmt: skip
    with pd.option_context("display.width", 220, "display.max_rows", 300):
        print(df.sort_values("us" if "us" in df else "variant", na_position="last")[cols].to_string(index=False))
    print(f"wrote {out_csv}")
    bad = df[df.get("rel_error", pd.Series(dtype=float)).fillna(1.0) >= 1e-2]
    if len(bad):
        print(f"{len(bad)} rows failed or were wrong", file=sys.stderr)
    if any("hang" in str(e) for e in df.get("error", [])):
        os._exit(3)  # a hung kernel would block the interpreter's CUDA teardown


if __name__ == "__main__":
    if "--aot" in sys.argv:
        aot_report()
    else:
        gpu_main()

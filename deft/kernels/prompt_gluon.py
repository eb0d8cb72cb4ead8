"""DeFT's shared-prompt tiles on Hopper, in Gluon: the kernel, its launcher and its plan (``DeftAttention.prompt_kernel``).

A shared prompt's tiles (many rows, no visibility mask, pool slots consecutive: the plan's big affine tiles) are
the step's tensor-core work. This kernel runs them FlashAttention-3 style instead of through ``tl.dot``: one CTA
per (pair of row tiles over the same chunk, KV head); a 1-warp producer streams the chunk's K and V blocks
through two TMA rings in shared memory; two consumer warpgroups (64 rows each, one tile record each) run
``warpgroup_mma`` asynchronously, the PV GEMM of block i-1 in flight during block i's softmax, and take turns
issuing their GEMMs (two mbarriers), so one's softmax overlaps the other's tensor-core work. Both warpgroups
read every K/V block the producer loaded once. H100, session 12's probe (``scripts/gluon_probe.py``, variant
``asyncpvpp_wg2_n128_s2``): 40.1-40.3 µs for the 16k prompt's partials against 48.8-49.7 for the fused
kernel's affine 64-row tile.

Partials are written exactly as :func:`~deft.kernels.tree_attention.deft_partial_kernel` writes them (normalised
O in the workspace's dtype, log2-sum-exp in fp32, at the tile's partial rows), so the global reduction is shared.
Every block is a full ``BLOCK_N``-token TMA box: the last block of a chunk whose length is not a multiple of
``BLOCK_N`` is loaded ending at the chunk's end (overlapping the block before it) and its first ``shift`` columns,
already counted, get no weight; so no box reads a slot outside the chunk, and a tile must hold ``BLOCK_N`` tokens
or more (:func:`partition_prompt_tiles` leaves shorter ones to the fused kernel).
"""

from __future__ import annotations

import functools
import math
import weakref

import numpy as np
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from deft.kernels.kv_groups import FLAG_CONTIG, FLAG_MASK, TILE_FIELDS, KVGroups

LOG2E = 1.4426950408889634
#: K/V tokens per TMA box and per GEMM, and the ring depth (session 12's fastest probe variant; session 17,
#: `scripts/prompt_probe.py`: 3 stages fit the shared memory too, 229,784 B, and were no faster; 64-token blocks at 4
#: stages 10-18 % slower, and with the S GEMM issued a block ahead, so that ptxas overlaps a block's softmax with its
#: own GEMMs, slower still, 20-32 %: commit e4368f6, `notes/deft_kernels.md`)
BLOCK_N = 128
STAGES = 2
#: rows per consumer warpgroup (``warpgroup_mma``'s M); a CTA's two warpgroups hold two tile records of these
WG_ROWS = 64
HEAD_DIMS = (64, 128)
PRODUCER_REGS = 24  # the least ``setmaxnreg`` allows
NUM_WARPS = 12  # two consumer warpgroups and the producer's (registers are handed out by whole warpgroups)
MAXNREG = 168  # registers per thread at launch: 168 x 12 warps x 32 fill the SM's 64K
CONS_REGS = 240  # each consumer warpgroup's after ``setmaxnreg`` (the producer keeps 24)


# ---------------------------------------------------------------------------------------------------------- kernel
@gluon.jit
def _producer(args, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA partition (1 warp): K_j, then V_{j-1}, each into its ring once both warpgroups released the stage.

    The consumers free K_j when its S GEMM retired but V_j only when the PV GEMM did, a block later, so K and V
    have rings of their own. Block j starts at slot ``s_lo + j * BLOCK_N``, the last one at ``s_hi - BLOCK_N``."""
    k_desc, v_desc, k_bufs, v_bufs, ready_k, ready_v, empty_k, empty_v, s_lo, s_hi, n_iter, col = args
    nbytes: gl.constexpr = BLOCK_N * k_desc.block_type.shape[1] * 2
    for j in range(n_iter + 1):
        if j < n_iter:
            sk = j % STAGES
            mbarrier.wait(empty_k.index(sk), ((j // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1 at once
            mbarrier.expect(ready_k.index(sk), nbytes)
            row = gl.minimum(s_lo + j * BLOCK_N, s_hi - BLOCK_N)
            tma.async_copy_global_to_shared(k_desc, [row, col], ready_k.index(sk), k_bufs.index(sk))
        if j > 0:
            jv = j - 1
            sv = jv % STAGES
            mbarrier.wait(empty_v.index(sv), ((jv // STAGES) & 1) ^ 1)
            mbarrier.expect(ready_v.index(sv), nbytes)
            row_v = gl.minimum(s_lo + jv * BLOCK_N, s_hi - BLOCK_N)
            tma.async_copy_global_to_shared(v_desc, [row_v, col], ready_v.index(sv), v_bufs.index(sv))


@gluon.jit
def _turn_wait(turn, k, W: gl.constexpr):
    """Before warpgroup W's k-th GEMM issue, wait until the other one issued its (k-1)-th (warpgroup 0 first)."""
    mbarrier.wait(turn.index(W), (k + 1 - W) & 1)


@gluon.jit
def _turn_pass(turn, W: gl.constexpr):
    """Warpgroup W issued its GEMMs; the other may issue its next ones."""
    mbarrier.arrive(turn.index(1 - W))


@gluon.jit
def _softmax_step(sc, m_i, l_i, qk_scale):
    """One block's online-softmax update: (P, alpha, new max, new sum) from the raw scores, in the log2 domain. The
    scale goes onto the row max and into each exponent's FFMA (``qk_scale`` > 0, so the max commutes with it): the
    same bits as scaling every score first, 64 multiplies fewer per thread and block (H100, session 17: the kernel
    alone 0.5-4 % faster on the few-shot 16k plans, ``scripts/prompt_probe.py``)."""
    m_new = gl.maximum(m_i, gl.max(sc, 1) * qk_scale)
    p = gl.exp2(sc * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _globaltimer(anchor):
    """The GPU's global nanosecond timer (comparable across SMs); ``anchor`` (any int32 scalar) is unused."""
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [anchor], dtype=gl.int64, is_pure=False,
                                     pack=1)  # fmt: skip


@gluon.jit
def _launch_dependents(anchor):
    """``griddepcontrol.launch_dependents`` (Gluon 3.6 has no wrapper for it); ``anchor`` is unused."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents;\n mov.u32 $0, 0;", "=r,r", [anchor], dtype=gl.int32,
                              is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _fence_release(anchor):
    """``fence.acq_rel.gpu`` in every thread: its stores so far are ordered before its (or, after a barrier, its
    warpgroup's) next release; ``anchor`` is unused."""
    gl.inline_asm_elementwise("fence.acq_rel.gpu;\n mov.u32 $0, 0;", "=r,r", [anchor], dtype=gl.int32, is_pure=False,
                              pack=1)  # fmt: skip


@gluon.jit
def _smid(anchor):
    """The SM this CTA runs on."""
    return gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [anchor], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _consumer(common, q_smem, q_lo, n_q, pbase, GROUP: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              W: gl.constexpr, TIMELINE: gl.constexpr, SIGNAL: gl.constexpr):  # fmt: skip
    """Warpgroup W: the online-softmax attention of one tile record's rows (``n_q`` queries x GROUP heads, padded
    to 64 with zero rows that are not stored) over the chunk, then its partials.

    Iteration i (1 <= i < n_iter) issues S_i = Q K_i^T and O += P_{i-1} V_{i-1}, waits for S_i alone, frees K_i,
    runs block i's softmax while the PV GEMM runs, waits for it, frees V_{i-1} and rescales O by block i's alpha."""
    (q_ptr, meta, part_o, part_lse, k_bufs, v_bufs, ready_k, ready_v, empty_k, empty_v, turn, off_queries, head0,
     n_iter, shift, stride_qn, stride_qh, stride_pn, stride_ph, stride_ln, qk_scale, timeline, tl_at, signal) = common
    NW: gl.constexpr = gl.num_warps()
    ROWS: gl.constexpr = q_smem.type.shape[0]
    D: gl.constexpr = q_smem.type.shape[1]
    DT: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, D, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)  # A in registers
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    cols = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))

    # this tile's query rows -> shared memory: row r is query (q_lo + r // GROUP), head head0 + r % GROUP
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [NW, 1], [1, 0])
    r_ld = gl.arange(0, ROWS, gl.SliceLayout(1, ld_layout))
    ok_ld = r_ld // GROUP < n_q
    qid = gl.load(meta + off_queries + (q_lo + r_ld // GROUP) * 3, mask=ok_ld, other=0).to(gl.int64)
    q_off = qid * stride_qn + (head0 + r_ld % GROUP) * stride_qh
    d_ld = gl.arange(0, D, gl.SliceLayout(0, ld_layout))
    q_ptrs = q_ptr + gl.expand_dims(q_off, 1) + gl.expand_dims(d_ld, 0)
    q_smem.store(gl.load(q_ptrs, mask=gl.expand_dims(ok_ld, 1), other=0.0))
    fence_async_shared()  # generic-proxy stores -> async-proxy (wgmma) reads
    gl.thread_barrier()

    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    o = gl.zeros([ROWS, D], gl.float32, o_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([ROWS], gl.float32, row_s)

    # S_0, then free K_0 (a stage is free once every warp of both warpgroups retired the GEMM reading it)
    mbarrier.wait(ready_k.index(0), 0)
    _turn_wait(turn, 0, W)
    s_tok = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    _turn_pass(turn, W)
    sc = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
    gl.thread_barrier()
    mbarrier.arrive(empty_k.index(0))
    if n_iter == 1:  # block 0 is the chunk's last: its first `shift` columns are not this chunk's
        sc = gl.where(gl.expand_dims(cols >= shift, 0), sc, float("-inf"))
    p, alpha, m_i, l_i = _softmax_step(sc, m_i, l_i, qk_scale)
    pa = gl.convert_layout(p.to(DT), p_layout)
    for i in range(1, n_iter):
        sk = i % STAGES
        jv = i - 1
        sv = jv % STAGES
        mbarrier.wait(ready_k.index(sk), (i // STAGES) & 1)
        mbarrier.wait(ready_v.index(sv), (jv // STAGES) & 1)
        _turn_wait(turn, i, W)
        s_tok = warpgroup_mma(q_smem, k_bufs.index(sk).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        o_tok = warpgroup_mma(pa, v_bufs.index(sv), o, is_async=True)
        _turn_pass(turn, W)
        sc = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])  # S_i retired; P_{i-1} V_{i-1} may run on
        gl.thread_barrier()
        mbarrier.arrive(empty_k.index(sk))
        if i == n_iter - 1:  # the last block ends at the chunk's end; its first `shift` columns were counted
            sc = gl.where(gl.expand_dims(cols >= shift, 0), sc, float("-inf"))
        p, alpha, m_i, l_i = _softmax_step(sc, m_i, l_i, qk_scale)
        pa_next = gl.convert_layout(p.to(DT), p_layout)
        o, pa = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, pa])
        gl.thread_barrier()
        mbarrier.arrive(empty_v.index(sv))
        o = o * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        pa = pa_next

    # the last block's PV GEMM (V_{n-1} is not freed: the producer loads nothing after it)
    last = n_iter - 1
    sl = last % STAGES
    mbarrier.wait(ready_v.index(sl), (last // STAGES) & 1)
    _turn_wait(turn, n_iter, W)
    o_tok = warpgroup_mma(pa, v_bufs.index(sl), o, is_async=True)
    _turn_pass(turn, W)
    o, pa = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, pa])

    # normalised O and log2-sum-exp at the tile's partial rows (pbase + local query), as the fused kernel stores them
    l_o = gl.convert_layout(l_i, row_o)
    out = o / gl.expand_dims(l_o, 1)
    r = gl.arange(0, ROWS, row_o)
    ok = r // GROUP < n_q
    prow = (pbase + r // GROUP).to(gl.int64)
    head = head0 + r % GROUP
    d = gl.arange(0, D, gl.SliceLayout(0, o_layout))
    o_ptrs = part_o + gl.expand_dims(prow * stride_pn + head * stride_ph, 1) + gl.expand_dims(d, 0)
    gl.store(o_ptrs, out.to(part_o.dtype.element_ty), mask=gl.expand_dims(ok, 1))
    gl.store(part_lse + prow * stride_ln + head, gl.convert_layout(m_i, row_o) + gl.log2(l_o), mask=ok)
    if SIGNAL:  # count this warpgroup done, after every thread's stores (the branches' kernel merges on the count)
        _fence_release(n_iter)
        gl.thread_barrier()
        gl.atomic_add(signal, 1, sem="release", scope="gpu")
    if TIMELINE:  # this warpgroup's end, after its stores
        gl.store(timeline + tl_at + 1 + W, _globaltimer(n_iter))


# the plan's offsets and pair count change from step to step: not specialised (a value that is 1 or a multiple of 16
# would otherwise compile a variant of its own, seconds for this kernel, the first time a step's plan had one: an
# end-to-end few-shot 16k run lost 2.06 s in one step that way, session 18)
@gluon.jit(do_not_specialize=["off_tok_slot", "off_queries", "n_pairs"], do_not_specialize_on_alignment=["meta"])
def prompt_partial_kernel(q_ptr, k_desc, v_desc, part_o, part_lse, meta, off_tok_slot, off_queries, n_pairs,
                          stride_qn, stride_qh, stride_pn, stride_ph, stride_ln, qk_scale, timeline, signal,
                          GROUP: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                          CONS_REGS: gl.constexpr, PROD_REGS: gl.constexpr, TIMELINE: gl.constexpr,
                          PDL_TRIGGER: gl.constexpr = False, SIGNAL: gl.constexpr = False):  # fmt: skip
    """Grid (CTAs, KV heads). CTA c < n_pairs runs tile records 2c (warpgroup 0) and 2c + 1 (warpgroup 1), which
    share a token range; CTA c >= n_pairs runs record n_pairs + c alone (warpgroup 1 computes zero rows and
    stores nothing). Records come first in the packed array (:func:`partition_prompt_tiles` put them there).
    ``TIMELINE`` (diagnostics): CTA (c, kvh) writes its start, each warpgroup's end (``%globaltimer`` ns) and its SM
    at ``timeline[4 (kvh x CTAs + c) :][:4]``. ``SIGNAL``: each consumer warpgroup adds one to ``signal[0]`` (int32)
    after its partial stores, with release semantics (a merging launch after it waits for 2 x CTAs x KV heads)."""
    D: gl.constexpr = k_desc.block_type.shape[1]
    DT: gl.constexpr = k_desc.dtype
    c = gl.program_id(0)
    kvh = gl.program_id(1)
    tl_at = (kvh * gl.num_programs(0) + c).to(gl.int64) * 4
    if PDL_TRIGGER:  # a programmatic dependent may launch once every CTA is here (all hold their SMs by then)
        _launch_dependents(c)
    if TIMELINE:
        gl.store(timeline + tl_at, _globaltimer(c))
        gl.store(timeline + tl_at + 3, _smid(c).to(gl.int64))
    rec_a = c + gl.minimum(c, n_pairs)
    rec_b = c + gl.minimum(c + 1, n_pairs)
    ra = meta + rec_a * 6
    rb = meta + rec_b * 6
    t_lo = gl.load(ra)
    t_hi = gl.load(ra + 1)
    q_lo_a = gl.load(ra + 2)
    n_q_a = gl.load(ra + 3) - q_lo_a
    pbase_a = gl.load(ra + 4)
    q_lo_b = gl.load(rb + 2)
    n_q_b = (gl.load(rb + 3) - q_lo_b) * (rec_b - rec_a)  # a single's warpgroup 1: no rows
    pbase_b = gl.load(rb + 4)
    s_lo = gl.load(meta + off_tok_slot + t_lo)  # the chunk's slots are consecutive from here
    n_tok = t_hi - t_lo
    n_iter = gl.cdiv(n_tok, BLOCK_N)
    shift = n_iter * BLOCK_N - n_tok
    col = kvh * D
    head0 = kvh * GROUP

    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, D], DT)
    k_bufs = gl.allocate_shared_memory(DT, [STAGES, BLOCK_N, D], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(DT, [STAGES, BLOCK_N, D], v_desc.layout)
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    ready_k = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    ready_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    empty_k = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    empty_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready_k.index(s), count=1)  # the expect-tx arrival; the TMA bytes complete the phase
        mbarrier.init(ready_v.index(s), count=1)
        mbarrier.init(empty_k.index(s), count=2)  # one arrival per consumer warpgroup
        mbarrier.init(empty_v.index(s), count=2)
    for w in gl.static_range(2):
        mbarrier.init(turn.index(w), count=1)  # one arrival by the other warpgroup
    fence_async_shared()
    q_smem = gl.allocate_shared_memory(DT, [2, 64, D], q_layout)
    common = (q_ptr, meta, part_o, part_lse, k_bufs, v_bufs, ready_k, ready_v, empty_k, empty_v, turn, off_queries,
              head0, n_iter, shift, stride_qn, stride_qh, stride_pn, stride_ph, stride_ln, qk_scale, timeline,
              tl_at, signal)  # fmt: skip
    prod = (k_desc, v_desc, k_bufs, v_bufs, ready_k, ready_v, empty_k, empty_v, s_lo, s_lo + n_tok, n_iter, col)
    gl.warp_specialize([
        (_consumer, (common, q_smem.index(0), q_lo_a, n_q_a, pbase_a, GROUP, BLOCK_N, STAGES, 0, TIMELINE, SIGNAL)),
        (_consumer, (common, q_smem.index(1), q_lo_b, n_q_b, pbase_b, GROUP, BLOCK_N, STAGES, 1, TIMELINE, SIGNAL)),
        (_producer, (prod, BLOCK_N, STAGES)),
    ], [4, 1], [CONS_REGS, PROD_REGS])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- plan
def prompt_tile_mask(g: KVGroups, group: int, small_rows: int, min_tokens: int = BLOCK_N) -> np.ndarray:
    """Which of ``g``'s tile records this kernel runs: more rows than the fused kernel's small tile holds
    (``small_rows``; a one-query branch would pad a warpgroup's 64 rows fourfold) and at most a warpgroup's 64, no
    visibility mask, consecutive slots, and at least ``min_tokens`` tokens (every block a full TMA box inside the
    chunk): a shared prompt's row tiles."""
    t = g.section("tiles").reshape(-1, len(TILE_FIELDS))
    rows = (t[:, 3] - t[:, 2]).astype(np.int64) * group
    return (
        (rows > small_rows)
        & (rows <= WG_ROWS)
        & ((t[:, 5] & FLAG_MASK) == 0)
        & ((t[:, 5] & FLAG_CONTIG) != 0)
        & (t[:, 1] - t[:, 0] >= min_tokens)
    )


def partition_prompt_tiles(
    g: KVGroups, group: int, small_rows: int, min_tokens: int = BLOCK_N, native: bool = True
) -> tuple[int, int]:
    """Reorder ``g``'s tile records in place for this kernel: its tiles (:func:`prompt_tile_mask`) first, stably
    sorted by token range, those of a range two by two (records 2c and 2c + 1 for CTA c), then each odd range's last
    one, then every other tile in its current order (the fused kernel's launch, longest first as the plan put them).
    Returns (the kernel's tiles, its pairs); with (0, 0) the records are as they were. ``native``: the C version
    (:func:`~deft.kernels.plan_native.prompt_partition_native`, the same order) where it can run; this numpy one is
    its reference, and about 50 µs of a plan's host time (12 numpy calls) against the C one's few."""
    min_tokens = max(min_tokens, BLOCK_N)
    t = g.section("tiles").reshape(-1, len(TILE_FIELDS))
    if native:
        from deft.kernels.plan_native import prompt_partition_native

        done = prompt_partition_native(t, group, small_rows, WG_ROWS, min_tokens)
        if done is not None:
            return done
    mine = prompt_tile_mask(g, group, small_rows, min_tokens)
    n_mine = int(np.count_nonzero(mine))
    if n_mine == 0:
        return 0, 0
    sel = t[mine]
    sel = sel[np.lexsort((sel[:, 1], sel[:, 0]))]  # by token range, stable
    new_range = np.r_[True, (sel[1:, 0] != sel[:-1, 0]) | (sel[1:, 1] != sel[:-1, 1])]
    starts = np.flatnonzero(new_range)
    sizes = np.diff(np.r_[starts, n_mine])
    rank = np.arange(n_mine) - np.repeat(starts, sizes)  # index within its token range
    paired = rank < np.repeat(sizes - sizes % 2, sizes)
    t[...] = np.concatenate([sel[paired], sel[~paired], t[~mine]])
    return n_mine, int(np.count_nonzero(paired)) // 2


# ---------------------------------------------------------------------------------------------------------- launcher
@functools.cache
def _major(device: torch.device) -> int:
    """The device's compute capability major (looked up once per device: ``supported`` runs once per layer)."""
    return torch.cuda.get_device_capability(device)[0]


def supported(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> bool:
    """Whether this kernel can run on these tensors: a Hopper GPU, fp16/bf16, head_dim 64/128, pools whose
    [slots, kv_heads * head_dim] view a TMA descriptor can address (contiguous, 16-byte aligned)."""
    if q.device.type != "cuda" or _major(q.device) != 9:
        return False
    return (
        q.dtype in (torch.float16, torch.bfloat16)
        and k_pool.shape[2] in HEAD_DIMS
        and all(p.is_contiguous() and p.data_ptr() % 16 == 0 for p in (k_pool, v_pool))
    )


@functools.cache
def _box_layout(block: int, head_dim: int, bf16: bool) -> gl.NVMMASharedLayout:
    """The shared layout of a [block, head_dim] TMA box (made once: 6 µs each, and ``run`` needs two per layer)."""
    return gl.NVMMASharedLayout.get_default_for([block, head_dim], gl.bfloat16 if bf16 else gl.float16)


def _descriptor(pool: torch.Tensor, cache: dict | None = None):
    """TMA descriptor of ``pool`` [slots, kv_heads, d] viewed as [slots, kv_heads * d], box [BLOCK_N, d]. With
    ``cache`` (a dict the caller owns: ``DeftAttention`` keeps one per method), made once per pool object: ``run``
    needs two per layer, and an engine passes the same per-layer pool tensors every step (H100, session 18: ``run``'s
    host time 191 -> 164 µs). An entry holds its pool's memory (the descriptor references it), so entries whose pool
    object the caller has dropped are cleared at the next miss, and all of them go with the cache's owner."""
    key = (pool.data_ptr(), tuple(pool.shape), pool.stride(), pool.dtype, pool.device, BLOCK_N)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None and hit[0]() is pool:
            return hit[1]
        for k in [k for k, (ref, _) in cache.items() if ref() is None]:
            del cache[k]
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    n, h, d = pool.shape
    # on a detached alias of the pool (the same memory), so the descriptor does not keep the caller's tensor object
    # alive, and the cache's weak reference to it dies when the caller drops it
    desc = TensorDescriptor.from_tensor(
        pool.detach().view(n, h * d), [BLOCK_N, d], _box_layout(BLOCK_N, d, pool.dtype == torch.bfloat16)
    )
    if cache is not None:
        cache[key] = (weakref.ref(pool), desc)
    return desc


def launch_prompt_partials(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    meta: torch.Tensor,
    offsets: dict[str, tuple[int, int]],
    n_tiles: int,
    n_pairs: int,
    warmup: bool = False,
    timeline: torch.Tensor | None = None,
    descriptors: dict | None = None,
    pdl_trigger: bool = False,
    signal: torch.Tensor | None = None,
) -> None:
    """Partials of the first ``n_tiles`` tile records of ``meta`` (laid out by :func:`partition_prompt_tiles`,
    ``n_pairs`` pairs first), every KV head, into the workspace rows the records name. ``warmup``: compile (or
    load) the kernel for these arguments' types without running it. ``timeline`` (diagnostics): an int64 tensor of
    at least 4 x CTAs x KV heads entries, each CTA's start, its two warpgroups' ends and its SM (see
    :func:`prompt_partial_kernel`; ``scripts/gluon_timeline.py``). ``descriptors``: the caller's cache of the
    pools' TMA descriptors (:func:`_descriptor`). ``signal`` (int32): each consumer warpgroup of each CTA adds one to
    ``signal[0]`` once its partials are stored (:func:`signal_target` in all).
    The block and the ring depth are this module's :data:`BLOCK_N` and :data:`STAGES`, read at each launch (so a
    probe can set them)."""
    if n_tiles == 0 and not warmup:
        return
    n_kv, d = k_pool.shape[1], k_pool.shape[2]
    kernel = prompt_partial_kernel[(n_tiles - n_pairs, n_kv)]
    if warmup:
        kernel = functools.partial(prompt_partial_kernel.warmup, grid=(1, n_kv))
    kernel(
        q, _descriptor(k_pool, descriptors), _descriptor(v_pool, descriptors), part_o, part_lse, meta, offsets["tok_slot"][0],
        offsets["queries"][0], n_pairs, q.stride(0), q.stride(1), part_o.stride(0), part_o.stride(1),
        part_lse.stride(0), LOG2E / math.sqrt(d), part_lse if timeline is None else timeline,
        meta if signal is None else signal, GROUP=q.shape[1] // n_kv, BLOCK_N=BLOCK_N, STAGES=STAGES,
        CONS_REGS=CONS_REGS, PROD_REGS=PRODUCER_REGS, TIMELINE=timeline is not None, PDL_TRIGGER=bool(pdl_trigger),
        SIGNAL=signal is not None, num_warps=4, maxnreg=MAXNREG,
    )  # fmt: skip


def signal_target(n_tiles: int, n_pairs: int, n_kv_heads: int) -> int:
    """What ``signal[0]`` reaches when :func:`launch_prompt_partials` with these tiles and pairs is done: two consumer
    warpgroups per CTA, ``n_tiles - n_pairs`` CTAs per KV head."""
    return 2 * (n_tiles - n_pairs) * n_kv_heads

"""The fused DeFT attention kernel: per (tile, KV head), partial attention of the tile's queries over
its chunk of gathered K/V, with online softmax; writes a normalised partial output and its log-sum-exp.

GQA-aware: a tile's rows are (local query, query head of this KV head), so each K/V block is loaded
once for all ``group`` query heads that share it; ``tl.dot`` runs the rows on tensor cores. A tile runs in
two phases: the tokens all its rows see whole (no visibility test; affine addresses when their pool slots
are consecutive), then the rest with the per-token ancestor/causal test (``kv_groups.TILE_FIELDS``).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from deft.kernels.kv_groups import small_tile_rows  # noqa: F401 (the kernel's small tile; re-exported)

LOG2E = 1.4426950408889634


def _dot_f32(dtype: torch.dtype) -> bool:
    """The Triton interpreter (3.6) computes bf16 ``tl.dot`` wrongly; there, upcast to fp32 first."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _attend_chunk(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_ks,
    stride_vs,
    tok_slot,
    tok_node,
    nodes,
    t_lo,
    t_hi,
    row_tin,
    row_vis,
    qk_scale,
    t_mask,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    PREFETCH: tl.constexpr,
    DOT_F32: tl.constexpr,
    IDX_INLOOP: tl.constexpr,
    AFFINE: tl.constexpr,
    UNIFIED: tl.constexpr = False,
    STAGES: tl.constexpr = None,
):
    """Online softmax of the tile's rows over flat tokens ``[t_lo, t_hi)``: the inner loop.

    The next block's slot indices are loaded one iteration ahead, and K and V of a block are issued
    together, so the gathers never wait on an index load; with ``PREFETCH`` the next block's K and V
    themselves are loaded into registers before the current block is computed (two blocks in flight).
    With ``IDX_INLOOP`` the slot indices are loaded at the top of each iteration instead, the plain
    gather idiom that Triton's software pipeliner can schedule ``num_stages`` blocks ahead.
    With ``AFFINE`` (the plan found the chunk's slots consecutive, as a prefilled prompt's are) the
    addresses are the first slot plus the token offset: no per-token index loads, and addresses the
    compiler knows are contiguous, so K and V stream like a dense tensor's. With ``MASKED`` and ``UNIFIED`` only
    the tokens from ``t_mask`` on are tested (the node loads of the others are predicated off), so one copy of the
    loop serves a tile's unmasked and masked phases (a smaller kernel; see ``DeftAttention.unified_mask``). ``STAGES``:
    this loop's software-pipelining depth (``tl.range``'s ``num_stages``; None: the launch's ``num_stages``)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # Only the hand-pipelined modes carry state across iterations; in the others every address is a
    # function of the loop's induction variable, which is what lets Triton's software pipeliner issue
    # the loads of later blocks (``num_stages``) while this one computes.
    if AFFINE:
        base = tl.load(tok_slot + t_lo).to(tl.int64) - t_lo
    elif PREFETCH:
        # K/V of the next block are loaded into registers before this block is computed
        t0 = t_lo + offs_n
        slot = tl.load(tok_slot + t0, mask=t0 < t_hi, other=0).to(tl.int64)
        k = tl.load(k_base + slot[:, None] * stride_ks + offs_d[None, :], mask=(t0 < t_hi)[:, None], other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_vs + offs_d[None, :], mask=(t0 < t_hi)[:, None], other=0.0)
        slot = tl.load(tok_slot + t0 + BLOCK_N, mask=t0 + BLOCK_N < t_hi, other=0).to(tl.int64)
    elif not IDX_INLOOP:
        t0 = t_lo + offs_n
        slot = tl.load(tok_slot + t0, mask=t0 < t_hi, other=0).to(tl.int64)
    for start in tl.range(t_lo, t_hi, BLOCK_N, num_stages=STAGES):
        t = start + offs_n
        valid = t < t_hi
        if AFFINE:
            addr = base + t
            k_cur = tl.load(k_base + addr[:, None] * stride_ks + offs_d[None, :], mask=valid[:, None], other=0.0)
            v_cur = tl.load(v_base + addr[:, None] * stride_vs + offs_d[None, :], mask=valid[:, None], other=0.0)
        elif PREFETCH:
            t_next = t + BLOCK_N
            nvalid = t_next < t_hi
            k_cur = k
            v_cur = v
            k = tl.load(k_base + slot[:, None] * stride_ks + offs_d[None, :], mask=nvalid[:, None], other=0.0)
            v = tl.load(v_base + slot[:, None] * stride_vs + offs_d[None, :], mask=nvalid[:, None], other=0.0)
            slot = tl.load(tok_slot + t_next + BLOCK_N, mask=t_next + BLOCK_N < t_hi, other=0).to(tl.int64)
        elif IDX_INLOOP:
            idx = tl.load(tok_slot + t, mask=valid, other=0).to(tl.int64)
            k_cur = tl.load(k_base + idx[:, None] * stride_ks + offs_d[None, :], mask=valid[:, None], other=0.0)
            v_cur = tl.load(v_base + idx[:, None] * stride_vs + offs_d[None, :], mask=valid[:, None], other=0.0)
        else:
            t_next = t + BLOCK_N
            k_cur = tl.load(k_base + slot[:, None] * stride_ks + offs_d[None, :], mask=valid[:, None], other=0.0)
            v_cur = tl.load(v_base + slot[:, None] * stride_vs + offs_d[None, :], mask=valid[:, None], other=0.0)
            slot = tl.load(tok_slot + t_next, mask=t_next < t_hi, other=0).to(tl.int64)
        if DOT_F32:
            k_cur = k_cur.to(tl.float32)
            v_cur = v_cur.to(tl.float32)
        s = tl.dot(q, tl.trans(k_cur)) * qk_scale
        if MASKED:
            # visibility: ancestor-or-self, and causal inside the query's own node; with UNIFIED only the tokens
            # from t_mask on are tested (every row sees the ones before, whose node loads are predicated off)
            if UNIFIED:
                tested = valid & (t >= t_mask)
            else:
                tested = valid
            node = tl.load(tok_node + t, mask=tested, other=0) * 3
            pos = t - tl.load(nodes + node, mask=tested, other=0)
            tin = tl.load(nodes + node + 1, mask=tested, other=0)
            end = tl.load(nodes + node + 2, mask=tested, other=0)
            vis = (
                (tin[None, :] <= row_tin[:, None])
                & (row_tin[:, None] < end[None, :])
                & ((row_tin[:, None] != tin[None, :]) | (pos[None, :] < row_vis[:, None]))
            )
            if UNIFIED:
                vis = vis | (t < t_mask)[None, :]
            s = tl.where(vis & valid[None, :], s, float("-inf"))
        else:
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_cur.dtype), v_cur)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _globaltimer(anchor):
    """The GPU's global nanosecond timer (comparable across SMs, unlike ``clock64``); ``anchor`` is unused."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,l", [anchor], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _prefetch_kv_l2(k_base, v_base, slot, stride_ks, stride_vs, HEAD_DIM: tl.constexpr):
    """Ask L2 for the K and V rows of pool ``slot`` (``prefetch.global.L2``, one per 128-byte line; a hint, no result).
    A tile issues it for its first two K/V blocks between loading its query records and its queries: the query chain
    (tile record, query records, queries, their store to shared memory) otherwise runs before the first K/V copy is
    issued, so a short tile waits for the two chains one after the other instead of side by side."""
    line = tl.arange(0, HEAD_DIM // 64) * 64  # fp16/bf16: 64 elements per 128-byte line
    kp = k_base + slot[:, None] * stride_ks + line[None, :]
    vp = v_base + slot[:, None] * stride_vs + line[None, :]
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [kp], dtype=tl.int32, is_pure=False, pack=1)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [vp], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _smid(anchor):
    """The SM this program runs on; ``anchor`` is unused."""
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,l", [anchor], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _write_timeline(timeline, t_start, anchor):
    """Diagnostics: this program's start (``t_start``), end (now, global ns) and SM at 4 int64 per program of a
    2-D grid, in linear program order."""
    pid = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * 4
    tl.store(timeline + pid, t_start)
    tl.store(timeline + pid + 1, _globaltimer(anchor))
    tl.store(timeline + pid + 2, _smid(anchor).to(tl.int64))


# ``meta``'s alignment is not specialised either: a launch over a plan's later tiles (the Gluon path's rest, a split
# plan's small tiles) gets a view starting ``n x TILE_FIELDS`` words in, 16-byte aligned or not with ``n``'s parity
@triton.jit(
    do_not_specialize=["off_tok_slot", "off_tok_node", "off_nodes", "off_queries", "off_red_ptr", "off_red_idx"],
    do_not_specialize_on_alignment=["meta"],
)
def deft_partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    part_o,
    part_lse,
    meta,
    off_tok_slot,
    off_tok_node,
    off_nodes,
    off_queries,
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
    out_ptr,
    counters,
    off_red_ptr,
    off_red_idx,
    stride_on,
    stride_oh,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SMALL_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PREFETCH: tl.constexpr,
    DOT_F32: tl.constexpr,
    IDX_INLOOP: tl.constexpr,
    CONTIG: tl.constexpr,
    HEAD_FASTEST: tl.constexpr,
    N_KV: tl.constexpr,
    TIMELINE: tl.constexpr,
    PDL_TRIGGER: tl.constexpr,
    UNIFIED: tl.constexpr = False,
    AFFINE_BIG: tl.constexpr = False,
    SMALL_STAGES: tl.constexpr = 5,
    SMALL_BLOCK_N: tl.constexpr = 32,
    SMALL_AFFINE: tl.constexpr = False,
    FUSED_REDUCE: tl.constexpr = False,
    L2_PREFETCH: tl.constexpr = False,
    BIG_GATHER_BLOCK_N: tl.constexpr = 64,
    BIG_GATHER_STAGES: tl.constexpr = None,
):
    if PDL_TRIGGER:  # a reduction launched as a programmatic dependent may start once every program is here
        tl.extra.cuda.gdc_launch_dependents()
    if TIMELINE:  # diagnostics only: this program's start (global ns), end and SM, at 4 int64 per program
        t_start = _globaltimer(q_ptr)
    if HEAD_FASTEST:  # one axis, the KV heads of a tile next to each other: tiles start in the plan's order
        tile = tl.program_id(0) // N_KV
        kvh = tl.program_id(0) % N_KV
    else:  # the tiles of one KV head next to each other, head after head
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
    rec = meta + tile * 6  # the tiles section starts the packed array
    t_lo = tl.load(rec)
    t_hi = tl.load(rec + 1)
    q_lo = tl.load(rec + 2)
    n_q = tl.load(rec + 3) - q_lo
    pbase = tl.load(rec + 4)
    # bits 0 and 1: the masked phase is not empty; the unmasked phase's slots are consecutive. Bits 2 and
    # up: the unmasked phase's length, [t_lo, t_mid); the masked phase is [t_mid, t_hi).
    flags = tl.load(rec + 5)
    t_mid = t_lo + (flags >> 2)

    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh
    # tiles whose rows fit SMALL_M run the small tile (a quarter of the tensor-core work per token for a
    # branch with one or two queries); the small tile has no affine copy (few-query nodes are decoded
    # tokens, whose slots are rarely consecutive), which keeps the kernel's code small
    # with UNIFIED a masked tile always runs the big tile, so the small one compiles one plain gathered loop
    if SMALL_M < BLOCK_M:
        if UNIFIED:
            small = (n_q * GROUP <= SMALL_M) & ((flags & 1) == 0)
        else:
            small = n_q * GROUP <= SMALL_M
    else:
        small = False
    if small:
        _tile(
            q_ptr, k_base, v_base, part_o, part_lse, meta, off_tok_slot, off_tok_node, off_nodes, off_queries,
            stride_qn, stride_qh, stride_ks, stride_vs, stride_pn, stride_ph, stride_ln, qk_scale,
            kvh, t_lo, t_mid, t_hi, q_lo, n_q, pbase, flags, GROUP, SMALL_M, SMALL_BLOCK_N,
            HEAD_DIM, PREFETCH, DOT_F32, IDX_INLOOP, SMALL_AFFINE, UNIFIED, UNIFIED | AFFINE_BIG, STAGES=SMALL_STAGES,
            out_ptr=out_ptr, counters=counters, off_red_ptr=off_red_ptr, off_red_idx=off_red_idx, stride_on=stride_on,
            stride_oh=stride_oh, N_HEADS=N_KV * GROUP, FUSED_REDUCE=FUSED_REDUCE, L2_PREFETCH=L2_PREFETCH,
            GATHER_BLOCK_N=SMALL_BLOCK_N, GATHER_STAGES=SMALL_STAGES,
        )  # fmt: skip
    else:
        _tile(
            q_ptr, k_base, v_base, part_o, part_lse, meta, off_tok_slot, off_tok_node, off_nodes, off_queries,
            stride_qn, stride_qh, stride_ks, stride_vs, stride_pn, stride_ph, stride_ln, qk_scale,
            kvh, t_lo, t_mid, t_hi, q_lo, n_q, pbase, flags, GROUP, BLOCK_M, BLOCK_N, HEAD_DIM, PREFETCH, DOT_F32, IDX_INLOOP, CONTIG, UNIFIED,
            False, AFFINE_BIG, out_ptr=out_ptr, counters=counters, off_red_ptr=off_red_ptr, off_red_idx=off_red_idx,
            stride_on=stride_on, stride_oh=stride_oh, N_HEADS=N_KV * GROUP, FUSED_REDUCE=FUSED_REDUCE,
            L2_PREFETCH=L2_PREFETCH, GATHER_BLOCK_N=BIG_GATHER_BLOCK_N, GATHER_STAGES=BIG_GATHER_STAGES,
        )  # fmt: skip
    if TIMELINE:
        _write_timeline(timeline, t_start, q_ptr)


@triton.jit
def _tile(
    q_ptr, k_base, v_base, part_o, part_lse, meta, off_tok_slot, off_tok_node, off_nodes, off_queries,
    stride_qn, stride_qh, stride_ks, stride_vs, stride_pn, stride_ph, stride_ln, qk_scale,
    kvh, t_lo, t_mid, t_hi, q_lo, n_q, pbase, flags,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    PREFETCH: tl.constexpr, DOT_F32: tl.constexpr, IDX_INLOOP: tl.constexpr, CONTIG: tl.constexpr,
    UNIFIED: tl.constexpr, PLAIN: tl.constexpr, AFFINE_ONLY: tl.constexpr = False, STAGES: tl.constexpr = None,
    out_ptr=None, counters=None, off_red_ptr=0, off_red_idx=0, stride_on=0, stride_oh=0, N_HEADS: tl.constexpr = 0,
    FUSED_REDUCE: tl.constexpr = False, L2_PREFETCH: tl.constexpr = False, GATHER_BLOCK_N: tl.constexpr = 0,
    GATHER_STAGES: tl.constexpr = None,
):  # fmt: skip
    """One tile: load its rows' queries, attend over the chunk in two phases, store the normalised partial
    and LSE. Phase one, ``[t_lo, t_mid)``, is seen whole by every row (the plan's unmasked prefix: a
    shared ancestor's tokens), so it carries no visibility test, and with ``CONTIG`` it takes affine
    addresses when the plan flagged its slots consecutive; phase two, ``[t_mid, t_hi)``, tests visibility
    per token (empty for most tiles). With ``UNIFIED`` the gathered tokens of both phases run one loop that tests
    only those from ``t_mid`` on. ``PLAIN``: the caller runs only tiles without a masked phase here, so only the
    first phase's loop is compiled (gathered, and with ``CONTIG`` the affine one too). ``FUSED_REDUCE``: then the global
    reduction of the rows whose last partial this program wrote (:func:`_merge_if_last`). ``GATHER_BLOCK_N`` /
    ``GATHER_STAGES``: the K/V block and pipeline depth of the loops over gathered slots (the affine loop keeps
    ``BLOCK_N`` / ``STAGES``). ``L2_PREFETCH``: the first two K/V blocks' rows are prefetched into L2 before the
    queries are loaded (:func:`_prefetch_kv_l2`)."""
    if L2_PREFETCH:  # the first two blocks' slots, loaded beside the query records (the tail past t_hi: pool row 0)
        pf_t = t_lo + tl.arange(0, 2 * BLOCK_N)
        pf_slot = tl.load(meta + off_tok_slot + pf_t, mask=pf_t < t_hi, other=0).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    lq = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = lq < n_q
    qrec = meta + off_queries + (q_lo + lq) * 3
    qid = tl.load(qrec, mask=row_ok, other=0).to(tl.int64)
    row_tin = tl.load(qrec + 1, mask=row_ok, other=-1)
    row_vis = tl.load(qrec + 2, mask=row_ok, other=0)
    if L2_PREFETCH:
        _prefetch_kv_l2(k_base, v_base, pf_slot, stride_ks, stride_vs, HEAD_DIM)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + qid[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    tok_slot = meta + off_tok_slot
    tok_node = meta + off_tok_node
    nodes = meta + off_nodes
    if AFFINE_ONLY:  # every tile here is unmasked over consecutive slots (the plan's AFFINE_BIG): the affine loop alone
        acc, m_i, l_i = _attend_chunk(
            acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, tok_slot, tok_node, nodes, t_lo, t_hi,
            row_tin, row_vis, qk_scale, t_lo, BLOCK_N, HEAD_DIM, False, PREFETCH, DOT_F32, IDX_INLOOP, True,
        )  # fmt: skip
    elif UNIFIED and not PLAIN:  # one gathered loop for both phases (the test from t_mid on); the affine copy apart
        t_gather = t_lo
        if CONTIG:
            if (flags & 2) != 0:
                acc, m_i, l_i = _attend_chunk(
                    acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, tok_slot, tok_node, nodes, t_lo, t_mid,
                    row_tin, row_vis, qk_scale, t_lo, BLOCK_N, HEAD_DIM, False, PREFETCH, DOT_F32, IDX_INLOOP, True,
                )  # fmt: skip
                t_gather = t_mid
        if t_gather < t_hi:
            acc, m_i, l_i = _attend_chunk(
                acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, tok_slot, tok_node, nodes, t_gather, t_hi,
                row_tin, row_vis, qk_scale, t_mid, GATHER_BLOCK_N, HEAD_DIM, True, PREFETCH, DOT_F32, IDX_INLOOP, False, True, STAGES=GATHER_STAGES,
            )  # fmt: skip
    else:  # the first phase, affine or gathered, then the tested one; with PLAIN (no tile here has a masked phase:
        # t_mid == t_hi) the tested loop is not compiled, nor the affine one without CONTIG (both constexprs)
        if CONTIG and (flags & 2) != 0:
            acc, m_i, l_i = _attend_chunk(
                acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, tok_slot, tok_node, nodes, t_lo, t_mid,
                row_tin, row_vis, qk_scale, t_lo, BLOCK_N, HEAD_DIM, False, PREFETCH, DOT_F32, IDX_INLOOP, True, STAGES=STAGES,
            )  # fmt: skip
        else:
            acc, m_i, l_i = _attend_chunk(
                acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, tok_slot, tok_node, nodes, t_lo, t_mid,
                row_tin, row_vis, qk_scale, t_lo, GATHER_BLOCK_N, HEAD_DIM, False, PREFETCH, DOT_F32, IDX_INLOOP, False, STAGES=GATHER_STAGES,
            )  # fmt: skip
        if not PLAIN:
            if t_mid < t_hi:
                acc, m_i, l_i = _attend_chunk(
                    acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, tok_slot, tok_node, nodes, t_mid, t_hi,
                    row_tin, row_vis, qk_scale, t_lo, GATHER_BLOCK_N, HEAD_DIM, True, PREFETCH, DOT_F32, IDX_INLOOP, False, STAGES=GATHER_STAGES,
                )  # fmt: skip
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    prow = (pbase + lq).to(tl.int64)
    tl.store(
        part_o + prow[:, None] * stride_pn + head[:, None] * stride_ph + offs_d[None, :],
        o.to(part_o.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(part_lse + prow * stride_ln + head, lse, mask=row_ok)
    if FUSED_REDUCE:
        _merge_if_last(
            out_ptr, part_o, part_lse, meta, counters, off_red_ptr, off_red_idx, stride_on, stride_oh, stride_pn,
            stride_ph, stride_ln, q_lo + lq, qid, head, row_ok, BLOCK_M, HEAD_DIM, N_HEADS, MERGE_ROWS // min(BLOCK_M, MERGE_ROWS),
        )  # fmt: skip


#: partials a fused merge loads at once, times the tile's rows (a 64-row tile merges 2 at a time, a 16-row one 8). sm_90,
#: UNIFIED kernel: 2 at 64 rows takes 237 registers and no spills; 4 or 8 take all 255 and spill
MERGE_ROWS = tl.constexpr(128)


@triton.jit
def _merge_if_last(
    out_ptr, part_o, part_lse, meta, counters, off_red_ptr, off_red_idx, stride_on, stride_oh, stride_pn, stride_ph,
    stride_ln, s, qid, head, row_ok, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, N_HEADS: tl.constexpr,
    MERGE_P: tl.constexpr,
):  # fmt: skip
    """The global reduction fused into the partial kernel: each of the tile's rows (sorted query ``s``, query head
    ``head``) counts its stored partial on a per-(query, head) counter, and the program whose increment completes a
    row's count (its query's partial rows, from the plan's reduction lists) merges that row's partials into ``out``
    and zeroes the counter for the next launch. Every program's partial stores precede its increments (a CTA barrier,
    then acquire-release atomics at GPU scope), so the last program sees them all; the partials are read past L1."""
    p_lo = tl.load(meta + off_red_ptr + s, mask=row_ok, other=0)
    n_parts = tl.load(meta + off_red_ptr + s + 1, mask=row_ok, other=0) - p_lo
    cnt = counters + s.to(tl.int64) * N_HEADS + head
    tl.debug_barrier()  # every thread's partial stores are issued before any of the program's increments
    old = tl.atomic_add(cnt, 1, mask=row_ok, sem="acq_rel", scope="gpu")
    last = row_ok & (old == n_parts - 1)
    n_last = tl.where(last, n_parts, 0)
    if tl.max(n_last, 0) > 0:
        tl.debug_barrier()
        offs_d = tl.arange(0, HEAD_DIM)
        offs_p = tl.arange(0, MERGE_P)
        m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # MERGE_P partials of every merged row at a time: their row indices and LSEs in one load each, then their
        # outputs in an unrolled loop of loads that depend on registers only (no round trip between them)
        for p0 in range(0, tl.max(n_last, 0), MERGE_P):
            ok = last[:, None] & (p0 + offs_p[None, :] < n_last[:, None])
            prow = tl.load(meta + off_red_idx + p_lo[:, None] + p0 + offs_p[None, :], mask=ok, other=0).to(tl.int64)
            lse = tl.load(part_lse + prow * stride_ln + head[:, None], mask=ok, other=float("-inf"), cache_modifier=".cg")
            m_new = tl.maximum(m, tl.max(lse, 1))
            w = tl.exp2(lse - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l_sum = l_sum * alpha + tl.sum(w, 1)
            acc = acc * alpha[:, None]
            for jj in tl.static_range(MERGE_P):
                pick = offs_p[None, :] == jj
                prow_j = tl.sum(tl.where(pick, prow, 0), 1)
                w_j = tl.sum(tl.where(pick, w, 0.0), 1)
                o = tl.load(
                    part_o + prow_j[:, None] * stride_pn + head[:, None] * stride_ph + offs_d[None, :],
                    mask=(last & (p0 + jj < n_last))[:, None],
                    other=0.0,
                    cache_modifier=".cg",
                )
                acc += o.to(tl.float32) * w_j[:, None]
            m = m_new
        o_out = acc / tl.where(last, l_sum, 1.0)[:, None]
        tl.store(
            out_ptr + qid[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :],
            o_out.to(out_ptr.dtype.element_ty),
            mask=last[:, None],
        )
        tl.store(cnt, 0, mask=last)


def launch_partials(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    meta: torch.Tensor,
    offsets: dict[str, tuple[int, int]],
    n_tiles: int,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    prefetch: bool = False,
    idx_inloop: bool = False,
    small_m: int = 0,
    contiguous: bool = True,
    warmup: bool = False,
    head_fastest: bool = False,
    timeline: torch.Tensor | None = None,
    pdl_trigger: bool = False,
    unified: bool = False,
    affine_big: bool = False,
    small_stages: int = 0,
    small_block_n: int = 0,
    small_affine: bool = False,
    fused_out: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    l2_prefetch: bool = False,
    big_gather_block: int = 0,
    big_gather_stages: int = 0,
    launch_pdl: bool = False,
):
    """Launch one program per (tile, KV head); tiles of one chunk are neighbours so they share L2.
    ``contiguous``: big tiles whose first phase the plan flagged as over consecutive slots use affine
    addresses. ``warmup``: compile (or load) the kernel for these arguments without running it.
    ``head_fastest``: one grid axis in (tile, KV head) order, so the GPU starts the tiles in the plan's
    order across all heads (with tiles sorted longest first: longest-processing-time-first scheduling);
    otherwise a 2-D grid that starts every tile of KV head 0, then of head 1, and so on.
    ``timeline`` (diagnostics, GPU only): an int64 tensor of at least 4 x programs entries; each program writes
    its start and end (``%globaltimer`` ns) and its SM id at ``4 x`` its linear program id (see
    ``scripts/timeline_probe.py``). ``pdl_trigger`` (Hopper): each program lets a programmatic dependent launch
    (the reduction with ``pdl``) proceed as soon as it starts. ``unified``: a tile's gathered tokens, unmasked and masked,
    run one loop that tests only the masked ones, and masked tiles always run the big tile, whose rows they may not
    fill: the big tile compiles two loops instead of three, the small tile one instead of two. ``affine_big``: every tile
    is either big, unmasked and over consecutive slots (``contiguous`` on), or small and unmasked (the plan's tile
    classes say so: ``DeftAttention.affine_for``); the big tile compiles the affine loop alone, the small tile its plain
    gathered loop (about 2,900 SASS instructions). ``small_stages``: the small tile's loops (all over gathered slots)
    pipelined this many stages deep (0: ``num_stages``). A gathered block's slot indices are loaded a stage before its
    K and V, so at ``num_stages=3`` only one K/V block is in flight while a block is computed, and a short,
    latency-bound program (a branch's one query) waits a full HBM round trip per block; at 5 two are, in K/V buffers
    the big tile's affine loop has anyway (Hopper, 64-token blocks: the same 112 KB of shared memory; the big tile's
    gathered loops at 5 stages would need 117 KB, one program per SM). ``small_affine`` (needs ``contiguous``): the small
    tile compiles the affine loop too and takes it for tiles the plan flagged as over consecutive slots (a filled
    prompt chunk's rest rows, ``fill_tiles``); without it the small tile gathers. ``fused_out`` and ``counters`` (an
    int32 tensor of at least queries x heads zeros, left zeroed): the global reduction runs inside this launch, the
    last program to store a (query, head)'s partial merging it into ``fused_out`` (:func:`_merge_if_last`); no
    :func:`~deft.kernels.global_reduce.launch_reduce` follows. ``l2_prefetch``: each program asks L2 for its first two K/V
    blocks before it loads its queries (a hint, no effect on results; off under the interpreter, which runs no PTX).
    ``big_gather_block`` / ``big_gather_stages`` (0: ``block_n`` / ``num_stages``): the big tile's loops over gathered slots
    with their own K/V block and depth (as ``small_block_n`` / ``small_stages`` for the small tile). Returns the compiled kernel (registers, spills, shared memory are
    on it)."""
    if unified not in (False, True) or affine_big not in (False, True):  # the plan's choices, not the method's "auto"
        raise ValueError(f"unified and affine_big must be bools, got {unified!r}, {affine_big!r}")
    if (fused_out is None) != (counters is None):
        raise ValueError("fused_out and counters go together (the fused reduction)")
    if (affine_big or small_affine) and not contiguous:
        raise ValueError("affine_big and small_affine need contiguous (the affine loop)")
    n_kv, d = k_pool.shape[1], k_pool.shape[2]
    args = (
        q, k_pool, v_pool, part_o, part_lse, meta,
        offsets["tok_slot"][0], offsets["tok_node"][0], offsets["nodes"][0], offsets["queries"][0],
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        part_o.stride(0), part_o.stride(1), part_lse.stride(0),
        LOG2E / math.sqrt(d), part_lse if timeline is None else timeline,
        part_o if fused_out is None else fused_out, part_lse if counters is None else counters,
        offsets["red_ptr"][0], offsets["red_idx"][0],
        0 if fused_out is None else fused_out.stride(0), 0 if fused_out is None else fused_out.stride(1),
    )  # fmt: skip
    consts = dict(
        GROUP=q.shape[1] // n_kv, BLOCK_M=block_m, SMALL_M=small_tile_rows(q.shape[1] // n_kv, block_m, small_m), BLOCK_N=block_n, HEAD_DIM=d, PREFETCH=prefetch, DOT_F32=_dot_f32(q.dtype), IDX_INLOOP=idx_inloop and not prefetch,
        CONTIG=bool(contiguous), HEAD_FASTEST=bool(head_fastest), N_KV=n_kv, TIMELINE=timeline is not None, PDL_TRIGGER=bool(pdl_trigger), UNIFIED=bool(unified), AFFINE_BIG=bool(affine_big), SMALL_STAGES=int(small_stages) or None, SMALL_BLOCK_N=int(small_block_n) or block_n, SMALL_AFFINE=bool(small_affine), FUSED_REDUCE=fused_out is not None, L2_PREFETCH=bool(l2_prefetch) and os.environ.get("TRITON_INTERPRET") != "1", BIG_GATHER_BLOCK_N=int(big_gather_block) or block_n, BIG_GATHER_STAGES=int(big_gather_stages) or None, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if launch_pdl:  # a programmatic dependent of the kernel before it on the stream (its programs wait for nothing)
        consts["launch_pdl"] = True
    grid = (n_tiles * n_kv,) if head_fastest else (n_tiles, n_kv)
    if warmup:
        return deft_partial_kernel.warmup(*args, grid=tuple(max(x, 1) for x in grid), **consts)
    return deft_partial_kernel[grid](*args, **consts)

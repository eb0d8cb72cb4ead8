"""Probe: how fast can one Triton program stream a shared prompt's K/V for many query rows on this GPU?

The few-shot snapshots spend most of DeFT's time in the prompt: 50 queries x 4 query heads = 200 rows per
KV head over a 16k-token node (``notes/deft_kernels.md``: ~155 TFLOP/s effective, 16 % of tensor peak). This
script times a minimal split-K kernel over exactly that work, one knob at a time, to find what the ceiling
is and what holds the DeFT kernel below it:

- ``load``: ``gather`` (slot indices loaded per block, as DeFT does), ``affine`` (addresses computed from
  the token index, as for a contiguous run of slots), ``tma`` (a host tensor descriptor: Hopper's TMA).
- tile rows / warps / K-V block / pipeline stages, chunk length (tokens per program), and Triton's
  automatic warp specialisation (``tl.range(..., warp_specialize=True)``).

Every variant is checked against ``torch`` (partials merged on the host side) before it is timed.
Writes ``$OUT/kernel_probe_<date>.csv`` (or ``results/h100/``) and prints a table sorted by time.

Run on the GPU machine: ``python -m scripts.kernel_probe``. Not part of the library: a measurement.
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
import sys
from pathlib import Path

import pandas as pd
import torch
import triton
import triton.language as tl

LOAD_KINDS = {"gather": 0, "affine": 1, "tma": 2}


@triton.jit
def probe_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    slots,
    desc_k,
    desc_v,
    part_o,
    part_lse,
    n_tok,
    chunk,
    n_rows,
    n_rt,
    stride_qn,
    stride_qh,
    stride_ks,
    stride_kh,
    qk_scale,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    LOAD: tl.constexpr,
    WS: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    n_kv = tl.num_programs(1)
    c = pid // n_rt
    rt = pid % n_rt
    rows = rt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    qid = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + qid[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None])
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_lo = c * chunk
    t_hi = tl.minimum(t_lo + chunk, n_tok)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_kh
    for start in tl.range(t_lo, t_hi, BLOCK_N, warp_specialize=WS):
        t = start + offs_n
        valid = t < t_hi
        if LOAD == 0:
            s_ = tl.load(slots + t, mask=valid, other=0).to(tl.int64)
            k = tl.load(k_base + s_[:, None] * stride_ks + offs_d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_base + s_[:, None] * stride_ks + offs_d[None, :], mask=valid[:, None], other=0.0)
        elif LOAD == 1:
            tt = t.to(tl.int64)
            k = tl.load(k_base + tt[:, None] * stride_ks + offs_d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_base + tt[:, None] * stride_ks + offs_d[None, :], mask=valid[:, None], other=0.0)
        else:
            k = desc_k.load([start, kvh * HEAD_DIM])
            v = desc_v.load([start, kvh * HEAD_DIM])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    o = acc / l_i[:, None]
    prow = ((c * n_kv + kvh) * n_rt * BLOCK_M + rows).to(tl.int64)
    tl.store(part_o + prow[:, None] * HEAD_DIM + offs_d[None, :], o.to(part_o.dtype.element_ty), mask=row_ok[:, None])
    tl.store(part_lse + prow, m_i + tl.log2(l_i), mask=row_ok)


def run_probe(q, k, v, slots, cfg: dict, out_o, out_lse):
    """Launch one configuration; returns a callable that re-launches it."""
    n_q, n_h, d = q.shape
    n_tok, n_kv = k.shape[0], k.shape[1]
    group = n_h // n_kv
    n_rows = n_q * group
    bm, bn = cfg["block_m"], cfg["block_n"]
    n_rt = triton.cdiv(n_rows, bm)
    n_chunks = triton.cdiv(n_tok, cfg["chunk"])
    load = LOAD_KINDS[cfg["load"]]
    if load == 2:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k2, v2 = k.view(k.shape[0], -1), v.view(v.shape[0], -1)
        dk = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [bn, d])
        dv = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [bn, d])
    else:
        dk = dv = k  # unused pointer arguments

    def launch():
        probe_kernel[(n_chunks * n_rt, n_kv)](
            q, k, v, slots, dk, dv, out_o, out_lse, n_tok, cfg["chunk"], n_rows, n_rt,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), 1.4426950408889634 / math.sqrt(d),
            GROUP=group, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d, LOAD=load, WS=cfg["ws"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip

    return launch, n_chunks, n_rt


def merge(out_o, out_lse, n_chunks, n_kv, n_rt, bm, n_rows, group, n_q, d):
    """Merge the per-chunk partials (log2-sum-exp weights) into [n_q, n_heads, d]."""
    o = out_o[: n_chunks * n_kv * n_rt * bm].view(n_chunks, n_kv, n_rt * bm, d)[:, :, :n_rows].float()
    lse = out_lse[: n_chunks * n_kv * n_rt * bm].view(n_chunks, n_kv, n_rt * bm)[:, :, :n_rows]
    w = torch.softmax(lse * math.log(2.0), dim=0)
    res = (w[..., None] * o).sum(0)  # [n_kv, n_rows, d]; row = query * group + head-in-group
    return res.view(n_kv, n_q, group, d).permute(1, 0, 2, 3).reshape(n_q, n_kv * group, d)


def configs(quick: bool) -> list[dict]:
    out = []
    tiles = [(64, 4), (128, 4), (128, 8)]
    for load, (bm, w), bn in itertools.product(("gather", "affine", "tma"), tiles, (64, 128)):
        for chunk in (512, 1024, 2048):
            out.append(dict(load=load, block_m=bm, num_warps=w, block_n=bn, num_stages=3, chunk=chunk, ws=False))
    for load, st in itertools.product(("gather", "tma"), (2, 4)):
        for chunk in (1024, 2048):
            out.append(dict(load=load, block_m=128, num_warps=8, block_n=64, num_stages=st, chunk=chunk, ws=False))
    for load, (bm, w) in itertools.product(("tma", "affine"), ((128, 4), (128, 8))):
        for chunk in (1024, 2048):
            out.append(dict(load=load, block_m=bm, num_warps=w, block_n=64, num_stages=3, chunk=chunk, ws=True))
    if quick:
        out = [c for c in out if c["chunk"] == 1024 and c["block_n"] == 64][:6]
    return out


def _time_deft(m, plan, q, k, v, dev) -> tuple[float, float]:
    """Device µs of the DeFT partial kernel alone, and of the whole run (kernel + reduction)."""
    from deft.bench.timing import time_device
    from deft.kernels.tree_attention import launch_partials

    g = plan.groups

    def part():
        launch_partials(
            q, k, v, plan.part_o, plan.part_lse, plan.meta, g.offsets, g.n_tiles, plan.block_m, plan.block_n,
            plan.num_warps, plan.num_stages, m.prefetch, m.idx_inloop, m.small_m, m.contiguous, unified=plan.unified,
            affine_big=plan.affine_big,
        )  # fmt: skip

    t_part = time_device(part, reps=50, device=dev).median_ms * 1e3
    t_all = time_device(lambda: m.run(q, k, v, plan), reps=50, device=dev).median_ms * 1e3
    return t_part, t_all


def deft_rows(dev, bw: float, meta: dict) -> list[dict]:
    """The DeFT partial kernel itself on the probe's work (a fan of one-token branches on the prompt, so
    the prompt's tiles carry the same 200 rows), and on the sorting128ToT snapshot: partial kernel alone
    and with the reduction, against chunk length, the affine copy, the small-tile copy and tile shape."""
    from deft.attention import AttentionShape
    from deft.kernels.autotune import fan_tree
    from deft.kernels.deft_flatten import DeftFlatten
    from deft.reference import reference_attention, relative_error

    shape = AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128, dtype="bfloat16")
    trees = [("prompt16k_fan50x1", fan_tree(16384, 50, 1))]
    try:
        from scripts.kernel_snapshots import workload_snapshots

        trees += [(n, t) for n, t in workload_snapshots() if n.startswith(("sorting", "docmerge"))]
    except Exception as e:  # traces absent: the probe tree alone
        print(f"workload trees skipped: {e}")
    out = []
    for name, tree in trees:
        n_slots = tree.n_slots or int(tree.slots.max()) + 1
        q = torch.randn(tree.n_queries, 32, 128, device=dev).bfloat16()
        k = torch.randn(n_slots, 8, 128, device=dev).bfloat16()
        v = torch.randn_like(k)
        ref = reference_attention(q, k, v, tree)
        chunks = (512, 1024, 2048) if name.startswith("prompt") else (None,)
        for chunk, contig, small, (bm, w) in itertools.product(chunks, (True, False), (16, 0), ((64, 4), (128, 8))):
            m = DeftFlatten(chunk_size=chunk, contiguous=contig, small_m=small, block_m=bm, num_warps=w)
            plan = m.plan(tree, shape, dev)
            err = relative_error(m.run(q, k, v, plan), ref)
            g = plan.groups
            t_part, t_all = _time_deft(m, plan, q, k, v, dev)
            kern = m.last_kernel
            row = dict(load="deft", tree=name, chunk=g.chunk_size, contiguous=contig, small_m=small, block_m=bm,
                       num_warps=w, partial_us=t_part, us=t_all, rel_error=err, n_tiles=g.n_tiles,
                       n_regs=getattr(kern, "n_regs", -1), n_spills=getattr(kern, "n_spills", -1),
                       kv_bw_frac=tree.unique_kv_tokens * shape.kv_token_bytes / (t_all * 1e-6) / bw, **meta)  # fmt: skip
            print(row, flush=True)
            out.append(row)
    return out


def main() -> None:
    from deft.bench.timing import copy_bandwidth, time_device

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = os.environ.get("DEFT_PROBE_QUICK") == "1" or dev.type != "cuda"
    n_tok = int(os.environ.get("DEFT_PROBE_TOKENS", 16384 if dev.type == "cuda" else 256))
    n_q = int(os.environ.get("DEFT_PROBE_QUERIES", 50 if dev.type == "cuda" else 3))
    n_h, n_kv, d = 32, 8, 128
    if dev.type != "cuda":
        n_h, n_kv, d = 4, 2, 64
    torch.manual_seed(0)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float16  # the interpreter mis-computes bf16 dots
    q = torch.randn(n_q, n_h, d, device=dev, dtype=dt)
    k = torch.randn(n_tok, n_kv, d, device=dev, dtype=dt)
    v = torch.randn(n_tok, n_kv, d, device=dev, dtype=dt)
    slots = torch.arange(n_tok, device=dev, dtype=torch.int32)
    group = n_h // n_kv
    kr = k.float().repeat_interleave(group, 1)
    vr = v.float().repeat_interleave(group, 1)
    ref = torch.softmax(torch.einsum("qhd,thd->hqt", q.float(), kr) / math.sqrt(d), -1)
    ref = torch.einsum("hqt,thd->qhd", ref, vr)
    n_rows = n_q * group
    out_o = torch.empty(triton.cdiv(n_tok, 256) * n_kv * triton.cdiv(n_rows, 64) * 64 * 2, d, device=dev, dtype=dt)
    out_lse = torch.empty(out_o.shape[0], device=dev, dtype=torch.float32)
    if dev.type == "cuda":
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
        bw = copy_bandwidth(dev)
    else:
        bw = float("nan")
    kv_bytes = 2 * k.numel() * k.element_size()
    flops = 4.0 * n_rows * n_kv * n_tok * d
    rows = []
    cfgs = configs(quick) if os.environ.get("DEFT_PROBE_KERNEL", "1") == "1" else []
    for i, cfg in enumerate(cfgs):
        if dev.type != "cuda" and cfg["load"] == "tma":
            continue
        row = dict(cfg)
        try:
            launch, n_chunks, n_rt = run_probe(q, k, v, slots, cfg, out_o, out_lse)
            out_o.fill_(float("nan"))
            launch()
            got = merge(out_o, out_lse, n_chunks, n_kv, n_rt, cfg["block_m"], n_rows, group, n_q, d)
            err = ((got - ref).norm() / ref.norm()).item()
            row["rel_error"] = err
            if dev.type == "cuda":
                st = time_device(launch, reps=50, device=dev)
                row["us"] = st.median_ms * 1e3
                row["p90_us"] = st.p90_ms * 1e3
                row["tflops"] = flops / (st.median_ms * 1e-3) / 1e12
                row["kv_bw_frac"] = kv_bytes / (st.median_ms * 1e-3) / bw
                row["programs"] = n_chunks * n_rt * n_kv
                row["ok"] = err < 1e-2
        except Exception as e:  # a variant that does not compile here is a result too
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        rows.append(row)
        print(f"[{i + 1}/{len(cfgs)}] {row}", flush=True)
    df = pd.DataFrame(rows)
    meta = dict(
        gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        torch=torch.__version__, triton=triton.__version__, git_commit=os.environ.get("DEFT_GIT_COMMIT", "unknown"),
        date=datetime.date.today().isoformat(), n_tok=n_tok, n_queries=n_q, copy_bw_gbps=bw / 1e9,
    )  # fmt: skip
    for key, val in meta.items():
        df[key] = val
    if dev.type == "cuda" and os.environ.get("DEFT_PROBE_DEFT", "1") == "1":
        deft = pd.DataFrame(deft_rows(dev, bw, meta))
        df = pd.concat([df, deft], ignore_index=True)
        with pd.option_context("display.width", 200, "display.max_rows", 200):
            cols = ["tree", "chunk", "contiguous", "small_m", "block_m", "num_warps", "partial_us", "us", "n_regs",
                    "n_tiles", "kv_bw_frac", "rel_error"]  # fmt: skip
            print(deft[cols].to_string(index=False))
    out_dir = Path(os.environ.get("OUT", "results/h100"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if dev.type == "cuda":
        df.to_csv(out_dir / f"kernel_probe_{meta['date']}.csv", index=False)
    cols = [c for c in ("load", "block_m", "num_warps", "block_n", "num_stages", "chunk", "ws", "us", "tflops",
                        "kv_bw_frac", "rel_error", "error") if c in df]  # fmt: skip
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(df.sort_values("us" if "us" in df else "rel_error")[cols].to_string(index=False))
    bad = df[df.get("rel_error", pd.Series(dtype=float)).fillna(1.0) >= 1e-2]
    if len(bad):
        print(f"{len(bad)} variants failed or were wrong", file=sys.stderr)


if __name__ == "__main__":
    main()

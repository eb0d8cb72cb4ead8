"""Probe: would a separate prompt kernel, run beside DeFT's kernel for the rest of the tree, reach the bandwidth
target at few-shot 16k step 200? Measured before building it.

The snapshot's tree is a 16,000-token prompt with 50 branches of 200 tokens, one query at each tip. DeFT-Flatten
runs it as one launch (the prompt's 64-row tiles and the branches' 16-row tiles together) plus the reduction. The
split it would take: the prompt's partials from the Gluon kernel of ``scripts/gluon_probe.py`` (128 rows per CTA,
a warp-specialised TMA producer, asynchronous PV), the branches from DeFT-Flatten on a tree of the branches alone
(under a one-token root), launched on a second stream so its programs take the SMs the prompt kernel leaves free
and then the rest. Timed with the same cold-L2 CUDA events (``deft.bench.timing.time_device``), one call:

- ``full``: DeFT-Flatten on the whole tree (today's path);
- ``prompt``: the Gluon prompt kernel alone, per chunk length (6, 7 or 8 chunks of the prompt);
- ``branches``: DeFT-Flatten on the branches' tree alone (partial kernel and reduction);
- ``split``: both, the prompt kernel first and the branches on a second stream; ``split_rev``: branches first;
- ``branches_contig_slots`` (with ``DEFT_SPLIT_LAYOUT=1``): the branches with each one's tokens in consecutive
  slots instead of interleaved by step as a decoding loop allocates them (the DRAM locality of the gathers);
- ``branches_<knobs>`` (with ``DEFT_SPLIT_SWEEP=1``): the branches' tree under other DeFT knobs (K/V block, stages,
  chunking; ``DEFT_SPLIT_KNOBS``, a JSON list of keyword dicts, replaces the default list), to see what bounds a
  tree of short one-query branches when it has the GPU to itself.

The split leaves out what an integration adds: the prompt's partial in the reduction (one more per query) and
the plan's second record list. Each part is checked against its own fp64 reference first. Writes
``$OUT/split_probe_<date>.csv``; prints a table (``DEFT_SPLIT_PROMPT=0`` leaves the prompt kernel out). Run on the GPU machine: ``python -m scripts.split_probe``.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import triton

from deft.attention import AttentionShape
from deft.bench.timing import copy_bandwidth, time_device
from deft.kernels.autotune import fan_tree
from deft.kernels.deft_flatten import DeftFlatten
from deft.reference import reference_attention, relative_error
from deft.tree import DecodingTree

SHAPE = AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128, dtype="bfloat16")
PROMPT, WIDTH, BRANCH = 16000, 50, 200  # the snapshot fewshot_16k_w50_step200
#: DeFT knobs tried on the branches' tree alone (``DEFT_SPLIT_SWEEP=1``)
BRANCH_SWEEP = (
    dict(block_n=32), dict(block_n=128), dict(num_stages=2), dict(num_stages=4), dict(ctas_per_sm=1.0),
    dict(ctas_per_sm=2.0), dict(ctas_per_sm=8.0), dict(chunk_size=200), dict(chunk_size=1000), dict(small_m=0),
)
VARIANTS = (dict(mode=6, num_wg=2, block_n=128, stages=2), dict(mode=1, num_wg=2, block_n=128, stages=3))


def main() -> None:
    from scripts import gluon_probe as gp

    dev = torch.device("cuda")
    torch.manual_seed(0)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    bw = copy_bandwidth(dev)
    full_tree = fan_tree(PROMPT, WIDTH, BRANCH)
    kv_bytes = full_tree.unique_kv_tokens * SHAPE.kv_token_bytes
    q = torch.randn(WIDTH, SHAPE.n_heads, SHAPE.head_dim, device=dev).bfloat16()
    k = torch.randn(full_tree.n_slots, SHAPE.n_kv_heads, SHAPE.head_dim, device=dev).bfloat16()
    v = torch.randn_like(k)
    rows: list[dict] = []
    meta = dict(gpu=torch.cuda.get_device_name(dev), torch=torch.__version__, triton=triton.__version__,
                git_commit=os.environ.get("DEFT_GIT_COMMIT", "unknown"), date=datetime.date.today().isoformat(),
                copy_bw_gbps=bw / 1e9, kv_bytes=kv_bytes)  # fmt: skip

    def record(name: str, st, err: float, own_bytes: int | None = None, **kw) -> None:
        """One row; ``frac_copy_bw`` counts the whole tree's bytes, ``own_frac_copy_bw`` the part's own."""
        us = st.median_ms * 1e3
        own = kv_bytes if own_bytes is None else own_bytes
        rows.append(dict(case=name, us=us, p90_us=st.p90_ms * 1e3, rel_error=err, frac_copy_bw=kv_bytes / (us * 1e-6) / bw,
                         own_frac_copy_bw=own / (us * 1e-6) / bw, **kw, **meta))  # fmt: skip
        print(f"{name:34s} {us:7.1f} µs  {rows[-1]['frac_copy_bw']:.2f} of copy BW  err {err:.1e}", flush=True)

    # today's path: one launch for the whole tree
    m = DeftFlatten()
    plan = m.plan(full_tree, SHAPE, dev)
    out = torch.empty_like(q)
    err = relative_error(m.run(q, k, v, plan, out=out), reference_attention(q, k, v, full_tree))
    record("full", time_device(lambda: m.run(q, k, v, plan, out=out), device=dev), err, tiles=plan.groups.n_tiles)

    # the branches alone, under a one-token root (the prompt's last token, so the queries see one prompt token)
    b_tree = fan_tree(1, WIDTH, BRANCH)
    kb = torch.randn(b_tree.n_slots, SHAPE.n_kv_heads, SHAPE.head_dim, device=dev).bfloat16()
    vb = torch.randn_like(kb)
    mb = DeftFlatten()
    b_plan = mb.plan(b_tree, SHAPE, dev)
    ob = torch.empty_like(q)
    err = relative_error(mb.run(q, kb, vb, b_plan, out=ob), reference_attention(q, kb, vb, b_tree))
    b_bytes = b_tree.unique_kv_tokens * SHAPE.kv_token_bytes
    record("branches", time_device(lambda: mb.run(q, kb, vb, b_plan, out=ob), device=dev), err, b_bytes,
           tiles=b_plan.groups.n_tiles, chunk=b_plan.groups.chunk_size)  # fmt: skip

    if os.environ.get("DEFT_SPLIT_LAYOUT") == "1":
        # the same branches with each branch's tokens in consecutive slots (a decoding loop interleaves them by
        # step: a branch's consecutive tokens 50 slots, 100 KB of K, apart): does the gathers' DRAM locality matter?
        c_tree = DecodingTree.from_arrays(b_tree.parent, np.diff(b_tree.slot_ptr), np.arange(b_tree.n_slots),
                                          np.arange(1, WIDTH + 1), [BRANCH] * WIDTH, n_slots=b_tree.n_slots)  # fmt: skip
        mc = DeftFlatten()
        c_plan = mc.plan(c_tree, SHAPE, dev)
        oc = torch.empty_like(q)
        err = relative_error(mc.run(q, kb, vb, c_plan, out=oc), reference_attention(q, kb, vb, c_tree))
        record("branches_contig_slots", time_device(lambda: mc.run(q, kb, vb, c_plan, out=oc), device=dev), err,
               b_bytes, tiles=c_plan.groups.n_tiles, chunk=c_plan.groups.chunk_size)  # fmt: skip

    if os.environ.get("DEFT_SPLIT_SWEEP") == "1":
        sweep = json.loads(os.environ["DEFT_SPLIT_KNOBS"]) if "DEFT_SPLIT_KNOBS" in os.environ else BRANCH_SWEEP
        for kw in sweep:
            mk = DeftFlatten(**kw)
            pk = mk.plan(b_tree, SHAPE, dev)
            ok_ = torch.empty_like(q)
            err = relative_error(mk.run(q, kb, vb, pk, out=ok_), reference_attention(q, kb, vb, b_tree))
            name = "branches_" + "_".join(f"{a}{b}" for a, b in kw.items())
            record(name, time_device(lambda mk=mk, pk=pk, ok_=ok_: mk.run(q, kb, vb, pk, out=ok_), device=dev), err,
                   b_bytes, tiles=pk.groups.n_tiles, chunk=pk.groups.chunk_size)  # fmt: skip

    # the prompt alone: the Gluon kernel over the prompt's slots (0 .. PROMPT-1 in fan_tree's layout)
    kp, vp = k[:PROMPT], v[:PROMPT]
    group = SHAPE.n_heads // SHAPE.n_kv_heads
    qf, kr, vr = q.float(), kp.float().repeat_interleave(group, 1), vp.float().repeat_interleave(group, 1)
    ref_p = torch.einsum("hqt,thd->qhd", torch.softmax(torch.einsum("qhd,thd->hqt", qf, kr) / 128**0.5, -1), vr)
    part_o = torch.empty(16 * SHAPE.n_kv_heads * 256, SHAPE.head_dim, device=dev, dtype=torch.bfloat16)
    part_lse = torch.empty(part_o.shape[0], device=dev, dtype=torch.float32)
    s2 = torch.cuda.Stream(dev)
    for var in VARIANTS if os.environ.get("DEFT_SPLIT_PROMPT", "1") == "1" else ():
        for n_chunks in (6, 7, 8):
            chunk = triton.cdiv(PROMPT, n_chunks)
            name = f"{gp.vname(var)}_c{n_chunks}"
            try:
                launch, nc, n_rt, bm = gp.make_launch(q, kp, vp, part_o, part_lse, var, chunk)
                part_o.fill_(float("nan"))
                launch()
                got = gp.merge_partials(part_o, part_lse, nc, SHAPE.n_kv_heads, n_rt, bm, WIDTH, group)
                err = ((got - ref_p).norm() / ref_p.norm()).item()
            except Exception as e:  # a variant that does not build here is a result too
                rows.append(dict(case=f"prompt_{name}", error=f"{type(e).__name__}: {str(e)[:200]}", **meta))
                print(f"prompt_{name}: {rows[-1]['error']}", flush=True)
                continue
            ctas = nc * n_rt * SHAPE.n_kv_heads
            record(f"prompt_{name}", time_device(launch, device=dev), err, PROMPT * SHAPE.kv_token_bytes, ctas=ctas,
                   chunk=chunk)  # fmt: skip

            def split(first_prompt: bool, launch=launch) -> None:
                cur = torch.cuda.current_stream(dev)
                s2.wait_stream(cur)
                if first_prompt:
                    launch()
                with torch.cuda.stream(s2):
                    mb.run(q, kb, vb, b_plan, out=ob)
                if not first_prompt:
                    launch()
                cur.wait_stream(s2)

            record(f"split_{name}", time_device(lambda: split(True), device=dev), err, ctas=ctas, chunk=chunk)
            record(f"split_rev_{name}", time_device(lambda: split(False), device=dev), err, ctas=ctas, chunk=chunk)
    df = pd.DataFrame(rows)
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / f"split_probe_{meta['date']}.csv", index=False)
    cols = [c for c in ("case", "us", "p90_us", "frac_copy_bw", "own_frac_copy_bw", "rel_error", "tiles", "ctas", "chunk",
                        "error") if c in df]  # fmt: skip
    with pd.option_context("display.width", 200):
        print(df[cols].to_string(index=False))


if __name__ == "__main__":
    main()

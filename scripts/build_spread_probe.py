"""How far apart identical launches built apart time: the default DeFT-Flatten built ``DEFT_BSP_BUILDS`` times (each its
own method object, plan, workspace and CUDA graph) on a few snapshots, the graphs replayed together in
:func:`~deft.bench.timing.time_device_interleaved` rounds (random order, cold L2); per build, its median and where its
plan's buffers sit. What a paired comparison over one build per variant cannot tell from a real gap (session 23:
0.6-1.3 % between the medians of 8 builds, no pattern in the buffers' offsets).

Rows to ``$OUT/build_spread_<date>.csv`` (default ``results/h100/probe``). Environment: ``DEFT_BSP_BUILDS`` (8),
``DEFT_BSP_ROUNDS`` (300), ``DEFT_SNAP_SNAPS`` (snapshot name prefixes; default three). Run on the GPU machine:
``python -m scripts.build_spread_probe``.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from deft.bench.timing import time_device_interleaved
from deft.kernels.deft_flatten import DeftFlatten
from scripts.kernel_snapshots import SHAPE, graph_of, inputs, save_probe_rows, snapshots

DEFAULT_SNAPS = ("fewshot_4k_w50_step1", "medusa64_4k_s120", "fewshot_16k_w50_step200")


def main() -> None:
    dev = torch.device("cuda")
    builds = int(os.environ.get("DEFT_BSP_BUILDS", "8"))
    rounds = int(os.environ.get("DEFT_BSP_ROUNDS", "300"))
    want = [p for p in os.environ.get("DEFT_SNAP_SNAPS", ",".join(DEFAULT_SNAPS)).split(",") if p]
    rows = []
    for name, tree in snapshots():
        if not any(name.startswith(p) for p in want):
            continue
        q, k, v, _ = inputs(tree, dev)
        built = []
        for _ in range(builds):
            m = DeftFlatten()
            p = m.plan(tree, SHAPE, dev)
            built.append((p, graph_of(lambda m=m, p=p, q=q, k=k, v=v: m.run(q, k, v, p))))
        us = time_device_interleaved({f"b{i}": [g.replay] for i, (_, g) in enumerate(built)}, rounds=rounds, device=dev)
        for i, (p, _) in enumerate(built):
            x = us[f"b{i}"] * 1e3
            rows.append({"snapshot": name, "build": i, "median_us": float(np.median(x)), "p10_us": float(np.percentile(x, 10)),
                         "p90_us": float(np.percentile(x, 90)), "rounds": rounds, "part_o_ptr": p.part_o.data_ptr(),
                         "part_lse_ptr": p.part_lse.data_ptr(), "meta_ptr": p.meta.data_ptr()})  # fmt: skip
        med = [r["median_us"] for r in rows if r["snapshot"] == name]
        print(f"{name:26s} builds' medians {' '.join(f'{u:.2f}' for u in med)}  spread {(max(med) - min(med)) / np.median(med):.2%}")
    if rows:
        save_probe_rows(rows, "build_spread", dev)


if __name__ == "__main__":
    main()

"""The global reduction alone on the GPU: its CUDA-graph time for a snapshot plan, with L2 warm (the partial
kernel has just written the partials, as in a real step) and cold, for several program shapes (query heads per
program, warps). Prints a table; rows to ``$OUT/reduce_probe_<date>.csv``.

Run on the GPU machine: ``python -m scripts.reduce_probe``.
"""

from __future__ import annotations

import functools
import os

import torch

from deft.bench.timing import time_device
from deft.kernels.deft_flatten import DeftFlatten
from deft.kernels.global_reduce import launch_reduce
from deft.reference import TOLERANCE, relative_error
from scripts.kernel_snapshots import SHAPE, graph_of, inputs, save_probe_rows, snapshots

SHAPES = ((1, 1), (1, 2), (1, 4), (2, 2), (2, 4), (4, 8))  # (heads per program, warps)


def main() -> None:
    dev = torch.device("cuda")
    prefixes = os.environ.get("DEFT_RP_SNAPS", "fewshot_16k_w50_step200,sorting128ToT,medusa64,fewshot_4k_w50_step1").split(",")
    rows = []
    for sname, tree in snapshots():
        if not any(sname.startswith(p) for p in prefixes):
            continue
        q, k, v, ref = inputs(tree, dev)
        m = DeftFlatten(pdl=False)
        plan = m.plan(tree, SHAPE, dev)
        m.run(q, k, v, plan)  # the partials
        g = plan.groups
        for heads, warps in SHAPES:
            out = torch.empty_like(q)
            red = functools.partial(
                launch_reduce, out, plan.part_o, plan.part_lse, plan.meta, g.offsets, plan.block_p, heads=heads, num_warps=warps
            )
            red()
            err = relative_error(out, ref)
            assert err < TOLERANCE[torch.bfloat16], (sname, heads, warps, err)
            graph = graph_of(red)
            warm = time_device(graph.replay, reps=50, cold_l2=False, device=dev)
            cold = time_device(graph.replay, reps=50, device=dev)
            rows.append({"snapshot": sname, "queries": tree.n_queries, "block_p": plan.block_p, "heads": heads,
                         "warps": warps, "warm_us": warm.median_ms * 1e3, "cold_us": cold.median_ms * 1e3})  # fmt: skip
    df = save_probe_rows(rows, "reduce_probe", dev)
    print(df[["snapshot", "queries", "block_p", "heads", "warps", "warm_us", "cold_us"]].round(2).to_string(index=False))


if __name__ == "__main__":
    main()

"""One DeFT-Flatten step of a kernel snapshot, run once inside a profiler range: the target for Nsight Compute.

Usage on the GPU machine (``--profile-from-start off`` profiles only the marked run; the step's kernels are
compiled and run twice before it)::

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
        python -m scripts.ncu_step

Environment: ``DEFT_NCU_SNAP`` (a snapshot name of :mod:`scripts.kernel_snapshots`, default
``fewshot_16k_w50_step200``) and ``DEFT_NCU_KNOBS`` (DeFT-Flatten constructor arguments as JSON, default none).
ncu runs each kernel alone, with the caches flushed before it (its default cache control), so the prompt kernel
and the rest's launch, concurrent in a real step, are measured one at a time here.
"""

from __future__ import annotations

import json
import os

import torch

from deft.kernels.deft_flatten import DeftFlatten
from scripts.kernel_snapshots import SHAPE, inputs, snapshots


def main() -> None:
    name = os.environ.get("DEFT_NCU_SNAP", "fewshot_16k_w50_step200")
    knobs = json.loads(os.environ.get("DEFT_NCU_KNOBS", "{}"))
    trees = dict(snapshots())
    if name not in trees:
        raise SystemExit(f"DEFT_NCU_SNAP={name} is not one of {sorted(trees)}")
    dev = torch.device("cuda")
    tree = trees[name]
    q, k, v, _ = inputs(tree, dev)
    m = DeftFlatten(**knobs)
    plan = m.plan(tree, SHAPE, dev)
    for _ in range(2):
        m.run(q, k, v, plan)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    m.run(q, k, v, plan)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"{name} {knobs}: {plan.n_prompt} prompt tiles ({plan.n_pairs} pairs), {plan.groups.n_tiles} tiles, "
          f"rest rows {plan.rest_rows or plan.block_m}")  # fmt: skip


if __name__ == "__main__":
    main()

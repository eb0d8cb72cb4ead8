"""Host time of ``DeftAttention.plan`` (DeFT-Flatten, defaults) on the snapshot trees, for comparing two versions of
the plan on the same GPU machine: run it once per checkout, alternating, each time with that checkout's ``deft``
first on ``PYTHONPATH``, and compare the rows. A noisy host moves a whole process's numbers together (session 11
measured the same code 2x apart in back-to-back processes), so alternate several rounds and pin the process to
one core (``taskset -c 3``).

    git worktree add /tmp/old <commit>
    for r in 1 2 3; do
      PYTHONPATH=/tmp/old:$PYTHONPATH taskset -c 3 python -m scripts.plan_ab old$r
      taskset -c 3 python -m scripts.plan_ab new$r
    done > plan_ab.csv          # tag,snapshot,median_us,p90_us,plan module

Each snapshot: 20 plans to warm up, then 400 timed ones (a fresh tree object each, as an engine step has), with a
device synchronisation every 25 so the staging buffers' events never make a plan wait. Needs a CUDA GPU.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

import deft.kernels.deft_attention as deft_attention
from deft.kernels.deft_flatten import DeftFlatten
from scripts.kernel_snapshots import SHAPE, fresh, snapshots


def main() -> None:
    tag = sys.argv[1] if len(sys.argv) > 1 else "plan"
    dev = torch.device("cuda")
    m = DeftFlatten()
    for name, tree in snapshots():
        for _ in range(20):
            m.plan(fresh(tree), SHAPE, dev)
        ts = []
        for i in range(400):
            t = fresh(tree)
            t0 = time.perf_counter()
            m.plan(t, SHAPE, dev)
            ts.append(time.perf_counter() - t0)
            if i % 25 == 0:
                torch.cuda.synchronize()
        print(f"{tag},{name},{np.median(ts) * 1e6:.1f},{np.percentile(ts, 90) * 1e6:.1f},{deft_attention.__file__}", flush=True)


if __name__ == "__main__":
    main()

"""Host time of ``DeftAttention.run`` per snapshot (the launch path the end-to-end engine pays once per layer), and
where it goes: for each snapshot of :func:`scripts.kernel_snapshots.snapshots` named by ``DEFT_HP_SNAPS`` (default
the few-shot 16k ones, whose plans take the Gluon prompt kernel, and docmergeToT, which does not), the median host µs
of ``run`` (``DEFT_HP_REPS`` calls, default 300, :func:`~deft.bench.timing.time_host`; the GPU's work per call is
shorter than the host's, so no call waits for a full queue) with
the Gluon kernel's TMA descriptors cached (the default) and made anew each call (``fresh_desc_us``), then
a cProfile of as many calls with the functions that take the most cumulative time. Prints a table; writes
``$OUT/run_host_probe_<date>.csv``. GPU only: ``python -m scripts.run_host_probe``.
"""

from __future__ import annotations

import cProfile
import functools
import io
import os
import pstats

import torch

from deft.bench.timing import time_host
from deft.kernels.deft_flatten import DeftFlatten
from scripts.kernel_snapshots import SHAPE, inputs, save_probe_rows, snapshots


def fresh_descriptors(m, run) -> None:
    """``run`` with the Gluon kernel's TMA descriptors made anew (as before they were cached)."""
    m._descriptors.clear()
    run()


def main() -> None:
    dev = torch.device("cuda")
    prefixes = [p for p in os.environ.get("DEFT_HP_SNAPS", "fewshot_16k,docmergeToT").split(",") if p]
    reps = int(os.environ.get("DEFT_HP_REPS", "300"))
    rows = []
    for name, tree in snapshots():
        if not any(name.startswith(p) for p in prefixes):
            continue
        q, k, v, _ = inputs(tree, dev)
        m = DeftFlatten()
        plan = m.plan(tree, SHAPE, dev)
        out = torch.empty_like(q)
        run = functools.partial(m.run, q, k, v, plan, out=out)
        for _ in range(20):
            run()
        us = time_host(run, reps).median_ms * 1e3
        fresh = time_host(functools.partial(fresh_descriptors, m, run), reps).median_ms * 1e3 if plan.n_prompt else us
        prof = cProfile.Profile()
        torch.cuda._sleep(200_000_000)
        prof.enable()
        for _ in range(min(reps, 100)):
            run()
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(22)
        print(f"== {name}: run() {us:.1f} µs host (gluon prompt tiles: {plan.n_prompt})\n" + s.getvalue()[-4500:])
        rows.append(dict(snapshot=name, run_host_us=us, fresh_desc_us=fresh, n_prompt=plan.n_prompt, reps=reps))
    df = save_probe_rows(rows, "run_host_probe", dev)
    print(df[["snapshot", "n_prompt", "run_host_us", "fresh_desc_us"]].round(1).to_string(index=False))


if __name__ == "__main__":
    main()

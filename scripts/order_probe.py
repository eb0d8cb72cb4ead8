"""Launch-order probe: the same DeFT-Flatten plan with its tiles launched in other orders, timed on the GPU.

The session-8 timeline showed the few-shot prompt's big programs (tensor-bound) running first and the branch
programs (HBM-bound) after them. This asks whether interleaving the two kinds, so that an SM runs one of each,
shortens the launch. Only the order of the plan's tile records changes (each record carries its own ranges and
partial rows), so every order computes the same output; each is checked against the fp64 reference.

Orders: ``lpt`` (the plan's longest-first order, without the ``mix`` rule), ``mix`` (big and small tiles
alternating, each kind longest first: the order the rule picks, :func:`~deft.kernels.kv_groups.alternate`), ``mix_b2s1`` (two big, one small), ``small_first`` (small tiles first, a control). Prints a table; rows to
``$OUT/order_probe_<date>.csv``. Run on the GPU machine: ``python -m scripts.order_probe``.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import torch

from deft.bench.timing import time_device
from deft.kernels.deft_flatten import DeftFlatten
from deft.kernels.kv_groups import TILE_FIELDS, alternate
from deft.reference import TOLERANCE, relative_error
from scripts.kernel_snapshots import SHAPE, graph_of, inputs, save_probe_rows, snapshots


def interleave(big: np.ndarray, small: np.ndarray, nb: int, ns: int) -> np.ndarray:
    """``nb`` big then ``ns`` small, repeated; the rest of the longer list at the end."""
    out, i, j = [], 0, 0
    while i < len(big) or j < len(small):
        out.extend(big[i : i + nb])
        out.extend(small[j : j + ns])
        i, j = i + nb, j + ns
    return np.asarray(out, dtype=np.int64)


def orders(t: np.ndarray, small_rows: int, group: int) -> dict[str, np.ndarray]:
    """Tile permutations of the plan's (longest-first) records ``t``."""
    idx = np.arange(t.shape[0])
    small = (t[:, 3] - t[:, 2]) * group <= small_rows
    big_i, small_i = idx[~small], idx[small]
    return {
        "lpt": idx,
        "mix": alternate(big_i, small_i),
        "mix_b2s1": interleave(big_i, small_i, 2, 1),
        "small_first": np.concatenate([small_i, big_i]),
    }


def main() -> None:
    dev = torch.device("cuda")
    prefixes = os.environ.get(
        "DEFT_OP_SNAPS", "fewshot_16k_w50_step200,fewshot_16k_w50_step399,fewshot_4k_w50_step399,fewshot_4k_w50_step200"
    ).split(",")
    rows = []
    for sname, tree in snapshots():
        if not any(sname.startswith(p) for p in prefixes):
            continue
        q, k, v, ref = inputs(tree, dev)
        m = DeftFlatten(mix=0)  # plain longest first: the other orders permute it
        plan = m.plan(tree, SHAPE, dev)
        g = plan.groups
        n_rec = g.n_tiles * len(TILE_FIELDS)
        host = plan.meta.cpu().numpy().copy()
        t = host[:n_rec].reshape(g.n_tiles, len(TILE_FIELDS)).copy()
        small_rows = m.small_m if m.small_m < plan.block_m else 0
        for name, perm in orders(t, small_rows, SHAPE.group_size).items():
            packed = host.copy()
            packed[:n_rec] = t[perm].ravel()
            meta = torch.from_numpy(packed).to(dev)
            p2 = dataclasses.replace(plan, meta=meta)
            out = m.run(q, k, v, p2)
            err = relative_error(out, ref)
            assert err < TOLERANCE[torch.bfloat16], (sname, name, err)
            run = functools.partial(m.run, q, k, v, p2)
            graph = time_device(graph_of(run).replay, reps=50, device=dev)
            eager = time_device(run, reps=50, device=dev)
            rows.append({"snapshot": sname, "order": name, "graph_us": graph.median_ms * 1e3,
                         "graph_p90_us": graph.p90_ms * 1e3, "eager_us": eager.median_ms * 1e3, "rel_err": err,
                         "tiles": g.n_tiles, "small_tiles": int(((t[:, 3] - t[:, 2]) * SHAPE.group_size <= small_rows).sum())})  # fmt: skip
            print(f"{sname[:26]:26s} {name:12s} graph {rows[-1]['graph_us']:7.1f} eager {rows[-1]['eager_us']:7.1f}", flush=True)
    df = save_probe_rows(rows, "order_probe", dev)
    print(df.pivot_table(index="snapshot", columns="order", values="graph_us").round(1).to_string())


if __name__ == "__main__":
    main()

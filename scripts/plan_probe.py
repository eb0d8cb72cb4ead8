"""Plan-time probe: where a DeFT plan's host time goes on the GPU machine, and what cheaper uploads would save.

``DeftAttention.plan`` is the C grouping (tree derivation, chunking, packing into a pinned staging buffer) plus a
torch-side upload (a device ``empty``, a non-blocking ``copy_``, an event that guards the staging buffer's reuse)
plus a little Python (workspace, launch configuration, the plan record). On the GPU machine's host the plan
measured 126-186 µs where the same plan takes 27-30 µs on the development CPU without the upload. This times
each piece on the snapshot trees, round-robin over the pieces so a noisy host affects them alike, and times
the upload done other ways:

- ``upload``: ``deft.kernels.staging``'s runtime path (``empty``, then the copy and the event through the CUDA
  runtime by ctypes, the plans' default since session 10); ``upload_torch``: its torch path
  (``empty`` + ``copy_`` + event record; ``DEFT_CUDART_UPLOAD=0`` in plans);
- ``to``: ``pinned[:n].to(dev, non_blocking=True)`` + event record (one torch call fewer);
- ``ring_copy``: ``copy_`` into a slice of a device buffer allocated once + event record;
- ``cudart``: ``cudaMemcpyAsync`` + ``cudaEventRecord`` through ctypes into a buffer allocated once, with the
  stream and event handles looked up once (the cheapest an upload can be from Python);
- the parts alone: ``empty``, ``copy``, ``record``, ``current_stream``.

Rows (median and p90 µs per piece and snapshot) to ``$OUT/plan_probe_<date>.csv``; a table last. Run on the GPU
machine: ``python -m scripts.plan_probe``.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from deft.kernels.deft_flatten import DeftFlatten
from deft.kernels.staging import PinnedStaging
from deft.kernels.staging import cudart as staging_cudart
from scripts.kernel_snapshots import SHAPE, fresh, save_probe_rows, snapshots

REPS = int(os.environ.get("DEFT_PP_REPS", "300"))


def round_robin(pieces: dict[str, Callable[[], object]], reps: int, sync_every: int = 25) -> dict[str, np.ndarray]:
    """µs samples of each piece, the pieces taken in turn within every repetition."""
    out: dict[str, list[float]] = {k: [] for k in pieces}
    for fn in pieces.values():  # warm-up
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    for r in range(reps):
        for k, fn in pieces.items():
            t0 = time.perf_counter()
            fn()
            out[k].append((time.perf_counter() - t0) * 1e6)
        if r % sync_every == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return {k: np.asarray(v) for k, v in out.items()}


def probe_snapshot(tree, dev: torch.device, cudart: ctypes.CDLL | None) -> tuple[dict[str, np.ndarray], dict]:
    """µs samples of every piece on one tree, and the plan's size."""
    m = DeftFlatten()
    plan = m.plan(tree, SHAPE, dev)
    staging = m._staging[dev]
    staging.lib = cudart  # "upload": the runtime path whatever DEFT_CUDART_UPLOAD says (torch when there is none)
    n = int(plan.groups.packed.size)
    pinned = torch.empty(max(n, 1 << 16), dtype=torch.int32, pin_memory=True)
    ring = torch.empty(max(n, 1 << 16), dtype=torch.int32, device=dev)
    ev = torch.cuda.Event()
    stream = torch.cuda.current_stream()
    trees = [fresh(tree) for _ in range(64)]
    it = iter(range(1 << 30))

    def tr():
        return trees[next(it) % len(trees)]

    torch_staging = PinnedStaging(dev)
    torch_staging.lib = None  # the torch path
    torch_staging.alloc(n)

    def up_torch():
        torch_staging.turn = 0  # the same buffer each time (no alloc in between)
        return torch_staging.upload(n)

    def up_to():
        d = pinned[:n].to(dev, non_blocking=True)
        ev.record()
        return d

    def up_ring():
        ring[:n].copy_(pinned[:n], non_blocking=True)
        ev.record()

    pieces: dict[str, Callable[[], object]] = {
        "plan": lambda: m.plan(tr(), SHAPE, dev),
        "groups": lambda: m.groups(tr(), SHAPE, staging.alloc),
        "upload": lambda: staging.upload(n),
        "upload_torch": up_torch,
        "to": up_to,
        "ring_copy": up_ring,
        "empty": lambda: torch.empty(n, dtype=torch.int32, device=dev),
        "copy": lambda: ring[:n].copy_(pinned[:n], non_blocking=True),
        "record": lambda: ev.record(),
        "record_stream": lambda: ev.record(stream),
        "current_stream": lambda: torch.cuda.current_stream(),
        "workspace": lambda: m._workspace(max(plan.groups.n_partials, 1), SHAPE, dev),
        "precompile_lookup": lambda: m._precompile(plan, dev),
    }
    if cudart is not None:
        src, dst, nbytes = pinned.data_ptr(), ring.data_ptr(), 4 * n
        s_handle, e_handle = stream.cuda_stream, ev.cuda_event

        def up_cudart():
            cudart.cudaMemcpyAsync(dst, src, nbytes, 1, s_handle)
            cudart.cudaEventRecord(e_handle, s_handle)

        pieces["cudart"] = up_cudart
    return round_robin(pieces, REPS), {"packed_ints": n, "n_tiles": plan.groups.n_tiles, "reps": REPS}


def main() -> None:
    dev = torch.device("cuda")
    cudart = staging_cudart()
    print("cudart:", cudart, flush=True)
    rows = []
    for sname, tree in snapshots():
        samples, info = probe_snapshot(tree, dev, cudart)
        for k, s in samples.items():
            rows.append({"snapshot": sname, "piece": k, "median_us": float(np.median(s)),
                         "p10_us": float(np.percentile(s, 10)), "p90_us": float(np.percentile(s, 90)), **info})  # fmt: skip
        print(f"{sname[:26]:26s} " + " ".join(f"{k} {np.median(s):.1f}" for k, s in samples.items()), flush=True)
    df = save_probe_rows(rows, "plan_probe", dev)
    print(df.pivot_table(index="snapshot", columns="piece", values="median_us").round(1).to_string())


if __name__ == "__main__":
    main()

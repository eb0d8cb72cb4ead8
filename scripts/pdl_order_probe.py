"""What a stream waits for after a programmatic dependent launch (PDL), on this GPU (Hopper; run it there).

A kernel ``A`` of one program per SM spins for ``DEFT_PO_US`` µs (default 200) and then sets its flag; its programs
run ``griddepcontrol.launch_dependents`` as they start. After it, a kernel launched as its programmatic dependent,
and then a reader that sums ``A``'s flags (all set: the reader ran after ``A`` ended). Cases:

- ``marker_then_normal``: A, a PDL marker, a normal reader on the same stream;
- ``marker_event_side``: A, a PDL marker, an event after it, the reader on a second stream waiting for that event;
- ``pdl_kernel_then_normal``: A, a PDL kernel with work of its own (also a reader), a normal reader after it;
- ``baseline_event``: A, an event, the reader on a second stream (no PDL): the flags must all be set.

Each case runs eagerly and as a CUDA graph, and prints the flags each reader saw and the µs from A's start to the
reader's start (``%globaltimer``). ``DeftAttention(prompt_order="chain")`` relies on the third case's answer (the plain
launch after a PDL secondary waits for the primary too); the second says why a marker kernel with a second stream
waiting for it does not work (the event after the marker completes only once the primary has ended). H100, session 20:
``results/h100/probe/pdl_order_probe_2026-12-06_s20d.csv``.
"""

from __future__ import annotations

import os

import pandas as pd
import torch
import triton
import triton.language as tl

from deft.kernels.tree_attention import _globaltimer
from scripts.kernel_snapshots import provenance


@triton.jit
def marker_kernel(x_ptr, WRITE: tl.constexpr):
    if WRITE:  # never set: a kernel with no work of its own
        tl.store(x_ptr, 0)


def launch_marker(x: torch.Tensor) -> None:
    """One program with no work, launched as a programmatic dependent of the kernel before it."""
    marker_kernel[(1,)](x, WRITE=False, num_warps=1, launch_pdl=True)


@triton.jit
def spin_kernel(flags, t_start, ns):
    pid = tl.program_id(0)
    tl.extra.cuda.gdc_launch_dependents()
    t0 = _globaltimer(flags)
    if pid == 0:
        tl.store(t_start, t0)
    t = t0
    while t - t0 < ns:
        t = _globaltimer(flags)
    tl.store(flags + pid, 1)


@triton.jit
def read_kernel(flags, n, out, t_read, BLOCK: tl.constexpr):
    t = _globaltimer(flags)
    offs = tl.arange(0, BLOCK)
    tl.store(out, tl.sum(tl.load(flags + offs, mask=offs < n, other=0, volatile=True)))
    tl.store(t_read, t)


def run_case(case: str, n: int, ns: int, flags, out, times, side) -> None:
    cur = torch.cuda.current_stream()
    flags.zero_()
    out.fill_(-1)
    spin_kernel[(n,)](flags, times[0:], ns, num_warps=1)
    if case == "marker_then_normal":
        launch_marker(out)
        read_kernel[(1,)](flags, n, out, times[1:], BLOCK=triton.next_power_of_2(n), num_warps=4)
    elif case in ("marker_event_side", "baseline_event"):
        if case == "marker_event_side":
            launch_marker(out)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            read_kernel[(1,)](flags, n, out, times[1:], BLOCK=triton.next_power_of_2(n), num_warps=4)
        cur.wait_stream(side)
    elif case == "pdl_kernel_then_normal":
        read_kernel[(1,)](flags, n, out[1:], times[2:], BLOCK=triton.next_power_of_2(n), num_warps=4, launch_pdl=True)
        read_kernel[(1,)](flags, n, out, times[1:], BLOCK=triton.next_power_of_2(n), num_warps=4)
    else:
        raise ValueError(case)


def main() -> None:
    dev = torch.device("cuda")
    n = torch.cuda.get_device_properties(dev).multi_processor_count
    ns = int(float(os.environ.get("DEFT_PO_US", "200")) * 1e3)
    flags = torch.zeros(n, dtype=torch.int32, device=dev)
    out = torch.zeros(2, dtype=torch.int32, device=dev)
    times = torch.zeros(3, dtype=torch.int64, device=dev)
    side = torch.cuda.Stream(dev)
    rows = []
    for case in ("baseline_event", "marker_then_normal", "marker_event_side", "pdl_kernel_then_normal"):
        for mode in ("eager", "graph"):
            if mode == "eager":
                fn = lambda c=case: run_case(c, n, ns, flags, out, times, side)  # noqa: E731
            else:
                run_case(case, n, ns, flags, out, times, side)  # compile outside the capture
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    run_case(case, n, ns, flags, out, times, side)
                fn = g.replay
            for rep in range(3):
                fn()
                torch.cuda.synchronize()
                t = times.cpu().tolist()
                o = out.cpu().tolist()
                rows.append({"case": case, "mode": mode, "rep": rep, "programs": n, "spin_us": ns / 1e3,
                             "flags_seen": o[0], "flags_seen_by_pdl_kernel": o[1] if case.startswith("pdl") else None,
                             "reader_start_after_a_us": (t[1] - t[0]) / 1e3,
                             "pdl_reader_start_after_a_us": (t[2] - t[0]) / 1e3 if case.startswith("pdl") else None})  # fmt: skip
    df = pd.DataFrame(rows)
    print(torch.cuda.get_device_name(dev), torch.__version__, triton.__version__)
    print(df.to_string(index=False))
    out_dir = os.environ.get("OUT")
    if out_dir:
        df.assign(**provenance(dev)).to_csv(os.path.join(out_dir, "pdl_order_probe.csv"), index=False)


if __name__ == "__main__":
    main()

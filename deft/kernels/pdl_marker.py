"""A one-program kernel that does nothing, launched as a programmatic dependent (PDL) of the kernel before it.

Hopper lets a kernel launched with programmatic stream serialization start once every program of the kernel before
it on the stream has run ``griddepcontrol.launch_dependents`` (or ended). This kernel has no work of its own, so it
ends at once; an event recorded after it then marks "every program of the previous kernel has started", which a
second stream can wait for (``DeftAttention``'s ``prompt_order="marker"``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def pdl_marker_kernel(x_ptr, WRITE: tl.constexpr):
    if WRITE:  # never set by the launcher: gives the kernel an argument it could touch
        tl.store(x_ptr, 0)


def launch_marker(x: torch.Tensor, warmup: bool = False) -> None:
    """One program, launched as a programmatic dependent of the kernel before it on the current stream."""
    if warmup:
        pdl_marker_kernel.warmup(x, WRITE=False, grid=(1,), num_warps=1, launch_pdl=True)
    else:
        pdl_marker_kernel[(1,)](x, WRITE=False, num_warps=1, launch_pdl=True)

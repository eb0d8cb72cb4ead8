"""Host-to-device upload of a packed DeFT plan: pinned staging buffers, the copy and the event that guards reuse.

A plan is packed on the host straight into a pinned buffer and copied to a fresh device tensor with one
asynchronous copy on the current stream. Two pinned buffers are used in turn; an event recorded after each copy
lets the plan two steps later wait (rarely: the copy is a few µs) before it overwrites its buffer.

The copy and the event go through the CUDA runtime's ``cudaMemcpyAsync`` and ``cudaEventRecord`` called by ctypes
when the process has the runtime loaded (torch's CUDA build does), with the stream and event handles torch
already holds. Through torch the same two operations are a ``copy_`` (with its own event in torch's pinned-memory
allocator) and an ``Event.record`` that looks the current stream up again: several times the cost on a slow host
(``scripts/plan_probe.py`` measures both: on the H200 host of session 10, 9-17 µs against 22-50 µs). The runtime
path is the default; ``DEFT_CUDART_UPLOAD=0`` takes torch's (and a runtime that cannot be found, or an error it
returns, falls back to torch).
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

#: True: upload through the CUDA runtime when it is loaded (the default; ``DEFT_CUDART_UPLOAD=0`` at import: torch)
CUDART_UPLOAD = os.environ.get("DEFT_CUDART_UPLOAD", "1") != "0"
_H2D = 1  # cudaMemcpyHostToDevice
_cudart: ctypes.CDLL | None = None
_cudart_error: str | None = None


def cudart() -> ctypes.CDLL | None:
    """The CUDA runtime library already mapped into this process (torch's), with the two calls typed; None
    when there is none (a CPU build, a static runtime) or it lacks them."""
    global _cudart, _cudart_error
    if _cudart is not None or _cudart_error is not None:
        return _cudart
    path = None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libcudart.so" in line:
                    path = line.split()[-1]
                    break
    except OSError as e:
        _cudart_error = f"no /proc/self/maps: {e}"
        return None
    if path is None:
        _cudart_error = "libcudart is not loaded in this process"
        return None
    try:
        lib = ctypes.CDLL(path)
        lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        lib.cudaMemcpyAsync.restype = ctypes.c_int
        lib.cudaEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cudaEventRecord.restype = ctypes.c_int
        lib.cudaGetLastError.argtypes = []
        lib.cudaGetLastError.restype = ctypes.c_int
    except (OSError, AttributeError) as e:
        _cudart_error = f"{type(e).__name__}: {e}"
        return None
    _cudart = lib
    return lib


def _raw_stream(index: int) -> int:
    """The current CUDA stream's handle for device ``index``."""
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return get(index) if get is not None else torch.cuda.current_stream(index).cuda_stream


class PinnedStaging:
    """Two pinned int32 staging buffers used in turn, so a plan never overwrites a copy still in flight."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.bufs: list[torch.Tensor | None] = [None, None]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0
        self.lib = cudart() if CUDART_UPLOAD else None

    def alloc(self, n: int) -> np.ndarray:
        """The current buffer's first ``n`` entries, to pack a plan into (waits for its copy of two plans ago)."""
        i = self.turn
        if self.events[i] is not None:  # the copy made from this buffer two plans ago (also before it is freed:
            self.events[i].synchronize()  # torch's pinned allocator may hand it out again)
        buf = self.bufs[i]
        if buf is None or buf.numel() < n:
            buf = torch.empty(
                max(n, 2 * (buf.numel() if buf is not None else 0), 1 << 16), dtype=torch.int32, pin_memory=True
            )
            self.bufs[i] = buf
        return buf.numpy()[:n]

    def upload(self, n: int) -> torch.Tensor:
        """Copy the first ``n`` entries of the current buffer (filled through :meth:`alloc`) to a new device tensor."""
        i = self.turn
        self.turn ^= 1
        dev = torch.empty(n, dtype=torch.int32, device=self.device)
        ev = self.events[i]
        if ev is None:
            ev = self.events[i] = torch.cuda.Event()
            ev.record()  # creates the CUDA event, whose handle the fast path then uses
        lib = self.lib
        if lib is not None and n > 0:
            stream = _raw_stream(self.index)
            src = self.bufs[i].data_ptr()
            if lib.cudaMemcpyAsync(dev.data_ptr(), src, 4 * n, _H2D, stream) == 0:
                if lib.cudaEventRecord(ev.cuda_event, stream) != 0:
                    lib.cudaGetLastError()
                    ev.record()
                return dev
            lib.cudaGetLastError()  # clear it, so torch's next launch check does not report it as its own
            self.lib = None  # torch from now on (and this copy again, through torch)
        dev.copy_(self.bufs[i][:n], non_blocking=True)
        ev.record()
        return dev

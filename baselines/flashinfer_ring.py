"""FlashInfer wrappers reused round-robin, each re-planned only after the GPU has taken its previous plan.

FlashInfer 0.5.3's ``plan`` (decode and prefill wrappers alike) writes its schedule into the wrapper's
page-locked host buffer and copies it to the wrapper's device buffer with an asynchronous copy issued from its
C++ side, on the current stream. PyTorch's pinned-memory allocator never sees that copy. So when the host runs
ahead of the GPU, which is the point of an overlapped engine, a second ``plan`` on the same wrapper rewrites the
host buffer before the first copy has run, and the GPU reads a schedule that is half of each: wrong rows or an
illegal memory access many steps later. A fresh wrapper per plan only moves the race: the dropped wrapper's
pinned buffer goes back to PyTorch's host allocator, which hands it to the next wrapper at once.

``WrapperRing`` keeps ``size`` wrappers per key and records a CUDA event after each plan; a wrapper is
re-planned only once its event has completed (in practice long before: ``size`` steps later).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch


class WrapperRing:
    """Round-robin FlashInfer wrappers per key; ``acquire`` waits for the chosen wrapper's last plan copy."""

    def __init__(self, make: Callable[[Hashable], Any], size: int = 4) -> None:
        if size < 1:
            raise ValueError(f"a wrapper ring needs at least one wrapper, got {size}")
        self.make = make
        self.size = int(size)
        self._rings: dict[Hashable, list[list[Any]]] = {}  # key -> [[wrapper, event or None], ...]
        self._next: dict[Hashable, int] = {}

    def acquire(self, key: Hashable) -> Any:
        """The wrapper to plan next for ``key``: a new one until the ring is full, then the least recently
        planned, once the GPU has run the copy of its previous plan."""
        ring = self._rings.setdefault(key, [])
        if len(ring) < self.size:
            ring.append([self.make(key), None])
            return ring[-1][0]
        i = self._next.get(key, 0)
        self._next[key] = (i + 1) % self.size
        w, ev = ring[i]
        if ev is not None:
            ev.synchronize()
        return w

    def planned(self, key: Hashable, wrapper: Any, device: torch.device | None = None) -> None:
        """Mark ``wrapper`` as just planned: its schedule copy is queued on ``device``'s current stream."""
        for entry in self._rings.get(key, []):
            if entry[0] is wrapper:
                if device is not None and device.type == "cuda":
                    entry[1] = torch.cuda.Event()
                    entry[1].record(torch.cuda.current_stream(device))
                return
        raise KeyError(f"wrapper not in the ring for {key!r}")

    def __len__(self) -> int:
        return sum(len(r) for r in self._rings.values())

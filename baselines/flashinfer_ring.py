"""FlashInfer wrappers kept (and optionally reused round-robin) until the GPU has taken their plans.

FlashInfer 0.5.3's ``plan`` (decode and prefill wrappers alike) writes its schedule into the wrapper's
page-locked host buffer and copies it to the wrapper's device buffer with an asynchronous copy issued from its
C++ side, on the current stream; PyTorch's allocators never see that copy (read in its source). So when the
host runs ahead of the GPU, as the overlapped engine does, re-planning a wrapper could rewrite the host buffer
before the GPU has copied it, and a dropped wrapper's buffers could go to the next one while a copy into them
is still queued.

``WrapperRing`` guards against both: it records a CUDA event after each plan and keeps the last ``size``
wrappers per key. With ``reuse=True`` it hands them out round-robin and re-plans one only after its event has
completed; with ``reuse=False`` every plan gets a new wrapper and the oldest is dropped only after its event
has completed. The guard did not cure FlashInfer cascade's crashes in the engine (``notes/baselines.md``), so
they have another cause; it costs one event per plan.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch


class WrapperRing:
    """FlashInfer wrappers per key, each released or re-planned only after the GPU ran its last plan's copy."""

    def __init__(self, make: Callable[[Hashable], Any], size: int = 4, reuse: bool = True) -> None:
        if size < 1:
            raise ValueError(f"a wrapper ring needs at least one wrapper, got {size}")
        self.make = make
        self.size = int(size)
        self.reuse = bool(reuse)
        self._rings: dict[Hashable, list[list[Any]]] = {}  # key -> [[wrapper, event or None], ...], oldest first

    def acquire(self, key: Hashable) -> Any:
        """The wrapper to plan next for ``key``: a new one until the ring is full; then (``reuse``) the least
        recently planned, or (not ``reuse``) a new one after the oldest is released, either once the GPU has
        run the copy of that wrapper's last plan."""
        ring = self._rings.setdefault(key, [])
        if len(ring) < self.size:
            ring.append([self.make(key), None])
            return ring[-1][0]
        entry = ring.pop(0)
        if entry[1] is not None:
            entry[1].synchronize()
        if not self.reuse:
            entry = [self.make(key), None]
        entry[1] = None
        ring.append(entry)
        return entry[0]

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

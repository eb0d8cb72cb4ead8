"""Token-granular paged KV pool: one slot per token, shared by every descendant, freed on prune."""

from __future__ import annotations

import numpy as np
import torch


class KVPoolFull(RuntimeError):
    """The pool has fewer free slots than asked for."""


class SlotAllocator:
    """Free-list of slot indices. ``alloc`` and ``free`` are vectorised (no per-token Python)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"KV pool capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        # stack of free slots; the top is at the end, lowest slots handed out first
        self._free = np.arange(self.capacity - 1, -1, -1, dtype=np.int64)
        self._n_free = self.capacity
        self._in_use = np.zeros(self.capacity, dtype=bool)

    @property
    def n_free(self) -> int:
        return self._n_free

    @property
    def n_used(self) -> int:
        return self.capacity - self._n_free

    def alloc(self, n: int) -> np.ndarray:
        """Take ``n`` free slots; raise :class:`KVPoolFull` naming the numbers if there are not enough."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of slots ({n})")
        if n > self._n_free:
            raise KVPoolFull(
                f"KV pool full: {n} slots asked, {self._n_free} free of {self.capacity}; "
                f"raise the pool capacity (e.g. kv_capacity=) to at least {self.n_used + n}"
            )
        top = self._n_free
        out = self._free[top - n : top][::-1].copy()
        self._n_free -= n
        self._in_use[out] = True
        return out

    def free(self, slots: np.ndarray) -> None:
        """Return slots to the pool; freeing a slot that is not in use is an error."""
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size == 0:
            return
        if slots.min() < 0 or slots.max() >= self.capacity:
            raise ValueError(f"slot outside the pool (0..{self.capacity - 1}) freed")
        if not self._in_use[slots].all() or np.unique(slots).size != slots.size:
            bad = slots[~self._in_use[slots]]
            raise ValueError(f"double free of slots {bad[:8].tolist() or 'repeated in one call'}")
        self._in_use[slots] = False
        n = slots.size
        self._free[self._n_free : self._n_free + n] = slots[::-1]
        self._n_free += n

    def in_use(self) -> np.ndarray:
        """Indices of the slots currently allocated."""
        return np.flatnonzero(self._in_use)


class KVPool:
    """Per-layer K and V tensors ``[capacity, n_kv_heads, head_dim]`` and the slot allocator they share."""

    def __init__(
        self,
        n_layers: int,
        capacity: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> None:
        self.allocator = SlotAllocator(capacity)
        self.k = [torch.empty(capacity, n_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty(capacity, n_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(n_layers)]

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    def alloc(self, n: int) -> np.ndarray:
        return self.allocator.alloc(n)

    def free(self, slots: np.ndarray) -> None:
        self.allocator.free(slots)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v [n, n_kv_heads, head_dim]`` of new tokens into ``slots`` of ``layer``."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

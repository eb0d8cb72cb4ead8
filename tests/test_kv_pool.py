"""Slot allocator and KV pool: lowest slots first, free on prune, a full pool says what to raise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deft.kv_pool import KVPool, KVPoolFull, SlotAllocator


def test_alloc_hands_out_lowest_free_slots_and_tracks_use():
    a = SlotAllocator(10)
    assert a.alloc(3).tolist() == [0, 1, 2]
    assert a.alloc(2).tolist() == [3, 4]
    assert (a.n_used, a.n_free) == (5, 5)
    a.free(np.array([1, 3]))
    assert a.in_use().tolist() == [0, 2, 4]
    again = a.alloc(2)
    assert sorted(again.tolist()) == [1, 3]  # freed slots are reused before fresh ones
    assert a.alloc(0).size == 0


def test_full_pool_error_names_asked_free_capacity_and_fix():
    a = SlotAllocator(8)
    a.alloc(6)
    with pytest.raises(KVPoolFull) as e:
        a.alloc(5)
    msg = str(e.value)
    assert "5 slots asked" in msg and "2 free of 8" in msg and "at least 11" in msg and "kv_capacity" in msg
    assert a.n_free == 2  # a failed alloc takes nothing


def test_free_rejects_double_free_and_foreign_slots():
    a = SlotAllocator(4)
    s = a.alloc(2)
    a.free(s[:1])
    with pytest.raises(ValueError, match="double free"):
        a.free(s[:1])
    with pytest.raises(ValueError, match="double free"):
        a.free(np.array([s[1], s[1]]))
    with pytest.raises(ValueError, match="outside the pool"):
        a.free(np.array([4]))
    a.free(np.zeros(0, dtype=np.int64))
    assert a.n_used == 1


def test_bad_capacity_and_negative_alloc():
    with pytest.raises(ValueError, match="capacity must be positive"):
        SlotAllocator(0)
    with pytest.raises(ValueError, match="negative"):
        SlotAllocator(2).alloc(-1)


def test_free_then_realloc_cycles_without_leak():
    rng = np.random.default_rng(0)
    a = SlotAllocator(64)
    live: list[np.ndarray] = []
    for _ in range(200):
        if live and rng.random() < 0.5:
            a.free(live.pop(int(rng.integers(len(live)))))
        elif a.n_free:
            live.append(a.alloc(int(rng.integers(1, a.n_free + 1))))
        held = np.concatenate(live) if live else np.zeros(0, dtype=np.int64)
        assert np.unique(held).size == held.size == a.n_used
        assert sorted(held.tolist()) == a.in_use().tolist()


def test_kv_pool_write_lands_in_the_allocated_slots():
    pool = KVPool(n_layers=2, capacity=6, n_kv_heads=2, head_dim=4, dtype=torch.float32)
    assert len(pool.k) == len(pool.v) == 2 and pool.k[0].shape == (6, 2, 4)
    slots = pool.alloc(3)
    k = torch.randn(3, 2, 4)
    v = torch.randn(3, 2, 4)
    pool.write(1, torch.from_numpy(slots), k, v)
    assert torch.equal(pool.k[1][torch.from_numpy(slots)], k)
    assert torch.equal(pool.v[1][torch.from_numpy(slots)], v)
    with pytest.raises(KVPoolFull):
        pool.alloc(4)
    pool.free(slots)
    assert pool.capacity == 6 and pool.allocator.n_free == 6

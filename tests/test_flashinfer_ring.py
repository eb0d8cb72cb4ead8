"""The FlashInfer wrapper ring (CPU): round-robin reuse per key, and the bookkeeping that guards re-plans."""

from __future__ import annotations

import itertools

import pytest
import torch

from baselines.flashinfer_ring import WrapperRing


def test_ring_creates_size_wrappers_per_key_then_reuses_them_round_robin():
    made = itertools.count()
    ring = WrapperRing(lambda key: (key, next(made)), size=3)
    got = []
    for _ in range(7):
        w = ring.acquire("a")
        ring.planned("a", w, torch.device("cpu"))
        got.append(w[1])
    assert got == [0, 1, 2, 0, 1, 2, 0]
    w = ring.acquire("b")  # another key, its own wrappers
    assert w == ("b", 3) and len(ring) == 4


def test_planned_refuses_a_wrapper_from_elsewhere_and_a_ring_needs_one_wrapper():
    ring = WrapperRing(lambda key: object(), size=2)
    ring.acquire("a")
    with pytest.raises(KeyError):
        ring.planned("a", object())
    with pytest.raises(ValueError, match="at least one"):
        WrapperRing(lambda key: object(), size=0)


def test_ring_without_reuse_gives_a_new_wrapper_per_plan_and_keeps_the_last_size():
    made = itertools.count()
    ring = WrapperRing(lambda key: (key, next(made)), size=2, reuse=False)
    got = []
    for _ in range(5):
        w = ring.acquire("a")
        ring.planned("a", w, torch.device("cpu"))
        got.append(w[1])
    assert got == [0, 1, 2, 3, 4] and len(ring) == 2

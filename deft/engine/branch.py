"""Branch controller: applies a trace's grow / branch / prune events step by step.

The trace decides the tree's shape (so every method does the same work); the controller replays it
through :func:`workloads.trace.replay` with the engine's own slot allocator, so the KV pool hands out
the slots of new tokens and takes back those of pruned branches. Before any step runs it sizes the
pool from the trace's counts and refuses a pool that is too small, naming the numbers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from deft.kv_pool import SlotAllocator


class KVCapacityError(ValueError):
    """The KV pool cannot hold the trace's peak KV; raised before any step runs."""


@dataclass(frozen=True)
class KVNeeds:
    """What a trace asks of the engine over its first ``steps`` decode steps."""

    trace: str
    steps: int
    prompt_len: int
    slots: int  # peak KV tokens held at once: the pool size the trace needs
    peak_step: int
    max_queries: int
    query_counts: np.ndarray  # distinct per-step query counts (CUDA-graph buckets)
    total_queries: int

    def check(self, capacity: int) -> None:
        """Raise :class:`KVCapacityError` if a pool of ``capacity`` slots cannot hold the trace."""
        if capacity < self.slots:
            raise KVCapacityError(
                f"trace {self.trace} needs a KV pool of {self.slots} slots ({self.prompt_len}-token prompt, peak "
                f"at step {self.peak_step} of the {self.steps} run) but kv_capacity={capacity}: raise "
                f"bench.kv_capacity to at least {self.slots} or lower bench.max_steps; no step was run"
            )


def kv_needs(trace, max_steps: int | None = None) -> KVNeeds:
    """Peak KV slots, steps and query counts of ``trace`` (first ``max_steps`` steps), without replaying slots."""
    from workloads.trace import step_counts

    sc = step_counts(trace)
    n = trace.n_steps if max_steps is None else max(0, min(int(max_steps), trace.n_steps))
    slots = sc.kv_slots[:n]
    nq = sc.n_queries[:n]
    peak = int(np.argmax(slots)) if n else 0
    return KVNeeds(
        trace=trace.name,
        steps=n,
        prompt_len=int(trace.prompt_len),
        slots=int(slots[peak]) if n else int(trace.prompt_len),
        peak_step=peak + 1,
        max_queries=int(nq.max()) if n else 0,
        query_counts=np.unique(nq),
        total_queries=int(nq.sum()),
    )


class BranchController:
    """Yields each step's :class:`~workloads.trace.StepState`, its slots taken from and freed to ``allocator``.

    ``replay_ms`` holds the host time spent producing each step (events applied, slots allocated and freed).
    """

    def __init__(self, trace, allocator: SlotAllocator, max_steps: int | None = None) -> None:
        self.trace = trace
        self.allocator = allocator
        self.steps = trace.n_steps if max_steps is None else min(int(max_steps), trace.n_steps)
        self.replay_ms: list[float] = []

    def __iter__(self) -> Iterator:
        from workloads.trace import replay

        it = replay(self.trace, allocator=self.allocator)
        for _ in range(self.steps):
            t0 = time.perf_counter()
            state = next(it)
            self.replay_ms.append((time.perf_counter() - t0) * 1e3)
            yield state


def engine_batches(trace, capacity: int | None = None, max_steps: int | None = None) -> Iterator:
    """The engine's step batches of ``trace`` without a model: the same slots, freed slots and queries a
    :class:`~deft.engine.runner.TreeDecoder` run sees (its allocator, its sequence tree manager), to replay
    every engine tree through an attention method alone. ``capacity``: pool slots (default: the trace's peak).
    Yields :class:`~deft.engine.sequence_tree.StepBatch`; the first step's tree holds the prompt."""
    from deft.engine.sequence_tree import SequenceTree

    needs = kv_needs(trace, max_steps)
    cap = int(capacity or needs.slots)
    needs.check(cap)
    seq = SequenceTree(cap + 1)
    first = True
    for state in BranchController(trace, SlotAllocator(cap), max_steps):
        if first:
            seq.prefill(state.tree, trace.prompt_len)
            first = False
        yield seq.advance(state)

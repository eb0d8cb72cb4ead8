"""Which steps of a trace to measure, and how many steps each measured one stands for."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from deft.tree import DecodingTree


def select_steps(
    n_steps: int,
    stride: int | None = None,
    steps: Sequence[int | str] | None = None,
    samples: int | None = None,
) -> list[int]:
    """1-based steps to measure.

    ``steps`` (explicit list; ``"last"`` and negative numbers count from the end) wins over ``stride``
    (every k-th step from step 1), which wins over ``samples`` (about that many, evenly spaced); all
    three ``None``: every step. Steps past the trace's end are dropped.
    """
    if n_steps <= 0:
        return []
    if steps is not None and len(steps) > 0:
        out = set()
        for s in steps:
            s = n_steps if s == "last" else int(s)
            s = n_steps + 1 + s if s < 0 else s
            if 1 <= s <= n_steps:
                out.add(s)
        return sorted(out)
    if stride is None and samples:
        stride = max(1, -(-n_steps // int(samples)))
    stride = max(1, int(stride or 1))
    return list(range(1, n_steps + 1, stride))


def step_weights(sampled: Sequence[int], n_steps: int) -> np.ndarray:
    """Steps each sampled step represents when integrating over the trace.

    Sample ``s_i`` stands for steps ``[s_i, s_{i+1})``; the first also covers the steps before it and
    the last runs to the end, so the weights sum to ``n_steps`` (with stride ``k``: ``k`` each).
    """
    s = np.asarray(sampled, dtype=np.int64)
    if s.size == 0:
        return np.zeros(0)
    bounds = np.append(s, n_steps + 1)
    w = np.diff(bounds).astype(np.float64)
    w[0] += s[0] - 1
    return w


def trace_length(trace, replay_fn) -> int:
    """Decode steps of a trace: from the trace if it says, else by counting a replay."""
    for attr in ("n_steps", "num_steps"):
        v = getattr(trace, attr, None)
        if isinstance(v, int | np.integer):
            return int(v)
    steps = getattr(trace, "steps", None)
    if isinstance(steps, Sequence):
        return len(steps)
    return sum(1 for _ in replay_fn(trace))


def sampled_trees(trace, replay_fn, wanted: Sequence[int]) -> Iterator[tuple[int, DecodingTree]]:
    """Replay ``trace`` and yield ``(step, tree)`` at the wanted steps (the replay stops after the last)."""
    want = set(wanted)
    last = max(want) if want else 0
    if not want:
        return
    for st in replay_fn(trace):
        if st.step in want:
            yield st.step, st.tree
        if st.step >= last:
            break

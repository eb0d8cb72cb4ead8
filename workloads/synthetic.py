"""Synthetic trees for sweeps over tree shape: ``depth`` levels of ``branching``-way fan-out under the prompt.

``fanout: regular`` gives every node above the last level exactly ``branching`` children; ``random``
draws each count uniformly from ``0..2*branching`` (mean ``branching``; a node with none is a finished
branch, pruned; the prompt always gets at least one). ``lengths: fixed`` makes every node ``node_len``
tokens; ``random`` draws from ``1..2*node_len-1`` (mean ``node_len``). Children start when their parent
ends, as in the reasoning templates. Same parameters and seed, same tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workloads.trace import Trace, TraceError, Workload, check_int, tree_trace

MAX_NODES = 2_000_000


@dataclass
class Synthetic(Workload):
    """A generated tree, cut at ``max_seq_len`` like the reasoning templates."""

    prompt_len: int = 4000
    depth: int = 3
    branching: int = 4
    node_len: int = 128
    max_seq_len: int = 4400
    seed: int = 0
    fanout: str = "regular"
    lengths: str = "fixed"

    name = "synthetic"

    def __post_init__(self) -> None:
        check_int("prompt_len", self.prompt_len)
        check_int("depth", self.depth)
        check_int("branching", self.branching)
        check_int("node_len", self.node_len)
        check_int("max_seq_len", self.max_seq_len, self.prompt_len + 2)
        check_int("seed", self.seed, 0)
        if self.fanout not in ("regular", "random"):
            raise TraceError(f"fanout must be 'regular' or 'random', got {self.fanout!r}")
        if self.lengths not in ("fixed", "random"):
            raise TraceError(f"lengths must be 'fixed' or 'random', got {self.lengths!r}")

    def trace(self) -> Trace:
        rng = np.random.default_rng(self.seed)
        parent, start, length = [np.array([-1])], [np.array([1 - self.prompt_len])], [np.array([self.prompt_len])]
        level = np.array([0])  # node ids of the previous level
        level_end = np.array([0])
        n = 1
        for d in range(1, self.depth + 1):  # per level, vectorised over its nodes
            if self.fanout == "regular":
                kids = np.full(level.size, self.branching)
            else:
                kids = rng.integers(0, 2 * self.branching + 1, size=level.size)
                if d == 1:
                    kids = np.maximum(kids, 1)
            total = int(kids.sum())
            if n + total > MAX_NODES:
                raise TraceError(f"synthetic tree would exceed {MAX_NODES} nodes at depth {d}; lower depth or branching")
            if total == 0:
                break
            lens = (
                np.full(total, self.node_len)
                if self.lengths == "fixed"
                else rng.integers(1, 2 * self.node_len, size=total)
            )
            p = np.repeat(level, kids)
            s = np.repeat(level_end, kids) + 1
            parent.append(p)
            start.append(s)
            length.append(lens)
            level = np.arange(n, n + total)
            level_end = s + lens - 1
            n += total
        name = f"synthetic(d={self.depth},b={self.branching},l={self.node_len},{self.fanout},{self.lengths},seed={self.seed})"
        return tree_trace(
            name, self.prompt_len, np.concatenate(parent), np.concatenate(start), np.concatenate(length), self.max_seq_len
        )

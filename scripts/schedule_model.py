"""A list-scheduling model of a DeFT launch: which tile order and cut finish first, on the CPU.

The GPU starts a grid's programs in order as slots free up, so a launch behaves like greedy list scheduling:
each program goes to the slot that frees first. This script builds the plans of the kernel snapshots (the
same trees as ``scripts/kernel_snapshots.py``), gives every (tile, KV head) program a cost, and reports the
makespan for the launch orders the kernel offers: head-major (every tile of KV head 0, then head 1, ...; the
default 2-D grid) and longest first across all heads (``lpt=True``). Its cost model is crude (see
``program_cost``; model units, not µs), so it only ranks alternatives for a GPU run to confirm: on the
session-6 H100 rows it ranked Flatten against Node-Chunk as measured on 8 of 9 snapshots, and ``wide_waves``
1 against 2 on 4 of 5 (``notes/deft_kernels.md``).

    python -m scripts.schedule_model        # SLOTS=264 (132 SMs x 2 resident programs) by default
"""

from __future__ import annotations

import heapq
import os

import numpy as np

from deft.kernels.deft_flatten import DeftFlatten
from deft.kernels.deft_node import DeftNodeChunk
from deft.kernels.kv_groups import TILE_FIELDS, KVGroups, tile_tokens

#: model costs: per program, per 64 tokens for a big / small tile, and the factor for masked tokens
PROGRAM, BIG, SMALL, MASKED = 2.0, 1.5, 1.0, 1.8


def program_cost(g: KVGroups, group: int, small_rows: int = 16) -> np.ndarray:
    """Model cost of each tile's program (the same for every KV head), in tile order."""
    t = g.section("tiles").reshape(-1, len(TILE_FIELDS))
    n_tok, masked = tile_tokens(t)
    per = np.where((t[:, 3] - t[:, 2]) * group > small_rows, BIG, SMALL)
    return PROGRAM + per * (n_tok - masked + MASKED * masked) / 64


def makespan(costs: np.ndarray, slots: int) -> float:
    """Greedy list scheduling of ``costs`` in order onto ``slots`` identical slots: when the last one ends."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    free = [0.0] * slots
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + float(c))
    return max(free)


def launch_order(costs: np.ndarray, n_kv_heads: int, head_fastest: bool) -> np.ndarray:
    """Program costs in the order the grid starts them: head-major 2-D grid, or one axis with a tile's heads
    next to each other."""
    return np.repeat(costs, n_kv_heads) if head_fastest else np.tile(costs, n_kv_heads)


def main() -> None:
    from scripts.kernel_snapshots import SHAPE, snapshots

    slots = int(os.environ.get("SLOTS", 264))
    group = SHAPE.group_size
    print(f"makespan in model units, {slots} slots, {SHAPE.n_kv_heads} KV heads; bound = max(work / slots, longest)")
    print(f"{'snapshot':28s} {'Flatten':>8s} {'+lpt':>7s} {'NodeChunk':>10s} {'+lpt':>7s} {'bound':>7s}")
    for name, tree in snapshots():
        cells = []
        for cls in (DeftFlatten, DeftNodeChunk):
            for lpt in (False, True):
                m = cls(lpt=lpt, n_sms=slots // 2)
                c = program_cost(m.groups(tree, SHAPE), group)
                cells.append(makespan(launch_order(c, SHAPE.n_kv_heads, lpt), slots))
                if cls is DeftFlatten and not lpt:
                    bound = max(c.sum() * SHAPE.n_kv_heads / slots, c.max())
        print(f"{name[:28]:28s} {cells[0]:8.1f} {cells[1]:7.1f} {cells[2]:10.1f} {cells[3]:7.1f} {bound:7.1f}")


if __name__ == "__main__":
    main()

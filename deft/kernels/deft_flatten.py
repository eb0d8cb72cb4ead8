"""DeFT-Flatten: the tree's seen KV in DFS order, cut into near-equal chunks across node boundaries."""

from __future__ import annotations

from typing import Any

from deft.kernels.deft_attention import DeftAttention

#: Flatten's default ``few_split``: runs of chunks whose queries x group fit 16 rows (a fan's branches) are cut
#: as Node-Chunk cuts them (H100, session 7: few-shot 4k step 399 78.8 -> 73.6 µs, sweep geomean 55.3 -> 55.1)
FEW_SPLIT = 16


class DeftFlatten(DeftAttention):
    """DeFT-Flatten: balanced chunks regardless of node boundaries, each with the union of its nodes'
    queries and a per-token visibility test; chunks with more queries than a tile holds are split.
    ``few_split`` defaults to :data:`FEW_SPLIT` here (see :class:`DeftAttention`)."""

    name = "deft_flatten"
    mode = "flatten"

    def __init__(self, *args: Any, few_split: int = FEW_SPLIT, **kwargs: Any) -> None:
        super().__init__(*args, few_split=few_split, **kwargs)

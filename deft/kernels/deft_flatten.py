"""DeFT-Flatten: the tree's seen KV in DFS order, cut into near-equal chunks across node boundaries."""

from __future__ import annotations

from typing import Any

from deft.kernels.deft_attention import DeftAttention

#: Flatten's default ``few_split``: runs of chunks whose queries x group fit one 64-row tile (a fan's branches, a
#: reasoning tree's leaves) are cut as Node-Chunk cuts them, so they need no visibility mask. H100: 16 rows in
#: session 7 (few-shot 4k step 399 78.8 -> 73.6 µs); 64 in session 8, side by side with 16 (graph µs):
#: sorting128ToT 40.8 -> 37.3, docmergeToT 42.0 -> 41.0, the few-shot and Medusa snapshots within 2 %.
FEW_SPLIT = 64


class DeftFlatten(DeftAttention):
    """DeFT-Flatten: balanced chunks regardless of node boundaries, each with the union of its nodes'
    queries and a per-token visibility test; chunks with more queries than a tile holds are split.
    ``few_split`` defaults to :data:`FEW_SPLIT` here (see :class:`DeftAttention`)."""

    name = "deft_flatten"
    mode = "flatten"

    def __init__(self, *args: Any, few_split: int = FEW_SPLIT, **kwargs: Any) -> None:
        super().__init__(*args, few_split=few_split, **kwargs)

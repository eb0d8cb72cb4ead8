"""DeFT-Flatten: the tree's seen KV in DFS order, cut into near-equal chunks across node boundaries."""

from __future__ import annotations

from deft.kernels.deft_attention import DeftAttention


class DeftFlatten(DeftAttention):
    """DeFT-Flatten: balanced chunks regardless of node boundaries, each with the union of its nodes'
    queries and a per-token visibility test; chunks with more queries than a tile holds are split."""

    name = "deft_flatten"
    mode = "flatten"

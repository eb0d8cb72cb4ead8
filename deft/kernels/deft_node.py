"""DeFT-Node and DeFT-Node-Chunk: groups that follow node boundaries."""

from __future__ import annotations

from deft.kernels.deft_attention import DeftAttention


class DeftNode(DeftAttention):
    """DeFT-Node: one group per tree node (long prompts make one long, unbalanced group)."""

    name = "deft_node"
    mode = "node"


class DeftNodeChunk(DeftAttention):
    """DeFT-Node-Chunk: every node cut into chunks of at most the chunk size (load balance)."""

    name = "deft_node_chunk"
    mode = "node_chunk"

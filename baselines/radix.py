"""Radix attention (SGLang): KV shared in the token pool, attention sequence-based over each query's path.

Faithful to SGLang's Triton decode attention (``triton_ops/decode_attention.py``, page size 1, as in
v0.3-0.4 with the default ``--triton-attention-num-kv-splits 8``): stage 1 (the grouped kernel) runs
one program per (request, KV head, split) with the KV group's query heads as tile rows, each split
covering ``ceil(len / num_kv_splits)`` tokens of the request's ``kv_indices``; every split writes an
fp32 partial output and its log-sum-exp, and stage 2 merges them per (request, head) -- also when a
request has a single split. A query of the tree is a request whose kv_indices are its root-to-node
path: the shared prefix sits once in the pool but is read once per query.

Deviations, none changing the HBM traffic: splits that would be empty are not launched (SGLang launches
and returns at once), and KV groups wider than 16 heads use one wider tile instead of SGLang's 16-head
blocks (for Llama-3's group of 4 the two are the same kernel).

IO: see :func:`baselines.path_decode.split_io`; K/V = ``path_kv_tokens x`` bytes per token, and every
query pays ``num_kv_splits`` partial rows (while its path has that many tokens).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from baselines.path_decode import SplitDecodeMethod, split_items
from deft.attention import AttentionShape
from deft.tree import DecodingTree


class RadixAttention(SplitDecodeMethod):
    """SGLang-style radix attention: per-query paths through the shared pool, fixed KV splits, two stages."""

    name = "radix"

    def __init__(self, num_kv_splits: int = 8, block_n: int = 64, num_warps: int = 4, num_stages: int = 2) -> None:
        if num_kv_splits < 1:
            raise ValueError(f"radix: num_kv_splits must be >= 1, got {num_kv_splits}")
        self.num_kv_splits = num_kv_splits
        self.block_n = block_n
        self.num_warps = num_warps
        self.num_stages = num_stages

    def _cut(self, tree: DecodingTree, shape: AttentionShape | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        path_len = tree.query_path_len
        iq, lo, hi = split_items(path_len, np.full(path_len.size, self.num_kv_splits, dtype=np.int64))
        return iq, lo, hi, np.ones(tree.n_queries, dtype=bool)

    def describe(self) -> dict[str, Any]:
        return {"num_kv_splits": self.num_kv_splits, "block_n": self.block_n, "num_warps": self.num_warps}

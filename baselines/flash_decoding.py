"""Flash-Decoding: sequence-based attention with each query's path split across programs, then a merge.

Our own Triton kernels (:mod:`baselines.path_decode`), in the form of FlashAttention-2's split-KV decode:
one program per (query, split, KV head) holding the group's query heads as tile rows (FlashAttention
packs the GQA group into the row dimension the same way), and a merge kernel over the splits.

Split size. The plan picks one split length for the step so the whole grid has about ``target_ctas``
programs: ``split = max(min_split, ceil(path_kv_tokens * n_kv_heads / target_ctas))``, rounded up to
``block_n``; query ``j`` gets ``ceil(path_len_j / split)`` near-equal splits. A query left with a single
split writes its output directly and skips the merge (as FlashAttention does with ``num_splits == 1``).
The split depends on the tree and shape only, so ``io`` needs no GPU.

IO: see :func:`baselines.path_decode.split_io` -- K/V ``path_kv_tokens x`` bytes per token, partial
rows only for queries with more than one split.
"""

from __future__ import annotations

from typing import Any

from baselines.path_decode import SplitDecodeMethod, split_items
from deft.attention import AttentionShape
from deft.tree import DecodingTree


class FlashDecoding(SplitDecodeMethod):
    """Split-K decode over each query's gathered path: GPU-filling splits plus a log-sum-exp merge."""

    name = "flash_decoding"

    def __init__(
        self,
        target_ctas: int = 4224,
        min_split: int = 256,
        block_n: int = 64,
        num_warps: int = 4,
        num_stages: int = 2,
    ) -> None:
        if target_ctas < 1 or min_split < 1:
            raise ValueError(f"flash_decoding: target_ctas and min_split must be >= 1, got {target_ctas}, {min_split}")
        self.target_ctas = target_ctas
        self.min_split = min_split
        self.block_n = block_n
        self.num_warps = num_warps
        self.num_stages = num_stages

    def split_len(self, tree: DecodingTree, shape: AttentionShape) -> int:
        """Tokens per split for this step (a multiple of ``block_n``)."""
        want = -(-tree.path_kv_tokens * shape.n_kv_heads // self.target_ctas)
        split = max(self.min_split, want)
        return int(-(-split // self.block_n) * self.block_n)

    def _cut(self, tree: DecodingTree, shape: AttentionShape):
        path_len = tree.query_path_len
        n_splits = -(-path_len // self.split_len(tree, shape))
        iq, lo, hi = split_items(path_len, n_splits)
        return iq, lo, hi, n_splits > 1

    def describe(self) -> dict[str, Any]:
        return {
            "target_ctas": self.target_ctas,
            "min_split": self.min_split,
            "block_n": self.block_n,
            "num_warps": self.num_warps,
        }

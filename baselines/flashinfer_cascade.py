"""FlashInfer ``MultiLevelCascadeAttentionWrapper`` with one level per tree depth: the shared-prefix kernel a
FlashInfer user would pick instead of DeFT.

Layout. Queries are sorted into DFS order of their nodes (then by ``visible``), so the queries below any node
are contiguous. With ``D`` the deepest query node's depth there are ``D + 1`` levels:

- level ``k < D``: one segment per node at depth ``k`` holding the queries strictly below it, whose pages are
  that node's full span (page size 1: a page is a slot). Queries whose own node is at depth ``<= k`` have no
  node there: they sit in zero-length segments (indptr step 0, last-page length 0), for which the kernel
  writes a zero output with log-sum-exp ``-inf`` that the merge ignores.
- level ``D`` (the last, which the wrapper runs first): one segment per (node, visible) group with the first
  ``visible`` tokens of the queries' own node. This keeps speculative trees (partial visibility inside a
  node) exact: a node's own queries never see its full span through a shared level.

The wrapper runs every level with ``BatchPrefillWithPagedKVCacheWrapper`` (``causal=False``; FA3 on H100,
since no custom mask is used) over all query rows and merges the partial states in place. ``run`` gathers q
into DFS order and scatters the output back when the tree's query order differs (counted in ``io``).

IO model (FlashInfer's documented cascade algorithm; assumptions stated):

- ``kv``: each segment's pages are read once per query tile of that segment, per KV head; a tile packs
  ``cta_q`` rows of (query, head-in-group) pairs. ``cta_q=128`` is FA3's tile for head_dim 128 (an
  assumption; FA2's planner picks 16/64/128 by packed length). No split-KV inside a level (the SM90
  scheduler assigns whole (tile, KV head) work items).
- ``q``: every level reads every query row once (empty segments included); ``o``: the final output once.
- ``partial``: each level writes an output and an fp32 log-sum-exp for every row, and each of the
  ``levels - 1`` merges reads two states and writes one; the final write is counted in ``o``.
- ``meta``: page indices (int32) read once per (tile, KV head), plus per-level indptr arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from baselines._optional import gpu_package_problem
from baselines.flashinfer_paged import WORKSPACE_BYTES
from baselines.flashinfer_ring import WrapperRing
from deft.attention import AttentionMethod, AttentionShape, IOCounts, Plan, UnsupportedInput, check_inputs, to_device
from deft.tree import DecodingTree


@dataclass(frozen=True)
class CascadeLevel:
    """One level's paged layout (int32 CSR) plus per-segment query counts and lengths (for ``io``)."""

    qo_indptr: np.ndarray
    kv_indptr: np.ndarray
    kv_indices: np.ndarray
    last_page_len: np.ndarray

    @property
    def seg_queries(self) -> np.ndarray:
        return np.diff(self.qo_indptr)

    @property
    def seg_len(self) -> np.ndarray:
        return np.diff(self.kv_indptr)


@dataclass(frozen=True)
class CascadeLayout:
    """Query order (DFS) and the levels, root depth first, own-node level last."""

    order: np.ndarray
    levels: list[CascadeLevel]

    @property
    def is_identity(self) -> bool:
        return bool((self.order == np.arange(self.order.size)).all())


def _level(tree: DecodingTree, seg_start: np.ndarray, n_q: int, seg_slots: list[np.ndarray]) -> CascadeLevel:
    lens = np.array([s.size for s in seg_slots], dtype=np.int64)
    kv_indptr = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(lens, out=kv_indptr[1:])
    indices = np.concatenate(seg_slots) if lens.sum() else np.zeros(0, dtype=np.int64)
    return CascadeLevel(
        qo_indptr=np.append(seg_start, n_q).astype(np.int32),
        kv_indptr=kv_indptr.astype(np.int32),
        kv_indices=indices.astype(np.int32),
        last_page_len=(lens > 0).astype(np.int32),
    )


def cascade_layout(tree: DecodingTree) -> CascadeLayout:
    """Sort queries into DFS order and build one level per depth plus the own-node level."""
    tin = tree.tin
    order = np.lexsort((np.arange(tree.n_queries), tree.query_visible, tin[tree.query_node]))
    qn = tree.query_node[order]
    qv = tree.query_visible[order]
    n_q = qn.size
    depth_q = tree.depth[qn]
    max_depth = int(depth_q.max()) if n_q else 0

    # ancestor at depth k of each query (or -1 if its node is at depth <= k), deepest level first
    anc = np.full((max_depth, n_q), -1, dtype=np.int64)
    cur, cur_depth = qn.copy(), depth_q.copy()
    for k in range(max_depth - 1, -1, -1):
        up = cur_depth > k
        cur[up] = tree.parent[cur[up]]
        cur_depth[up] -= 1
        anc[k] = np.where(depth_q > k, cur, -1)

    levels = []
    for k in range(max_depth):
        a = anc[k]
        start = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
        levels.append(_level(tree, start, n_q, [tree.node_slots(int(v)) if v >= 0 else np.zeros(0, np.int64) for v in a[start]]))
    start = np.flatnonzero(np.r_[True, (qn[1:] != qn[:-1]) | (qv[1:] != qv[:-1])]) if n_q else np.zeros(0, np.int64)
    levels.append(_level(tree, start, n_q, [tree.node_slots(int(qn[s]))[: int(qv[s])] for s in start]))
    return CascadeLayout(order=order, levels=levels)


@dataclass(frozen=True)
class FlashInferCascadePlan(Plan):
    wrapper: Any  # this plan's own wrapper
    order: torch.Tensor | None  # DFS query order, None when the tree's order already is
    inverse: torch.Tensor | None
    n_levels: int
    epoch: int  # the wrapper's plan count when this plan was made (a ring reuses wrappers)


class FlashInferCascade(AttentionMethod):
    """FlashInfer ``MultiLevelCascadeAttentionWrapper``, one level per tree depth plus the queries' own nodes."""

    name = "flashinfer_cascade"

    def __init__(self, cta_q: int = 128, reuse_wrappers: bool = True) -> None:
        """``reuse_wrappers``: re-plan a ring of wrappers per level count (default) or make a new wrapper per
        plan. FlashInfer 0.5.3 crashes in the engine on some traces either way (illegal memory access; not
        isolated): reuse on sorting128ToT (4k step 1545, 16k), new wrappers on docmergeToT 4k; each policy
        runs the traces the other crashes on (``notes/baselines.md``)."""
        self.cta_q = cta_q
        self.reuse_wrappers = bool(reuse_wrappers)
        self._workspace: dict[torch.device, torch.Tensor] = {}
        self._wrappers = WrapperRing(self._new_wrapper, reuse=self.reuse_wrappers)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return gpu_package_problem("flashinfer")

    def describe(self) -> dict[str, Any]:
        return {"page_size": 1, "levels": "depth+own", "reuse_wrappers": self.reuse_wrappers}

    def _new_wrapper(self, key: tuple[torch.device, int]):
        """A wrapper for (device, level count), sharing one float workspace (runs are stream-ordered)."""
        import flashinfer

        device, n_levels = key
        if device not in self._workspace:
            self._workspace[device] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        w = flashinfer.MultiLevelCascadeAttentionWrapper(n_levels, self._workspace[device], "NHD")
        w._deft_epoch = 0
        return w

    def plan(self, tree: DecodingTree, shape: AttentionShape, device: str | torch.device = "cuda") -> FlashInferCascadePlan:
        self.check_available()
        device = torch.device(device)
        if device.type != "cuda":
            raise UnsupportedInput(f"{self.name} runs on CUDA only, got device {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        layout = cascade_layout(tree)
        n_levels = len(layout.levels)
        w = self._wrappers.acquire((device, n_levels))
        lv = layout.levels
        w.plan(
            [torch.from_numpy(x.qo_indptr) for x in lv],
            [torch.from_numpy(x.kv_indptr) for x in lv],
            [torch.from_numpy(x.kv_indices) for x in lv],
            [torch.from_numpy(x.last_page_len) for x in lv],
            shape.n_heads,
            shape.n_kv_heads,
            shape.head_dim,
            1,
            causal=False,
            sm_scale=shape.sm_scale,
            q_data_type=shape.torch_dtype,
            kv_data_type=shape.torch_dtype,
        )
        self._wrappers.planned((device, n_levels), w, device)
        w._deft_epoch += 1
        order = inverse = None
        if not layout.is_identity:
            order = to_device(layout.order, device)
            inverse = to_device(np.argsort(layout.order), device)
        return FlashInferCascadePlan(tree.n_queries, shape, str(device), w, order, inverse, n_levels, w._deft_epoch)

    def run(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: FlashInferCascadePlan) -> torch.Tensor:
        check_inputs(q, k_pool, v_pool)
        if plan.wrapper._deft_epoch != plan.epoch:
            raise RuntimeError(f"{self.name}: this plan was superseded (its wrapper was planned again); plan again")
        if plan.order is not None:
            q = q.index_select(0, plan.order)
        out = plan.wrapper.run(q, (k_pool.unsqueeze(1), v_pool.unsqueeze(1)))
        if plan.inverse is not None:
            out = out.index_select(0, plan.inverse)
        return out

    def io(self, tree: DecodingTree, shape: AttentionShape) -> IOCounts:
        layout = cascade_layout(tree)
        n_q, n_levels = tree.n_queries, len(layout.levels)
        row = shape.q_row_bytes
        state = n_q * (row + shape.n_heads * 4)  # one output plus fp32 log-sum-exp per query head
        kv = meta = 0
        for lv in layout.levels:
            tiles = -(-lv.seg_queries * shape.group_size // self.cta_q)
            tiles = np.where(lv.seg_len > 0, tiles, 0)
            kv += int((lv.seg_len * tiles).sum()) * shape.kv_token_bytes
            meta += int((lv.seg_len * tiles).sum()) * 4 * shape.n_kv_heads + 4 * (2 * lv.seg_len.size + 1) * 2
        q_bytes = n_levels * n_q * row
        o_bytes = n_q * row
        if not layout.is_identity:  # gather q into DFS order, scatter the output back
            q_bytes += 2 * n_q * row
            o_bytes += 2 * n_q * row
        return IOCounts(kv=kv, q=q_bytes, o=o_bytes, partial=(4 * n_levels - 3) * state - n_q * row, meta=meta)

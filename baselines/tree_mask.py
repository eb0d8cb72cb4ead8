"""Tree attention with a dense tree mask, unfused (Medusa / SpecInfer style; the paper's "tree attention").

The tree's seen tokens, laid out once in DFS order, form one sequence; a dense boolean mask
``[n_queries, n_tokens]`` says which query sees which token. Attention is the eager Hugging Face form
Medusa patches its mask into, one PyTorch op per step, every intermediate in HBM:

1. ``kg, vg = pool[:, kv_head][slots]``           gather the sequence's K/V, ``[KV, T, D]``
2. ``qg = q * scale`` regrouped to ``[KV, Q*G, D]`` (the GQA group's heads share each K/V row)
3. ``s = qg @ kg^T``                               logits ``[KV, Q*G, T]`` in the input dtype
4. ``s.masked_fill_(hidden, -inf)``                 the tree mask, broadcast over heads
5. ``p = softmax(s)``                              fp32 inside the kernel, stored in the input dtype
6. ``og = p @ vg``; ``out = og`` regrouped to ``[Q, H, D]``

Runs on CPU and GPU. IO model (one layer, bytes): K/V read from the pool and written gathered, then
read by each matmul once per 128-row tile of its ``Q*G`` rows (cuBLAS-style 128x128 output tiles, the
assumption here); q read and its regrouped copy written, then read once per 128-column tile of ``T``;
logits ``Q*H*T`` elements written by (3), read and written by (4), read by (5), which writes ``p``, read
by (6); the mask ``Q*T`` bytes read once (a broadcast operand small enough to stay in L2); o written by
(6), read and written by the regroup; slot indices read by both gathers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deft.attention import AttentionMethod, AttentionShape, IOCounts, Plan, UnsupportedInput, check_inputs, to_device
from deft.tree import DecodingTree

#: output tile side assumed for the cuBLAS matmuls in the IO model
GEMM_TILE = 128


def tree_sequence(tree: DecodingTree) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slot, node, position-in-node) of every token some query sees, nodes in DFS order."""
    order = tree.dfs_order
    seen = tree.node_seen_len[order]
    nodes = order[seen > 0]
    lens = seen[seen > 0]
    n_tok = int(lens.sum())
    tok_node = np.repeat(nodes, lens)
    pos = np.arange(n_tok, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    return tree.slots[tree.slot_ptr[tok_node] + pos], tok_node, pos


@dataclass(frozen=True, eq=False)
class TreeMaskPlan(Plan):
    """The sequence's slots and the dense mask of hidden (query, token) pairs, on the device."""

    slots: torch.Tensor  # [T] int32
    hidden: torch.Tensor  # [Q, T] bool, True where the query must not attend
    n_tokens: int
    max_slot: int


class TreeMaskAttention(AttentionMethod):
    """Unfused PyTorch tree attention over the DFS token sequence with a dense tree mask."""

    name = "tree_mask"

    def plan(self, tree: DecodingTree, shape: AttentionShape, device: str | torch.device = "cuda") -> TreeMaskPlan:
        slot, tok_node, pos = tree_sequence(tree)
        hidden = ~tree.visibility(tok_node, pos)
        n_tok = slot.size
        # one H2D copy: int32 slots, then the mask bytes
        nq = tree.n_queries
        mask_words = -(-(nq * n_tok) // 4)
        host = np.zeros(n_tok + mask_words, dtype=np.int32)
        host[:n_tok] = slot
        host[n_tok:].view(np.uint8)[: nq * n_tok] = hidden.reshape(-1)
        buf = to_device(host, device)
        mask = buf[n_tok:].view(torch.uint8)[: nq * n_tok].view(torch.bool).view(nq, n_tok)
        return TreeMaskPlan(
            n_queries=nq,
            shape=shape,
            device=str(device),
            slots=buf[:n_tok],
            hidden=mask,
            n_tokens=n_tok,
            max_slot=int(slot.max()) if n_tok else -1,
        )

    def run(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: TreeMaskPlan) -> torch.Tensor:
        check_inputs(q, k_pool, v_pool)
        s = plan.shape
        if q.shape[0] != plan.n_queries or (q.shape[1], k_pool.shape[1], q.shape[2]) != (
            s.n_heads,
            s.n_kv_heads,
            s.head_dim,
        ):
            raise UnsupportedInput(
                f"{self.name}: q {tuple(q.shape)} / pool {tuple(k_pool.shape)} do not match the plan "
                f"({plan.n_queries} queries, {s.n_heads}/{s.n_kv_heads} heads, head_dim {s.head_dim})"
            )
        if plan.max_slot >= k_pool.shape[0]:
            raise UnsupportedInput(f"{self.name}: the tree uses slot {plan.max_slot}, the pool has {k_pool.shape[0]}")
        if q.device != plan.slots.device:
            raise UnsupportedInput(f"{self.name}: q is on {q.device}, the plan on {plan.slots.device}")
        nq, h, d = q.shape
        kvh = k_pool.shape[1]
        g = h // kvh
        kg = k_pool.transpose(0, 1).index_select(1, plan.slots)  # [KV, T, D]
        vg = v_pool.transpose(0, 1).index_select(1, plan.slots)
        qg = torch.empty((kvh, nq, g, d), dtype=q.dtype, device=q.device)
        torch.mul(q.view(nq, kvh, g, d).transpose(0, 1), d**-0.5, out=qg)
        logits = torch.bmm(qg.view(kvh, nq * g, d), kg.transpose(1, 2))  # [KV, Q*G, T]
        logits.view(kvh, nq, g, -1).masked_fill_(plan.hidden[None, :, None, :], float("-inf"))
        p = torch.softmax(logits, dim=-1)
        og = torch.bmm(p, vg)  # [KV, Q*G, D]
        return og.view(kvh, nq, g, d).transpose(0, 1).reshape(nq, h, d)

    def io(self, tree: DecodingTree, shape: AttentionShape) -> IOCounts:
        return tree_mask_io(tree.n_queries, tree.unique_kv_tokens, shape)

    def describe(self) -> dict[str, Any]:
        return {"gemm_tile": GEMM_TILE}


def tree_mask_io(n_queries: int, n_tokens: int, shape: AttentionShape) -> IOCounts:
    """HBM bytes of the unfused form for ``n_queries`` over a ``n_tokens`` sequence (see module doc)."""
    e = shape.elem_bytes
    kv_bytes = n_tokens * shape.kv_token_bytes  # K and V, all KV heads
    q_bytes = n_queries * shape.q_row_bytes
    rows = n_queries * shape.group_size  # matmul rows per KV head
    m_tiles = -(-rows // GEMM_TILE)
    n_tiles = -(-n_tokens // GEMM_TILE)
    logit_bytes = n_queries * shape.n_heads * n_tokens * e
    return IOCounts(
        kv=2 * kv_bytes + m_tiles * kv_bytes,  # gather read + write, then K by (3) and V by (6) per row tile
        q=2 * q_bytes + n_tiles * q_bytes,
        o=3 * q_bytes,
        logits=6 * logit_bytes,
        mask=n_queries * n_tokens,
        meta=2 * 4 * n_tokens,
    )

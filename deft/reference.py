"""fp64 PyTorch tree attention: the truth every method is tested against."""

from __future__ import annotations

import numpy as np
import torch

from deft.tree import DecodingTree


def reference_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tree: DecodingTree,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Exact tree attention in float64 on ``q``'s device; returns ``[n_queries, n_heads, head_dim]`` fp64.

    Each query attends to the full spans of its node's ancestors plus the first ``visible`` tokens of
    its own node. Query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)`` (GQA).
    """
    n_q, n_heads, d = q.shape
    n_kv = k_pool.shape[1]
    group = n_heads // n_kv
    scale = d**-0.5 if sm_scale is None else sm_scale
    slot, tok_node, pos = tree.token_table()
    mask = torch.from_numpy(tree.visibility(tok_node, pos)).to(q.device)  # [Q, T]
    idx = torch.from_numpy(slot).to(q.device)
    k = k_pool.index_select(0, idx).double().repeat_interleave(group, dim=1)  # [T, H, D]
    v = v_pool.index_select(0, idx).double().repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,thd->hqt", q.double(), k) * scale
    s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqt,thd->qhd", p, v)


def naive_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tree: DecodingTree,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Per-query softmax over the query's gathered path, one query at a time (cross-check of the reference)."""
    n_q, n_heads, d = q.shape
    group = n_heads // k_pool.shape[1]
    scale = d**-0.5 if sm_scale is None else sm_scale
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for j in range(n_q):
        idx = torch.from_numpy(np.ascontiguousarray(tree.query_slots(j))).to(q.device)
        k = k_pool[idx].double()
        v = v_pool[idx].double()
        for h in range(n_heads):
            w = torch.softmax((k[:, h // group] @ q[j, h].double()) * scale, dim=0)
            out[j, h] = w @ v[:, h // group]
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN or Inf anywhere gives ``inf``."""
    o = out.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


#: relative-error tolerance per dtype (DESIGN.md)
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}

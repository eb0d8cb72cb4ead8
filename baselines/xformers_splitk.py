"""xformers' Triton split-K operator (``xformers.ops.fmha.triton_splitk.FwOp``): the published Flash-Decoding.

Only the Triton operator is used, called directly (``FwOp.apply``). xformers' CUDA extension does not load on the
GPU machine's torch and is not needed (``scripts/device_env.sh`` removes ``xformers/_C.so`` after installing the
wheel, so xformers takes its no-extension path instead of trying a mismatched binary); without it xformers'
dispatcher (``memory_efficient_attention``) refuses every CUDA operator, which is why the operator is called
directly.

Layout. The operator's paged biases need pages that are multiples of its ``BLOCK_N`` (64 tokens), so the
token-granular pool cannot be passed in place. ``run`` therefore gathers each query's path (its ancestors'
full spans, then its visible prefix) into one packed K and one packed V sequence ``[1, sum(path), G, 1, D]``
(two ``index_select`` copies) and describes it with ``BlockDiagonalGappyKeysMask`` (one key sequence per query,
one query row each). GQA goes through xformers' BMGHK layout: the G KV heads are broadcast over the group's
query heads by a stride-0 expand, which the operator folds into its M dimension. Speculative trees need
nothing else: each query's gathered sequence stops at its visible prefix.

IO model:

- ``kv`` = 3 x path bytes: the gather reads every query's path K/V from the pool and writes it packed, and the
  kernel reads it once per (query, KV head, split), each split a disjoint part.
- ``partial``: split-K as xformers plans it (``FwOp.get_split_k`` with B = queries, H = 1 after the GQA
  fold): each split writes an fp32 partial output and an fp64 log-sum-exp per query head, which the reduce
  kernel reads back.
- ``q``: read by the GQA fold copy, written, and read by the kernel; ``o`` once.
- ``meta``: the gather index (int64, read by both copies) and the key sequence starts and lengths (int32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from baselines._optional import gpu_package_problem
from baselines.path_decode import path_slots
from deft.attention import AttentionMethod, AttentionShape, IOCounts, Plan, UnsupportedInput, check_inputs, to_device
from deft.tree import DecodingTree


def xformers_split_k(n_q: int, max_path: int) -> int:
    """Splits xformers' CUDA heuristic picks for B=n_q one-row sequences after the GQA fold (H=1)."""
    bh = max(n_q, 1)
    split_k = max(max_path, 1024) // bh
    max_chunk = 64 if max_path <= 512 and bh <= 64 else 128
    stop = max_path / max_chunk
    while split_k > stop:
        split_k //= 2
    return max(min(split_k, 64), 1)


@dataclass(frozen=True)
class XformersSplitKPlan(Plan):
    gather: torch.Tensor  # [sum(path)] slot of every packed key
    bias: Any  # BlockDiagonalGappyKeysMask on the device


class XformersSplitK(AttentionMethod):
    """xformers Triton split-K decoding on per-query gathered paths (``BlockDiagonalGappyKeysMask``)."""

    name = "xformers_splitk"

    def __init__(self, split_k: int | None = None) -> None:
        self.split_k = split_k  # None: xformers' own heuristic
        self._fixed_op = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        reason = gpu_package_problem("xformers")
        if reason is None:
            from xformers.ops.fmha import triton_splitk

            if triton_splitk.FwOp.OPERATOR is None:
                return "xformers' Triton split-K operator is unavailable (xformers found no usable Triton)"
        return reason

    def describe(self) -> dict[str, Any]:
        return {"split_k": self.split_k if self.split_k is not None else "heuristic", "layout": "gathered paths"}

    def _op(self):
        from xformers.ops.fmha import triton_splitk

        if self.split_k is None:
            return triton_splitk.FwOp
        if self._fixed_op is None:
            self._fixed_op = type(f"FwOp_S{self.split_k}", (triton_splitk.FwOp,), {"SPLIT_K": self.split_k})
        return self._fixed_op

    def plan(self, tree: DecodingTree, shape: AttentionShape, device: str | torch.device = "cuda") -> XformersSplitKPlan:
        self.check_available()
        from xformers.ops.fmha.attn_bias import BlockDiagonalGappyKeysMask

        device = torch.device(device)
        if device.type != "cuda":
            raise UnsupportedInput(f"{self.name} runs on CUDA only, got device {device}")
        if device.index is None:  # xformers compares the bias's device with q's exactly
            device = torch.device("cuda", torch.cuda.current_device())
        if shape.head_dim not in (16, 32, 64, 128, 256, 512):
            raise UnsupportedInput(f"{self.name}: head_dim {shape.head_dim} not supported by xformers' split-K")
        indptr, slots = path_slots(tree)
        bias = BlockDiagonalGappyKeysMask.from_seqlens(
            q_seqlen=[1] * tree.n_queries,
            kv_seqstarts=indptr.tolist(),
            kv_seqlen=np.diff(indptr).tolist(),
            device=device,
        )
        gather = to_device(slots, device)
        return XformersSplitKPlan(tree.n_queries, shape, str(device), gather, bias)

    def run(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: XformersSplitKPlan) -> torch.Tensor:
        from xformers.ops.fmha.common import Inputs

        check_inputs(q, k_pool, v_pool)
        n_q, n_heads, d = q.shape
        g = k_pool.shape[1]
        h = n_heads // g
        k = k_pool.index_select(0, plan.gather)  # [sum(path), G, D]: the per-query path copies
        v = v_pool.index_select(0, plan.gather)
        k = k.view(1, -1, g, 1, d).expand(1, k.shape[0], g, h, d)
        v = v.view(1, -1, g, 1, d).expand(1, v.shape[0], g, h, d)
        inp = Inputs(query=q.reshape(1, n_q, g, h, d), key=k, value=v, attn_bias=plan.bias, scale=plan.shape.sm_scale)
        # the operator itself, not xformers' dispatcher: the dispatcher refuses every CUDA operator when the
        # C++ extension did not load, though this Triton one does not use it
        out, _ = self._op().apply(inp, needs_gradient=False)
        return out.reshape(n_q, n_heads, d)

    def io(self, tree: DecodingTree, shape: AttentionShape) -> IOCounts:
        n_q = tree.n_queries
        path = tree.path_kv_tokens
        row = shape.q_row_bytes
        max_path = int(tree.query_path_len.max()) if n_q else 0
        split = self.split_k if self.split_k is not None else xformers_split_k(n_q, max_path)
        partial = 2 * split * n_q * shape.n_heads * (shape.head_dim * 4 + 8) if split > 1 else 0
        return IOCounts(
            kv=3 * path * shape.kv_token_bytes,
            q=3 * n_q * row,
            o=n_q * row,
            partial=partial,
            meta=2 * path * 8 + (2 * n_q + 1) * 4,
        )

"""FlashInfer batch decode over the shared token pool with page size 1: how SGLang serves radix trees.

Every query is one request of ``BatchDecodeWithPagedKVCacheWrapper`` whose page list is its own path: the
full spans of its node's ancestors, then the first ``visible`` tokens of its node. With page size 1 a page is
a slot, so the pools ``[n_slots, n_kv_heads, head_dim]`` are passed as ``[n_slots, 1, n_kv_heads, head_dim]``
NHD pages (a view, no copy). Speculative trees (several queries per node, partial visibility) need nothing
else: each query's page list simply stops at its visible prefix. We chose these per-query rows over the
multi-query prefill wrapper with a custom mask because they are exact for every tree, need no bit mask, and
read the same K/V bytes as that wrapper does when each request has one query.

``use_tensor_cores="auto"`` follows SGLang's rule (tensor-core decode, i.e. FlashInfer's prefill kernel, when a
KV head serves 4 or more query heads in fp16/bf16), so Llama-3-8B (32/8 heads) runs the tensor-core path.

IO model (FlashInfer's documented decode algorithm, both kernels): one CTA per (request, KV head), or per
(chunk of a request, KV head) when split-KV is on, streams that request's pages once and serves all the query
heads of its KV head. So

- ``kv`` = sum over queries of their path length x K+V bytes per token (the sequence-based cost: a shared
  prefix is re-read by every query);
- ``meta`` = the page indices (int32), read once per KV head, plus indptr and last-page arrays;
- ``partial``: split-KV as FlashInfer plans it (``PartitionPagedKVCacheBinarySearchMinNumPagePerBatch``:
  the smallest chunk, at least 128 pages, such that chunks x KV heads fit ``num_sms x ctas_per_sm`` CTAs;
  no split when that leaves one chunk per request). Each chunk writes a partial output row (output dtype)
  and an fp32 log-sum-exp per query head, which the merge kernel reads back. ``num_sms=132`` (H100 SXM) and
  ``ctas_per_sm=2`` are assumptions: the real occupancy depends on the compiled kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from baselines._optional import gpu_package_problem
from baselines.flashinfer_ring import WrapperRing
from baselines.path_decode import device_path_slots, path_indptr, path_slots
from deft.attention import AttentionMethod, AttentionShape, IOCounts, Plan, UnsupportedInput, check_inputs
from deft.tree import DecodingTree

WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace


def split_kv_chunks(path_len: np.ndarray, n_kv_heads: int, max_ctas: int, min_chunk: int = 128) -> np.ndarray:
    """Chunks per request under FlashInfer's split-KV planner (all ones when it does not split)."""
    if path_len.size == 0:
        return path_len
    lo, hi = min_chunk, max(int(path_len.max()), min_chunk)
    while lo < hi:
        mid = (lo + hi) // 2
        if int(np.ceil(path_len / mid).sum()) * n_kv_heads > max_ctas:
            lo = mid + 1
        else:
            hi = mid
    chunks = np.ceil(path_len / lo).astype(np.int64)
    if chunks.sum() == path_len.size:  # one chunk each: FlashInfer runs the kernel without split-KV
        return np.ones_like(chunks)
    return chunks


def resolve_tensor_cores(setting: bool | str, shape: AttentionShape) -> bool:
    """``"auto"``: SGLang's rule, tensor cores when group size >= 4 for fp16/bf16."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise UnsupportedInput(f"use_tensor_cores must be true, false or 'auto', got {setting!r}")
    return shape.group_size >= 4 and shape.dtype in ("float16", "bfloat16")


@dataclass(frozen=True)
class FlashInferPagedPlan(Plan):
    wrapper: Any
    epoch: int
    use_tensor_cores: bool


class FlashInferPaged(AttentionMethod):
    """FlashInfer ``BatchDecodeWithPagedKVCacheWrapper``, page size 1, one request per query."""

    name = "flashinfer_paged"

    def __init__(
        self, use_tensor_cores: bool | str = "auto", num_sms: int = 132, ctas_per_sm: int = 2, device_indices: bool = True
    ) -> None:
        """``device_indices``: build the per-query page lists on the GPU (as Radix does, and as SGLang keeps its
        ``req_to_token`` table there) and hand them to FlashInfer's plan, which takes device indices as they
        are; ``False`` builds them on the host and FlashInfer copies them (the Q x path-length list is 3 MB a
        step at few-shot width 50, prompt 16k: a host-bound plan in the engine)."""
        self.device_indices = bool(device_indices)
        self.use_tensor_cores = use_tensor_cores
        self.num_sms = num_sms
        self.ctas_per_sm = ctas_per_sm
        self._workspace: dict[torch.device, torch.Tensor] = {}
        self._wrappers = WrapperRing(self._new_wrapper)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return gpu_package_problem("flashinfer")

    def describe(self) -> dict[str, Any]:
        return {"use_tensor_cores": self.use_tensor_cores, "page_size": 1, "device_indices": self.device_indices}

    def _new_wrapper(self, key: tuple[torch.device, bool]):
        """A wrapper for (device, tensor cores); they share one float workspace (runs are stream-ordered)."""
        import flashinfer

        device, tc = key
        if device not in self._workspace:
            self._workspace[device] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._workspace[device], "NHD", use_tensor_cores=tc)
        w._deft_epoch = 0
        return w

    def plan(self, tree: DecodingTree, shape: AttentionShape, device: str | torch.device = "cuda") -> FlashInferPagedPlan:
        self.check_available()
        device = torch.device(device)
        if device.type != "cuda":
            raise UnsupportedInput(f"{self.name} runs on CUDA only, got device {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        tc = resolve_tensor_cores(self.use_tensor_cores, shape)
        if self.device_indices:
            indptr = path_indptr(tree)
            indices = device_path_slots(tree, device)  # int32, built where FlashInfer reads it
        else:
            indptr, slots = path_slots(tree)
            indices = torch.from_numpy(slots.astype(np.int32))
        w = self._wrappers.acquire((device, tc))
        w.plan(
            torch.from_numpy(indptr.astype(np.int32)),
            indices,
            torch.ones(tree.n_queries, dtype=torch.int32),
            shape.n_heads,
            shape.n_kv_heads,
            shape.head_dim,
            1,
            q_data_type=shape.torch_dtype,
            kv_data_type=shape.torch_dtype,
            sm_scale=shape.sm_scale,
        )
        self._wrappers.planned((device, tc), w, device)
        w._deft_epoch += 1
        return FlashInferPagedPlan(tree.n_queries, shape, str(device), w, w._deft_epoch, tc)

    def run(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: FlashInferPagedPlan) -> torch.Tensor:
        check_inputs(q, k_pool, v_pool)
        if plan.wrapper._deft_epoch != plan.epoch:
            raise RuntimeError(f"{self.name}: this plan was superseded (its wrapper was planned again); plan again")
        return plan.wrapper.run(q, (k_pool.unsqueeze(1), v_pool.unsqueeze(1)))

    def io(self, tree: DecodingTree, shape: AttentionShape) -> IOCounts:
        path_len = tree.query_path_len
        chunks = split_kv_chunks(path_len, shape.n_kv_heads, self.num_sms * self.ctas_per_sm)
        n_q = tree.n_queries
        row = shape.q_row_bytes
        split_rows = int(chunks[chunks > 1].sum())  # partial rows written then merged
        partial = 2 * split_rows * (row + shape.n_heads * 4)
        return IOCounts(
            kv=tree.path_kv_tokens * shape.kv_token_bytes,
            q=n_q * row,
            o=n_q * row,
            partial=partial,
            meta=tree.path_kv_tokens * 4 * shape.n_kv_heads + (2 * n_q + 1) * 4,
        )

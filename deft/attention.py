"""The contract every attention method (DeFT or baseline) implements: ``plan / run / io``.

``plan`` does the host work for one tree state (index arrays, chunking, masks) and may upload small
index tensors; ``run`` is device work only and is reused by every layer of the step; ``io`` gives the
analytic bytes the method's kernels move between HBM and the chip for that plan.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from deft.tree import DecodingTree

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class UnsupportedInput(ValueError):
    """Inputs a method cannot take (head_dim, dtype, head counts); raised before any launch."""


class MethodUnavailable(RuntimeError):
    """The method cannot run on this machine (no GPU, package missing); the message says why in one line."""


@dataclass(frozen=True)
class AttentionShape:
    """Per-layer attention shape: query heads, KV heads (GQA), head dim, dtype name, layers per step."""

    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    n_layers: int = 1

    def __post_init__(self) -> None:
        if self.n_heads <= 0 or self.n_kv_heads <= 0 or self.head_dim <= 0:
            raise UnsupportedInput(f"head counts and head_dim must be positive: {self}")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedInput(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads} (GQA needs whole groups)"
            )
        if self.dtype not in DTYPES:
            raise UnsupportedInput(f"dtype {self.dtype!r} unknown; use one of {sorted(DTYPES)}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def kv_token_bytes(self) -> int:
        """Bytes of K plus V for one token of one layer."""
        return 2 * self.n_kv_heads * self.head_dim * self.elem_bytes

    @property
    def q_row_bytes(self) -> int:
        """Bytes of one query (all heads) of one layer; the output row is the same size."""
        return self.n_heads * self.head_dim * self.elem_bytes

    @property
    def sm_scale(self) -> float:
        return self.head_dim**-0.5


@dataclass(frozen=True)
class IOCounts:
    """Bytes moved between HBM and the chip, per category, for one layer of one step (unless scaled)."""

    kv: int = 0
    q: int = 0
    o: int = 0
    partial: int = 0
    mask: int = 0
    logits: int = 0
    meta: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def __add__(self, other: IOCounts) -> IOCounts:
        return IOCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def scale(self, k: int) -> IOCounts:
        """Counts for ``k`` identical layers."""
        return IOCounts(**{f.name: getattr(self, f.name) * k for f in fields(self)})

    def as_dict(self, prefix: str = "io_") -> dict[str, int]:
        d = {f"{prefix}{k}": v for k, v in asdict(self).items()}
        d[f"{prefix}total"] = self.total
        return d


def floor_io(tree: DecodingTree, shape: AttentionShape) -> IOCounts:
    """The floor for any method: unique K/V bytes of the tree, plus reading q and writing o once."""
    return IOCounts(
        kv=tree.unique_kv_tokens * shape.kv_token_bytes,
        q=tree.n_queries * shape.q_row_bytes,
        o=tree.n_queries * shape.q_row_bytes,
    )


@dataclass(frozen=True)
class Plan:
    """Base of every method's plan: what it was made for. Methods subclass it with their index tensors."""

    n_queries: int
    shape: AttentionShape
    device: str


class AttentionMethod(abc.ABC):
    """An attention algorithm over a decoding tree. Subclasses are built by Hydra from ``conf/method``."""

    #: short name used in results rows and tables
    name: str = "method"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """One line saying why this method cannot run here, or ``None`` if it can."""
        return None

    def check_available(self) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise MethodUnavailable(f"{self.name}: {reason}")

    @abc.abstractmethod
    def plan(self, tree: DecodingTree, shape: AttentionShape, device: str | torch.device = "cuda") -> Plan:
        """Host-side preparation for one tree state; serves every layer of the step."""

    @abc.abstractmethod
    def run(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Device-only attention for one layer: ``q [n_queries, n_heads, head_dim]`` -> ``out`` same shape."""

    @abc.abstractmethod
    def io(self, tree: DecodingTree, shape: AttentionShape) -> IOCounts:
        """Analytic HBM traffic of one layer for the plan this method makes for ``tree``."""

    def describe(self) -> dict[str, Any]:
        """Tunables worth recording with a result (chunk size, tile shape...)."""
        return {}

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tree: DecodingTree) -> torch.Tensor:
        """Plan and run in one go (convenience for tests and notebooks)."""
        shape = shape_of(q, k_pool)
        return self.run(q, k_pool, v_pool, self.plan(tree, shape, q.device))


def shape_of(q: torch.Tensor, k_pool: torch.Tensor) -> AttentionShape:
    """Infer the attention shape from tensors, checking they agree."""
    check_inputs(q, k_pool, k_pool)
    name = {v: k for k, v in DTYPES.items()}[q.dtype]
    return AttentionShape(n_heads=q.shape[1], n_kv_heads=k_pool.shape[1], head_dim=q.shape[2], dtype=name)


def check_inputs(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    head_dims: tuple[int, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
) -> None:
    """Raise :class:`UnsupportedInput` with a clear message if the tensors cannot go to a kernel."""
    if q.dim() != 3 or k_pool.dim() != 3 or v_pool.dim() != 3:
        raise UnsupportedInput(
            f"expected q [n_queries, n_heads, head_dim] and pools [n_slots, n_kv_heads, head_dim]; "
            f"got q {tuple(q.shape)}, k_pool {tuple(k_pool.shape)}, v_pool {tuple(v_pool.shape)}"
        )
    if k_pool.shape != v_pool.shape:
        raise UnsupportedInput(f"k_pool {tuple(k_pool.shape)} and v_pool {tuple(v_pool.shape)} differ in shape")
    if q.dtype != k_pool.dtype or q.dtype != v_pool.dtype:
        raise UnsupportedInput(f"dtype mismatch: q {q.dtype}, k_pool {k_pool.dtype}, v_pool {v_pool.dtype}")
    if q.shape[2] != k_pool.shape[2]:
        raise UnsupportedInput(f"head_dim mismatch: q has {q.shape[2]}, pool has {k_pool.shape[2]}")
    if q.shape[1] % k_pool.shape[1]:
        raise UnsupportedInput(
            f"q has {q.shape[1]} heads, not a multiple of the pool's {k_pool.shape[1]} KV heads"
        )
    if head_dims is not None and q.shape[2] not in head_dims:
        raise UnsupportedInput(f"head_dim {q.shape[2]} not supported; supported: {head_dims}")
    if dtypes is not None and q.dtype not in dtypes:
        raise UnsupportedInput(f"dtype {q.dtype} not supported; supported: {dtypes}")
    if q.device != k_pool.device or q.device != v_pool.device:
        raise UnsupportedInput(f"device mismatch: q on {q.device}, pools on {k_pool.device}/{v_pool.device}")


def to_device(host: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """A plan's host array on ``device`` without blocking the host: on CUDA it is staged in pinned memory and
    copied asynchronously (PyTorch's caching host allocator keeps the staging block until the copy has run).
    A pageable ``.to(device)`` would wait for the stream to drain, so an engine planning step ``t + 1`` while
    the GPU runs step ``t`` would stall in every baseline's plan."""
    t = torch.from_numpy(np.ascontiguousarray(host))
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)

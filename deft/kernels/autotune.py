"""Per-GPU choice of DeFT tile shapes and chunk rule over a few tree-independent candidates, cached.

Candidates are timed on two fixed synthetic trees (a long prompt with a wide fan, a short prompt with a
narrow one), so the pick does not depend on the tree being decoded; the result is cached in
``$DEFT_CACHE_DIR/autotune.json`` (default ``~/.cache/deft``) keyed by GPU, method and shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deft.attention import AttentionShape
from deft.tree import DecodingTree

CANDIDATES: list[dict[str, Any]] = [
    {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3, "ctas_per_sm": 4.0},
    {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 3, "ctas_per_sm": 4.0},
    {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3, "ctas_per_sm": 2.0},
    {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3, "ctas_per_sm": 8.0},
    {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 4, "ctas_per_sm": 4.0},
    {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3, "ctas_per_sm": 4.0},
]


def cache_path() -> Path:
    return Path(os.environ.get("DEFT_CACHE_DIR", "~/.cache/deft")).expanduser() / "autotune.json"


def fan_tree(prompt: int, width: int, branch: int) -> DecodingTree:
    """A few-shot-shaped tree: prompt, ``width`` branches of ``branch`` tokens, one query per branch tip.
    Slots as a decoding loop allocates them: the prompt first, then branch tokens interleaved by step."""
    n_tok = prompt + width * branch
    br = prompt + (np.arange(branch)[None, :] * width + np.arange(width)[:, None]).ravel()
    slots = np.concatenate([np.arange(prompt), br])
    return DecodingTree.from_arrays([-1] + [0] * width, [prompt] + [branch] * width, slots,
                                    np.arange(1, width + 1), [branch] * width, n_slots=n_tok)  # fmt: skip


def _key(cls: type, shape: AttentionShape, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device)
    return f"{name}|{cls.name}|{shape.n_heads}/{shape.n_kv_heads}/{shape.head_dim}/{shape.dtype}"


def measure(cls: type, shape: AttentionShape, device: torch.device, reps: int = 20) -> list[tuple[dict, float]]:
    """Median time (ms, summed over the synthetic trees) of every candidate, best first."""
    from deft.bench.timing import time_device

    trees = [fan_tree(8000, 32, 128), fan_tree(2000, 8, 64)]
    gen = torch.Generator(device=device).manual_seed(0)
    results = []
    for cand in CANDIDATES:
        m = cls(**cand)
        total = 0.0
        for tree in trees:
            q = torch.randn(tree.n_queries, shape.n_heads, shape.head_dim, device=device, generator=gen).to(
                shape.torch_dtype
            )
            k = torch.randn(tree.n_slots, shape.n_kv_heads, shape.head_dim, device=device, generator=gen).to(
                shape.torch_dtype
            )
            v = torch.randn_like(k)
            plan = m.plan(tree, shape, device)
            total += time_device(
                lambda m=m, q=q, k=k, v=v, plan=plan: m.run(q, k, v, plan), reps=reps, device=device
            ).median_ms
        results.append((cand, total))
    return sorted(results, key=lambda r: r[1])


def tuned_config(cls: type, shape: AttentionShape, device: torch.device) -> tuple[dict[str, Any], str]:
    """The cached best configuration for this GPU and shape, measuring and caching it if absent."""
    path = cache_path()
    key = _key(cls, shape, device)
    cache = json.loads(path.read_text()) if path.exists() else {}
    if key in cache:
        return cache[key], f"autotune cache {path}"
    best, ms = measure(cls, shape, device)[0]
    cache = json.loads(path.read_text()) if path.exists() else {}
    cache[key] = best
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    tmp.replace(path)
    return best, f"autotuned ({ms:.3f} ms on the synthetic trees)"

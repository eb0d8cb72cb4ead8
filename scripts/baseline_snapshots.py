"""GPU check of the Triton/PyTorch baselines: correctness vs a GPU fp64 reference, then cold-L2 latency.

Trees: few-shot prompt 4k and 16k, width 50, 200 tokens per branch; a 64-token speculative tree on a
4k prompt. Llama-3-8B layer (32 heads, 8 KV heads, head_dim 128), bf16, one layer, median of 50 runs.
Prints a table last; writes the rows as JSON to ``$OUT/baseline_snapshots.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from baselines.flash_decoding import FlashDecoding
from baselines.radix import RadixAttention
from baselines.tree_mask import TreeMaskAttention
from baselines.tree_mask_fused import FusedTreeMaskAttention
from deft.attention import AttentionShape, floor_io
from deft.bench.timing import time_device, time_host
from deft.reference import TOLERANCE, reference_attention, relative_error
from deft.tree import DecodingTree

SHAPE = AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128, dtype="bfloat16")
METHODS = {
    "radix": RadixAttention(),
    "flash_decoding": FlashDecoding(),
    "tree_mask": TreeMaskAttention(),
    "tree_mask_fused": FusedTreeMaskAttention(),
    "tree_mask_fused[m64]": FusedTreeMaskAttention(block_m=64),
    "flash_decoding[ctas1056]": FlashDecoding(target_ctas=1056),
}


def few_shot(prompt: int, width: int, step: int, seed: int = 0) -> DecodingTree:
    """A prompt with ``width`` branches of ``step`` tokens each, one query per branch's newest token."""
    rng = np.random.default_rng(seed)
    lens = np.array([prompt] + [step] * width)
    n = int(lens.sum())
    return DecodingTree.from_arrays(
        [-1] + [0] * width, lens, rng.permutation(n), np.arange(1, width + 1), np.full(width, step), n_slots=n
    )


def speculative(prompt: int, n_tokens: int, seed: int = 0) -> DecodingTree:
    """A prompt plus a random token tree of ``n_tokens`` single-token candidates, one query each."""
    rng = np.random.default_rng(seed)
    parent = [-1, 0] + [int(rng.integers(0, i)) + 1 for i in range(1, n_tokens)]  # candidates hang off the prompt
    lens = np.array([prompt] + [1] * n_tokens)
    n = int(lens.sum())
    return DecodingTree.from_arrays(parent, lens, rng.permutation(n), np.arange(1, n_tokens + 1), np.ones(n_tokens, dtype=np.int64), n_slots=n)


def random_tree(seed: int) -> DecodingTree:
    rng = np.random.default_rng(seed)
    n_nodes = 40
    parent = [-1] + [int(rng.integers(0, i)) for i in range(1, n_nodes)]
    lens = rng.integers(1, 300, n_nodes)
    qn = rng.integers(0, n_nodes, 60)
    n = int(lens.sum()) + 100
    vis = np.array([int(rng.integers(1, lens[j] + 1)) for j in qn])
    return DecodingTree.from_arrays(parent, lens, rng.permutation(n)[: lens.sum()], qn, vis, n_slots=n)


def inputs(tree: DecodingTree, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (SHAPE.n_heads, SHAPE.n_kv_heads, SHAPE.head_dim)
    q = torch.randn(tree.n_queries, shape[0], shape[2], generator=g, device="cuda", dtype=dtype)
    k = torch.randn(tree.n_slots, shape[1], shape[2], generator=g, device="cuda", dtype=dtype)
    v = torch.randn(tree.n_slots, shape[1], shape[2], generator=g, device="cuda", dtype=dtype)
    return q, k, v


def main() -> None:
    trees = {
        "few_shot_4k_w50": few_shot(4096, 50, 200),
        "few_shot_16k_w50": few_shot(16384, 50, 200),
        "speculative_64_4k": speculative(4096, 64),
    }
    rows = []
    # correctness: every method, both dtypes, on a random tree and the benchmark trees
    checks = {"random": random_tree(1), **trees}
    for dtype in (torch.float16, torch.bfloat16):
        for tname, tree in checks.items():
            q, k, v = inputs(tree, dtype, seed=2)
            ref = reference_attention(q, k, v, tree)
            for mname, m in METHODS.items():
                err = relative_error(m(q, k, v, tree), ref)
                ok = err < TOLERANCE[dtype]
                print(f"check {mname:24s} {tname:18s} {str(dtype)[6:]:9s} err={err:.2e} {'ok' if ok else 'FAIL'}")
                rows.append({"kind": "check", "method": mname, "tree": tname, "dtype": str(dtype), "err": err, "ok": ok})
            del ref
    torch.cuda.empty_cache()
    # latency
    table = []
    for tname, tree in trees.items():
        q, k, v = inputs(tree, torch.bfloat16)
        floor = floor_io(tree, SHAPE).total
        for mname, m in METHODS.items():
            plan = m.plan(tree, SHAPE, "cuda")
            t = time_device(lambda m=m, plan=plan, q=q, k=k, v=v: m.run(q, k, v, plan), reps=50)
            tp = time_host(lambda m=m, tree=tree: m.plan(tree, SHAPE, "cuda"), reps=5, sync=torch.cuda.synchronize)
            io = m.io(tree, SHAPE)
            row = {"kind": "time", "method": mname, "tree": tname, **t.as_dict("run_"), "plan_ms": tp.median_ms,
                   **io.as_dict(), "floor_bytes": floor, "gbps": io.total / (t.median_ms * 1e-3) / 1e9}  # fmt: skip
            rows.append(row)
            table.append(row)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "baseline_snapshots.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  bf16 32/8/128, median of 50, cold L2")
    print(f"{'tree':18s} {'method':24s} {'run_ms':>8s} {'p10':>7s} {'p90':>7s} {'plan_ms':>8s} {'io_MB':>8s} {'floor_MB':>8s} {'GB/s':>7s}")
    for r in table:
        print(f"{r['tree']:18s} {r['method']:24s} {r['run_median_ms']:8.4f} {r['run_p10_ms']:7.4f} {r['run_p90_ms']:7.4f} "
              f"{r['plan_ms']:8.2f} {r['io_total'] / 1e6:8.1f} {r['floor_bytes'] / 1e6:8.1f} {r['gbps']:7.0f}")  # fmt: skip
    bad = [r for r in rows if r["kind"] == "check" and not r["ok"]]
    print(f"checks: {sum(r['kind'] == 'check' for r in rows) - len(bad)} ok, {len(bad)} failed")


if __name__ == "__main__":
    main()

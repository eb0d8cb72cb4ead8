"""GPU check of the library baselines: correctness against the fp64 reference and cold-L2 latency of one
Llama-3-8B layer (32 query heads, 8 KV heads, head_dim 128, bf16) on the few-shot snapshot (4k prompt,
width 50, 200 tokens per branch) and a 64-candidate speculative tree on a 4k prompt.

Run on the GPU machine after ``source scripts/device_env.sh``: ``python scripts/gpu_baseline_check.py``.
FlashInfer's JIT modules (both dtypes) are compiled first, in parallel processes, so that the test suite run
after it finds them built; set ``DEFT_CHECK_CSV`` to also write the rows as CSV.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.flashinfer_cascade import FlashInferCascade  # noqa: E402
from baselines.flashinfer_paged import FlashInferPaged  # noqa: E402
from baselines.flex_attention import FlexAttention  # noqa: E402
from baselines.xformers_splitk import XformersSplitK  # noqa: E402
from deft.attention import AttentionShape, floor_io  # noqa: E402
from deft.bench.timing import time_device, time_host  # noqa: E402
from deft.reference import TOLERANCE, reference_attention, relative_error  # noqa: E402
from deft.tree import DecodingTree  # noqa: E402

SHAPE = AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128, dtype="bfloat16")


def few_shot_tree(prompt: int = 4096, width: int = 50, step: int = 200) -> DecodingTree:
    """Few-shot snapshot: one prompt, ``width`` branches of ``step`` tokens, one query per branch tip."""
    parent = np.r_[-1, np.zeros(width, dtype=np.int64)]
    node_len = np.r_[prompt, np.full(width, step)]
    n = int(node_len.sum())
    leaves = np.arange(1, width + 1)
    return DecodingTree.from_arrays(parent, node_len, np.arange(n), leaves, np.full(width, step), n_slots=n)


def speculative_tree(prompt: int = 4096, n_cand: int = 64, seed: int = 0) -> DecodingTree:
    """Medusa-style token tree: ``n_cand`` single-token candidates under a prompt, one query each."""
    rng = np.random.default_rng(seed)
    parent = np.r_[-1, [int(rng.integers(0, max(1, i // 2 + 1))) if i > 1 else 0 for i in range(1, n_cand + 1)]]
    node_len = np.r_[prompt, np.ones(n_cand, dtype=np.int64)]
    n = int(node_len.sum())
    cand = np.arange(1, n_cand + 1)
    return DecodingTree.from_arrays(parent, node_len, np.arange(n), cand, np.ones(n_cand, dtype=np.int64), n_slots=n)


def methods() -> dict[str, object]:
    return {
        "flashinfer_paged": FlashInferPaged(),
        "flashinfer_paged[no_tc]": FlashInferPaged(use_tensor_cores=False),
        "flashinfer_cascade": FlashInferCascade(),
        "xformers_splitk": XformersSplitK(),
        "flex_attention": FlexAttention(),
        "flex_attention[decode]": FlexAttention(force_flex_attention=False),
    }


def _warm_one(label: str, dtype: str) -> str:
    """Build one FlashInfer JIT module by planning and running a small tree (runs in a child process)."""
    t0 = time.perf_counter()
    m = methods()[label]
    shape = AttentionShape(SHAPE.n_heads, SHAPE.n_kv_heads, SHAPE.head_dim, dtype)
    tree = speculative_tree(prompt=300, n_cand=8)
    q = torch.randn(tree.n_queries, shape.n_heads, shape.head_dim, device="cuda", dtype=shape.torch_dtype)
    k = torch.randn(tree.n_slots, shape.n_kv_heads, shape.head_dim, device="cuda", dtype=shape.torch_dtype)
    m.run(q, k, k, m.plan(tree, shape, "cuda"))
    torch.cuda.synchronize()
    return f"{label} {dtype}: {time.perf_counter() - t0:.0f} s"


def warm_flashinfer_jit() -> None:
    """Compile every FlashInfer module the check and the tests use, in parallel processes."""
    if FlashInferPaged.unavailable_reason() is not None:
        print(f"flashinfer: {FlashInferPaged.unavailable_reason()}")
        return
    jobs = [(m, d) for m in ("flashinfer_paged", "flashinfer_cascade") for d in ("bfloat16", "float16")]
    jobs.append(("flashinfer_paged[no_tc]", "bfloat16"))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(len(jobs), mp_context=get_context("spawn")) as ex:
        futures = [ex.submit(_warm_one, *j) for j in jobs]
        for f, j in zip(futures, jobs, strict=True):
            try:
                print("jit:", f.result(), flush=True)
            except Exception as e:  # report and go on: the check below shows the method failing
                print(f"jit: {j} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
    print(f"jit: all modules in {time.perf_counter() - t0:.0f} s", flush=True)


def check(label: str, method, tree_name: str, tree: DecodingTree) -> dict:
    row = {"method": label, "tree": tree_name}
    reason = method.unavailable_reason()
    if reason is not None:
        return {**row, "status": f"unavailable: {reason}"}
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = SHAPE.torch_dtype
    q = torch.randn(tree.n_queries, SHAPE.n_heads, SHAPE.head_dim, device="cuda", dtype=dt, generator=g)
    k = torch.randn(tree.n_slots, SHAPE.n_kv_heads, SHAPE.head_dim, device="cuda", dtype=dt, generator=g)
    v = torch.randn(tree.n_slots, SHAPE.n_kv_heads, SHAPE.head_dim, device="cuda", dtype=dt, generator=g)
    try:
        plan = method.plan(tree, SHAPE, "cuda")
        out = method.run(q, k, v, plan)
        torch.cuda.synchronize()
        err = relative_error(out, reference_attention(q, k, v, tree))
        stats = time_device(lambda: method.run(q, k, v, plan), reps=50, warmup=5)
        plan_stats = time_host(lambda: method.plan(tree, SHAPE, "cuda"), reps=5, warmup=1, sync=torch.cuda.synchronize)
        plan = method.plan(tree, SHAPE, "cuda")  # the timed plans superseded the first
    except Exception as e:
        return {**row, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
    io = method.io(tree, SHAPE)
    return {
        **row,
        "status": "ok" if err < TOLERANCE[dt] else "WRONG",
        "rel_err": err,
        "median_ms": stats.median_ms,
        "p10_ms": stats.p10_ms,
        "p90_ms": stats.p90_ms,
        "plan_ms": plan_stats.median_ms,
        "io_mb": io.total / 1e6,
        "floor_mb": floor_io(tree, SHAPE).total / 1e6,
        "gb_s": io.total / (stats.median_ms * 1e-3) / 1e9,
    }


def main() -> None:
    if not torch.cuda.is_available():
        print("gpu_baseline_check: needs a CUDA GPU (torch sees none)")
        return
    warm_flashinfer_jit()
    trees = {"few_shot_4k_w50": few_shot_tree(), "spec64_4k": speculative_tree()}
    rows = []
    for tree_name, tree in trees.items():
        for label, m in methods().items():
            r = check(label, m, tree_name, tree)
            print(r, flush=True)
            rows.append(r)
    if os.environ.get("DEFT_CHECK_CSV"):
        import pandas as pd

        pd.DataFrame(rows).to_csv(os.environ["DEFT_CHECK_CSV"], index=False)
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__}; {SHAPE}; median of 50 cold-L2 runs")
    print(f"{'tree':17} {'method':24} {'status':7} {'rel_err':>8} {'median_ms':>9} {'p10':>7} {'p90':>7} {'plan_ms':>8} {'io_MB':>8} {'GB/s':>6}")
    for r in rows:
        if "median_ms" not in r:
            print(f"{r['tree']:17} {r['method']:24} {r['status']}")
            continue
        print(
            f"{r['tree']:17} {r['method']:24} {r['status']:7} {r['rel_err']:8.1e} {r['median_ms']:9.4f} {r['p10_ms']:7.4f} "
            f"{r['p90_ms']:7.4f} {r['plan_ms']:8.2f} {r['io_mb']:8.1f} {r['gb_s']:6.0f}"
        )


if __name__ == "__main__":
    main()

"""``bench=attention``: replay a trace without a model and time one layer of attention per sampled step.

Per sampled step: plan time (host, synchronised), run latency of one layer (CUDA events, cold L2, median
of at least 50 repetitions; measured again, up to twice, when the median is over 1.3x the fastest repetition,
keeping the lowest median: ``deft.bench.timing.steadiest``, ``latency_passes``) over K/V pools of random normal data sized to the trees' pool (``n_slots``; else
the largest slot the sampled steps use: methods may read past a tree's last slot, e.g. FlexAttention's
padded key length), the method's analytic IO, achieved bandwidth (unique K/V bytes / time) and its fraction of
the measured copy bandwidth, and on selected steps the relative error against the fp64 reference.
The aggregate row integrates over steps (each sample weighted by the steps it stands for) and layers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from deft.attention import AttentionMethod, AttentionShape, floor_io
from deft.bench.steps import step_weights
from deft.bench.timing import copy_bandwidth, steadiest, time_device, time_host
from deft.reference import TOLERANCE, reference_attention, relative_error
from deft.tree import DecodingTree

MIN_REPS = 50


@functools.cache
def copy_bw(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), measured once per process."""
    return copy_bandwidth(device)


def checked_steps(check: str | Sequence[int] | None, steps: Sequence[int]) -> set[int]:
    """Steps to compare with the reference: ``first`` (default), ``all``, ``none``, or a list of steps."""
    if check is None or check == "none":
        return set()
    if check == "first":
        return {steps[0]} if steps else set()
    if check == "all":
        return set(steps)
    return {int(s) for s in check} & set(steps)


class OutOfMemory(RuntimeError):
    """The method ran out of GPU memory on a step; the run is skipped, never half-written."""


def attention_rows(
    method: AttentionMethod,
    trees: Sequence[tuple[int, DecodingTree]],
    shape: AttentionShape,
    n_steps: int,
    device: str = "cuda",
    reps: int = MIN_REPS,
    warmup: int = 5,
    plan_reps: int = 10,
    check: str | Sequence[int] | None = "first",
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """One row per sampled step plus one aggregate row (see the module docstring)."""
    reps = max(MIN_REPS, int(reps))
    dev = torch.device(device)
    dtype = shape.torch_dtype
    steps = [s for s, _ in trees]
    w = step_weights(steps, n_steps)
    to_check = checked_steps(check, steps)
    n_slots = max(t.n_slots or int(t.slots.max()) + 1 for _, t in trees)
    gen = torch.Generator(device=dev).manual_seed(seed)
    k_pool = torch.randn(n_slots, shape.n_kv_heads, shape.head_dim, generator=gen, device=dev, dtype=dtype)
    v_pool = torch.randn(n_slots, shape.n_kv_heads, shape.head_dim, generator=gen, device=dev, dtype=dtype)
    bw_copy = copy_bw(str(dev))
    sync = functools.partial(torch.cuda.synchronize, dev)
    rows: list[dict] = []
    it = tqdm(trees, desc=f"attention {method.name}", unit="step", disable=not progress, leave=False)
    try:
        for (step, tree), weight in zip(it, w, strict=True):
            q = torch.randn(tree.n_queries, shape.n_heads, shape.head_dim, generator=gen, device=dev, dtype=dtype)
            plan_t = time_host(lambda tree=tree: method.plan(tree, shape, dev), reps=plan_reps, warmup=1, sync=sync)
            plan = method.plan(tree, shape, dev)
            run = functools.partial(method.run, q, k_pool, v_pool, plan)
            run_t = steadiest(lambda run=run: time_device(run, reps=reps, warmup=warmup, device=dev))
            io = method.io(tree, shape)
            fl = floor_io(tree, shape)
            sec = run_t.median_ms * 1e-3
            row = {
                "kind": "step", "step": step, "weight": float(weight),
                "n_nodes": tree.n_nodes, "n_queries": tree.n_queries,
                "unique_kv_tokens": tree.unique_kv_tokens, "path_kv_tokens": tree.path_kv_tokens,
                "latency_ms": run_t.median_ms, "latency_p10_ms": run_t.p10_ms, "latency_p90_ms": run_t.p90_ms,
                "latency_reps": run_t.reps, "latency_passes": run_t.passes,
                "plan_ms": plan_t.median_ms, "plan_p10_ms": plan_t.p10_ms, "plan_p90_ms": plan_t.p90_ms,
                "kv_floor_bytes": fl.kv,
                "achieved_bw_gbps": fl.kv / sec / 1e9, "io_bw_gbps": io.total / sec / 1e9,
                "copy_bw_gbps": bw_copy / 1e9, "bw_fraction": fl.kv / sec / bw_copy,
                **io.as_dict(), **fl.as_dict(prefix="floor_"),
                "tolerance": TOLERANCE[dtype],
            }  # fmt: skip
            digest = getattr(method, "launch_digest", None)  # DeFT: equal digests, identical launches
            if digest is not None:
                row["launch_digest"] = digest(plan)
            flops = getattr(method, "tensor_flops", None)  # DeFT: tensor work, rows padded to the tile, and the need
            if flops is not None:
                executed, useful = flops(tree, shape)
                row.update(mma_gflop=executed / 1e9, useful_gflop=useful / 1e9, mma_tflops=executed / sec / 1e12)
            if step in to_check:
                out = method.run(q, k_pool, v_pool, plan)
                ref = reference_attention(q, k_pool, v_pool, tree)
                err = relative_error(out, ref)
                row.update(rel_error=err, error_ok=bool(err <= TOLERANCE[dtype]))
                del out, ref
            rows.append(row)
            del plan, q
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        raise OutOfMemory(f"out of GPU memory at step {step} ({tree!r}): {str(e).splitlines()[0]}") from None
    return [*rows, aggregate(rows, shape, n_steps, bw_copy)]


def aggregate(rows: Sequence[dict], shape: AttentionShape, n_steps: int, bw_copy: float) -> dict:
    """Integrate step rows over the trace (weights) and the model's layers."""
    w = np.array([r["weight"] for r in rows])
    L = shape.n_layers

    def wsum(key: str, layers: int = 1) -> float:
        return float((w * np.array([r[key] for r in rows], dtype=np.float64)).sum() * layers)

    attn_ms = wsum("latency_ms", L)
    kv_bytes = wsum("kv_floor_bytes", L)
    io_keys = [k for k in rows[0] if k.startswith("io_") or k.startswith("floor_")]
    errs = [r["rel_error"] for r in rows if "rel_error" in r]
    agg = {
        "kind": "aggregate", "step": None, "weight": float(w.sum()), "n_steps": n_steps, "n_sampled": len(rows),
        "n_nodes": wsum("n_nodes"), "n_queries": wsum("n_queries"),
        "unique_kv_tokens": wsum("unique_kv_tokens"), "path_kv_tokens": wsum("path_kv_tokens"),
        "total_attn_ms": attn_ms, "total_plan_ms": wsum("plan_ms"),
        "kv_floor_bytes": kv_bytes,
        "achieved_bw_gbps": kv_bytes / (attn_ms * 1e-3) / 1e9 if attn_ms > 0 else None,
        "copy_bw_gbps": bw_copy / 1e9,
        "bw_fraction": kv_bytes / (attn_ms * 1e-3) / bw_copy if attn_ms > 0 else None,
        **{k: wsum(k, L) for k in io_keys},
        "tolerance": rows[0]["tolerance"],
    }  # fmt: skip
    if attn_ms > 0:
        agg["io_bw_gbps"] = agg["io_total"] / (attn_ms * 1e-3) / 1e9
    if errs:
        agg["rel_error"] = max(errs)
        agg["error_ok"] = bool(agg["rel_error"] <= agg["tolerance"])
    return agg

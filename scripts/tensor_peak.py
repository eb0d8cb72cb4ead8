"""The GPU's measured dense bf16 tensor throughput: the compute side of the roofline the kernel table's
bandwidth floor leaves out.

A shared prompt seen by many queries is not a bandwidth problem alone: at few-shot 16k step 200 the prompt's
50 queries x 4 query heads are 200 rows per KV head, so each prompt K/V token costs 200 x 128 x 4 flops of
QK^T and PV per KV head. This probe times ``torch.matmul`` (cuBLAS) on square bf16 GEMMs (the same inputs each
run: a GEMM this size is compute-bound), CUDA events, median of ``DEFT_TP_REPS``
(default 50) after a warm-up, and writes ``$OUT/tensor_peak_<date>.csv`` (one row per size, with
:func:`scripts.kernel_snapshots.provenance`). :func:`tensor_floor_us` turns a tree's tile rows into the
time its tensor work needs at that throughput. Run on the GPU machine: ``python -m scripts.tensor_peak``.
"""

from __future__ import annotations

import os

import torch

from scripts.kernel_snapshots import save_probe_rows

SIZES = (4096, 8192, 16384)


def gemm_tflops(n: int, reps: int, dev: torch.device) -> float:
    """Median TFLOP/s of an ``n x n x n`` bf16 GEMM over ``reps`` timed runs."""
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(5):
        torch.matmul(a, b, out=c)
    times = []
    for _ in range(reps):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        torch.matmul(a, b, out=c)
        ev[1].record()
        ev[1].synchronize()
        times.append(ev[0].elapsed_time(ev[1]) * 1e-3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def tensor_floor_us(row_tokens: float, head_dim: int, tflops: float) -> float:
    """µs the QK^T and PV GEMMs of ``row_tokens`` (tile rows x tokens, summed over tiles and KV heads) need at
    ``tflops``: 4 x head_dim flops per row-token."""
    return row_tokens * 4 * head_dim / (tflops * 1e12) * 1e6


def main() -> None:
    dev = torch.device("cuda")
    reps = int(os.environ.get("DEFT_TP_REPS", "50"))
    rows = [{"n": n, "tflops": gemm_tflops(n, reps, dev), "reps": reps} for n in SIZES]
    df = save_probe_rows(rows, "tensor_peak", dev)
    print(df[["n", "tflops", "gpu"]].to_string(index=False))


if __name__ == "__main__":
    main()

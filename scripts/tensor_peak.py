"""The GPU's measured dense bf16 tensor throughput: the compute side of the roofline the kernel table's
bandwidth floor leaves out.

A shared prompt seen by many queries is not a bandwidth problem alone: at few-shot 16k step 200 the prompt's
50 queries x 4 query heads are 200 rows per KV head, so each prompt K/V token costs 200 x 128 x 4 flops of
QK^T and PV per KV head. This probe times ``torch.matmul`` (cuBLAS) on square bf16 GEMMs and torch's fused
attention on the few-shot prompts alone (:func:`sdpa_prompt_us`), with the benchmarks' timing (CUDA events, warm-up,
cold L2, median of ``DEFT_TP_REPS``, default 50), and writes ``$OUT/tensor_peak_<date>.csv`` (one row per case, with
:func:`scripts.kernel_snapshots.provenance`); ``DeftAttention.tensor_flops`` over these rates is a step's tensor time.
Run on the GPU machine: ``python -m scripts.tensor_peak``.
"""

from __future__ import annotations

import os

import torch

from deft.bench.timing import time_device
from scripts.kernel_snapshots import save_probe_rows

SIZES = (4096, 8192, 16384)


def gemm_tflops(n: int, reps: int, dev: torch.device) -> float:
    """TFLOP/s of an ``n x n x n`` bf16 GEMM at its median time (:func:`deft.bench.timing.time_device`)."""
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    t = time_device(lambda: torch.matmul(a, b, out=c), reps=reps, device=dev)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def sdpa_prompt_us(n_tok: int, n_q: int, reps: int, dev: torch.device) -> tuple[float, str]:
    """Median µs (cold L2, :func:`deft.bench.timing.time_device`) of torch's fused attention
    (``scaled_dot_product_attention`` with GQA, the first backend of flash / memory-efficient / math that takes the
    call) for ``n_q`` queries x 32 heads over one ``n_tok``-token prompt of 8 KV heads, head_dim 128, bf16: a shared
    prompt's part of a few-shot step as one dense library call, a reference for the same tensor work, not a ceiling
    (a prefill kernel handed 50 queries; H100, session 15: 78.2 µs at 16k, longer than DeFT-Flatten's whole step).
    Returns the time and the backend that ran."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 32, n_q, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 8, n_tok, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend):
            try:
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            except RuntimeError:
                continue
            t = time_device(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), reps=reps, device=dev)
        return t.median_ms * 1e3, backend.name
    return float("nan"), "none"


def main() -> None:
    dev = torch.device("cuda")
    reps = int(os.environ.get("DEFT_TP_REPS", "50"))
    rows = [{"case": "gemm", "n": n, "tflops": gemm_tflops(n, reps, dev), "reps": reps} for n in SIZES]
    for n_tok in (4000, 16000):  # the few-shot snapshots' prompts, their 50 queries
        us, backend = sdpa_prompt_us(n_tok, 50, reps, dev)
        flops = 50 * 32 * n_tok * 4 * 128  # useful: no padding counted
        rows.append({"case": f"sdpa_{backend.lower()}", "n": n_tok, "us": us, "tflops": flops / (us * 1e-6) / 1e12, "reps": reps})
    df = save_probe_rows(rows, "tensor_peak", dev)
    print(df[["case", "n", "tflops", "gpu"]].assign(us=df.get("us")).to_string(index=False))


if __name__ == "__main__":
    main()

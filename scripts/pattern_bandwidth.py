"""What HBM gives a read-only kernel for the access patterns of a DeFT step, against the copy bandwidth the floor uses.

A tree step reads its K/V from a pool laid out ``[slot, kv_head, head_dim]``: the shared prompt's tokens in
consecutive slots, read per KV head by the prompt kernel (256-byte segments at a 2 KB stride for Llama-3-8B's 8 heads
of 128 bf16), and the branches' tokens in scattered slots (decoding interleaves the branches one token per step),
read per KV head by the fused kernel (256 bytes per token) or per token row by the branches' kernel (2 KB). Each
pattern here is one launch of :func:`_read_kernel` over a ``[2 x tokens, 8, 128]`` bf16 tensor (K and V of the step's
tokens), summing what it reads into a few floats, with enough programs and pipeline depth to keep HBM busy:

- ``rows_seq``: whole 2 KB rows in slot order (a plain stream);
- ``heads_seq``: one KV head's 256-byte segments in slot order, a program per (range, head);
- ``rows_rand`` / ``heads_rand``: the same over a random permutation of the slots;
- ``step_heads`` / ``step_rows``: one launch reading the step's mix, the prompt's share of the tokens in slot order and
  the branches' in random order, by their shares of the programs, all per head (or all as whole rows).

References: ``torch_sum`` (torch's reduction over the same tensor), and ``rows_seq_x8`` / ``torch_sum_x8`` over eight
times the bytes (a long read's rate, without the launch's ramp and tail). Prints bytes read / time for each (cold L2,
median of ``DEFT_PB_REPS`` = 30), after each flush of ``DEFT_PB_FLUSHES`` (``write,read``:
:data:`deft.bench.timing.L2_FLUSHES`), beside the measured copy bandwidth
(read + written bytes / time, the floor's), and writes the rows to ``$OUT/pattern_bandwidth_<date>.csv``. GPU only:
``python -m scripts.pattern_bandwidth`` (``DEFT_PB_PROMPT`` = 16000, ``DEFT_PB_BRANCH`` = 10000 tokens: few-shot
16k, width 50, step 200).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pandas as pd
import torch
import triton
import triton.language as tl

from deft.bench.timing import copy_bandwidth, set_l2_flush, time_device
from scripts.kernel_snapshots import provenance


@triton.jit
def _read_kernel(x_ptr, slots, out, n_seq, n_tok, per_prog_seq, per_prog_rand, n_prog_seq, stride_s,
                 ROW: tl.constexpr, BLOCK_T: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """Programs ``[0, n_prog_seq)`` read tokens ``[0, n_seq)`` of ``slots`` (``per_prog_seq`` each), the others tokens
    ``[n_seq, n_tok)`` (``per_prog_rand`` each); a token is ``ROW`` elements at ``slot x stride_s + head x ROW``, head
    ``program_id(1)``. Sums everything read into ``out``."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    if pid < n_prog_seq:
        lo = pid * per_prog_seq
        hi = tl.minimum(lo + per_prog_seq, n_seq)
    else:
        lo = n_seq + (pid - n_prog_seq) * per_prog_rand
        hi = tl.minimum(lo + per_prog_rand, n_tok)
    offs = tl.arange(0, ROW)
    acc = tl.zeros([BLOCK_T, ROW], dtype=tl.float32)
    for t0 in tl.range(lo, hi, BLOCK_T, num_stages=STAGES):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < hi
        s = tl.load(slots + t, mask=ok, other=0).to(tl.int64)
        acc += tl.load(x_ptr + s[:, None] * stride_s + head * ROW + offs[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    tl.atomic_add(out + (pid % 64), tl.sum(tl.sum(acc, 1), 0))


def launch(x: torch.Tensor, slots: torch.Tensor, out: torch.Tensor, n_seq: int, row: int, n_sms: int) -> None:
    """One read of ``slots``' tokens: the first ``n_seq`` by a share of the programs proportional to their count."""
    n_tok = slots.numel()
    heads = x.shape[1] * x.shape[2] // row
    progs = 8 * n_sms // heads  # programs per head: eight per SM in all
    n_prog_seq = round(progs * n_seq / n_tok) if 0 < n_seq < n_tok else (progs if n_seq else 0)
    n_prog_rand = progs - n_prog_seq
    per_seq = -(-n_seq // max(n_prog_seq, 1))
    per_rand = -(-(n_tok - n_seq) // max(n_prog_rand, 1))
    block = 16 if row == 1024 else 64
    _read_kernel[(progs, heads)](x, slots, out, n_seq, n_tok, per_seq, per_rand, n_prog_seq, x.stride(0), ROW=row,
                                 BLOCK_T=block, STAGES=4, num_warps=4)  # fmt: skip


def row_of(prov: dict, name: str, nbytes: int, ms: float, copy: float, prompt: int, branch: int) -> dict:
    """One result row: bytes read / time, and its fraction of the copy bandwidth."""
    tbs = nbytes / (ms * 1e-3) / 1e12
    return {**prov, "pattern": name, "bytes": nbytes, "us": ms * 1e3, "read_tb_s": tbs, "copy_tb_s": copy / 1e12,
            "fraction_of_copy": tbs / (copy / 1e12), "prompt": prompt, "branch": branch}  # fmt: skip


def main() -> None:
    dev = torch.device("cuda")
    prompt = int(os.environ.get("DEFT_PB_PROMPT", "16000"))
    branch = int(os.environ.get("DEFT_PB_BRANCH", "10000"))
    reps = int(os.environ.get("DEFT_PB_REPS", "30"))
    n = 2 * (prompt + branch)  # K and V
    x = torch.randn(n, 8, 128, device=dev).to(torch.bfloat16)
    out = torch.zeros(64, device=dev)
    seq = torch.arange(n, dtype=torch.int32, device=dev)
    rand = torch.randperm(n, device=dev).to(torch.int32)
    n_prompt = 2 * prompt
    mix = torch.cat([seq[:n_prompt], n_prompt + torch.randperm(n - n_prompt, device=dev).to(torch.int32)])
    n_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    patterns = {  # (slots, tokens read by the first programs, elements per token read)
        "rows_seq": (seq, n, 1024), "heads_seq": (seq, n, 128), "rows_rand": (rand, n, 1024), "heads_rand": (rand, n, 128),
        "step_heads": (mix, n_prompt, 128), "step_rows": (mix, n_prompt, 1024),
    }  # fmt: skip
    copy = copy_bandwidth(dev)
    prov = provenance(dev)
    rows = []
    big = torch.empty(8 * n, 8, 128, dtype=torch.bfloat16, device=dev).normal_()
    big_seq = torch.arange(8 * n, dtype=torch.int32, device=dev)
    nbytes, big_bytes = x.numel() * x.element_size(), big.numel() * big.element_size()
    for mode in os.environ.get("DEFT_PB_FLUSHES", "write,read").split(","):
        set_l2_flush(mode)
        p = {**prov, "l2_flush": mode}
        for name, (slots, n_first, row) in patterns.items():
            stats = time_device(lambda s=slots, f=n_first, r=row: launch(x, s, out, f, r, n_sms), reps=reps, device=dev)
            rows.append(row_of(p, name, nbytes, stats.median_ms, copy, prompt, branch))
        # references: torch's own reduction over the same bytes, and a plain stream of 8x the bytes (a long read's rate)
        stats = time_device(lambda: x.sum(dtype=torch.float32), reps=reps, device=dev)
        rows.append(row_of(p, "torch_sum", nbytes, stats.median_ms, copy, prompt, branch))
        stats = time_device(lambda: launch(big, big_seq, out, 8 * n, 1024, n_sms), reps=reps, device=dev)
        rows.append(row_of(p, "rows_seq_x8", big_bytes, stats.median_ms, copy, prompt, branch))
        stats = time_device(lambda: big.sum(dtype=torch.float32), reps=reps, device=dev)
        rows.append(row_of(p, "torch_sum_x8", big_bytes, stats.median_ms, copy, prompt, branch))
    df = pd.DataFrame(rows)
    out_dir = Path(os.environ.get("OUT", "results/h100/probe"))
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / f"pattern_bandwidth_{datetime.date.today().isoformat()}.csv", index=False)
    print(df[["l2_flush", "pattern", "us", "read_tb_s", "copy_tb_s", "fraction_of_copy"]].round(3).to_string(index=False))


if __name__ == "__main__":
    main()

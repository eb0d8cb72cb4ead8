"""Validate the analytic IO model on hardware: Nsight Compute DRAM bytes of one ``run()`` vs ``io()``.

For each (method, case, step) in ``conf/ncu.yaml`` the driver launches this script again as a child under
``ncu --clock-control none --profile-from-start off --metrics dram__bytes_read.sum,dram__bytes_write.sum,
gpu__time_duration.sum``. The child replays the case's trace to the step, fills K/V pools with random data,
plans, runs once outside the profiled range (JIT, autotune), then runs once between
``cudaProfilerStart/Stop``. ncu flushes the caches before every kernel (its default cache control), the
same cold-L2 condition the IO model assumes. The driver sums bytes over the profiled kernels and writes
one row per pair to ``results/<gpu>/ncu/ncu_validation.csv``.

``l2_read`` (``lts__t_sectors_srcunit_tex_op_read`` x 32 B) is what the SMs read from L2: the loads the
kernels issue, which is what ``io()`` counts tile by tile; ``ncu_dram_read`` is what actually came from HBM,
lower wherever concurrent programs re-read data still in L2 (measured: for Radix the 50 queries' prefix
re-reads almost all hit L2 on a 50 MB L2).

``io_read_est`` is the part of ``io()`` that is read: K/V, q, mask and metadata, plus half of the
partial-result and logits bytes (``IOCounts`` counts those written once and read back once). Where the
ratio misses 1 by more than the tolerance, the likely causes are L2 hits inside one kernel (two tiles of
one chunk loading the same K/V while it is still in the 50 MB L2: DRAM reads below ``io()``), sector
granularity (32-byte sectors: scattered small reads count whole sectors, above ``io()``), and writes
absorbed by L2 before the kernel ends.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io as _io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig

_ROOT = Path(__file__).resolve().parents[1]
METRICS = (
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "gpu__time_duration.sum",
    "lts__t_sectors_srcunit_tex_op_read.sum",  # 32-byte sectors the SMs read from L2: what io() models
)


def find_ncu(explicit: str | None) -> str:
    cands = [explicit] if explicit else [shutil.which("ncu"), *sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True), "/usr/local/cuda/bin/ncu"]
    for c in cands:
        if c and os.path.exists(c) and os.access(c, os.X_OK):
            return c
    raise SystemExit("ncu (Nsight Compute) not found: put it on PATH or set ncu=/path/to/ncu")


def pairs_override(pairs) -> str:
    """The driver's pair list as one override, so a child indexes the same list (a ``pairs=[...]`` given
    to the driver on the command line would otherwise not reach it)."""
    items = ",".join(f"{{method:{p.method},case:{p.case},step:{int(p.step)}}}" for p in pairs)
    return f"pairs=[{items}]"


def parse_ncu_csv(text: str) -> pd.DataFrame:
    """Rows of ncu's ``--csv --page raw`` report: one per profiled kernel, metric values as numbers."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        return pd.DataFrame()
    rows = list(csv.reader(_io.StringIO("\n".join(lines[start:]))))
    df = pd.DataFrame([r for r in rows[1:] if len(r) == len(rows[0])], columns=rows[0])
    df = df[pd.to_numeric(df["ID"], errors="coerce").notna()].copy()  # drops the units row
    for m in METRICS:
        if m in df:
            df[m] = pd.to_numeric(df[m].str.replace(",", ""), errors="coerce")
    return df


# ---------------------------------------------------------------------- child: the profiled process
def child(cfg: DictConfig) -> None:
    import torch
    from hydra import compose
    from hydra.utils import instantiate

    from deft.attention import floor_io
    from deft.bench.app import attention_shape
    from deft.bench.resolvers import register
    from workloads.trace import replay

    register()
    pair = cfg.pairs[int(cfg.pair_index)]
    # this app's Hydra already searches conf/: compose the bench config of the pair inside it
    bcfg = compose("config", overrides=[f"case={pair.case}", f"method={pair.method}", *cfg.overrides])
    method = instantiate(bcfg.method)
    trace = instantiate(bcfg.workload).trace()
    tree = next(st.tree for st in replay(trace) if st.step == int(pair.step))
    shape = dataclasses.replace(attention_shape(bcfg), n_layers=1)
    dev = torch.device("cuda")
    n = int(tree.slots.max()) + 1
    k = torch.randn(n, shape.n_kv_heads, shape.head_dim, device=dev, dtype=shape.torch_dtype)
    v = torch.randn_like(k)
    q = torch.randn(tree.n_queries, shape.n_heads, shape.head_dim, device=dev, dtype=shape.torch_dtype)
    plan = method.plan(tree, shape, dev)
    method.run(q, k, v, plan)  # compile / autotune outside the profiled range
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    method.run(q, k, v, plan)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    c, f = method.io(tree, shape), floor_io(tree, shape)
    info = {"trace": trace.name, "n_queries": tree.n_queries, "unique_kv_tokens": tree.unique_kv_tokens,
            "path_kv_tokens": tree.path_kv_tokens, **c.as_dict(), "floor_total": f.total, "method_name": method.name}  # fmt: skip
    Path(cfg.io_json).write_text(json.dumps(info))


# ---------------------------------------------------------------------- driver
def driver(cfg: DictConfig) -> None:
    import torch

    from deft.bench.provenance import provenance
    from deft.bench.results import write_atomic

    if not torch.cuda.is_available():
        raise SystemExit("ncu validation needs a CUDA GPU")
    ncu = find_ncu(cfg.ncu)
    prov = provenance("cuda")
    rows = []
    out = Path(cfg.out) if cfg.out else _ROOT / "results" / prov["gpu"] / "ncu" / "ncu_validation.csv"
    for i, pair in enumerate(cfg.pairs):
        with tempfile.TemporaryDirectory() as tmp:
            io_json, log = Path(tmp) / "io.json", Path(tmp) / "ncu.csv"
            cmd = [
                ncu, "--clock-control", "none", "--profile-from-start", "off", "--metrics", ",".join(METRICS),
                "--csv", "--page", "raw", "--print-units", "base", "--log-file", str(log),
                sys.executable, "-m", "scripts.ncu_validate", "mode=child", f"pair_index={i}", f"io_json={io_json}",
                *[f"overrides={list(cfg.overrides)}"] * bool(cfg.overrides), pairs_override(cfg.pairs),
            ]  # fmt: skip
            print(f"[{i + 1}/{len(cfg.pairs)}] {pair.method} {pair.case} step {pair.step}", flush=True)
            p = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, timeout=int(cfg.timeout_s))
            if p.returncode != 0 or not io_json.exists():
                print(f"  failed (rc {p.returncode}): {(p.stderr or p.stdout).strip().splitlines()[-3:]}", flush=True)
                continue
            k = parse_ncu_csv(log.read_text())
            io = json.loads(io_json.read_text())
        read, write = float(k["dram__bytes_read.sum"].sum()), float(k["dram__bytes_write.sum"].sum())
        l2_read = 32.0 * float(k.get("lts__t_sectors_srcunit_tex_op_read.sum", pd.Series([float("nan")])).sum())
        io_read = io["io_kv"] + io["io_q"] + io["io_mask"] + io["io_meta"] + (io["io_partial"] + io["io_logits"]) / 2
        ratio = read / io_read if io_read else float("nan")
        rows.append(
            {"method": pair.method, "case": pair.case, "step": int(pair.step), **io, "kernels": len(k),
             "kernel_names": ";".join(sorted(set(k.get("Kernel Name", pd.Series(dtype=str)).astype(str))))[:300],
             "ncu_dram_read": read, "ncu_dram_write": write, "ncu_time_ns": float(k["gpu__time_duration.sum"].sum()),
             "io_read_est": io_read, "read_ratio": ratio, "l2_read": l2_read,
             "l2_read_ratio": l2_read / io_read if io_read else float("nan"),
             "dram_read_vs_floor": read / io["floor_total"] if io.get("floor_total") else float("nan"), "total_ratio": (read + write) / io["io_total"] if io["io_total"] else float("nan"),
             "within_tolerance": bool(abs(ratio - 1) <= float(cfg.tolerance)), **{c: prov[c] for c in ("gpu_name", "torch", "triton", "git_commit", "date")}}
        )  # fmt: skip
        print(f"  DRAM read {read / 1e6:.2f} MB, L2->SM read {l2_read / 1e6:.2f} MB, io read estimate "
              f"{io_read / 1e6:.2f} MB: DRAM ratio {ratio:.3f}, L2 ratio {l2_read / io_read:.3f}, "
              f"DRAM / floor {read / io['floor_total']:.3f}", flush=True)  # fmt: skip
        write_atomic(pd.DataFrame(rows), out)  # after every pair: a killed run keeps what it measured
    print(f"wrote {out}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="ncu")
def main(cfg: DictConfig) -> None:
    child(cfg) if cfg.mode == "child" else driver(cfg)


if __name__ == "__main__":
    main()

"""Result rows: the schema, the stable run key, atomic per-run CSV files, and loading them back.

Layout: ``<results_dir>/<gpu>/<bench>/<workload>__<method>__<key>.csv``, one file per run (one Hydra
job), holding one row per measured step plus one ``aggregate`` row; ``bench=e2e`` files, with a row for every
decode step, are gzipped (``.csv.gz``, written with a fixed mtime so equal rows give equal bytes). ``<gpu>`` is ``h100``, ``a100``...,
or ``cpu`` for runs without a GPU (``bench=io``). A file exists only once its run finished: it is
written to a temporary name and renamed, so a killed sweep loses at most the run in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from deft.attention import IOCounts

#: config keys that do not change what is measured (paths, resume switches, launcher settings)
NON_SEMANTIC_KEYS = ("results_dir", "traces_dir", "hydra", "bench.force", "bench.progress", "workload.traces_dir")

IO_FIELDS = tuple(f"io_{k}" for k in IOCounts().as_dict(prefix=""))  # io_kv ... io_total
FLOOR_FIELDS = tuple(f"floor_{k}" for k in IOCounts().as_dict(prefix=""))

#: columns every row carries, in this order (bench-specific columns follow, then anything extra)
SCHEMA: tuple[str, ...] = (
    # what ran
    "bench", "run_key", "kind", "step", "weight", "n_steps", "n_sampled",
    "workload", "case", "trace", "prompt_len", "method", "experiment", "model",
    "n_layers", "n_heads", "n_kv_heads", "head_dim", "dtype",
    # tree at this step (sums over steps for aggregate rows)
    "n_nodes", "n_queries", "unique_kv_tokens", "path_kv_tokens",
    # latency, one layer (step rows); totals over steps x layers (aggregate rows)
    "latency_ms", "latency_p10_ms", "latency_p90_ms", "latency_reps", "plan_ms", "plan_p10_ms", "plan_p90_ms",
    "total_attn_ms", "total_plan_ms",
    # bandwidth
    "kv_floor_bytes", "achieved_bw_gbps", "io_bw_gbps", "copy_bw_gbps", "bw_fraction",
    # IO per category (one layer for step rows; summed over steps x layers for aggregate rows)
    *IO_FIELDS, *FLOOR_FIELDS,
    # correctness
    "rel_error", "tolerance", "error_ok",
    # where
    "device", "gpu", "gpu_name", "python", "torch", "cuda", "triton", "flashinfer", "xformers", "numpy",
    "triton_interpret", "git_commit", "git_dirty", "host", "date",
)  # fmt: skip


def _drop(d: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in d:
        return
    if rest:
        if isinstance(d[head], dict):
            _drop(d[head], rest)
    else:
        del d[head]


def semantic_config(cfg: DictConfig | Mapping) -> dict[str, Any]:
    """The resolved config minus keys that do not change the measurement."""
    d = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg))
    for key in NON_SEMANTIC_KEYS:
        _drop(d, key)
    return d


def run_key(cfg: DictConfig | Mapping) -> str:
    """Stable 12-hex hash of the semantic config: same config, same key, on any machine."""
    blob = json.dumps(semantic_config(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(s))


def run_path(results_dir: str | Path, gpu: str, bench: str, workload: str, method: str, key: str) -> Path:
    """Where a run's rows go: ``.csv.gz`` for ``bench=e2e`` (thousands of step rows), ``.csv`` otherwise."""
    ext = ".csv.gz" if bench == "e2e" else ".csv"
    """Where one run's rows live."""
    return Path(results_dir) / _safe(gpu) / _safe(bench) / f"{_safe(workload)}__{_safe(method)}__{key}{ext}"


def finished_run(path: str | Path) -> Path | None:
    """The finished file of the run ``path`` names, plain or gzipped (an older layout), or ``None``."""
    path = Path(path)
    stem = path.name.removesuffix(".gz").removesuffix(".csv")
    for cand in (path.with_name(f"{stem}.csv"), path.with_name(f"{stem}.csv.gz")):
        if cand.exists():
            return cand
    return None


def flatten(prefix: str, d: Mapping[str, Any]) -> dict[str, Any]:
    """``{'a': 1, 'b': {'c': 2}}`` -> ``{prefix+'a': 1, prefix+'b.c': 2}``; lists become JSON strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(f"{prefix}{k}.", v))
        elif isinstance(v, list | tuple):
            out[f"{prefix}{k}"] = json.dumps(list(v))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows -> DataFrame with the schema's columns first (missing ones empty), extras after, sorted."""
    df = pd.DataFrame(list(rows))
    extra = sorted(c for c in df.columns if c not in SCHEMA)
    return df.reindex(columns=[*SCHEMA, *extra])


def write_atomic(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as CSV (gzipped if ``path`` ends in ``.gz``) to ``path`` via a temporary file in the same
    folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if path.suffix == ".gz":
            with os.fdopen(fd, "wb") as f:
                df.to_csv(f, index=False, float_format="%.6g", compression={"method": "gzip", "mtime": 0})
        else:
            with os.fdopen(fd, "w", newline="") as f:
                df.to_csv(f, index=False, float_format="%.6g")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


#: columns that look numeric but are names (a hex key like ``1e5a...`` must not become a float)
_STR_COLUMNS = {c: str for c in ("run_key", "git_commit", "gpu", "gpu_name", "torch", "cuda", "triton", "flashinfer", "xformers", "python", "numpy", "host", "date")}


def load_results(root: str | Path, bench: str | None = None, gpu: str | None = None) -> pd.DataFrame:
    """Every finished run under ``root`` (optionally one bench and/or one GPU folder) as one DataFrame."""
    root = Path(root)
    folder = f"{gpu or '*'}/{bench or '*'}"
    files = sorted(p for ext in ("csv", "csv.gz") for p in root.glob(f"{folder}/*.{ext}") if not p.name.startswith("."))
    if not files:
        return to_frame([])
    frames = [pd.read_csv(p, low_memory=False, dtype=_STR_COLUMNS) for p in files]
    out = pd.concat(frames, ignore_index=True, sort=False)
    source = np.repeat([str(p.relative_to(root)) for p in files], [len(f) for f in frames])
    return pd.concat([out, pd.DataFrame({"source_file": source})], axis=1)

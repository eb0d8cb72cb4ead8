"""Paper-style tables from result files only (``results/<gpu>/<bench>/*.csv``), as Markdown.

- attention: total attention time per trace (one layer timed per sampled step, integrated over steps and
  layers) per method, and DeFT-Flatten's speedup over each baseline, per workload and prompt length;
- snapshots: per-step latency of one layer (issue 3/4 benchmark) with DeFT-Flatten's bandwidth figures;
- e2e: end-to-end and attention time of the engine runs, with speedups, beside the paper's where quoted;
- io: KV IO and partial-result IO per method with DeFT-Flatten's reduction, from ``bench=io`` rows.

Every table states the GPU, versions, dates and commits of the rows it came from. Run as
``python -m scripts.tables`` (Hydra config ``conf/reproduce.yaml``: ``results_dir``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from deft.bench.results import load_results

REF = "deft_flatten"
DISPLAY = {
    "deft_flatten": "DeFT-Flatten",
    "deft_node": "DeFT-Node",
    "deft_node_chunk": "DeFT-Node-Chunk",
    "radix": "Radix",
    "flash_decoding": "Flash-Decoding",
    "tree_mask": "Tree-mask (PyTorch)",
    "tree_mask_fused": "Tree-mask (fused)",
    "flashinfer_paged": "FlashInfer paged",
    "flashinfer_cascade": "FlashInfer cascade",
    "xformers_splitk": "xformers split-K",
    "flex_attention": "FlexAttention",
}
METHOD_ORDER = list(DISPLAY)

#: published end-to-end speedups of DeFT-Flatten over Radix (Llama-3.1-8B) as quoted in issue 6 of this
#: project from the paper (arXiv 2404.00242); keyed by (case label, prompt length)
PAPER_E2E_SPEEDUP_OVER_RADIX = {("few-shot b=50", 16000): 1.74, ("sorting128ToT", 16000): 1.66}
PAPER_E2E_SOURCE = "paper (arXiv 2404.00242, Llama-3.1-8B) as quoted in issue 6"
#: the paper's abstract (arXiv 2404.00242v4): IO reductions of DeFT-Flatten over the baselines
PAPER_IO_CLAIM = (
    "Paper (arXiv 2404.00242v4 abstract): DeFT reduces KV-cache IO by 73-99% and partial-result IO by nearly "
    "100% compared with the baselines. The paper's per-setting tables could not be retrieved here, so no "
    "per-row paper column is shown."
)


# ---------------------------------------------------------------------- labels and provenance
def case_label(row: pd.Series) -> str:
    """Paper-style name of a run's workload setting: ``few-shot b=50``, ``sorting128ToT``, ``speculative t=64``."""
    wl = row.get("workload")
    if wl == "few_shot":
        return f"few-shot b={int(row['wl.width'])}"
    if wl == "reasoning":
        return Path(str(row.get("wl.file"))).stem
    if wl == "speculative":
        m = re.search(r"(\d+)", str(row.get("wl.file")))
        return f"speculative t={m.group(1)}" if m else "speculative"
    return str(row.get("trace") or wl)


def _with_labels(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["label"] = [case_label(r) for _, r in df.iterrows()] if len(df) else []
    return df


def _latest(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per key: the most recent measurement (by date, then file name for a stable order)."""
    sort = [c for c in ("date", "source_file") if c in df.columns]
    return df.sort_values(sort, kind="stable").drop_duplicates(list(keys), keep="last")


def _join(vals) -> str:
    vals = sorted({str(v) for v in vals if isinstance(v, str) and v and v != "nan"})
    return ", ".join(vals) if vals else "n/a"


def l2_flushes(df: pd.DataFrame) -> pd.Series:
    """Each row's L2 flush (``deft.bench.timing.L2_FLUSHES``); rows from before the column (session 19) zeroed it."""
    col = df["l2_flush"] if "l2_flush" in df else pd.Series(np.nan, index=df.index)
    return col.astype(object).where(col.notna(), "write").astype(str)


def provenance_line(df: pd.DataFrame) -> str:
    """Where the rows of a table come from: GPU, versions, dates, commits."""
    if df.empty:
        return "_no rows_"
    commits = []
    for c, d in sorted({(str(c), bool(d)) for c, d in zip(df["git_commit"], df["git_dirty"].fillna(False), strict=True)}):
        commits.append(c + (" (dirty)" if d else ""))
    dates = sorted(str(d)[:10] for d in df["date"].dropna())
    parts = [
        f"GPU: {_join(df['gpu_name'])}",
        f"torch {_join(df['torch'].astype(str))}",
        f"CUDA {_join(df['cuda'].astype(str))}",
        f"triton {_join(df['triton'].astype(str))}",
    ]
    for lib in ("flashinfer", "xformers"):
        if lib in df and df[lib].notna().any():
            parts.append(f"{lib} {_join(df[lib].astype(str))}")
    if "bench" not in df or (df["bench"] != "io").any():  # timed rows: the L2 flush before each repetition
        parts.append(f"L2 flush {_join(l2_flushes(df))}")
    parts.append(f"dates {dates[0]}..{dates[-1]}" if dates else "dates n/a")
    parts.append(f"commits {', '.join(sorted(set(commits)))}")
    return "Source: " + "; ".join(parts) + "."


# ---------------------------------------------------------------------- markdown
def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, float | np.floating):
        a = abs(v)
        if a >= 100:
            return f"{v:,.0f}"
        if a >= 1 or a == 0:
            return f"{v:.2f}"
        return f"{v:.{digits}g}"
    return str(v)


def to_markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A plain Markdown table (no tabulate dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(v, digits) for v in r.tolist()) + " |")
    return "\n".join(lines)


def _methods(cols) -> list[str]:
    known = [m for m in METHOD_ORDER if m in cols]
    return known + sorted(c for c in cols if c not in METHOD_ORDER)


def _sort_index(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["label", "prompt_len"], kind="stable").reset_index(drop=True)


def speedup_frame(piv: pd.DataFrame, ref: str = REF) -> pd.DataFrame:
    """``baseline time / ref time`` for every baseline column of ``piv``, and over the best baseline."""
    out = pd.DataFrame(index=piv.index)
    if ref not in piv:
        return out
    base = [m for m in _methods(piv.columns) if m != ref]
    for m in base:
        out[f"x {DISPLAY.get(m, m)}"] = piv[m] / piv[ref]
    if base:
        out["x best other"] = piv[base].min(axis=1, skipna=True) / piv[ref]
    return out


# ---------------------------------------------------------------------- tables
def attention_table(df: pd.DataFrame, ref: str = REF) -> pd.DataFrame:
    """Total attention time per trace (s) per method and DeFT-Flatten's speedups (sweep runs, not snapshots)."""
    a = df[(df["bench"] == "attention") & (df["kind"] == "aggregate")]
    if "bench.steps" in a:
        a = a[a["bench.steps"].isna()]
    if a.empty:
        return pd.DataFrame()
    a = _latest(_with_labels(a), ["label", "prompt_len", "method", "model", "dtype"])
    piv = a.pivot_table(index=["label", "prompt_len"], columns="method", values="total_attn_ms", aggfunc="first") / 1e3
    piv = piv[_methods(piv.columns)]
    out = pd.concat([piv.rename(columns=lambda m: f"{DISPLAY.get(m, m)} (s)"), speedup_frame(piv, ref)], axis=1)
    return _sort_index(out.reset_index())


def snapshot_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The step rows :func:`snapshot_table` shows: snapshot runs (``bench.steps`` set), the newest per cell."""
    s = df[(df["bench"] == "attention") & (df["kind"] == "step")]
    if "bench.steps" in s:
        s = s[s["bench.steps"].notna()]
    if s.empty:
        return s
    return _latest(_with_labels(s), ["label", "prompt_len", "step", "method", "model", "dtype"])


def snapshot_table(df: pd.DataFrame, ref: str = REF) -> pd.DataFrame:
    """Per-step latency of one layer (µs) per method at the snapshot steps, with DeFT-Flatten's speedups."""
    s = snapshot_rows(df)
    if s.empty:
        return pd.DataFrame()
    piv = s.pivot_table(index=["label", "prompt_len", "step"], columns="method", values="latency_ms", aggfunc="first") * 1e3
    piv = piv[_methods(piv.columns)]
    out = pd.concat([piv.rename(columns=lambda m: f"{DISPLAY.get(m, m)} (µs)"), speedup_frame(piv, ref)], axis=1)
    same = same_launch(s, ref)
    if same is not None:
        out["same launch as ref"] = same.reindex(out.index).fillna("")
    out = out.reset_index()
    out["step"] = out["step"].astype(int)
    return out.sort_values(["label", "prompt_len", "step"], kind="stable").reset_index(drop=True)


def same_launch(s: pd.DataFrame, ref: str = REF) -> pd.Series | None:
    """Per snapshot step, the methods whose ``launch_digest`` equals ``ref``'s (the same kernels on the same plan, so
    their latency gap is run-to-run spread); None when the rows carry no digests (rows before session 14)."""
    if "launch_digest" not in s or s["launch_digest"].isna().all():
        return None
    keys = ["label", "prompt_len", "step"]
    d = s.dropna(subset=["launch_digest"]).set_index([*keys, "method"])["launch_digest"]
    if ref not in d.index.get_level_values("method"):
        return None
    r = d.xs(ref, level="method")
    others = d.drop(index=ref, level="method").reset_index()
    others = others[others["launch_digest"].to_numpy() == r.reindex(pd.MultiIndex.from_frame(others[keys])).to_numpy()]
    return others.groupby(keys)["method"].agg(lambda m: ", ".join(DISPLAY.get(x, x) for x in sorted(m)))


def bandwidth_table(df: pd.DataFrame, method: str = REF) -> pd.DataFrame:
    """One method at the snapshot steps: latency, plan time, achieved bandwidth, fraction of copy bandwidth, error."""
    s = df[(df["bench"] == "attention") & (df["kind"] == "step") & (df["method"] == method)]
    if "bench.steps" in s:
        s = s[s["bench.steps"].notna()]
    if s.empty:
        return pd.DataFrame()
    s = _latest(_with_labels(s), ["label", "prompt_len", "step", "model", "dtype"])
    out = pd.DataFrame(
        {
            "workload": s["label"],
            "prompt_len": s["prompt_len"],
            "step": s["step"].astype(int),
            "queries": s["n_queries"],
            "unique KV tokens": s["unique_kv_tokens"],
            "latency (µs)": s["latency_ms"] * 1e3,
            "p10..p90 (µs)": [f"{a * 1e3:.1f}..{b * 1e3:.1f}" for a, b in zip(s["latency_p10_ms"], s["latency_p90_ms"], strict=True)],
            "plan (µs)": s["plan_ms"] * 1e3,
            "plan / 32 layers": s["plan_ms"] / (s["latency_ms"] * s["n_layers"]),
            "achieved GB/s": s["achieved_bw_gbps"],
            "copy GB/s": s["copy_bw_gbps"],
            "fraction of copy BW": s["bw_fraction"],
            "rel. error": s["rel_error"],
        }
    )
    return out.sort_values(["workload", "prompt_len", "step"], kind="stable").reset_index(drop=True)


_E2E_TOTAL = ("e2e_ms", "end_to_end_ms", "total_ms", "decode_ms", "total_decode_ms")
_E2E_ATTN = ("attn_ms_total", "total_attn_ms", "attn_ms", "attention_ms")


def e2e_table(df: pd.DataFrame, ref: str = REF) -> pd.DataFrame:
    """Engine runs: end-to-end and attention time per method, DeFT-Flatten's speedups, the paper's beside."""
    e = df[df["bench"] == "e2e"]
    if e.empty:
        return pd.DataFrame()
    total = next((c for c in _E2E_TOTAL if c in e and e[c].notna().any()), None)
    attn = next((c for c in _E2E_ATTN if c in e and e[c].notna().any()), None)
    if total is None:
        return pd.DataFrame()
    if "kind" in e and (e["kind"] == "aggregate").any():
        e = e[e["kind"] == "aggregate"]
    e = _with_labels(e)
    if "bench.max_steps" in e:  # runs cut short (bench.max_steps) are not whole traces: their own rows
        cut = e["bench.max_steps"].notna()
        e.loc[cut, "label"] = e.loc[cut, "label"] + " (first " + e.loc[cut, "bench.max_steps"].astype(int).astype(str) + " steps)"
    e["engine"] = e["engine"].fillna("eager") if "engine" in e else "eager"
    keys = ["label", "prompt_len", "engine", "method", "model", "dtype"]
    e = _latest(e, keys)
    idx = ["label", "prompt_len", "engine"]
    piv = e.pivot_table(index=idx, columns="method", values=total, aggfunc="first") / 1e3
    piv = piv[_methods(piv.columns)]
    parts = [piv.rename(columns=lambda m: f"{DISPLAY.get(m, m)} e2e (s)"), speedup_frame(piv, ref).add_suffix(" e2e")]
    if attn is not None:
        pa = e.pivot_table(index=idx, columns="method", values=attn, aggfunc="first") / 1e3
        parts.append(speedup_frame(pa[_methods(pa.columns)], ref).add_suffix(" attn"))
        if ref in pa and ref in piv:
            parts.append((pa[ref] / piv[ref]).rename("DeFT-Flatten attention share"))
    out = pd.concat(parts, axis=1).reset_index()
    out["paper x Radix e2e"] = [PAPER_E2E_SPEEDUP_OVER_RADIX.get((lbl, int(p))) for lbl, p in zip(out["label"], out["prompt_len"], strict=True)]
    if out["paper x Radix e2e"].isna().all():
        out = out.drop(columns="paper x Radix e2e")
    return _sort_index(out)


IO_BASELINES = ("radix", "flash_decoding", "tree_mask", "tree_mask_fused", "flashinfer_paged", "flashinfer_cascade", "deft_node_chunk")


def _io_pivots(df: pd.DataFrame):
    d = df[(df["bench"] == "io") & (df["kind"] == "aggregate")]
    if "bench.steps" in d:
        d = d[d["bench.steps"].isna()]
    if d.empty:
        return None
    d = _latest(_with_labels(d), ["label", "prompt_len", "method", "model", "dtype"])
    idx = ["label", "prompt_len"]
    kv = d.pivot_table(index=idx, columns="method", values="io_kv", aggfunc="first") / 1e9
    part = d.pivot_table(index=idx, columns="method", values="io_partial", aggfunc="first") / 1e9
    floor = d.groupby(idx)["floor_kv"].first() / 1e9
    return kv[_methods(kv.columns)], part[_methods(part.columns)], floor


def io_table(df: pd.DataFrame, category: str = "kv") -> pd.DataFrame:
    """KV IO (``category='kv'``, with the unique-KV floor) or partial-result IO (``'partial'``), GB over the
    whole trace and all layers, per method."""
    p = _io_pivots(df)
    if p is None:
        return pd.DataFrame()
    kv, part, floor = p
    src = kv if category == "kv" else part
    out = src.rename(columns=lambda m: f"{DISPLAY.get(m, m)} (GB)")
    if category == "kv":
        out.insert(0, "unique-KV floor (GB)", floor)
    return _sort_index(out.reset_index())


def io_reduction_table(df: pd.DataFrame, ref: str = REF, baselines: Sequence[str] = IO_BASELINES) -> pd.DataFrame:
    """How much less KV IO and partial-result IO DeFT-Flatten moves than each baseline (%)."""
    p = _io_pivots(df)
    if p is None or ref not in p[0]:
        return pd.DataFrame()
    kv, part, _ = p
    out = pd.DataFrame(index=kv.index)
    for m in [b for b in baselines if b in kv]:
        out[f"KV vs {DISPLAY.get(m, m)}"] = 100 * (1 - kv[ref] / kv[m])
    for m in [b for b in baselines if b in part]:
        with np.errstate(divide="ignore", invalid="ignore"):
            out[f"partial vs {DISPLAY.get(m, m)}"] = (100 * (1 - part[ref] / part[m])).where(part[m] > 0)
    return _sort_index(out.reset_index())


# ---------------------------------------------------------------------- files
def sweep_pivot(sweep: pd.DataFrame) -> pd.DataFrame:
    """``kernel_snapshots`` sweep rows as snapshots x settings of CUDA-graph µs (median of a setting swept twice),
    the settings in the order they were swept."""
    order = list(dict.fromkeys(sweep["variant"]))
    return sweep.pivot_table(index="snapshot", columns="variant", values="graph_us", aggfunc="median", sort=False)[order]


def sweep_ledger(results_dir: str | Path) -> pd.DataFrame:
    """Every DeFT kernel setting ever swept by ``scripts/kernel_snapshots.py`` (``results/<gpu>/kernel_snapshots_*.csv``),
    against the default of the same call: one row per (call, setting), with the geomean, best and worst over the
    call's snapshots of the setting's CUDA-graph time / the call's ``default`` time. Only within-call ratios are
    formed, so settings from different calls, commits or GPUs are never compared with each other; ``default`` is the
    defaults of the call's commit. Calls without a ``default`` setting are left out."""
    rows = []
    for path in sorted(Path(results_dir).glob("*/kernel_snapshots_*.csv")):
        df = pd.read_csv(path)
        if not {"phase", "variant", "graph_us", "snapshot"} <= set(df.columns):
            continue
        sweep = df[df["phase"] == "sweep"]
        if "default" not in set(sweep["variant"]):
            continue
        piv = sweep_pivot(sweep)
        for setting in piv.columns:
            ratio = (piv[setting] / piv["default"]).dropna()
            if setting == "default" or ratio.empty:
                continue
            first = sweep[sweep["variant"] == setting].iloc[0]
            rows.append(
                {
                    "call": path.stem.removeprefix("kernel_snapshots_"),
                    "gpu": path.parent.name,
                    "commit": str(first.get("git_commit", ""))[:7],
                    "setting": setting,
                    "kwargs": str(first.get("kwargs", "")),
                    "snapshots": len(ratio),
                    "x default": float(np.exp(np.log(ratio).mean())),
                    "best": float(ratio.min()),
                    "worst": float(ratio.max()),
                }
            )
    return pd.DataFrame(rows)


def paired_verdict(r: pd.Series | dict) -> str:
    """What a ``kernel_paired`` row says of DeFT-Flatten against its variant: the ratio variant / Flatten's 95 %
    interval above 1 (Flatten faster), below 1 (slower), or across 1 (a tie); "same launch" where the plans and
    kernels were byte-identical (the ratio then measures placement and spread alone)."""
    if r["variant"] == "flatten":
        return ""
    if bool(r["same_launch"]):
        return "same launch"
    if r["vs_flatten_lo"] > 1:
        return "Flatten faster"
    return "Flatten SLOWER" if r["vs_flatten_hi"] < 1 else "tie (within the interval)"


def paired_table(results_dir: str | Path, gpu: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The newest ``results/<gpu>/kernel_paired_*.csv`` (``kernel_snapshots``' paired comparison) as snapshots x variants
    of "ratio [low, high] verdict", and its rows (empty frames when there is none)."""
    paths = sorted(Path(results_dir, gpu).glob("kernel_paired_2*.csv"))  # by name: the date, then the call tag
    paths = [p for p in paths if "samples" not in p.name]
    if not paths:
        return pd.DataFrame(), pd.DataFrame()
    rows = pd.read_csv(paths[-1])
    rows = rows[rows["variant"] != "flatten"]
    cell = rows.apply(
        lambda r: f"{r['vs_flatten']:.3f} [{r['vs_flatten_lo']:.3f}, {r['vs_flatten_hi']:.3f}] {paired_verdict(r)}", axis=1
    )
    table = rows.assign(cell=cell).pivot(index="snapshot", columns="variant", values="cell")
    table = table.reindex(index=list(dict.fromkeys(rows["snapshot"])), columns=list(dict.fromkeys(rows["variant"])))
    # provenance_line's columns, from the script's own (its rows name the GPU in "gpu" and carry no CUDA or dirty flag)
    rows = rows.assign(gpu_name=rows["gpu"], cuda=rows["torch"].astype(str).str.partition("+")[2], git_dirty=False)
    return table.rename_axis("snapshot").reset_index(), rows


def gpu_folders(results_dir: str | Path) -> list[str]:
    """GPU result folders (everything under ``results_dir`` holding bench folders, except ``cpu``)."""
    root = Path(results_dir)
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and p.name != "cpu" and any((p / b).is_dir() for b in ("attention", "e2e", "io"))
    ) if root.is_dir() else []  # fmt: skip


def write_table(path: Path, title: str, table: pd.DataFrame, rows: pd.DataFrame, notes: Sequence[str] = ()) -> Path | None:
    """``title``, the table, its provenance line and notes, as one Markdown file (nothing if empty)."""
    if table.empty:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    text = [f"### {title}", "", to_markdown(table), "", provenance_line(rows), *[f"\n{n}" for n in notes], ""]
    path.write_text("\n".join(text))
    return path


def build_all(results_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Every table from the files under ``results_dir``; returns the Markdown files written."""
    root = Path(results_dir)
    out = Path(out_dir) if out_dir else root / "tables"
    written: list[Path] = []
    for gpu in gpu_folders(root):
        df = load_results(root, gpu=gpu)
        att = df[df["bench"] == "attention"]
        e2e = df[df["bench"] == "e2e"]
        written += [
            write_table(out / f"attention_{gpu}.md", f"Attention time per trace, {gpu} (one layer timed per sampled step, x steps x layers)",
                        attention_table(df), att[att["kind"] == "aggregate"],
                        ["x M: M's time / DeFT-Flatten's time (above 1: DeFT-Flatten faster). The paper's per-setting "
                         "attention tables could not be retrieved here, so no paper column is shown."]),
            write_table(out / f"snapshots_{gpu}.md", f"Snapshot latency of one layer, {gpu}", snapshot_table(df), snapshot_rows(df),
                        ["x M: M's latency / DeFT-Flatten's latency. same launch as ref: methods whose kernels and plan "
                         "were byte-identical to DeFT-Flatten's at that step (their gap is run-to-run spread; rows "
                         "from session 14 on)."]),
            write_table(out / f"bandwidth_{gpu}.md", f"DeFT-Flatten at the snapshot steps, {gpu}", bandwidth_table(df), att[att["method"] == REF],
                        ["Achieved bandwidth: unique K/V bytes of the step / latency; fraction of the measured device copy bandwidth."]),
            write_table(out / f"e2e_{gpu}.md", f"End-to-end tree decoding, {gpu}", e2e_table(df), e2e,
                        [f"paper x Radix e2e: {PAPER_E2E_SOURCE}."]),
        ]  # fmt: skip
    for gpu in sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        table, rows = paired_table(root, gpu)
        written.append(write_table(
            out / f"paired_{gpu}.md", f"DeFT-Flatten against the other DeFT variants, paired, {gpu}", table, rows,
            ["Each cell: variant's time / DeFT-Flatten's, per interleaved round (CUDA graphs, cold L2, random order "
             "each round), median [95 % interval, bootstrapped over the variant's instances, each built apart, then "
             "rounds]; above 1: DeFT-Flatten faster. `python -m scripts.kernel_snapshots` (`DEFT_SNAP_PAIRED`, "
             "`DEFT_SNAP_INSTANCES`); the newest `kernel_paired_*.csv` of the folder."],
        ))  # fmt: skip
    ledger = sweep_ledger(root)
    if not ledger.empty:
        path = out / "kernel_sweeps.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([
            "### Every DeFT kernel setting swept, against its call's default", "",
            to_markdown(ledger.round(3)), "",
            "Source: `results/<gpu>/kernel_snapshots_*.csv` (`python -m scripts.kernel_snapshots`; sweep rows, CUDA-graph "
            "µs, cold L2, median of 50). x default: geomean over the call's snapshots of the setting's time / the call's "
            "`default` (the defaults of that commit); best / worst: the extreme snapshots. Below 1: faster. Ratios are "
            "formed within one call only; `notes/deft_kernels.md` tells what each call asked.", "",
        ]))  # fmt: skip
        written.append(path)
    io = load_results(root, bench="io")
    if not io.empty:
        # analytic rows are device independent: prefer the CPU folder's, else the newest
        io = io.assign(_cpu=(io["gpu"] == "cpu").astype(int)).sort_values(["_cpu", "date"]).drop_duplicates("run_key", keep="last")
        written += [
            write_table(out / "io_reduction.md", "DeFT-Flatten's IO reduction over each baseline (%, whole trace, all layers)",
                        io_reduction_table(io), io,
                        ["KV vs M: 1 - DeFT-Flatten's KV bytes / M's; partial vs M likewise for partial results "
                         "(empty where M writes none; negative where DeFT-Flatten moves more).", PAPER_IO_CLAIM]),
            write_table(out / "io_kv.md", "KV-cache IO over the whole trace (GB, analytic, all layers)", io_table(io, "kv"), io,
                        ["unique-KV floor: every distinct K/V token read once per step and layer."]),
            write_table(out / "io_partial.md", "Partial-result IO over the whole trace (GB, analytic, all layers)", io_table(io, "partial"), io,
                        ["Partial outputs and log-sum-exp written and read back by a reduction."]),
        ]  # fmt: skip
    return [p for p in written if p is not None]


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base="1.3", config_path="../conf", config_name="reproduce")
    def _app(cfg: DictConfig) -> None:
        for p in build_all(cfg.results_dir, cfg.get("tables_dir")):
            print(f"wrote {p}")

    _app()


if __name__ == "__main__":
    main()

"""Per-program timeline of the DeFT partial kernel on the GPU: when each (tile, KV head) program started and
ended (``%globaltimer``, ns, comparable across SMs) and on which SM, for the snapshot trees of
``scripts/kernel_snapshots.py``. It answers where a launch's time goes: how long the wide prompt programs
run, when the branch programs start, how ragged the tail is, how much of the SMs' time is idle, and what the
reduction adds after the partial kernel.

Each repetition flushes L2 and queues a GPU sleep first (as ``deft.bench.timing.time_device`` does), then
runs the partial kernel with the timeline on and the reduction, with CUDA events around each; of
``DEFT_TL_REPS`` repetitions (default 9) the one with the median makespan is kept. The timeline adds two
timer reads and three stores per program, a few hundred ns at most.

Writes ``$OUT/timeline_<date>[_<tag>].csv.gz`` (one row per program, with its tile's tokens, rows and
phases), ``$OUT/timeline_summary_<date>[_<tag>].csv`` (one row per snapshot and variant) and, for the
snapshots in ``DEFT_TL_PLOT``, a per-SM picture ``$OUT/timeline_<snapshot>_<variant>.png``; prints the
summary last.

Environment: ``DEFT_TL_VARIANTS`` (``name=class[:kwargs-json]`` separated by ``;``, default Flatten and
Node-Chunk with their defaults), ``DEFT_TL_SNAPS`` (comma-separated snapshot name prefixes; default all),
``DEFT_TL_TAG``, ``DEFT_TRACES_DIR``. Run on the GPU machine: ``python -m scripts.timeline_probe``.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from deft.bench.timing import BACKLOG_CYCLES, flush_l2, l2_flush_buffer, spin_up
from deft.kernels.deft_flatten import DeftFlatten
from deft.kernels.deft_node import DeftNode, DeftNodeChunk
from deft.kernels.global_reduce import launch_reduce
from deft.kernels.kv_groups import FLAG_CONTIG, FLAG_MASK, FLAG_SHIFT
from deft.kernels.tree_attention import launch_partials
from deft.reference import TOLERANCE, relative_error
from scripts.kernel_snapshots import SHAPE, inputs, provenance, snapshots

CLASSES = {"deft_flatten": DeftFlatten, "deft_node_chunk": DeftNodeChunk, "deft_node": DeftNode}
DEFAULT_VARIANTS = "flatten=deft_flatten;node_chunk=deft_node_chunk"


def parse_variants(spec: str) -> dict[str, tuple[type, dict]]:
    """``name=class[:kwargs-json];...`` -> {name: (class, kwargs)}."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        name, _, rest = item.partition("=")
        cls_name, _, kw = rest.partition(":")
        if cls_name not in CLASSES:
            raise SystemExit(f"unknown class {cls_name!r} in DEFT_TL_VARIANTS; choose from {sorted(CLASSES)}")
        out[name] = (CLASSES[cls_name], json.loads(kw) if kw else {})
    return out


def one_rep(m, plan, q, k, v, out, timeline: torch.Tensor, flush: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """One cold-L2 repetition: the partial kernel with the timeline on, then the reduction (none with ``fused_reduce``). Returns the
    timeline (programs x 4 int64), and the partial kernel's and the reduction's CUDA-event times in µs."""
    g = plan.groups
    timeline.fill_(-1)
    flush_l2(flush)
    torch.cuda._sleep(BACKLOG_CYCLES)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    ev[0].record()
    launch_partials(
        q, k, v, plan.part_o, plan.part_lse, plan.meta, g.offsets, g.n_tiles, plan.block_m, plan.block_n,
        plan.num_warps, plan.num_stages, timeline=timeline, pdl_trigger=plan.pdl, unified=plan.unified,
        affine_big=plan.affine_big, fused_out=out if plan.counters is not None else None, counters=plan.counters,
        **m.kernel_knobs(),  # the method's own kernel settings, as run passes them
    )  # fmt: skip
    ev[1].record()
    if plan.counters is None:  # fused_reduce: the partial kernel merged the rows itself
        launch_reduce(out, plan.part_o, plan.part_lse, plan.meta, g.offsets, plan.block_p, heads=plan.reduce_heads, pdl=plan.pdl)
    ev[2].record()
    torch.cuda.synchronize()
    return timeline.view(-1, 4).cpu().numpy(), ev[0].elapsed_time(ev[1]) * 1e3, ev[1].elapsed_time(ev[2]) * 1e3


def program_rows(m, plan, tl_np: np.ndarray, small_rows: int) -> pd.DataFrame:
    """One row per program: its timing and its tile's shape."""
    g = plan.groups
    n_kv = SHAPE.n_kv_heads
    t = g.records("tiles")
    pid = np.arange(tl_np.shape[0])
    tile, kvh = pid // n_kv, pid % n_kv  # 1-D (lpt) or 2-D grid, both linearised tile-major by the kernel
    ntok = (t["tok_hi"] - t["tok_lo"])[tile]
    unmasked = (t["flags"] >> FLAG_SHIFT)[tile]
    nq = (t["q_hi"] - t["q_lo"])[tile]
    rows = nq * SHAPE.group_size
    start = tl_np[:, 0]
    return pd.DataFrame(
        {
            "pid": pid, "tile": tile, "kv_head": kvh, "sm": tl_np[:, 2],
            "start_us": (start - start.min()) / 1e3, "end_us": (tl_np[:, 1] - start.min()) / 1e3,
            "tokens": ntok, "unmasked_tokens": unmasked, "masked_tokens": ntok - unmasked,
            "queries": nq, "rows": rows, "tile_rows": np.where(rows <= small_rows, small_rows, plan.block_m),
            "small": rows <= small_rows,
            "masked": (t["flags"][tile] & FLAG_MASK) != 0, "affine": (t["flags"][tile] & FLAG_CONTIG) != 0,
        }
    )  # fmt: skip


def summarise(df: pd.DataFrame, partial_us: float, reduce_us: float) -> dict:
    """Makespan, slot use and tail of one launch's timeline."""
    dur = df.end_us - df.start_us
    span = float(df.end_us.max())
    # programs resident at once: the most that overlap (sweep over start/end events)
    ev = np.concatenate([np.stack([df.start_us, np.ones(len(df))], 1), np.stack([df.end_us, -np.ones(len(df))], 1)])
    ev = ev[np.lexsort((ev[:, 1], ev[:, 0]))]
    slots = int(np.cumsum(ev[:, 1]).max())
    big = ~df.small
    return {
        "programs": len(df), "partial_us": partial_us, "reduce_us": reduce_us, "makespan_us": span,
        "launch_gap_us": partial_us - span,  # event-to-event time not covered by any program
        "max_resident": slots, "slot_use": float(dur.sum() / (slots * span)) if span > 0 else 0.0,
        "last_start_us": float(df.start_us.max()), "p90_end_us": float(df.end_us.quantile(0.9)),
        "tail_us": span - float(df.end_us.quantile(0.9)),
        "big_programs": int(big.sum()), "big_med_us": float(dur[big].median()) if big.any() else 0.0,
        "big_max_us": float(dur[big].max()) if big.any() else 0.0,
        "small_med_us": float(dur[~big].median()) if (~big).any() else 0.0,
        "small_max_us": float(dur[~big].max()) if (~big).any() else 0.0,
        "ns_per_token_big": float((dur[big] * 1e3 / df.tokens[big]).median()) if big.any() else 0.0,
        "ns_per_token_small": float((dur[~big] * 1e3 / df.tokens[~big].clip(lower=1)).median()) if (~big).any() else 0.0,
        "masked_programs": int(df.masked.sum()),
    }  # fmt: skip


def plot_sm_lanes(df: pd.DataFrame, colour: np.ndarray, title: str, what: str, path: Path) -> None:
    """Bars of the programs (``start_us``/``end_us``/``sm`` columns) per SM, the programs resident on one SM at once
    in lanes assigned greedily by start time; ``what`` names a program on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 7))
    lane = np.zeros(len(df), dtype=int)
    free: dict[int, list[float]] = {}
    for i in np.argsort(df.start_us.to_numpy()):
        ends = free.setdefault(int(df.sm.iloc[i]), [])
        j = next((j for j, e in enumerate(ends) if e <= df.start_us.iloc[i] + 1e-3), len(ends))
        if j == len(ends):
            ends.append(0.0)
        ends[j] = float(df.end_us.iloc[i])
        lane[i] = j
    n_lanes = max(len(v) for v in free.values())
    y = df.sm.to_numpy() * n_lanes + lane
    ax.barh(y, (df.end_us - df.start_us).to_numpy(), left=df.start_us.to_numpy(), height=0.9, color=colour)
    ax.set_xlabel(f"µs since the first {what} started")
    ax.set_ylabel(f"SM x {n_lanes} resident slots")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(df: pd.DataFrame, title: str, path: Path) -> None:
    """One partial launch's programs per SM (blue: big tile, green: small tile, red: masked phase)."""
    colour = np.where(df.masked, "tab:red", np.where(df.small, "tab:green", "tab:blue"))
    plot_sm_lanes(df, colour, title + "  (blue: big tile, green: small tile, red: masked phase)", "program", path)


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    variants = parse_variants(os.environ.get("DEFT_TL_VARIANTS", DEFAULT_VARIANTS))
    prefixes = [p for p in os.environ.get("DEFT_TL_SNAPS", "").split(",") if p]
    plot_snaps = [p for p in os.environ.get("DEFT_TL_PLOT", "fewshot_16k_w50_step200,sorting128ToT").split(",") if p]
    reps = int(os.environ.get("DEFT_TL_REPS", "9"))
    tag = os.environ.get("DEFT_TL_TAG", "")
    out_dir = Path(os.environ.get("OUT", "results/h100/timeline"))
    out_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    suffix = f"{date}_{tag}" if tag else date
    prov = provenance(dev)
    spin_up(dev)
    flush = l2_flush_buffer(dev)
    programs, summary = [], []
    for sname, tree in snapshots():
        if prefixes and not any(sname.startswith(p) for p in prefixes):
            continue
        q, k, v, ref = inputs(tree, dev)
        for vname, (cls, kw) in variants.items():
            m = cls(**kw)
            plan = m.plan(tree, SHAPE, dev)
            err = relative_error(m.run(q, k, v, plan), ref)
            assert err < TOLERANCE[torch.bfloat16], (sname, vname, err)
            n_prog = plan.groups.n_tiles * SHAPE.n_kv_heads
            timeline = torch.empty(n_prog * 4, dtype=torch.int64, device=dev)
            out = torch.empty_like(q)
            one_rep(m, plan, q, k, v, out, timeline, flush)  # compiles the timeline variant
            runs = [one_rep(m, plan, q, k, v, out, timeline, flush) for _ in range(reps)]
            assert all((r[0][:, :2] >= 0).all() for r in runs), "a program did not write its timeline"
            spans = [int(r[0][:, 1].max() - r[0][:, 0].min()) for r in runs]
            tl_np, p_us, r_us = runs[int(np.argsort(spans)[len(spans) // 2])]
            small = m.small_m if m.small_m and m.small_m < plan.block_m else 0  # 0: every tile is big
            df = program_rows(m, plan, tl_np, small)
            s = {**prov, "snapshot": sname, "variant": vname, "kwargs": json.dumps(kw), "rel_err": err,
                 "partial_us_med": float(np.median([r[1] for r in runs])), "reduce_us_med": float(np.median([r[2] for r in runs])),
                 **summarise(df, p_us, r_us)}  # fmt: skip
            summary.append(s)
            programs.append(df.assign(snapshot=sname, variant=vname, git_commit=prov["git_commit"]))
            if any(sname.startswith(p) for p in plot_snaps):
                plot(df, f"{sname} {vname}: partial kernel {p_us:.1f} µs", out_dir / f"timeline_{sname}_{vname}.png")
            print(
                f"{sname[:24]:24s} {vname:12s} partial {s['partial_us']:6.1f} reduce {s['reduce_us']:5.1f} "
                f"span {s['makespan_us']:6.1f} slots {s['max_resident']:3d} use {s['slot_use']:.2f} "
                f"tail {s['tail_us']:5.1f} big {s['big_med_us']:5.1f}/{s['big_max_us']:5.1f} "
                f"small {s['small_med_us']:5.1f}/{s['small_max_us']:5.1f}",
                flush=True,
            )
            pd.concat(programs).to_csv(out_dir / f"timeline_{suffix}.csv.gz", index=False)
            pd.DataFrame(summary).to_csv(out_dir / f"timeline_summary_{suffix}.csv", index=False)
    cols = ["snapshot", "variant", "partial_us_med", "reduce_us_med", "makespan_us", "launch_gap_us", "max_resident",
            "slot_use", "last_start_us", "tail_us", "big_med_us", "small_med_us", "ns_per_token_big", "ns_per_token_small"]  # fmt: skip
    print(pd.DataFrame(summary)[cols].round(2).to_string(index=False))


if __name__ == "__main__":
    main()

"""A list-scheduling model of a DeFT launch: which tile order and cut finish first, on the CPU.

The GPU starts a grid's programs in order as slots free up, so a launch behaves like greedy list scheduling:
each program goes to the slot that frees first. This script builds the plans of the kernel snapshots (the
same trees as ``scripts/kernel_snapshots.py``), gives every (tile, KV head) program a cost, and reports the
makespan for the launch orders the kernel offers: head-major (every tile of KV head 0, then head 1, ...; the
default 2-D grid) and longest first across all heads (``lpt=True``). Its cost model is crude (see
``program_cost``; model units, not µs), so it only ranks alternatives for a GPU run to confirm: on the
session-6 H100 rows it ranked Flatten against Node-Chunk as measured on 8 of 9 snapshots, and ``wide_waves``
1 against 2 on 4 of 5 (``notes/deft_kernels.md``).

    python -m scripts.schedule_model        # SLOTS=264 (132 SMs x 2 resident programs) by default

Calibrated mode (session 13): :mod:`deft.kernels.launch_model` prices a program in µs by its class (big affine, big
gathered, big masked, small) with a fixed cost and a per-token rate, ``fit_rates`` fits those from per-program timelines
(``scripts/timeline_probe.py``'s CSVs), and ``share_table`` models the makespan of each share of the wave the shared
prompt may take (``wide_waves``) next to the graph µs measured for it (``kernel_snapshots`` sweep rows). On session
13's H100 rows (``results/h100/kernel_snapshots_2026-12-05_s13c_wide.csv``, five shares) the model's best share is
the measured best on 5 of the 9 snapshots, within 0.5 % of it on 2 and 2-3.5 % behind it on few-shot 16k steps 200
and 399; taking it would have made the geomean about 2 % lower than the fixed 0.9 (16k step 1 and 4k step 200 7-8 %
faster, none slower by more than 0.5 %). On the next call's rows (``..._s13f_wide_new.csv``, three shares, the new
small-tile defaults) it picks the measured best on all 7 snapshots where its pick was measured. Not yet a plan rule
(``notes/deft_kernels.md``, session 13)::

    DEFT_SCHED_SHARES=results/h100/kernel_snapshots_2026-12-05_s13c_wide.csv python -m scripts.schedule_model
"""

from __future__ import annotations

import os

import numpy as np

from deft.kernels.deft_flatten import DeftFlatten
from deft.kernels.deft_node import DeftNodeChunk
from deft.kernels.kv_groups import TILE_FIELDS, KVGroups, tile_tokens
from deft.kernels.launch_model import (  # noqa: F401 (makespan, program_class, program_us re-exported)
    CLASSES,
    US_RATES,
    class_codes,
    makespan,
    program_class,
    program_us,
)

#: model costs: per program, per 64 tokens for a big / small tile, and the factor for masked tokens
PROGRAM, BIG, SMALL, MASKED = 2.0, 1.5, 1.0, 1.8


def program_cost(g: KVGroups, group: int, small_rows: int = 16) -> np.ndarray:
    """Model cost of each tile's program (the same for every KV head), in tile order."""
    t = g.section("tiles").reshape(-1, len(TILE_FIELDS))
    n_tok, masked = tile_tokens(t)
    per = np.where((t[:, 3] - t[:, 2]) * group > small_rows, BIG, SMALL)
    return PROGRAM + per * (n_tok - masked + MASKED * masked) / 64


#: the wide shares ``share_table`` compares, and the sweep variants that measured them (``kernel_snapshots.ALL_SWEEP``)
SHARES = {"wide0.7": 0.7, "wide0.75": 0.75, "wide0.8": 0.8, "default": 0.9, "wide1": 1.0}


def fit_rates(timeline) -> dict:
    """Least-squares ``(fixed, per unmasked token, per masked token)`` per class from timeline rows (a DataFrame with
    ``start_us, end_us, small, affine, masked, unmasked_tokens, masked_tokens``); a class without masked tokens gets its
    unmasked rate for them."""
    cls = np.asarray(CLASSES)[class_codes(timeline["small"] == 1, timeline["masked"] == 1, timeline["affine"] == 1)]
    out = {}
    for name in US_RATES:
        sel = cls == name
        if sel.sum() < 3:
            continue
        dur = (timeline["end_us"] - timeline["start_us"]).to_numpy()[sel]
        un = timeline["unmasked_tokens"].to_numpy()[sel].astype(float)
        ma = timeline["masked_tokens"].to_numpy()[sel].astype(float)
        cols = [np.ones_like(un), un] + ([ma] if ma.any() else [])
        coef = np.linalg.lstsq(np.stack(cols, 1), dur, rcond=None)[0]
        out[name] = (float(coef[0]), float(coef[1]), float(coef[2]) if ma.any() else float(coef[1]))
    return out


def share_table(snaps, measured=None, slots: int = 264, shares=SHARES):
    """Modelled makespan (µs, ``slots`` resident programs, a tile's KV heads started together) of DeFT-Flatten's plan
    for each share of the wave the shared prompt may take, next to the measured graph µs of the sweep variant that ran
    it (``measured``: kernel_snapshots rows, or None). One row per (snapshot, share)."""
    import pandas as pd

    from scripts.kernel_snapshots import SHAPE

    rows = []
    for name, tree in snaps:
        for variant, share in shares.items():
            m = DeftFlatten(n_sms=slots // 2, wide_waves=share)
            c = launch_order(program_us(m.groups(tree, SHAPE), SHAPE.group_size), SHAPE.n_kv_heads, True)
            row = dict(snapshot=name, variant=variant, share=share, model_us=makespan(c, slots))
            if measured is not None:
                got = measured[(measured["snapshot"] == name) & (measured["variant"] == variant)]["graph_us"]
                row["measured_us"] = float(got.median()) if len(got) else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def launch_order(costs: np.ndarray, n_kv_heads: int, head_fastest: bool) -> np.ndarray:
    """Program costs in the order the grid starts them: head-major 2-D grid, or one axis with a tile's heads
    next to each other."""
    return np.repeat(costs, n_kv_heads) if head_fastest else np.tile(costs, n_kv_heads)


def main() -> None:
    from scripts.kernel_snapshots import SHAPE, snapshots

    rows_path = os.environ.get("DEFT_SCHED_SHARES")
    if rows_path:  # the calibrated model's wide shares against the measured ones
        import pandas as pd

        meas = pd.read_csv(rows_path)
        meas = meas[meas["phase"] == "sweep"] if "phase" in meas else meas
        tab = share_table(snapshots(), meas, int(os.environ.get("SLOTS", 264)))
        with pd.option_context("display.width", 200):
            print(tab.pivot(index="snapshot", columns="share", values=["model_us", "measured_us"]).round(1).to_string())
        for name, g in tab.dropna(subset=["measured_us"]).groupby("snapshot"):  # the shares that were measured
            pick = g.loc[g["model_us"].idxmin()]
            best = g.loc[g["measured_us"].idxmin()]
            print(f"{name:28s} model picks {pick['share']:.2f} ({pick['measured_us']:.1f} µs measured); "
                  f"measured best {best['share']:.2f} ({best['measured_us']:.1f} µs)")  # fmt: skip
        return

    slots = int(os.environ.get("SLOTS", 264))
    group = SHAPE.group_size
    print(f"makespan in model units, {slots} slots, {SHAPE.n_kv_heads} KV heads; bound = max(work / slots, longest)")
    print(f"{'snapshot':28s} {'Flatten':>8s} {'+lpt':>7s} {'NodeChunk':>10s} {'+lpt':>7s} {'bound':>7s}")
    for name, tree in snapshots():
        cells = []
        for cls in (DeftFlatten, DeftNodeChunk):
            for lpt in (False, True):
                m = cls(lpt=lpt, n_sms=slots // 2)
                c = program_cost(m.groups(tree, SHAPE), group)
                cells.append(makespan(launch_order(c, SHAPE.n_kv_heads, lpt), slots))
                if cls is DeftFlatten and not lpt:
                    bound = max(c.sum() * SHAPE.n_kv_heads / slots, c.max())
        print(f"{name[:28]:28s} {cells[0]:8.1f} {cells[1]:7.1f} {cells[2]:10.1f} {cells[3]:7.1f} {bound:7.1f}")


if __name__ == "__main__":
    main()

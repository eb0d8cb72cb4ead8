"""Timeline of a DeFT step that runs the shared prompt in the Gluon kernel: when each prompt CTA and each program
of the rest's launch (the branches: chained to the prompt kernel by PDL, or on a side stream with
``prompt_order="streams"``) started and ended (``%globaltimer`` ns) and on which SM.

It answers which half of the step is its critical path (the prompt kernel on its share of the SMs, or the branches
on the SMs it leaves), how long SMs sit idle while the other half finishes, when the rest's programs start against
the prompt's CTAs, and what the join and the reduction add.

For each snapshot of :func:`scripts.kernel_snapshots.snapshots` whose plan takes the Gluon kernel (default: the
few-shot 16k ones) and each variant (``DEFT_GT_VARIANTS``, as ``scripts/timeline_probe.py``'s
``DEFT_TL_VARIANTS``) and stream-priority mode (``DEFT_GT_PRIOS``: ``same``, ``prompt_hi`` with the step on a
high-priority stream, ``rest_hi`` with the side stream high: with ``prompt_order="streams"`` only, the default
chain has one stream; ``DEFT_GT_PROMPT_VARIANT``: a
:data:`scripts.prompt_probe.VARIANTS` name, the prompt kernel's block and ring depth): ``DEFT_GT_REPS`` (9) cold-L2 replays of the step
captured in a CUDA graph with both timelines on, the median-makespan one kept; and, in CUDA graphs without
timelines (cold L2, median of 50), the step and its two partial launches alone. Writes ``$OUT/gluon_timeline_<date>[_<tag>].csv.gz`` (one row per CTA or program),
``$OUT/gluon_timeline_summary_<date>[_<tag>].csv`` and, for the first snapshot, per-SM pictures
``$OUT/gluon_timeline_<snapshot>_<variant>_<prio>.png``; prints the summary last. With ``DEFT_GT_REST_ALONE=1``
the rest's launch is also timed beside placeholder CTAs (:func:`_spin_kernel`) that hold the prompt's SMs for its
CTAs' median time without reading memory: the rest on the SMs the prompt leaves, without the prompt's HBM traffic
(``rest_alone_*`` columns). ``DEFT_GT_SLOTS=interleaved,contiguous`` adds each snapshot with its KV renumbered
node by node (:func:`node_ordered_slots`; name suffix ``_contiguous``). Hopper GPU only: ``python -m scripts.gluon_timeline``.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from deft.bench.timing import BACKLOG_CYCLES, flush_l2, l2_flush_buffer, spin_up, time_device
from deft.kernels import prompt_gluon
from deft.kernels.global_reduce import launch_reduce
from deft.reference import TOLERANCE, relative_error
from deft.tree import DecodingTree
from scripts.kernel_snapshots import SHAPE, inputs, provenance, snapshots
from scripts.prompt_probe import apply_variant
from scripts.timeline_probe import parse_variants, plot_sm_lanes

PRIOS = ("same", "prompt_hi", "rest_hi")
#: int32 words of shared memory a placeholder CTA holds (160 KB: one per SM, as a prompt CTA's 164 KB)
SPIN_ROWS = 160


@gluon.jit
def _spin_kernel(ns, sink, ROWS: gl.constexpr, PDL_TRIGGER: gl.constexpr):
    """Placeholder for the prompt kernel's CTAs: hold an SM (160 KB of shared memory) for ``ns`` nanoseconds
    without touching HBM, so the rest's launch runs on the SMs the prompt leaves without its memory traffic; with
    ``PDL_TRIGGER`` it lets a programmatic dependent launch as it starts, as the prompt kernel does (``prompt_order``)."""
    layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    row: gl.constexpr = gl.BlockedLayout([2], [32], [4], [0])
    buf = gl.allocate_shared_memory(gl.int32, [ROWS, 256], layout)
    c = gl.program_id(0)
    if PDL_TRIGGER:
        prompt_gluon._launch_dependents(c)
    buf.index(0).store(gl.full([256], 1, gl.int32, row))
    t0 = prompt_gluon._globaltimer(c)
    t = t0
    while t - t0 < ns:
        t = prompt_gluon._globaltimer(c)
    got = buf.index(0).load(row)
    gl.store(sink + gl.arange(0, 256, row), got, mask=gl.arange(0, 256, row) < (t - t0 - ns - (1 << 40)))  # never


def spin_launcher(ns: int, sink: torch.Tensor):
    """A stand-in for :func:`~deft.kernels.prompt_gluon.launch_prompt_partials`: the same grid of placeholder CTAs."""

    def launch(q, k_pool, v_pool, part_o, part_lse, meta, offsets, n_tiles, n_pairs, pdl_trigger=False, signal=None, **_):
        if signal is not None:
            raise SystemExit("DEFT_GT_REST_ALONE: the placeholder CTAs do not count themselves done (branch_merge)")
        grid = ((n_tiles - n_pairs) * k_pool.shape[1],)
        _spin_kernel[grid](ns, sink, ROWS=SPIN_ROWS, PDL_TRIGGER=bool(pdl_trigger), num_warps=4)

    return launch


def streams(mode: str, dev: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """(the step's stream, the side stream) for a priority mode (lower number: higher priority)."""
    lo, hi = torch.cuda.Stream.priority_range()
    if mode not in PRIOS:
        raise SystemExit(f"unknown priority mode {mode!r} in DEFT_GT_PRIOS; choose from {PRIOS}")
    main = torch.cuda.Stream(dev, priority=hi if mode == "prompt_hi" else lo)
    side = torch.cuda.Stream(dev, priority=hi if mode == "rest_hi" else lo)
    return main, side


def node_ordered_slots(tree: DecodingTree) -> DecodingTree:
    """The same tree with its KV renumbered node by node (slot = position in the node-ordered token list): each
    branch's tokens on consecutive slots, as a pool that allocates per sequence would place them, instead of the
    one-token-per-branch-per-step interleaving the replayed decoding gives."""
    n = len(tree.slots)
    return DecodingTree(tree.parent, tree.slot_ptr, np.arange(n, dtype=tree.slots.dtype), tree.query_node,
                        tree.query_visible, n)  # fmt: skip


def rest_head_blocks(method, plan) -> int:
    """Programs per rest tile: one per KV head in the fused kernel, one per block of heads in the branches' kernel."""
    if plan.rest_heads:
        return method.branch_head_blocks(SHAPE, plan.rest_heads)
    return SHAPE.n_kv_heads


def capture(fn, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    """``fn`` (one step's launches, run once eagerly first) in a CUDA graph on ``stream``: its replays are free of the
    host's launch path, which in eager runs can start the side stream's launch tens of µs late."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph


def step_with_timelines(m, q, k, v, plan, out, tls) -> None:
    """The step's launches as ``run`` makes them, both timelines on, then the reduction (none when the branches'
    kernel merged: ``branch_merge``)."""
    if not m._run_prompt(q, k, v, plan, timelines=tls, out=out):
        g = plan.groups
        launch_reduce(out, plan.part_o, plan.part_lse, plan.meta, g.offsets, plan.block_p, heads=plan.reduce_heads)


def one_rep(graph: torch.cuda.CUDAGraph, tls, flush) -> tuple[np.ndarray, np.ndarray, float]:
    """One cold-L2 replay of a step captured with both timelines on. Returns the prompt CTAs' and the rest programs'
    timelines (rows of 4 int64) and the replay's event µs."""
    for t in tls:
        t.fill_(-1)
    flush_l2(flush)
    torch.cuda._sleep(BACKLOG_CYCLES)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    graph.replay()
    ev[1].record()
    torch.cuda.synchronize()
    return tls[0].view(-1, 4).cpu().numpy(), tls[1].view(-1, 4).cpu().numpy(), ev[0].elapsed_time(ev[1]) * 1e3


def frame(tl_p: np.ndarray, tl_r: np.ndarray) -> pd.DataFrame:
    """One row per prompt CTA (kind ``prompt``, its later warpgroup's end) and rest program (``rest``), µs since
    the first start."""
    p = pd.DataFrame({"kind": "prompt", "start": tl_p[:, 0], "end": tl_p[:, 1:3].max(1), "sm": tl_p[:, 3],
                      "wg_end_gap_us": np.abs(tl_p[:, 1] - tl_p[:, 2]) / 1e3})  # fmt: skip
    r = pd.DataFrame({"kind": "rest", "start": tl_r[:, 0], "end": tl_r[:, 1], "sm": tl_r[:, 2], "wg_end_gap_us": 0.0,
                      "wait": tl_r[:, 3]})  # fmt: skip
    df = pd.concat([p, r], ignore_index=True)
    t0 = df.start.min()
    # a branch_merge program's fourth word: when its wait for the prompt kernel's count ended (0 otherwise)
    wait_us = np.where(df.wait.fillna(0).to_numpy() > 0, (df.wait.fillna(0) - t0) / 1e3, np.nan)
    return df.assign(start_us=(df.start - t0) / 1e3, end_us=(df.end - t0) / 1e3, wait_end_us=wait_us).drop(
        columns=["start", "end", "wait"]
    )


def summarise(df: pd.DataFrame, n_sms: int) -> dict:
    """Each half's start and end, and the SMs' idle time before the last program ends."""
    p, r = df[df.kind == "prompt"], df[df.kind == "rest"]
    span = float(df.end_us.max())
    busy = 0.0
    for _, d in df.groupby("sm"):  # union of the SM's busy intervals
        iv = d[["start_us", "end_us"]].sort_values("start_us").to_numpy()
        cur_s, cur_e = iv[0]
        for s, e in iv[1:]:
            if s > cur_e:
                busy += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        busy += cur_e - cur_s
    dur_p = p.end_us - p.start_us
    return {
        "span_us": span, "prompt_ctas": len(p), "prompt_sms": int(p.sm.nunique()),
        "prompt_first_start_us": float(p.start_us.min()), "prompt_last_start_us": float(p.start_us.max()),
        "prompt_end_min_us": float(p.end_us.min()), "prompt_end_med_us": float(p.end_us.median()),
        "prompt_end_max_us": float(p.end_us.max()), "prompt_cta_med_us": float(dur_p.median()),
        "prompt_wg_gap_med_us": float(p.wg_end_gap_us.median()),
        "rest_programs": len(r), "rest_first_start_us": float(r.start_us.min()) if len(r) else 0.0,
        "rest_end_p90_us": float(r.end_us.quantile(0.9)) if len(r) else 0.0,
        "rest_end_max_us": float(r.end_us.max()) if len(r) else 0.0,
        "rest_wait_end_med_us": float(r.wait_end_us.median()) if len(r) and r.wait_end_us.notna().any() else float("nan"),
        "rest_sms_before_prompt_end": int(r[r.start_us < p.end_us.min()].sm.nunique()) if len(r) else 0,
        "idle_sm_frac": 1.0 - busy / (n_sms * span) if span > 0 else 0.0,
        "critical": "prompt" if len(r) == 0 or p.end_us.max() >= r.end_us.max() else "rest",
    }  # fmt: skip


def plot(df: pd.DataFrame, title: str, path: Path) -> None:
    """The step's CTAs and programs per SM (blue: Gluon prompt CTA, green: rest program)."""
    colour = np.where(df.kind == "prompt", "tab:blue", "tab:green")
    plot_sm_lanes(df, colour, title + "  (blue: Gluon prompt CTA, green: rest program)", "CTA", path)


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    variants = parse_variants(os.environ.get("DEFT_GT_VARIANTS", "flatten=deft_flatten"))
    prios = [p for p in os.environ.get("DEFT_GT_PRIOS", "same").split(",") if p]
    prefixes = [p for p in os.environ.get("DEFT_GT_SNAPS", "fewshot_16k").split(",") if p]
    reps = int(os.environ.get("DEFT_GT_REPS", "9"))
    rest_alone = os.environ.get("DEFT_GT_REST_ALONE", "0") == "1"
    tag = os.environ.get("DEFT_GT_TAG", "")
    out_dir = Path(os.environ.get("OUT", "results/h100/timeline"))
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = datetime.date.today().isoformat() + (f"_{tag}" if tag else "")
    prov = provenance(dev)
    apply_variant(os.environ.get("DEFT_GT_PROMPT_VARIANT"), prov)  # the Gluon prompt kernel's block and ring depth
    n_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    spin_up(dev)
    flush = l2_flush_buffer(dev)
    rows, summary, first = [], [], None
    slot_orders = [x for x in os.environ.get("DEFT_GT_SLOTS", "interleaved").split(",") if x]
    trees = [(n, t) for n, t in snapshots() if any(n.startswith(p) for p in prefixes)]
    trees = [(n if o == "interleaved" else f"{n}_{o}", t if o == "interleaved" else node_ordered_slots(t))
             for n, t in trees for o in slot_orders]  # fmt: skip
    for sname, tree in trees:
        first = first or sname
        q, k, v, ref = inputs(tree, dev)
        for vname, (cls, kw) in variants.items():
            for prio in prios:
                m = cls(**kw)
                plan = m.plan(tree, SHAPE, dev)
                if plan.n_prompt == 0:
                    print(f"{sname} {vname}: no Gluon prompt tiles in this plan, skipped", flush=True)
                    continue
                main_s, side_s = streams(prio, dev)
                m._side[dev] = side_s
                n_ctas = plan.n_prompt - plan.n_pairs
                n_rest = plan.groups.n_tiles - plan.n_prompt
                rest_programs = (plan.rest_programs or n_rest) * rest_head_blocks(m, plan)
                tls = (torch.empty(4 * n_ctas * SHAPE.n_kv_heads, dtype=torch.int64, device=dev),
                       torch.zeros(4 * max(rest_programs, 1), dtype=torch.int64, device=dev))  # fmt: skip
                out = torch.empty_like(q)
                main_s.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(main_s):
                    err = relative_error(m.run(q, k, v, plan), ref)
                    assert err < TOLERANCE[torch.bfloat16], (sname, vname, err)
                    step_tl = functools.partial(step_with_timelines, m, q, k, v, plan, out, tls)
                    g_tl = capture(step_tl, main_s)
                    runs = [one_rep(g_tl, tls, flush) for _ in range(reps)]
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=main_s):
                        m.run(q, k, v, plan, out=out)
                    step_us = time_device(graph.replay, reps=50, device=dev).median_ms * 1e3
                    g_part = torch.cuda.CUDAGraph()  # the two partial launches and their join, no reduction
                    with torch.cuda.graph(g_part, stream=main_s):
                        m._run_prompt(q, k, v, plan)
                    part_graph_us = time_device(g_part.replay, reps=50, device=dev).median_ms * 1e3
                torch.cuda.synchronize(dev)
                for tp, tr, _ in runs:
                    assert (tp[:, :3] >= 0).all() and (n_rest == 0 or (tr[:, :2] >= 0).all()), "a timeline was not written"
                frames = [frame(tp, tr if n_rest else np.zeros((0, 4), dtype=np.int64)) for tp, tr, _ in runs]
                pick = int(np.argsort([f.end_us.max() for f in frames])[len(frames) // 2])  # the median makespan
                df, tl_us = frames[pick], runs[pick][2]
                s = {**prov, "snapshot": sname, "variant": vname, "kwargs": json.dumps(kw), "prio": prio,
                     "rel_err": err, "graph_step_us": step_us, "graph_partials_us": part_graph_us, "timeline_step_us": tl_us,
                     **summarise(df, n_sms)}  # fmt: skip
                if rest_alone and n_rest:  # the rest beside placeholder CTAs that hold the prompt's SMs as long
                    sink = torch.zeros(256, dtype=torch.int32, device=dev)
                    spin = spin_launcher(int(s["prompt_cta_med_us"] * 1e3), sink)
                    with mock.patch.object(prompt_gluon, "launch_prompt_partials", spin), torch.cuda.stream(main_s):
                        g_alone = capture(step_tl, main_s)
                        alone = [one_rep(g_alone, tls, flush)[1] for _ in range(reps)]
                    ends = [(tr[:, 1].max() - tr[:, 0].min()) / 1e3 for tr in alone]
                    p90s = [(np.quantile(tr[:, 1], 0.9) - tr[:, 0].min()) / 1e3 for tr in alone]
                    s.update(rest_alone_end_us=float(np.median(ends)), rest_alone_p90_us=float(np.median(p90s)),
                             spin_us=s["prompt_cta_med_us"])  # fmt: skip
                summary.append(s)
                rows.append(df.assign(snapshot=sname, variant=vname, prio=prio, git_commit=prov["git_commit"]))
                if sname == first:
                    plot(df, f"{sname} {vname} {prio}: step {tl_us:.1f} µs",
                         out_dir / f"gluon_timeline_{sname}_{vname}_{prio}.png")  # fmt: skip
                print({k2: (round(v2, 2) if isinstance(v2, float) else v2) for k2, v2 in s.items() if k2 not in prov},
                      flush=True)  # fmt: skip
                pd.concat(rows).to_csv(out_dir / f"gluon_timeline_{suffix}.csv.gz", index=False)
                pd.DataFrame(summary).to_csv(out_dir / f"gluon_timeline_summary_{suffix}.csv", index=False)
    cols = ["snapshot", "variant", "prio", "graph_step_us", "graph_partials_us", "timeline_step_us", "span_us", "prompt_last_start_us",
            "prompt_end_med_us", "prompt_end_max_us", "rest_first_start_us", "rest_end_p90_us", "rest_end_max_us", "rest_wait_end_med_us",
            "idle_sm_frac", "critical", "rest_alone_p90_us", "rest_alone_end_us"]  # fmt: skip
    if summary:
        df = pd.DataFrame(summary)
        print(df[[c for c in cols if c in df]].round(2).to_string(index=False))


if __name__ == "__main__":
    main()

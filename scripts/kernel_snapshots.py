"""GPU snapshot benchmark of the DeFT kernels (one Llama-3-8B layer, bf16).

For each snapshot tree (few-shot prompt 4k/16k, width 50, steps 1/200/399; speculative tree of 64
candidates on a 4k prompt; sorting128ToT / docmergeToT at 4k when ``workloads`` and the traces are
here): correctness of every variant against the fp64 reference on the GPU, cold-L2 latency (median
of 50), plan time, achieved bandwidth (unique K/V bytes / time) and its fraction of the measured copy
bandwidth. Also checks random trees and ranks the autotune candidates. Writes the raw rows to
``$OUT/kernel_snapshots_<date>.csv`` (or ``./results/h100``) and prints a short table last.

Environment: ``DEFT_SNAP_SWEEP`` (the DeFT-Flatten configurations swept, names from ``ALL_SWEEP``),
``DEFT_SNAP_TABLE`` (the table's variants), ``DEFT_SNAP_TABLE_CONFIG`` (an ``ALL_SWEEP`` name: the table's
configuration; default: the sweep's fastest), ``DEFT_PROMPT_VARIANT`` (a :data:`scripts.prompt_probe.VARIANTS`
name: the Gluon prompt kernel's module settings for the whole run, recorded in a ``prompt_gluon`` column), ``DEFT_SNAP_SNAPS`` (snapshot name prefixes, comma-separated; default
all 9), ``DEFT_TRACES_DIR``, ``DEFT_PLAN_CORE`` (the CPU the plan's host time is measured on, the timing thread
pinned to it; default the last one the process may use; ``off``: unpinned), ``DEFT_SNAP_PAIRED`` (rounds of the
paired comparison, default 400; 0: none), ``DEFT_SNAP_INSTANCES`` (each variant built that many times apart for it,
default 4). Run on the GPU machine: ``python -m scripts.kernel_snapshots``.

The paired comparison: after each snapshot's table rows, every table variant is built ``DEFT_SNAP_INSTANCES`` times
apart (own plan, buffers and CUDA graph) and the graphs replayed in interleaved rounds, random order
(:func:`~deft.bench.timing.time_device_interleaved`); ``kernel_paired_<date>.csv`` gets, per variant, its instances'
medians, the median of its per-round time over DeFT-Flatten's and that ratio's two-level bootstrap 95 % interval
(instances, then rounds; above 1: DeFT-Flatten faster with that confidence; below 1: slower), and
``kernel_paired_samples_<date>.csv`` the samples.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import triton

from deft.attention import AttentionShape, floor_io
from deft.bench.timing import (
    copy_bandwidth,
    l2_flush_mode,
    paired_ratio,
    pinned_thread,
    time_device,
    time_device_interleaved,
    time_host,
)
from deft.kernels.autotune import fan_tree
from deft.kernels.deft_flatten import DeftFlatten
from deft.kernels.deft_node import DeftNode, DeftNodeChunk
from deft.kernels.global_reduce import launch_reduce
from deft.reference import TOLERANCE, reference_attention, relative_error
from deft.tree import DecodingTree
from scripts.tables import paired_verdict, sweep_pivot

SHAPE = AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128, dtype="bfloat16")
#: DeFT-Flatten tile/pipeline configurations swept on the key snapshots; the best (geometric mean of
#: graph-replayed device time) is then used for all three variants on every snapshot
V5 = {"idx_inloop": True, "block_n": 32, "snap": 0.3, "partial_dtype": "input"}
V6 = {**V5, "small_m": 16}
#: session 21's branches' kernel settings, which its sweep entries pin (the defaults changed in session 22)
S21_BRANCHES = {"branch_heads": True, "branch_spread": 0, "branch_block_h": 0, "branch_warps": 8, "prompt_share": 1.1,
                "leaf_split": False}

ALL_SWEEP = {
    "default": {},
    "v5": V5,
    "v6": V6,
    "v6_fp32p": {**V6, "partial_dtype": "float32"},
    "v6_c2": {**V6, "ctas_per_sm": 2.0},
    "v6_c3": {**V6, "ctas_per_sm": 3.0},
    "v6_c6": {**V6, "ctas_per_sm": 6.0},
    "v6_s2": {**V6, "num_stages": 2},
    "v6_s4": {**V6, "num_stages": 4},
    "v6_n16": {**V6, "block_n": 16},
    "v6_n64": {**V6, "block_n": 64},
    "v6_m128": {**V6, "block_m": 128, "num_warps": 8},
    "v6_cmin256": {**V6, "chunk_min": 256},
    "v6_snap45": {**V6, "snap": 0.45},
    "v6_nosnap": {**V6, "snap": 0.0},
    # session 5: the current defaults (= v6_n64) against few_split and 128-row tiles
    "few16": {"few_split": 16},
    "few0": {"few_split": 0},
    "m128w8": {"block_m": 128, "num_warps": 8},
    "m128w4": {"block_m": 128, "num_warps": 4},
    "few16_m128w8": {"few_split": 16, "block_m": 128, "num_warps": 8},
    "c2": {"ctas_per_sm": 2.0},
    # session 5, affine addresses for consecutive slots (on by default): its effect, and chunk rules
    "nocontig": {"contiguous": False},
    "c1": {"ctas_per_sm": 1.0},
    "c05": {"ctas_per_sm": 0.5},
    "c1_max8k": {"ctas_per_sm": 1.0, "chunk_max": 8192},
    "few16_c2": {"few_split": 16, "ctas_per_sm": 2.0},
    "few16_c1": {"few_split": 16, "ctas_per_sm": 1.0},
    # wide nodes (a shared prompt) in long chunks, about 1 or 2 waves of programs (1 is the default since
    # session 6, so "default" = "wide1" from then on)
    "wide0": {"wide_waves": 0.0},
    "wide1": {"wide_waves": 1.0},
    "wide1.5": {"wide_waves": 1.5},
    "wide3": {"wide_waves": 3.0},
    # session 6, not yet measured: tiles launched longest first across all KV heads
    "lpt": {"lpt": True},
    "lpt_wide2": {"lpt": True, "wide_waves": 2.0},
    "wide2": {"wide_waves": 2.0},
    "wide1_few16": {"wide_waves": 1.0, "few_split": 16},
    # session 7: lpt is the default (so "default" = "lpt" from then on); few_split on top of it
    "nolpt": {"lpt": False},
    "few8": {"few_split": 8},
    "few32": {"few_split": 32},
    # from session 7's last commit, few_split=16 is Flatten's default too ("default" = lpt + few16)
    "nofew": {"few_split": 0},
    "nofew_nolpt": {"few_split": 0, "lpt": False},
    # session 8: few_split at 64 rows also re-cuts sorting128ToT's runs of ten one-token leaves (the default
    # from then on); the reduction over head groups, launched as a programmatic dependent (both on by default)
    "few64": {"few_split": 64},
    "red_h1": {"reduce_heads": 1},
    "nopdl_h1": {"reduce_heads": 1, "pdl": False},
    "nopdl": {"pdl": False},
    # with the reduction cheaper (one warp per program), the chunk policy again: more programs, more partials
    "c3": {"ctas_per_sm": 3.0},
    "c6": {"ctas_per_sm": 6.0},
    # session 9 (measured in session 10: mix adopted, fill slower): big and small tiles alternated when the big
    # ones are short (the rule at 1.5) and always; a chunk's query slices filled to the tile's rows, the rest in a small tile (50 queries at GQA 4:
    # 3 x 64 rows + 8), with and without the rule
    "mix": {"mix": 0.75},  # measured as mix=1.5 x (ctas_per_sm x SMs) slots: the same rule since session 10
    "mixall": {"mix": 1e9},
    "fill": {"fill_tiles": True},
    "fill_mix": {"fill_tiles": True, "mix": 0.75},
    # session 10: mix is the default (so "default" = "mix" from then on); without it, and with c3 (the rule then
    # counted ctas_per_sm x SMs slots, so it alternated the 16k trees too: 18-21 % slower; it counts resident
    # programs now); then the speculative t=32 gap: the knobs
    "nomix": {"mix": 0.0},
    "mix_c3": {"ctas_per_sm": 3.0},
    "nowide": {"wide_waves": 0.0},
    "nosplit": {"few_split": 0},
    "c5": {"ctas_per_sm": 5.0},
    "chunk64": {"chunk_size": 64},
    "wide0.9": {"wide_waves": 0.9},  # the default from session 10 on (so "default" = "wide0.9"; "wide1": before)
    "wide0.8": {"wide_waves": 0.8},
    # session 11: 128-row tiles on 8 warps (two warpgroups) counted as one resident program per SM, so the wide
    # prompt's wave and the mix rule see the slots such a kernel really has
    "m128_wc1": {"block_m": 128, "num_warps": 8, "wide_ctas_per_sm": 1},
    "m128_wc1_s2": {"block_m": 128, "num_warps": 8, "wide_ctas_per_sm": 1, "num_stages": 2},
    # session 11: masked tiles of one 64-token block take 8-10 µs in the timeline (22-29 µs beside a prompt
    # program); is it the kernel's size (7,500 SASS instructions, five copies of the loop)? Fewer copies:
    "small0": {"small_m": 0},
    "nocontig_small0": {"contiguous": False, "small_m": 0},
    # one gathered loop for a tile's unmasked and masked tokens: 5,700 SASS instructions instead of 7,500, and the
    # masked tiles run the code every gathered tile runs
    "unified": {"unified_mask": True},
    # ... chosen per plan: only when no tile runs the big tile's plain gathered loop (which the tested loop slows)
    "unified_auto": {"unified_mask": "auto"},  # the default from session 11 on (so "default" = "unified_auto")
    "nounified": {"unified_mask": False},
    # session 12: a kernel compiled for the plan's tile classes: where every big tile is affine and unmasked and
    # every small tile unmasked (a few-shot step past the first), the affine loop alone (2,900 SASS instructions)
    "special": {"specialise": True},
    # session 12: small tiles in a launch of their own (16-row kernel, 32- or 64-token K/V blocks) on a side stream
    "split": {"split_launch": True},
    "split_n64": {"split_launch": True, "small_block_n": 64},
    # session 13: filled tiles (3 x 64 rows + a small rest at 50 queries, GQA 4: 22 % less of the prompt's tensor
    # work) with the rest's long small tile cut into pieces of at most rest_chunk tokens
    "fill_rc256": {"fill_tiles": True, "rest_chunk": 256},
    "fill_rc512": {"fill_tiles": True, "rest_chunk": 512},
    "fill_rc1024": {"fill_tiles": True, "rest_chunk": 1024},
    # session 13: the small tile's gathered loop pipelined 5 stages deep (two K/V blocks in flight, not one)
    "ss5": {"small_stages": 5},
    # session 13: the share of the wave the shared prompt takes, again (a rule per tree would price the other tiles)
    "wide0.7": {"wide_waves": 0.7},
    "wide0.75": {"wide_waves": 0.75},
    # the small tile's own K/V block in the one launch (the branches alone: 36.8 -> 34.3 µs with 32 and small_stages=5)
    "sb32": {"small_block": 32},
    "sb32_ss5": {"small_block": 32, "small_stages": 5},
    "sb16_ss5": {"small_block": 16, "small_stages": 5},
    "sb32_ss5_again": {"small_block": 32, "small_stages": 5},  # the same, swept twice against default and wide0.9 (= default)
    # session 13, not yet measured: the prompt's share of the wave picked per tree by the launch model
    "wpick": {"wide_pick": True},
    # session 14: filled tiles again, the rest tile over the prompt's consecutive slots on the small tile's affine loop
    "fill_sa": {"fill_tiles": True, "small_affine": True},
    "fill_rc512_sa": {"fill_tiles": True, "rest_chunk": 512, "small_affine": True},
    "fill_rc1024_sa": {"fill_tiles": True, "rest_chunk": 1024, "small_affine": True},
    "sa": {"small_affine": True},
    # session 14: the global reduction inside the partial launch (the last program to store a row's partial merges it)
    "fused": {"fused_reduce": True},
    "fused_fill_rc1024_sa": {"fused_reduce": True, "fill_tiles": True, "rest_chunk": 1024, "small_affine": True},
    # session 14: the first two K/V blocks prefetched into L2 beside the query loads (the query chain ran first)
    "l2pf": {"l2_prefetch": True},
    "l2pf_fused": {"l2_prefetch": True, "fused_reduce": True},
    # session 14: the big tile's gathered loops at 32-token blocks, 5 stages (two blocks in flight, as the small tile's)
    "bg32s5": {"big_gather_block": 32, "big_gather_stages": 5},
    "l2pf_fused_fill_sa": {"l2_prefetch": True, "fused_reduce": True, "fill_tiles": True, "small_affine": True},
    # session 16: the prompt's row tiles in the Gluon kernel (deft/kernels/prompt_gluon.py), the rest beside it; the
    # prompt's chunk count follows wide_waves (0.9: 7 chunks at 16k; session 12's probe: 6-8 within 2 %)
    "gluon": {"prompt_kernel": "gluon"},  # the default from session 16 on (so "default" = "gluon" from then)
    "triton": {"prompt_kernel": "triton"},  # the default before: every tile in the fused kernel's one launch
    "gluon_w0.75": {"prompt_kernel": "gluon", "wide_waves": 0.75},
    "gluon_w1.0": {"prompt_kernel": "gluon", "wide_waves": 1.0},
    # the prompt CTAs' share of the SMs, finer (16k at 50 queries: 0.4 -> 3 chunks, 48 CTAs; 0.5 -> 4, 64; 0.67 -> 5,
    # 80; 0.75 -> 6, 96; 0.9 -> 7, 112; 1.0 -> 8, 128)
    "gluon_w0.4": {"prompt_kernel": "gluon", "wide_waves": 0.4},
    "gluon_w0.5": {"prompt_kernel": "gluon", "wide_waves": 0.5},
    "gluon_w0.67": {"prompt_kernel": "gluon", "wide_waves": 0.67},
    # the prompt's share per tree (prompt_share x its share of the step's K/V tokens, at most wide_waves; the 1.1 default
    # fitted on the sweep above), against other scales and the fixed share
    "gluon_ps1.0": {"prompt_kernel": "gluon", "prompt_share": 1.0},
    "gluon_ps1.25": {"prompt_kernel": "gluon", "prompt_share": 1.25},
    "gluon_fixed": {"prompt_kernel": "gluon", "prompt_share": 0},
    # ... and a 4k prompt's short chunks (500-700 tokens at 0.75-0.9) in the Gluon kernel too, at smaller shares
    "gluon_all_w0.5": {"prompt_kernel": "gluon", "prompt_min_tokens": 0, "wide_waves": 0.5},
    "gluon_all_w0.67": {"prompt_kernel": "gluon", "prompt_min_tokens": 0, "wide_waves": 0.67},
    "gluon_all_w0.75": {"prompt_kernel": "gluon", "prompt_min_tokens": 0, "wide_waves": 0.75},
    # session 17: the rest's launch (one-query branches beside the prompt kernel) compiled for 16-row tiles alone, its
    # gathered loops 5 (small_stages), 8 or 3 stages deep at 32-token blocks (sm_90 build at 5: 115 registers, 39 KB of
    # shared memory, four programs per SM; at 3: 96 and 22 KB, five; the fused kernel: 225 and 112 KB, two), and the
    # prompt's share scaled up for it (the branches then take fewer SMs for the same time)
    "gluon_sr": {"small_rest": True, "branch_heads": False},
    "gluon_sr_s8": {"small_rest": True, "branch_heads": False, "rest_stages": 8},
    "gluon_sr_s3": {"small_rest": True, "branch_heads": False, "rest_stages": 3},
    "gluon_sr_ps1.25": {"small_rest": True, "branch_heads": False, "prompt_share": 1.25},
    "gluon_sr_ps1.4": {"small_rest": True, "branch_heads": False, "prompt_share": 1.4},
    "gluon_sr_s3_ps1.25": {"small_rest": True, "branch_heads": False, "rest_stages": 3, "prompt_share": 1.25},
    "gluon_sr_s3_ps1.4": {"small_rest": True, "branch_heads": False, "rest_stages": 3, "prompt_share": 1.4},
    # session 20: the branches' launch kept from starting before the prompt kernel's CTAs (prompt_order): on the same
    # stream as a programmatic dependent of the prompt kernel (the default from session 20 on, so "default" =
    # "order_chain"), or on a side stream forked before it (before). A PDL marker kernel with the side stream waiting
    # for it was also measured (2b9b838): the wait then also waited for the prompt kernel's end (scripts/pdl_order_probe)
    "order_chain": {"prompt_order": "chain"},
    "order_streams": {"prompt_order": "streams"},
    # session 21: the branches' kernel (branch_heads, session 19) again, now chained to the prompt kernel and timed with
    # the reading flush: spread over the free SMs (branch_spread 1) or one program per tile, 3 or 5 stages, and with
    # the prompt's share scaled; all 8 KV heads per program at 8 warps and prompt_share 1.1, session 21's settings
    # (pinned: from session 22 the branches' kernel is the default, at 2 heads, 2 warps and 1.25)
    **{name: {**S21_BRANCHES, **kw} for name, kw in {
        "bh": {"branch_spread": 1.0},
        "bh_s5": {"branch_spread": 1.0, "branch_stages": 5},
        "bh_tile": {},
        "bh_tile_s5": {"branch_stages": 5},
        "bh_ps1.0": {"branch_spread": 1.0, "prompt_share": 1.0},
        "bh_ps1.25": {"branch_spread": 1.0, "prompt_share": 1.25},
        "bh_tile_ps1.25": {"prompt_share": 1.25},
        # ... and merging each query's partials in the branches' programs once the prompt kernel has counted its own
        # stored (branch_merge: no reduction launch)
        "bhm": {"branch_merge": True},
        "bhm_s5": {"branch_merge": True, "branch_stages": 5},
        "bhm_ps1.0": {"branch_merge": True, "prompt_share": 1.0},
        "bhm_w4": {"branch_merge": True, "branch_warps": 4},
    }.items()},
    # session 22: one branch program per (branch, block of KV heads) small enough to share an SM (4 heads at 4 warps:
    # 168 registers, 49 KB, three per SM; 2 at 2 warps: six; all 8 at 8 warps take an SM's registers alone), so the
    # prompt kernel can take 96 SMs at step 200 (prompt_share 1.25) and the branches still fit on the 36 it leaves;
    # fewer heads per program, a deeper pipeline, longer K/V blocks. h2w2_ps1.25 is the default from 7baa412 on, and
    # "fused_rest" the default before it (the rest in the fused kernel, prompt_share 1.1)
    "fused_rest": {"branch_heads": False, "prompt_share": 1.1},
    **{name: {"branch_heads": True, "branch_spread": 0, "leaf_split": False, **kw} for name, kw in {
        "h4": {"branch_block_h": 4, "branch_warps": 4, "prompt_share": 1.1},
        "h4_ps1.25": {"branch_block_h": 4, "branch_warps": 4, "prompt_share": 1.25},
        "h2_ps1.25": {"branch_block_h": 2, "branch_warps": 4, "prompt_share": 1.25},
        "h2w2_ps1.25": {"branch_block_h": 2, "branch_warps": 2, "prompt_share": 1.25},
        "h4s4_ps1.25": {"branch_block_h": 4, "branch_warps": 4, "branch_stages": 4, "prompt_share": 1.25},
        "h4n32_ps1.25": {"branch_block_h": 4, "branch_warps": 4, "branch_block_n": 32, "prompt_share": 1.25},
    }.items()},
    # session 23: Flatten's chunks of leaves only packed into masked tiles again (few-shot 16k step 1; the default cuts
    # them at their nodes when the prompt goes to the Gluon kernel and the branches to theirs: Node-Chunk's launch)
    "leaf0": {"leaf_split": False},
}
#: the configurations swept (``DEFT_SNAP_SWEEP=name,name``; default: the set for session 10)
SWEEP = {
    n: ALL_SWEEP[n]
    for n in os.environ.get("DEFT_SNAP_SWEEP", "default,nomix,mixall,mix_c3").split(",")
}
SWEEP_SNAPSHOTS = (
    "fewshot_16k_w50_step200",
    "fewshot_16k_w50_step399",
    "fewshot_4k_w50_step200",
    "fewshot_4k_w50_step399",
    "fewshot_4k_w50_step1",
    "fewshot_16k_w50_step1",
    "docmergeToT",
    "sorting128ToT",
    "medusa64",
    "medusa32",
)


def speculative_tree(prompt: int, n_candidates: int, seed: int = 0) -> DecodingTree:
    """A prompt and a random token tree of ``n_candidates`` one-token candidates, each a query."""
    rng = np.random.default_rng(seed)
    parent = [-1] + [0] + [int(rng.integers(1, i + 1)) for i in range(1, n_candidates)]
    n_tok = prompt + n_candidates
    return DecodingTree.from_arrays(parent, [prompt] + [1] * n_candidates, np.arange(n_tok),
                                    np.arange(1, n_candidates + 1), [1] * n_candidates, n_slots=n_tok)  # fmt: skip


def random_tree(rng, n_nodes: int, max_len: int) -> DecodingTree:
    parent = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n_nodes)])
    lens = rng.integers(1, max_len + 1, n_nodes)
    n_tok = int(lens.sum())
    leaves = np.setdiff1d(np.arange(n_nodes), parent[parent >= 0])
    extra = rng.integers(0, n_nodes, 4)
    qn = np.concatenate([leaves, extra])
    qv = np.concatenate([lens[leaves], rng.integers(1, lens[extra] + 1)])
    return DecodingTree.from_arrays(parent, lens, rng.permutation(n_tok + 99)[:n_tok], qn, qv, n_slots=n_tok + 99)


def workload_snapshots() -> list[tuple[str, DecodingTree]]:
    """sorting128ToT / docmergeToT at prompt 4k (the step with the most queries) and the Medusa tree of 64
    at prompt 4k (its middle step), replayed by ``workloads`` from the authors' templates in
    ``$DEFT_TRACES_DIR`` (default ``.cache/traces``, a git-ignored copy carried to the GPU machine)."""
    try:
        from workloads.reasoning import Reasoning
        from workloads.speculative import Speculative
        from workloads.trace import replay
    except Exception as e:  # written elsewhere; skip cleanly without it
        print(f"workload snapshots skipped: {type(e).__name__}: {e}")
        return []
    tdir = os.environ.get("DEFT_TRACES_DIR", ".cache/traces")
    out = []
    for name, wl, pick in (
        (
            "sorting128ToT_4k",
            Reasoning(file="sorting128ToT.json", tree_index=1, prompt_len=4000, max_seq_len=6000, traces_dir=tdir),
            "widest",
        ),
        (
            "docmergeToT_4k",
            Reasoning(file="docmergeToT.json", tree_index=0, prompt_len=4000, max_seq_len=6000, traces_dir=tdir),
            "widest",
        ),
        (
            "medusa64_4k",
            Speculative(
                file="APPS_tree_size64.json", record_index=0, prompt_len=4000, max_seq_len=5000, traces_dir=tdir
            ),
            "middle",
        ),
        *(
            (  # not in the default set: only when DEFT_SNAP_SNAPS names them (Flatten trails Node-Chunk here)
                f"medusa32_{p // 1000}k",
                Speculative(file="APPS_tree_size32.json", record_index=0, prompt_len=p, max_seq_len=p + 1000,
                            traces_dir=tdir),  # fmt: skip
                "middle",
            )
            for p in (2000, 8000)
            if any(x.startswith("medusa32") for x in os.environ.get("DEFT_SNAP_SNAPS", "").split(","))
        ),
    ):
        try:
            states = [(s.step, s.tree) for s in replay(wl.trace())]
        except Exception as e:
            print(f"workload snapshot {name} skipped: {type(e).__name__}: {e}")
            continue
        if pick == "widest":
            step, tree = max(states, key=lambda st: (st[1].n_queries, st[0]))
        else:
            step, tree = states[len(states) // 2]
        out.append((f"{name}_s{step}", tree))
    return out


def snapshots() -> list[tuple[str, DecodingTree]]:
    snaps = [(f"fewshot_{p // 1000}k_w50_step{s}", fan_tree(p, 50, s)) for p in (4000, 16000) for s in (1, 200, 399)]
    wl = workload_snapshots()
    if not any(name.startswith("medusa") for name, _ in wl):
        snaps.append(("speculative64_4k", speculative_tree(4000, 64)))
    return snaps + wl


def fresh(tree: DecodingTree) -> DecodingTree:
    """The same tree as a new object, so plan timing includes deriving DFS order and seen lengths."""
    return DecodingTree(tree.parent, tree.slot_ptr, tree.slots, tree.query_node, tree.query_visible, tree.n_slots)


def write_rows(path: Path, rows: list[dict]) -> None:
    """Rewrite the CSV atomically after every snapshot, so a killed run keeps what it measured."""
    tmp = path.with_suffix(".tmp")
    pd.DataFrame(rows).to_csv(tmp, index=False)  # the union of the rows' columns (table rows have a few more)
    tmp.replace(path)


def git_commit() -> str:
    env = os.environ.get("DEFT_GIT_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def graph_of(fn):
    """Capture ``fn`` (one layer's launches) in a CUDA graph: replaying it times the device work alone."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def measure(m, tree: DecodingTree, q, k, v, ref, kv_bytes: int, bw: float, dev) -> dict:
    """Correctness, eager and graph latency, run() host time, plan time (full and grouping only)."""
    plan = m.plan(tree, SHAPE, dev)
    digest = m.launch_digest(plan) if hasattr(m, "launch_digest") else ""  # before a later plan reuses its staging
    err = relative_error(m.run(q, k, v, plan), ref)
    run = lambda: m.run(q, k, v, plan)
    eager = time_device(run, reps=50, device=dev)
    graph = time_device(graph_of(run).replay, reps=50, device=dev)
    host_run = time_host(run, reps=20)
    out = torch.empty_like(q)
    red = lambda: launch_reduce(
        out, plan.part_o, plan.part_lse, plan.meta, plan.groups.offsets, plan.block_p, heads=plan.reduce_heads
    )  # alone, so without the programmatic dependent launch
    reduce_us = time_device(graph_of(red).replay, reps=30, device=dev).median_ms * 1e3  # alone, cold L2
    kern = getattr(m, "last_kernel", None)
    torch.cuda.synchronize(dev)
    core = os.environ.get("DEFT_PLAN_CORE")  # the plan's host time with this thread on one core ("off": unpinned)
    with pinned_thread(None if core is None else int(core)) if core != "off" else contextlib.nullcontext():
        plan_t = time_host(lambda: m.plan(fresh(tree), SHAPE, dev), reps=30)
        groups_t = time_host(lambda: m.groups(fresh(tree), SHAPE), reps=30)
    io = m.io(tree, SHAPE)
    flops = m.tensor_flops(tree, SHAPE) if hasattr(m, "tensor_flops") else (0, 0)
    g = plan.groups
    floor = floor_io(tree, SHAPE)
    return {
        "unique_kv_tokens": tree.unique_kv_tokens, "n_queries": tree.n_queries, "n_nodes": tree.n_nodes,
        "median_us": eager.median_ms * 1e3, "p10_us": eager.p10_ms * 1e3, "p90_us": eager.p90_ms * 1e3,
        "graph_us": graph.median_ms * 1e3, "graph_p90_us": graph.p90_ms * 1e3,
        "run_host_us": host_run.median_ms * 1e3, "reduce_us": reduce_us,
        "n_regs": getattr(kern, "n_regs", -1), "n_spills": getattr(kern, "n_spills", -1),
        "smem": getattr(getattr(kern, "metadata", None), "shared", -1), "plan_us": plan_t.median_ms * 1e3, "groups_us": groups_t.median_ms * 1e3,
        "rel_err": err, "achieved_TBps": kv_bytes / (eager.median_ms * 1e-3) / 1e12,
        "graph_TBps": kv_bytes / (graph.median_ms * 1e-3) / 1e12, "copy_TBps": bw / 1e12,
        "frac_copy_bw": kv_bytes / (eager.median_ms * 1e-3) / bw, "graph_frac_copy_bw": kv_bytes / (graph.median_ms * 1e-3) / bw,
        "floor_us": floor.total / bw * 1e6, "io_total": io.total, "io_kv": io.kv, "io_partial": io.partial,
        "io_floor": floor.total, "n_tiles": g.n_tiles, "n_chunks": g.n_chunks, "rows": g.rows,
        "chunk_size": g.chunk_size, "n_partials": g.n_partials,
        "plan_vs_32_layers": plan_t.median_ms / (32 * eager.median_ms),
        "launch_digest": digest, "mma_gflop": flops[0] / 1e9, "useful_gflop": flops[1] / 1e9, "graph_mma_tflops": flops[0] / (graph.median_ms * 1e-3) / 1e12,
    }  # fmt: skip


def plain_read_us(nbytes: int, dev: torch.device) -> float:
    """Graph µs of one plain read of ``nbytes`` (``torch.sum`` over a bf16 tensor that size), timed as the kernels are
    (cold L2 by the same flush, median of 50): what one launch reading the snapshot's unique K/V bytes once costs with no
    attention at all (it pays a launch's ramp and tail and, under the zeroing flush, the write-back of the flush's dirty
    L2 lines; session 19's ``pattern_bandwidth``). A reference, not a bound: torch's reduction is not the fastest read at
    every size (H100, session 20: 1.9 TB/s over few-shot 16k step 399's 147 MB, where DeFT-Flatten's step is faster)."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).normal_()
    us = time_device(graph_of(lambda: x.sum(dtype=torch.float32)).replay, reps=50, device=dev).median_ms * 1e3
    return us


def provenance(dev: torch.device) -> dict[str, str]:
    """GPU name, versions, commit and UTC time: the columns every row of these scripts carries."""
    return {
        "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
        "git_commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "l2_flush": l2_flush_mode(),
    }  # fmt: skip


def save_probe_rows(rows: list[dict], name: str, dev: torch.device) -> pd.DataFrame:
    """A probe's rows with :func:`provenance`, written to ``$OUT/<name>_<date>.csv`` (default
    ``results/h100/probe``); returns them as a frame."""
    df = pd.DataFrame(rows).assign(**provenance(dev))
    out_dir = Path(os.environ.get("OUT", "results/h100/probe"))
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / f"{name}_{datetime.date.today().isoformat()}.csv", index=False)
    return df


def inputs(tree: DecodingTree, dev):
    n_slots = tree.n_slots or int(tree.slots.max()) + 1
    q = torch.randn(tree.n_queries, SHAPE.n_heads, SHAPE.head_dim, device=dev).bfloat16()
    k = torch.randn(n_slots, SHAPE.n_kv_heads, SHAPE.head_dim, device=dev).bfloat16()
    v = torch.randn_like(k)
    return q, k, v, reference_attention(q, k, v, tree)


def sweep_summary(sweep: pd.DataFrame) -> pd.DataFrame:
    """The sweep's graph µs as snapshots x settings (in sweep order), with a geomean row and, per setting, the
    geomean of its ratio to the first setting (``default`` when swept)."""
    piv = sweep_pivot(sweep)
    first = piv.columns[0]
    geo = np.exp(np.log(piv).mean())
    ratio = np.exp(np.log(piv.div(piv[first], axis=0)).mean())
    return pd.concat([piv, geo.to_frame("geomean").T, ratio.to_frame(f"x {first}").T])


def paired(
    variants: dict[str, tuple[type, dict]], tree: DecodingTree, q, k, v, rounds: int, instances: int, dev
) -> tuple[list[dict], pd.DataFrame]:
    """Each variant built ``instances`` times apart (own method, plan, buffers and CUDA graph) and replayed in
    :func:`time_device_interleaved` rounds; rows of its median µs, its instances' medians, and its per-round ratio to
    ``flatten`` (median, two-level bootstrap 95 % interval over instances and rounds), and the samples (µs) in long
    form."""
    built: dict[str, list] = {}
    digests: dict[str, str] = {}
    for n, (cls, kw) in variants.items():
        built[n] = []
        for _ in range(instances):
            m = cls(**kw)
            p = m.plan(tree, SHAPE, dev)
            digests[n] = m.launch_digest(p) if hasattr(m, "launch_digest") else ""
            built[n].append((m, p, graph_of(lambda m=m, p=p: m.run(q, k, v, p))))
    fns = {n: [g.replay for _, _, g in b] for n, b in built.items()}
    us = {n: ms * 1e3 for n, ms in time_device_interleaved(fns, rounds=rounds, device=dev).items()}
    rows = []
    for n, x in us.items():
        med, lo, hi = paired_ratio(x, us["flatten"], instances) if n != "flatten" else (1.0, 1.0, 1.0)
        per = [float(np.median(x[i::instances])) for i in range(instances)]
        rows.append({"variant": n, "paired_us": float(np.median(x)), "paired_p10_us": float(np.percentile(x, 10)),
                     "paired_p90_us": float(np.percentile(x, 90)), "instances": instances,
                     "instance_us": "/".join(f"{u:.2f}" for u in per), "instance_spread": (max(per) - min(per)) / float(np.median(x)),
                     "vs_flatten": med, "vs_flatten_lo": lo, "vs_flatten_hi": hi, "rounds": rounds,
                     "same_launch": n != "flatten" and digests[n] == digests["flatten"], "launch_digest": digests[n]})  # fmt: skip
    samples = pd.DataFrame(
        [{"variant": n, "round": i, "instance": i % instances, "us": float(t)} for n, x in us.items() for i, t in enumerate(x)]
    )
    return rows, samples


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    t_start = time.time()
    prov = provenance(dev)
    from scripts.prompt_probe import apply_variant  # here: prompt_probe imports this module

    apply_variant(os.environ.get("DEFT_PROMPT_VARIANT"), prov)  # the Gluon prompt kernel's settings
    bw = copy_bandwidth(dev)
    print(f"{prov}  copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    date = datetime.date.today().isoformat()
    out_dir = Path(os.environ.get("OUT", "results/h100"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"kernel_snapshots_{date}.csv"
    paired_path, samples_path = out_dir / f"kernel_paired_{date}.csv", out_dir / f"kernel_paired_samples_{date}.csv"
    rounds = int(os.environ.get("DEFT_SNAP_PAIRED", "400"))
    instances = int(os.environ.get("DEFT_SNAP_INSTANCES", "4"))
    rows: list[dict] = []
    pair_rows: list[dict] = []
    pair_samples: list[pd.DataFrame] = []

    # correctness on random trees with the real shape
    rng = np.random.default_rng(0)
    worst: dict[str, float] = {}
    checks = {"flatten_" + n: (DeftFlatten, ALL_SWEEP[n]) for n in ("default", "v6", "v6_m128", "few16", "m128w4", "nopdl_h1")}
    checks |= {"node": (DeftNode, {}), "node_chunk": (DeftNodeChunk, {"chunk_min": 64})}
    for _ in range(6):
        tree = random_tree(rng, int(rng.integers(2, 40)), int(rng.integers(8, 700)))
        q, k, v, ref = inputs(tree, dev)
        for vname, (cls, kw) in checks.items():
            m = cls(**kw, chunk_min=64) if cls is DeftFlatten else cls(**kw)
            worst[vname] = max(worst.get(vname, 0.0), relative_error(m(q, k, v, tree), ref))
    print("random-tree worst rel err:", {k: f"{v:.2e}" for k, v in worst.items()}, flush=True)
    assert max(worst.values()) < TOLERANCE[torch.bfloat16], worst

    snaps = snapshots()
    only = [p for p in os.environ.get("DEFT_SNAP_SNAPS", "").split(",") if p]  # name prefixes; default: all 9
    if only:
        snaps = [(n, t) for n, t in snaps if any(n.startswith(p) for p in only)]
        if not snaps:
            raise SystemExit(f"DEFT_SNAP_SNAPS={','.join(only)} matches no snapshot")
    # sweep DeFT-Flatten configurations on the key snapshots
    score: dict[str, list[float]] = {n: [] for n in SWEEP}
    for sname, tree in snaps:
        if not any(sname.startswith(p) for p in SWEEP_SNAPSHOTS):
            continue
        q, k, v, ref = inputs(tree, dev)
        kv_bytes = tree.unique_kv_tokens * SHAPE.kv_token_bytes
        for vname, kw in SWEEP.items():
            r = measure(DeftFlatten(**kw), tree, q, k, v, ref, kv_bytes, bw, dev)
            rows.append(
                {
                    **prov,
                    "phase": "sweep",
                    "snapshot": sname,
                    "method": "deft_flatten",
                    "variant": vname,
                    "kwargs": str(kw),
                    **r,
                }
            )
            score[vname].append(r["graph_us"])
        write_rows(path, rows)
        print(f"swept {sname} ({time.time() - t_start:.0f}s)", flush=True)
    best = min(SWEEP, key=lambda n: float(np.exp(np.mean(np.log(score[n])))))
    print(
        "sweep geomean graph us:",
        {n: round(float(np.exp(np.mean(np.log(v)))), 1) for n, v in score.items()},
        "best:",
        best,
    )

    best = os.environ.get("DEFT_SNAP_TABLE_CONFIG") or best  # an ALL_SWEEP name: the table at it, not at the best
    tiles = {k: v for k, v in ALL_SWEEP[best].items() if k not in ("ctas_per_sm", "chunk_size", "snap")}
    table = {
        "flatten": (DeftFlatten, ALL_SWEEP[best]),
        "node": (DeftNode, tiles),
        "node_chunk": (DeftNodeChunk, ALL_SWEEP[best]),
        "node_chunk_default": (DeftNodeChunk, {}),
    }
    if best != "default":
        table["flatten_default"] = (DeftFlatten, {})
    keep = os.environ.get("DEFT_SNAP_TABLE")  # e.g. flatten,node_chunk: the table's variants (an ALL_SWEEP name: Flatten at it)
    if keep:
        table = {n: table[n] if n in table else (DeftFlatten, ALL_SWEEP[n]) for n in keep.split(",") if n in table or n in ALL_SWEEP}
    for sname, tree in snaps:
        q, k, v, ref = inputs(tree, dev)
        kv_bytes = tree.unique_kv_tokens * SHAPE.kv_token_bytes
        read_us = plain_read_us(kv_bytes, dev)
        for vname, (cls, kw) in table.items():
            m = cls(**kw)
            r = measure(m, tree, q, k, v, ref, kv_bytes, bw, dev)
            rows.append(
                {
                    **prov,
                    "phase": "table",
                    "snapshot": sname,
                    "method": m.name,
                    "variant": vname,
                    "kwargs": str(kw),
                    **r,
                    "read_us": read_us,
                    "graph_frac_of_read": read_us / r["graph_us"],
                }
            )
        write_rows(path, rows)
        if rounds > 0 and "flatten" in table:
            pr, ps = paired(table, tree, q, k, v, rounds, instances, dev)
            pair_rows += [{**prov, "snapshot": sname, **r} for r in pr]
            pair_samples.append(ps.assign(snapshot=sname, git_commit=prov["git_commit"], gpu=prov["gpu"]))
            write_rows(paired_path, pair_rows)
            pd.concat(pair_samples).to_csv(samples_path, index=False)
        print(f"done {sname} ({time.time() - t_start:.0f}s)", flush=True)

    import cProfile
    import io as _io
    import pstats

    tree16 = dict(snaps).get("fewshot_16k_w50_step200")
    if tree16 is not None:  # absent when DEFT_SNAP_SNAPS leaves it out
        mf = DeftFlatten()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            mf.plan(fresh(tree16), SHAPE, dev)
        prof.disable()
        buf = _io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(10)
        print("plan profile (200 plans of fewshot_16k step 200):", "\n".join(buf.getvalue().splitlines()[4:22]))

    print(f"\ncopy BW {bw / 1e12:.3f} TB/s; {prov['gpu']}; rows in {path}; table config {best}: {ALL_SWEEP[best]}")
    sweep = pd.DataFrame([r for r in rows if r["phase"] == "sweep"])
    if not sweep.empty:
        print(sweep_summary(sweep).round(3).to_string())
    if not any(r["phase"] == "table" for r in rows):
        return
    print(
        f"{'snapshot':26s} {'variant':15s} {'eager':>7s} {'graph':>7s} {'plan':>6s} {'group':>6s} {'floor':>6s} {'read':>6s} {'TB/s':>5s} {'frac':>5s} {'gfrac':>5s} {'err':>7s} tiles chunk rows TFLOP/s"
    )
    # '=': the same plan and kernels as DeFT-Flatten's at that snapshot (launch_digest), so the gap is run-to-run spread
    flat = {r["snapshot"]: r["launch_digest"] for r in rows if r["phase"] == "table" and r["variant"] == "flatten"}
    for r in rows:
        if r["phase"] == "table":
            same = "=" if r["variant"] != "flatten" and r["launch_digest"] == flat.get(r["snapshot"]) else " "
            print(
                f"{r['snapshot'][:26]:26s} {r['variant']:15s} {r['median_us']:7.1f} {r['graph_us']:7.1f} {r['plan_us']:6.0f} "
                f"{r['groups_us']:6.0f} {r['floor_us']:6.1f} {r['read_us']:6.1f} {r['achieved_TBps']:5.2f} {r['frac_copy_bw']:5.2f} "
                f"{r['graph_frac_copy_bw']:5.2f} {r['rel_err']:7.1e} {r['n_tiles']:5d} {r['chunk_size']:5d} {r['rows']:4d} "
                f"{r['graph_mma_tflops']:6.0f} {same}"
            )

    if pair_rows:
        print(
            f"\npaired: {rounds} interleaved rounds per snapshot over {instances} instances a variant; "
            "ratio = variant / DeFT-Flatten per round, median [95 % CI, instances then rounds]; instances' medians"
        )
        for r in pair_rows:
            print(
                f"{r['snapshot'][:26]:26s} {r['variant']:15s} {r['paired_us']:7.1f} "
                f"{r['vs_flatten']:6.3f} [{r['vs_flatten_lo']:.3f}, {r['vs_flatten_hi']:.3f}] {r['instance_us']:28s} {paired_verdict(r)}"
            )


if __name__ == "__main__":
    main()

"""DeFT tree attention as a method: KV-guided grouping (plan), fused partial attention plus the global
reduction (run), and the analytic HBM traffic of exactly that tiling (io).

The three paper variants (Flatten, Node, Node-Chunk) subclass :class:`DeftAttention` and only pick the
grouping mode; see ``deft_flatten.py`` and ``deft_node.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from deft.attention import (
    DTYPES,
    AttentionMethod,
    AttentionShape,
    IOCounts,
    Plan,
    UnsupportedInput,
    check_inputs,
)
from deft.kernels import plan_native
from deft.kernels.branch_heads import heads_per_program, launch_branch_heads
from deft.kernels.global_reduce import launch_reduce, pdl_supported, reduce_heads
from deft.kernels.kv_groups import (
    CLASS_BIG_AFFINE,
    CLASS_BIG_PLAIN,
    CLASS_SMALL_PLAIN,
    FLAG_CONTIG,
    FLAG_MASK,
    FLAG_SHIFT,
    MODES,
    KVGroups,
    auto_chunk_size,
    build_groups,
    one_rest_tile_per_query,
    order_tiles_longest_first,
    partition_small_last,
    rest_all_small,
    rest_small_unmasked,
    small_tile_rows,
    split_long_small_tiles,
    spread_rest_tiles,
    tile_classes,
)
from deft.kernels.launch_model import lpt_makespan
from deft.kernels.staging import PinnedStaging
from deft.kernels.tree_attention import launch_partials
from deft.tree import DecodingTree

#: head dims the kernels take; 64 and 128 are the models', 16 and 32 keep interpreter tests small
HEAD_DIMS = (16, 32, 64, 128)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
#: int32 fields per tile record (token range, query range, partial base, mask flag)
TILE_FIELDS = 6
#: widths the reduction kernel is compiled for (a plan picks the one that holds its most partials per query)
REDUCE_BLOCKS = (2, 4, 8, 16, 32, 64)
#: ``prompt_order``: how a Gluon plan's second launch follows the prompt kernel (see :class:`DeftAttention`)
PROMPT_ORDERS = ("chain", "streams")
#: (device, shape, configuration) keys whose kernel variants are all compiled in this process
_PRECOMPILED: set[tuple] = set()


@dataclass(frozen=True, eq=False)
class DeftPlan(Plan):
    """One step's DeFT plan: the packed index array on the device, its section views and the workspace."""

    groups: KVGroups
    meta: torch.Tensor
    part_o: torch.Tensor  # the method's workspace; rows [0, groups.n_partials) are this plan's
    part_lse: torch.Tensor
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    block_p: int
    reduce_heads: int  # query heads per reduction program
    pdl: bool  # the reduction is a programmatic dependent launch of the partial kernel
    unified: bool = False  # the partial kernel's UNIFIED variant (DeftAttention.unified_mask)
    affine_big: bool = False  # the partial kernel's AFFINE_BIG variant (DeftAttention.specialise)
    n_big: int = -1  # split_launch: tiles [0, n_big) run in the big tiles' launch, the rest in the small one; -1: one
    small_rows: int = 0  # split_launch: the small launch's tile rows
    split: tuple = ()  # split_launch: the launches (DeftAttention._split_launches), made once per plan, not per layer
    counters: torch.Tensor | None = None  # fused_reduce: per (query, head) int32 counters, zero between launches
    n_prompt: int = 0  # prompt_kernel="gluon": tiles [0, n_prompt) run in the Gluon prompt kernel, the rest after them
    n_pairs: int = 0  # prompt_kernel="gluon": of those, the pairs of records [2c, 2c + 1] (one CTA each)
    rest: tuple = ()  # prompt_kernel="gluon": the rest's (meta view, section offsets), made once per plan
    rest_rows: int = 0  # small_rest: the rest's launch compiled for these tile rows alone (0: the fused kernel's)
    rest_args: dict | None = None  # small_rest: that launch's arguments (DeftAttention.rest_launch_args), once per plan
    rest_heads: int = 0  # branch_heads: the rest runs in the branches' kernel with these rows per KV head (0: not)
    rest_programs: int = 0  # branch_heads with branch_spread: its programs per block of KV heads (0: one per tile)
    merge: bool = False  # branch_merge: the branches' kernel merges every query's partials (no reduction launch)


class _PlanContext:
    """A method's per-(device, shape) plan state (see :meth:`DeftAttention._plan_context`)."""

    __slots__ = ("staging", "device_name", "pdl", "launch", "heads", "compiled")

    def __init__(self, staging: PinnedStaging | None, device_name: str, pdl: bool) -> None:
        self.staging = staging
        self.device_name = device_name
        self.pdl = pdl
        self.launch: dict[int, tuple[int, int]] = {}  # tile rows -> (warps, stages)
        self.heads: dict[int, int] = {}  # reduction width -> query heads per program
        self.compiled = False  # every kernel variant compiled (DeftAttention._precompile) in this process


def wide_tokens(tree: DecodingTree, group: int, block_m: int) -> tuple[int, int]:
    """(seen tokens of ``tree``'s wide nodes, the most rows any of them has; 0 when none is wide): a wide node has
    more than ``block_m`` rows (queries in its subtree x ``group``). The reference for
    :func:`~deft.kernels.plan_native.wide_tokens_native`."""
    tin, size = tree.tin, tree.subtree_size
    q_tin = np.sort(tin[tree.query_node])
    rows = (np.searchsorted(q_tin, tin + size) - np.searchsorted(q_tin, tin)) * group
    wide = rows > block_m
    if not wide.any():
        return 0, 0
    return int(tree.node_seen_len[wide].sum()), int(rows[wide].max())


#: the shares of a wave ``wide_pick`` chooses the wide nodes' budget from (besides ``wide_waves``'): on session 13's H100
#: sweep the best of 0.7-1.0 was one of these, or within 1 % of one, on all 9 snapshots
WIDE_PICK_SHARES = (0.75, 0.9, 1.0)
#: ``wide_pick`` leaves ``wide_waves``' share only for one the launch model prices at least this much faster
WIDE_PICK_MARGIN = 0.01


class DeftAttention(AttentionMethod):
    """DeFT tree attention (arXiv 2404.00242) with GQA-aware tiles, paged token-granular KV.

    ``chunk_size``: fixed chunk size in tokens (Flatten, Node-Chunk); ``None`` picks per tree the
    number of chunks that gives about ``ctas_per_sm`` programs per SM, chunks kept within
    ``[chunk_min, chunk_max]``. ``block_m``: most tile rows (queries x heads per KV head); ``block_n``:
    K/V tokens per inner step. ``num_warps``/``num_stages``: ``None`` picks by tile rows. ``prefetch``:
    load the next K/V block into registers before computing the current one. ``idx_inloop``: load
    each block's slot indices inside the loop (the gather idiom Triton pipelines several blocks ahead)
    instead of one block ahead by hand. ``snap`` (Flatten): cut at a node boundary within ``snap`` x
    chunk size of the balanced cut (see :func:`~deft.kernels.kv_groups.build_groups`). ``small_m``:
    tiles whose rows (queries x group) fit this many run a small tile in the same launch (a branch
    with one query does a quarter of a 64-row tile's tensor-core work per token); 0 disables it.
    ``few_split`` (Flatten only; 0 = off; :class:`~deft.kernels.deft_flatten.DeftFlatten` defaults to 16):
    runs of chunks over several nodes whose queries x group fit this many rows (a fan's branches) are cut as
    Node-Chunk cuts them, so they need no visibility mask. H100, session 7, side by side: few-shot 4k step 399
    78.8 -> 73.6 µs, geomean of 7 snapshots 55.3 -> 55.1 µs. Session 6's end-to-end slow steps with it turned
    out to be the GPU host's, not its own (notes/deft_kernels.md, session 7). ``contiguous``: unmasked tiles whose
    tokens the plan found in consecutive pool slots (a prefilled prompt) address K/V affinely instead of
    loading a slot index per token (4-7 % faster on the few-shot 16k snapshots, notes/deft_kernels.md).
    ``wide_waves`` (Flatten and Node-Chunk; 0.9 by default, 0 = off): nodes whose queries need two
    or more row tiles (a shared prompt) get long chunks, about ``wide_waves`` waves of programs at
    ``wide_ctas_per_sm`` resident programs per SM; the rest keeps ``chunk_size``. 0.9 rather than a whole wave
    leaves resident slots for the other tiles (a token tree's, a few-shot step's leaves): H100, session 10, 9
    snapshots, geomean 52.2 -> 49.8 µs (few-shot 4k step 1 34.4 -> 27.2, 16k step 200 86.9 -> 80.2, Medusa 64
    35.9 -> 31.4; few-shot 16k step 1 64.0 -> 69.5, where the longer prompt programs are the critical path).
    ``lpt`` (on by default since session 7): launch the tiles longest first, across all KV heads (plan: tiles
    sorted by an estimated cost, :func:`~deft.kernels.kv_groups.order_tiles_longest_first`; kernel: a 1-D grid
    with a tile's KV heads next to each other), so long programs do not start last. H100, 7 sweep snapshots:
    geomean 58.8 -> 56.1 µs; few-shot 16k step 200 121 -> 95 µs (notes/deft_kernels.md, session 7).
    ``mix`` (with ``lpt``; 0.75 by default since session 10, 0 = off): then alternate big and small tiles when
    the costliest big tile is at most ``mix`` x the average load of the programs per KV head that are resident at
    once (``wide_ctas_per_sm`` x SMs / KV heads; :func:`~deft.kernels.kv_groups.order_tiles_longest_first`): a
    tensor-bound and an HBM-bound program share an SM better than two of a kind, unless the big tiles are the
    step's critical path. The rule picks exactly the order that session 8's probe measured 6-7 % faster at
    few-shot 4k steps 200 and 399, keeps longest-first at 16k (where alternating was 3-23 % slower), and alternates
    docmergeToT's tiles. Measured as a rule (H200, session 10, 9 snapshots, graph µs): few-shot 4k steps 200 / 399
    49.9 -> 46.3 and 60.3 -> 57.5, the rest within 1 µs; geomean 49.9 -> 49.2 (notes/deft_kernels.md, session 10).
    Those runs counted ``ctas_per_sm`` x SMs / KV heads programs with ``mix=1.5``, the same decisions at the
    default ``ctas_per_sm=4``; counting the resident programs instead keeps a change of ``ctas_per_sm`` (which
    changes the chunking, not residency) from flipping the rule (``ctas_per_sm=3`` flipped it on the 16k trees,
    18-21 % slower there).
    ``fill_tiles`` (off by default: measured slower, H200 session 10, geomean 49.9 -> 55.5 µs, few-shot 16k step 1
    63.7 -> 97.6 µs, the rest tiles re-reading their chunk from HBM after the big tiles' wave): a chunk with more
    queries than a tile holds is cut into full tiles and the rest (a small tile when it fits one: 50 few-shot
    queries at GQA 4 are 3 x 64 rows + 8, instead of 4 x 52 rows padded to 64), instead of near-equal slices; the
    wide nodes' budget (``wide_waves``) then counts only the big tiles.
    ``reduce_heads``: query heads per program of the global reduction (1 by default; 0: as many as fit a
    4096-element tile, :func:`~deft.kernels.global_reduce.reduce_heads`); the reduction runs one warp per program
    up to 4096-element tiles. H100, session 8, the reduction alone at few-shot 16k step 200: 6.4 µs with one warp,
    13.9 µs with four (the earlier default), 25 µs with four heads per program on eight warps.
    ``pdl`` (on by default; Hopper and later, else ignored): the reduction is a programmatic dependent launch that
    the partial kernel's programs trigger as they start, so its launch and list loads overlap the partial kernel's
    tail (H100: 0.4-1.3 µs less per layer in CUDA graphs, 1-3.6 µs eager).
    ``unified_mask`` (``"auto"`` by default since session 11; ``True`` always, ``False`` never): the partial kernel's
    UNIFIED variant, in which a big tile's gathered tokens run one loop that applies the visibility test only from
    its masked phase on, instead of one copy of the loop per phase, and masked tiles always run the big tile, so the
    small tile compiles only its plain gathered loop: about 5,300 SASS instructions instead of 7,500. In the smaller
    kernel the shared prompt's affine programs run 11 % faster; the tested loop costs the tiles that would run the plain gathered loop 18-28 % (a reasoning tree's
    multi-query branches). ``"auto"`` picks UNIFIED for a plan with no such tile (:meth:`unified_for`). H100,
    session 11, 11 snapshots, graph µs: geomean 44.4 -> 42.8 (always: 43.5); few-shot 16k step 200 79.8 -> 74.8,
    step 1 68.6 -> 63.3, Medusa 64 31.2 -> 29.6; the reasoning trees unchanged (notes/deft_kernels.md).
    ``specialise`` (off by default; session 12): a plan whose tiles are all big ones over consecutive slots without a
    masked phase, or small unmasked ones (a shared prompt and one query per branch: the few-shot steps after the
    first), runs the partial kernel's AFFINE_BIG variant, compiled with the affine loop as the big tile's only one
    (about 2,900 SASS instructions and 187 registers instead of 5,300 and 227) (:meth:`affine_for`; the tile
    classes come from the C plan's ordering pass, :func:`~deft.kernels.kv_groups.tile_classes`).
    ``split_launch`` (off by default; session 12): the small tiles (rows up to the small tile's: one-query branches,
    a token tree's leaves) run in a launch of their own, compiled for their rows with K/V blocks of
    ``small_block_n`` tokens, on a side stream that starts with the big tiles' launch and joins before the
    reduction (:meth:`_run_split`): the big tiles' kernel then holds no small tile's loops, and the small one, with
    its fewer registers and its smaller K/V stages, fits more programs per SM (a tree of 50 one-query branches of
    200 tokens alone: 36.9 -> 29.5 µs with 16-row tiles and 32-token blocks, H100, session 12). Measured slower on
    the snapshots, H100, session 12, one call, graph µs: geomean of 9 47.8 -> 50.2 (``small_block_n=64``: 48.5),
    few-shot 16k step 200 75.0 -> 80.8 (77.2); it stays off (notes/deft_kernels.md, session 12).
    ``rest_chunk`` (0 = off; session 13): small tiles without a masked phase longer than this many tokens run in
    pieces of at most that many, each with partial rows of its own (:func:`~deft.kernels.kv_groups.split_long_small_tiles`;
    with ``fill_tiles``, a shared prompt's rest queries then run beside the big tiles, not after them). Measured with
    ``fill_tiles``, slower: H100, session 13, 9 snapshots, graph µs, geomean 47.8 -> 53.3-53.5 (``fill_tiles`` alone 56.6),
    few-shot 16k step 200 74.5 -> 90.0 (rest pieces of 1,024 tokens): the prompt's 64-row programs drop to 44-45 µs, but the
    small tile runs a prompt token at 34-55 ns against the big tile's 25, so the rest costs more than the rows it saves.
    ``small_stages`` (5 by default since session 13; 0 = the launch's ``num_stages``) and ``small_block`` (32 by
    default; 0 = ``block_n``): the small tile's gathered loops pipelined 5 stages deep (two K/V blocks in flight instead
    of one, in shared memory the big tile has anyway) over 32-token K/V blocks (``small_block_n`` is the split launch's).
    H100, session 13, two calls, 9 snapshots, graph µs, each setting swept twice in the second: geomean 47.9 / 48.0 ->
    47.1 / 47.2 (few-shot 4k step 200 50.4 -> 47.8, 16k step 200 75.2 -> 73.2, step 399 92.5 -> 90.7, sorting128ToT
    32.9 -> 32.3; none slower by more than 0.3); 5 stages alone 47.6 -> 47.6, 32-token blocks alone 47.9 -> 50.0.
    ``wide_pick`` (off by default; session 13, not yet measured as a rule): the wide nodes' share of the wave chosen per
    tree, among ``wide_waves`` and :data:`WIDE_PICK_SHARES`, by the launch model (:mod:`deft.kernels.launch_model`: each
    candidate plan's programs priced in µs by class, longest first on the resident slots); a candidate replaces
    ``wide_waves``' share only when modelled :data:`WIDE_PICK_MARGIN` faster. Each candidate is a whole plan, so the
    plan's host time grows six- to eightfold with it (17-31 -> 130-210 µs on the development CPU). Against session 13's
    H100 sweep of fixed shares (0.7-1.0, graph µs) its choice was the measured best, or within 0.5 % of it, on 6 of 9
    snapshots and 1.5-3.5 % behind on three; the geomean at its choices 46.7 against 0.9's 47.5 (few-shot 16k step 1
    7 % and 4k step 200 6 % faster, none slower). Not yet run as a rule on a GPU.
    ``small_affine`` (off by default; session 14): the small tile compiles the affine loop as well and runs a tile over
    consecutive slots with it (with ``contiguous``): what a filled prompt chunk's rest rows (``fill_tiles``) need,
    which session 13 saw gather a prompt token at 40-55 ns against the big tile's 25. Measured with ``fill_tiles``,
    still slower: H200, session 15, 9 snapshots, graph µs, geomean 44.0 -> 50.5, few-shot 16k step 200 70.4 -> 91.8,
    step 1 62.1 -> 91.0 (``results/h200/kernel_snapshots_2026-12-05_s15_knobs.csv``).
    ``fused_reduce`` (off by default; session 14): no reduction launch; each program counts its stored partial rows on
    per-(query, head) counters and the one that completes a row's count merges that row
    (:func:`~deft.kernels.tree_attention._merge_if_last`). Timed after the partial kernel in session 12-13's H100
    timelines, the separate reduction took 5.2-7.6 µs (a sixth of a Medusa step; the programmatic dependent launch hides
    part of that in a real step); the fused one adds an atomic round trip to every program and a merge to the last.
    Measured slower on every snapshot (session 15, graph µs): H100, few-shot 16k step 200 72.7 -> 75.2, 4k step 200
    47.1 -> 52.6, docmergeToT 38.4 -> 67.7; H200, geomean of 9 44.0 -> 54.0. The merger reads a row's partials two at
    a time through three dependent loads (list, LSEs, outputs) at the end of the launch, a serial tail the separate
    reduction, spread over the GPU, does not have: the loss follows partials per query (docmergeToT 37, +76 % on
    the H100; sorting128ToT 18, +40 % on the H200; the few-shot steps 8-9, +3-20 %).
    ``l2_prefetch`` (off by default; session 14; measured 0.5-2 % slower, H100, 3 snapshots, and 1-4 % on H200's 9,
    session 15): each program asks L2 for its first two K/V blocks
    (``prefetch.global.L2``) between loading its query records and its queries. In the compiled kernel the queries'
    store to shared memory comes before the loop's first K/V copy, so a tile waited for the query chain and then for
    the K/V chain; with the prefetch the two run side by side (sm_90 SASS: the prefetches issue beside the query
    loads). A hint: results do not change, and the interpreter skips it.
    ``big_gather_block`` / ``big_gather_stages`` (0: ``block_n`` / the launch's ``num_stages``; session 14; 32 x 5
    measured within 1 % of the default either way, H100 3 snapshots, H200 9 (geomean 44.1 against 44.0 µs), session
    15): the big tile's loops over gathered slots (a reasoning tree's multi-query branches, masked tiles) with
    their own K/V block and depth, as ``small_block`` / ``small_stages`` are for the small tile. At 64-token blocks and
    3 stages such a loop has one block in flight (its slot indices take a stage); session 13's fit prices a big
    gathered token at 47 ns against an affine one's 19. 32-token blocks at 5 stages compile to the same 112 KB of
    shared memory (220 registers, sm_90, UNIFIED).
    ``prompt_kernel`` (``"gluon"`` by default since session 16; ``"triton"``: every tile in the fused kernel's one
    launch): a shared prompt's row tiles (unmasked, over
    consecutive slots, 17-64 rows, at least ``prompt_min_tokens`` tokens (and 128);
    :func:`~deft.kernels.prompt_gluon.prompt_tile_mask`) run in a
    Gluon kernel of their own (:mod:`deft.kernels.prompt_gluon`: TMA ring, warp-specialised producer, two consumer
    warpgroups on asynchronous ``wgmma`` taking turns, one tile record each) on the current stream, and the other
    tiles in the fused kernel beside it (``prompt_order``, below); the reduction waits for both. Off a Hopper GPU,
    or on pools a TMA descriptor cannot address, the prompt tiles run in the fused kernel instead, in a launch of
    their own (same plan, same partials: how the CPU tests check the split). ``prompt_min_tokens`` (2048) and
    ``prompt_share`` (1.25, session 22; 1.1 before; 0: ``wide_waves``' fixed share) decide per tree (:meth:`prompt_plan`): the Gluon kernel's
    CTAs hold an SM each for a whole chunk, so it pays only on long prompt chunks, and the prompt's share of the SMs
    should follow its share of the step's tokens. H100, session 16, graph µs (``results/h100/kernel_snapshots_2026-12-06_s16*``):
    few-shot 16k steps 1 / 200 / 399 62.2 / 72.9 / 89.9 -> 51.6 / 62.9 / 76.5 (the launches the rule makes, measured
    as fixed shares 0.9 / 0.67 / 0.5 in one call); on the 4k snapshots, the reasoning trees and Medusa (prompt chunks
    of 160-670 tokens) the Gluon kernel was slower at every share tried (4k step 1 25.5 -> 31-33, docmergeToT 38.0 ->
    52-55), and the rule leaves their plans as they were (equal ``launch_digest``). Session 18 raised
    ``prompt_min_tokens`` from 1024 to 2048: the paper sweeps' prompts with two row tiles per chunk (few-shot width 20
    and 30, Medusa 32; chunks of 1.1-1.4k tokens at the wide budget) ran 8-13 % slower over the trace in the Gluon
    kernel at 16k-20k, those with four (width 50, Medusa 64; 2.3k tokens and more) 10-22 % faster.
    ``small_rest`` (off by default; session 17) and ``rest_stages`` (0: ``small_stages``): with the Gluon prompt
    kernel, when every tile after its own is small (one-query branches), the rest's launch is the partial
    kernel compiled for the small tile's rows alone (:meth:`rest_launch_args`: 115 registers and 39 KB at 5 stages,
    four programs per SM, instead of 225 and 112 KB). H100, session 17: the branches alone 25.5 -> 25.0 µs (Nsight
    Compute), the few-shot 16k steps no faster (graph µs, geomean of three 64.2 -> 65.4; 3 stages 66.7).
    ``branch_heads`` (on by default from session 22; session 19), ``branch_block_h`` (2), ``branch_warps`` (2),
    ``branch_block_n`` / ``branch_stages`` / ``branch_maxnreg`` and ``branch_spread`` (0): with the Gluon prompt kernel,
    when every tile after its own is small and unmasked (one-query branches), the rest's launch is the branches' kernel
    (:mod:`deft.kernels.branch_heads`: a program loads a token's K and V rows for ``branch_block_h`` KV heads at once),
    one program per (tile, block of heads), or with ``branch_spread`` > 0 that many times the SMs the prompt kernel
    leaves, each over an equal run of tile pieces (:meth:`branch_programs`). H100, session 22, graph µs at few-shot 16k
    steps 1 / 200 / 399, with ``prompt_share`` 1.25: 43.4 / 54.5 / 66.1 (the fused kernel's rest, share 1.1) -> 44.3 /
    49.6 / 63.3 (two heads at two warps: 168 registers and 25 KB, several programs per SM, so the prompt kernel's sixth
    chunk at step 200 leaves its 36 SMs enough; all 8 heads at 8 warps take an SM's registers alone and ran in two
    waves there, 72 µs); over the width-50 few-shot traces 8 % less attention time at 16k and 20k, widths 20 and 30
    unchanged (``notes/deft_kernels.md``, session 22). H100, session 19,
    graph µs: few-shot 16k step 200 61.5-62.4 -> 59.3-60.1 (one program per tile, 3 stages), but step 399 73.8-74.6 ->
    76.2-77.3, and over the whole width-50 trace at 16k and 20k no net change (within the +-2 % spread of the default's
    repeats): the branches' kernel moves its bytes faster alone (24.9 against 42 µs on the 52 SMs the prompt leaves at
    step 200, 5 stages) and takes them from the prompt kernel in the step (``notes/deft_kernels.md``, session 19).
    ``branch_merge`` (off; session 21; needs ``branch_heads`` and ``branch_spread=0``): where every query is in exactly
    one tile after the prompt kernel's (:func:`~deft.kernels.kv_groups.one_rest_tile_per_query`) and the rest is chained
    to the Gluon kernel, the branches' kernel does the global reduction (no reduction launch): the prompt kernel's
    warpgroups count their partials stored in a word of the method's (release), each branch program waits for the count
    (acquire) and merges its queries' partial rows into the output (:mod:`deft.kernels.branch_heads`). H100, session 21,
    graph µs at few-shot 16k step 200: 56.3-56.6 against 52.3-52.8 without the merge (no reduction launch, but the
    prompt's warpgroups end ~1.8 µs later and the wait and the merge add 4.8 µs after them); :meth:`merge_errors` counts
    waits that gave up.
    ``prompt_order`` (``"chain"`` by default since session 20; ``"streams"`` before): how a Gluon plan's second launch
    (the rest) follows the prompt kernel. ``"chain"``: on the same stream, launched as a programmatic dependent (PDL)
    of the prompt kernel, whose CTAs run ``griddepcontrol.launch_dependents`` as they start, so the rest starts once
    every prompt CTA holds its SM, and the reduction after it (a plain launch) waits for both (the H100 runs a plain
    launch after a PDL secondary only once the primary has ended too: ``scripts/pdl_order_probe.py``). ``"streams"``:
    on a side stream forked before the prompt kernel and joined after; which of the two launches the GPU starts first
    is then a race, and in a CUDA graph that the rest's 400 programs won (their two programs per SM took every SM, the
    prompt's CTAs waited for them) the step took 100 µs instead of 75 (H100, session 20, few-shot 16k step 399, one of
    three graphs captured). H100, session 20, graph µs, few-shot 16k steps 1 / 200 / 399: 52.2 / 63.3 / 75.9 ->
    50.1 / 60.6 / 72.9.
    ``leaf_split`` (on; session 23; Flatten with ``few_split``): on a tree whose prompt goes to the Gluon kernel, with
    ``branch_heads``, a chunk whose nodes are all leaves counts as few whatever its queries and is cut at its nodes
    (:meth:`leaf_split_for`): few-shot 16k step 1's 50 one-token leaves go to the branches' kernel as one-query tiles,
    Node-Chunk's launch, instead of four masked query slices each reading all 50 tokens (H100, session 23, paired over
    400 rounds: the packed tiles 2.2-2.4 % slower).
    ``partial_dtype``: ``"input"`` stores partial outputs in q's dtype (half the bytes of
    ``"float32"``; measured faster on H100, notes/deft_kernels.md); LSEs are always fp32. ``autotune``: on first CUDA plan, load (or measure and
    cache) the best of a few tree-independent configurations for this GPU and shape.
    """

    name = "deft"
    mode = "flatten"

    def __init__(
        self,
        chunk_size: int | None = None,
        chunk_min: int = 128,
        chunk_max: int = 4096,
        ctas_per_sm: float = 4.0,
        block_m: int = 64,
        block_n: int = 64,
        num_warps: int | None = None,
        num_stages: int | None = None,
        partial_dtype: str = "input",
        prefetch: bool = False,
        autotune: bool = False,
        n_sms: int | None = None,
        snap: float = 0.3,
        idx_inloop: bool = True,
        small_m: int = 16,
        few_split: int = 0,
        contiguous: bool = True,
        wide_waves: float = 0.9,
        wide_ctas_per_sm: int = 2,
        lpt: bool = True,
        mix: float = 0.75,
        fill_tiles: bool = False,
        reduce_heads: int = 1,
        pdl: bool = True,
        unified_mask: bool | str = "auto",
        specialise: bool = False,
        split_launch: bool = False,
        small_block_n: int = 32,
        rest_chunk: int = 0,
        small_stages: int = 5,
        small_block: int = 32,
        wide_pick: bool = False,
        small_affine: bool = False,
        fused_reduce: bool = False,
        l2_prefetch: bool = False,
        big_gather_block: int = 0,
        big_gather_stages: int = 0,
        prompt_kernel: str = "gluon",
        prompt_min_tokens: int = 2048,
        prompt_share: float = 1.25,
        small_rest: bool = False,
        rest_stages: int = 0,
        branch_heads: bool = True,
        branch_block_n: int = 16,
        branch_stages: int = 3,
        branch_warps: int = 2,
        branch_spread: float = 0.0,
        prompt_order: str = "chain",
        branch_merge: bool = False,
        branch_block_h: int = 2,
        branch_maxnreg: int = 0,
        leaf_split: bool = True,
    ) -> None:
        self.__dict__["_gargs"] = {}  # per shape: build_groups' arguments and their C form (_group_args)
        self.__dict__["_ctx"] = {}  # per (device, shape): the plan context (_plan_context)
        self.__dict__["_descriptors"] = {}  # prompt_kernel="gluon": the pools' TMA descriptors (prompt_gluon._descriptor)
        if partial_dtype not in ("input", "float32"):
            raise ValueError(f"partial_dtype must be 'input' or 'float32', got {partial_dtype!r}")
        if block_m not in (16, 32, 64, 128, 256) or block_n not in (16, 32, 64, 128):
            raise ValueError(f"block_m {block_m} / block_n {block_n} must be powers of two (16..256 / 16..128)")
        self.chunk_size = chunk_size
        self.chunk_min = int(chunk_min)
        self.chunk_max = int(chunk_max)
        self.ctas_per_sm = float(ctas_per_sm)
        self.block_m = int(block_m)
        self.block_n = int(block_n)
        self.num_warps = num_warps
        self.num_stages = num_stages
        self.partial_dtype = partial_dtype
        self.prefetch = bool(prefetch)
        self.autotune = autotune
        self._n_sms = n_sms
        if not 0.0 <= float(snap) < 0.5:
            raise ValueError(f"snap must be in [0, 0.5), got {snap}")
        self.snap = float(snap)
        self.idx_inloop = bool(idx_inloop)
        self.small_m = int(small_m)
        if int(few_split) < 0:
            raise ValueError(f"few_split must be >= 0, got {few_split}")
        self.few_split = int(few_split)
        self.contiguous = bool(contiguous)
        if float(wide_waves) < 0 or int(wide_ctas_per_sm) < 1:
            raise ValueError(f"wide_waves must be >= 0 and wide_ctas_per_sm >= 1, got {wide_waves}, {wide_ctas_per_sm}")
        self.wide_waves = float(wide_waves)
        self.wide_ctas_per_sm = int(wide_ctas_per_sm)
        self.lpt = bool(lpt)
        if not 0.0 <= float(mix) < 1e18:
            raise ValueError(f"mix must be >= 0 (0: off), got {mix}")
        self.mix = float(mix)
        self.fill_tiles = bool(fill_tiles)
        if int(reduce_heads) < 0:
            raise ValueError(f"reduce_heads must be >= 0 (0: auto), got {reduce_heads}")
        self.reduce_heads = int(reduce_heads)
        self.pdl = bool(pdl)
        if unified_mask not in (False, True, "auto"):
            raise ValueError(f"unified_mask must be false, true or 'auto', got {unified_mask!r}")
        self.unified_mask = unified_mask if unified_mask == "auto" else bool(unified_mask)
        self.specialise = bool(specialise)
        self.split_launch = bool(split_launch)
        if small_block_n not in (16, 32, 64, 128):
            raise ValueError(f"small_block_n must be 16, 32, 64 or 128, got {small_block_n}")
        self.small_block_n = int(small_block_n)
        if int(rest_chunk) < 0:
            raise ValueError(f"rest_chunk must be >= 0 (0: off), got {rest_chunk}")
        self.rest_chunk = int(rest_chunk)
        if int(small_stages) != 0 and not 2 <= int(small_stages) <= 8:
            raise ValueError(f"small_stages must be 0 (the launch's num_stages) or 2..8, got {small_stages}")
        self.small_stages = int(small_stages)
        if small_block not in (0, 16, 32, 64, 128):
            raise ValueError(f"small_block must be 0 (block_n) or 16, 32, 64 or 128, got {small_block}")
        self.small_block = int(small_block)
        self.wide_pick = bool(wide_pick)
        self.small_affine = bool(small_affine)
        if fused_reduce and split_launch:
            raise ValueError("fused_reduce runs the reduction inside the one partial launch; split_launch has two")
        self.fused_reduce = bool(fused_reduce)
        self.l2_prefetch = bool(l2_prefetch)
        if big_gather_block not in (0, 16, 32, 64, 128):
            raise ValueError(f"big_gather_block must be 0 (block_n) or 16, 32, 64 or 128, got {big_gather_block}")
        if int(big_gather_stages) != 0 and not 2 <= int(big_gather_stages) <= 8:
            raise ValueError(f"big_gather_stages must be 0 (the launch's num_stages) or 2..8, got {big_gather_stages}")
        self.big_gather_block = int(big_gather_block)
        self.big_gather_stages = int(big_gather_stages)
        if prompt_kernel not in ("triton", "gluon"):
            raise ValueError(f"prompt_kernel must be 'triton' or 'gluon', got {prompt_kernel!r}")
        self.prompt_kernel = prompt_kernel
        if int(prompt_min_tokens) < 0:
            raise ValueError(f"prompt_min_tokens must be >= 0, got {prompt_min_tokens}")
        self.prompt_min_tokens = int(prompt_min_tokens)
        if float(prompt_share) < 0:
            raise ValueError(f"prompt_share must be >= 0 (0: wide_waves' fixed share), got {prompt_share}")
        self.prompt_share = float(prompt_share)
        self.small_rest = bool(small_rest)
        if int(rest_stages) != 0 and not 2 <= int(rest_stages) <= 8:
            raise ValueError(f"rest_stages must be 0 (small_stages) or 2..8, got {rest_stages}")
        self.rest_stages = int(rest_stages)
        self.branch_heads = bool(branch_heads)
        if branch_block_n not in (16, 32, 64):
            raise ValueError(f"branch_block_n must be 16, 32 or 64, got {branch_block_n}")
        if not 1 <= int(branch_stages) <= 8 or branch_warps not in (2, 4, 8, 16):
            raise ValueError(f"branch_stages must be 1..8 and branch_warps 2, 4, 8 or 16, got {branch_stages}, {branch_warps}")
        self.branch_block_n = int(branch_block_n)
        self.branch_stages = int(branch_stages)
        self.branch_warps = int(branch_warps)
        if not 0.0 <= float(branch_spread) <= 16.0:
            raise ValueError(f"branch_spread must be in [0, 16] (0: one program per tile), got {branch_spread}")
        self.branch_spread = float(branch_spread)
        if prompt_order not in PROMPT_ORDERS:
            raise ValueError(f"prompt_order must be one of {PROMPT_ORDERS}, got {prompt_order!r}")
        self.prompt_order = prompt_order
        if branch_merge and not (branch_heads and float(branch_spread) == 0):
            raise ValueError("branch_merge needs branch_heads=True and branch_spread=0 (one program per branch tile)")
        self.branch_merge = bool(branch_merge)
        if branch_block_h < 0 or branch_block_h & (branch_block_h - 1):
            raise ValueError(f"branch_block_h must be 0 (as many as fit) or a power of two, got {branch_block_h}")
        self.branch_block_h = int(branch_block_h)
        if branch_maxnreg and not 24 <= int(branch_maxnreg) <= 255:
            raise ValueError(f"branch_maxnreg must be 0 (the compiler's choice) or 24..255, got {branch_maxnreg}")
        self.branch_maxnreg = int(branch_maxnreg)
        self.leaf_split = bool(leaf_split)
        self._tuned: dict[tuple, dict[str, Any]] = {}
        self._config_source = "constructor"
        self._staging: dict[torch.device, PinnedStaging] = {}
        self._ws: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._counters: dict[torch.device, torch.Tensor] = {}  # fused_reduce: zero between launches
        self._sync: dict[torch.device, torch.Tensor] = {}  # branch_merge: the prompt's count, zero between launches
        self._side: dict[torch.device, torch.cuda.Stream] = {}  # split_launch: the small tiles' stream

    def __setattr__(self, name: str, value: Any) -> None:
        """Setting a knob (a constructor argument, ``mode``, the SM count) drops the cached plan arguments."""
        object.__setattr__(self, name, value)
        if name in _KNOBS:
            self.__dict__["_gargs"] = {}
            self.__dict__["_ctx"] = {}

    @classmethod
    def unavailable_reason(cls) -> str | None:
        import os

        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            return "needs a CUDA GPU (or TRITON_INTERPRET=1 for the Triton interpreter on CPU)"
        return None

    # ------------------------------------------------------------------ configuration
    @property
    def n_sms(self) -> int:
        if self._n_sms is None:
            self._n_sms = (
                torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
            )
        return self._n_sms

    def chunk_for(self, tree: DecodingTree | None, shape: AttentionShape) -> int:
        """The chunk size this method uses for ``tree`` (0 for one chunk per node)."""
        if self.mode == "node":
            return 0
        if self.chunk_size:
            return int(self.chunk_size)
        if tree is None:
            raise ValueError("chunk_for(None, shape) needs a fixed chunk_size: the automatic one depends on the tree")
        return auto_chunk_size(tree.unique_kv_tokens, *self.chunk_policy(shape))

    def groups(
        self, tree: DecodingTree, shape: AttentionShape, out_alloc=None, share: float | None = None, leaf: bool = False
    ) -> KVGroups:
        """The KV-guided grouping of ``tree`` (host only); ``share``: the wide nodes' share of a wave, for
        ``wide_waves``' (``prompt_share``'s pick, :meth:`prompt_plan`); ``leaf``: Flatten's chunks of leaves only cut
        at their nodes (:meth:`leaf_split_for`). :meth:`plan_groups` gives the grouping :meth:`plan` runs."""
        if self.wide_pick and self.mode != "node" and self.wide_waves > 0:
            g = self._pick_wide(tree, shape, out_alloc)
        else:
            g = self._build(tree, shape, out_alloc, share, leaf)
        if self.rest_chunk > 0:
            g = self._cut_rest(g, shape, out_alloc)
        return g

    def _build(
        self, tree: DecodingTree, shape: AttentionShape, out_alloc, share: float | None = None, leaf: bool = False
    ) -> KVGroups:
        """The grouping with the wide nodes' budget of ``share`` of a wave (None: ``wide_waves``)."""
        kw, prep = self._group_args(shape, share, leaf)
        g = None
        if prep is not None:  # the C plan with arguments checked once per shape (the usual case)
            g = plan_native.build_prepared(tree, prep, out_alloc)
        if g is None:
            g = build_groups(tree, out_alloc=out_alloc, **kw)
        return g

    def plan_groups(self, tree: DecodingTree, shape: AttentionShape, out_alloc=None) -> tuple[bool, KVGroups]:
        """``(gluon, groups)``: whether ``tree``'s plan gives the Gluon kernel its prompt tiles (:meth:`prompt_plan`), and
        the grouping that :meth:`plan`, :meth:`io` and :meth:`tensor_flops` take for it."""
        gluon, share = self.prompt_plan(tree, shape)
        return gluon, self.groups(tree, shape, out_alloc, share, self.leaf_split_for(gluon))

    def leaf_split_for(self, gluon: bool) -> bool:
        """``leaf_split``: whether Flatten's few-query re-cut (``few_split``) takes a chunk of leaves only whatever its
        queries, on a tree whose prompt goes to the Gluon kernel (``gluon``) and whose rest may then go to the branches'
        kernel (``branch_heads``, one-query unmasked tiles). Each query reads only its own leaf's tokens there, so the
        bytes are the same either way; the masked tiles that packed 50 one-token leaves (few-shot 16k step 1) run in
        the one-launch kernel, after the prompt kernel's SMs, where per-leaf tiles run beside it. Elsewhere (no prompt
        kernel: the 4k trees' step 1) the packed tiles stay: there they were the faster launch (H100, session 22)."""
        return gluon and self.leaf_split and self.branch_heads and self.mode == "flatten" and self.few_split > 0

    def prompt_plan(self, tree: DecodingTree, shape: AttentionShape) -> tuple[bool, float | None]:
        """``prompt_kernel="gluon"``: whether ``tree``'s plan gives the Gluon kernel its prompt tiles, and the wide
        nodes' share of a wave for it (None: ``wide_waves``'). With ``prompt_share`` (> 0) only trees whose prompt
        chunks reach ``prompt_min_tokens`` do (:meth:`_prompt_share`); the others get the one-launch plan unchanged.
        ``fused_reduce``, ``split_launch`` and ``wide_pick`` set the launches or the prompt's share themselves: with any
        of them on, no tree does."""
        if not self._gluon_on:
            return False, None
        if self.prompt_share == 0:
            return True, None
        share = self._prompt_share(tree, shape)
        return share is not None, share

    @property
    def _gluon_on(self) -> bool:
        """``prompt_kernel="gluon"`` without a knob that sets the launches or the prompt's share itself."""
        return self.prompt_kernel == "gluon" and not (self.fused_reduce or self.split_launch or self.wide_pick)

    def _prompt_share(self, tree: DecodingTree, shape: AttentionShape) -> float | None:
        """``prompt_kernel="gluon"`` with ``prompt_share``: the share of a wave the wide nodes (a shared prompt) take,
        ``prompt_share`` x their share of the step's K/V tokens, at most ``wide_waves``, to two decimals (a bounded
        set of cached plan arguments); None (``wide_waves``' share) when there is no wide node or their chunks at
        ``wide_waves``' share would be shorter than ``prompt_min_tokens`` (no tile for the Gluon kernel: the one-launch
        plan). The Gluon kernel's CTAs hold an SM each for their chunk, so the SMs they leave run the rest of the step:
        H100, session 16, few-shot 16k, the best fixed share was 0.9 at step 1 (prompt 99.7 % of the tokens), 0.67 at
        step 200 (62 %) and 0.5 at step 399 (45 %)."""
        if self.mode == "node" or self.wide_waves <= 0 or tree.n_queries == 0:
            return None
        most_tiles = -(-tree.n_queries * shape.group_size // self.block_m)  # no node has more row tiles
        if most_tiles < 2 or tree.unique_kv_tokens < self.prompt_min_tokens * max(1, self.wide_budget(shape) // most_tiles):
            return None  # no wide node, or none long enough: skip the per-node counts (a few-shot 4k step 1)
        got = plan_native.wide_tokens_native(tree, shape.group_size, self.block_m)
        wide_tok, most_rows = got if got is not None else wide_tokens(tree, shape.group_size, self.block_m)
        if most_rows == 0:
            return None
        tiles = -(-most_rows // self.block_m)
        if wide_tok < self.prompt_min_tokens * max(1, self.wide_budget(shape) // tiles):
            return None
        return min(self.wide_waves, round(self.prompt_share * wide_tok / max(tree.unique_kv_tokens, 1), 2))

    def _pick_wide(self, tree: DecodingTree, shape: AttentionShape, out_alloc) -> KVGroups:
        """``wide_pick``: the plan of the share (``wide_waves`` or one of :data:`WIDE_PICK_SHARES`) whose launch the
        model prices fastest, ``wide_waves``' unless another is :data:`WIDE_PICK_MARGIN` faster; the candidates are
        built apart and the chosen one copied into ``out_alloc``'s buffer."""
        slots = self.wide_ctas_per_sm * self.n_sms / shape.n_kv_heads
        plans, cost = {}, {}
        for share in dict.fromkeys((self.wide_waves, *WIDE_PICK_SHARES)):
            g = plans[share] = self._build(tree, shape, None, share)
            small = small_tile_rows(shape.group_size, g.rows, self.small_m)
            cost[share] = lpt_makespan(g, shape.group_size, small if small < g.rows else 0, slots)
        best = min(cost, key=cost.get)
        if cost[best] > (1.0 - WIDE_PICK_MARGIN) * cost[self.wide_waves]:
            best = self.wide_waves
        g = plans[best]
        if out_alloc is not None:
            buf = out_alloc(g.packed.size)
            buf[:] = g.packed
            g = replace(g, packed=buf)
        return g

    def _cut_rest(self, g: KVGroups, shape: AttentionShape, out_alloc) -> KVGroups:
        """``rest_chunk``: long small unmasked tiles in pieces (:func:`~deft.kernels.kv_groups.split_long_small_tiles`),
        then the tiles in longest-first order again."""
        small = small_tile_rows(shape.group_size, g.rows, self.small_m)
        if small >= g.rows:
            return g
        cut = split_long_small_tiles(g, shape.group_size, small, self.rest_chunk, out_alloc)
        if cut is not g and self.lpt:
            order_tiles_longest_first(cut, shape.group_size, small, self.mix, self.wide_ctas_per_sm * self.n_sms / shape.n_kv_heads)
        return cut

    def _group_args(
        self, shape: AttentionShape, share: float | None = None, leaf: bool = False
    ) -> tuple[dict[str, Any], plan_native.NativePlanArgs | None]:
        """:func:`~deft.kernels.kv_groups.build_groups`'s keyword arguments for ``shape`` and their C form (None
        when the C plan is off or declines them), made once per shape (and wide share, None: ``wide_waves``'; and
        ``leaf_split``): a method plans every step with the same ones, and on a slow host their Python costs as
        much as the C plan itself. Setting a knob drops them (:meth:`__setattr__`)."""
        key = (shape, None if share is None or share == self.wide_waves else float(share), bool(leaf))
        got = self._gargs.get(key)
        if got is not None:
            return got
        _check_shape(shape)
        snap = self.snap if self.mode == "flatten" else 0.0
        auto = self.mode != "node" and not self.chunk_size
        kw = dict(
            group=shape.group_size, mode=self.mode, chunk_size=0 if auto else self.chunk_for(None, shape),
            block_m_max=self.block_m, snap=snap, few_split=self.few_split if self.mode == "flatten" else 0,
            wide_budget=self.wide_budget(shape, share) if self.mode != "node" else 0,
            chunk_policy=self.chunk_policy(shape) if auto else None, lpt_small_m=self.small_m if self.lpt else None,
            lpt_mix=(self.mix, self.wide_ctas_per_sm * self.n_sms / shape.n_kv_heads), fill_tiles=self.fill_tiles,
            fill_small=self.fill_small(shape), leaf_split=bool(leaf) and self.mode == "flatten",
        )  # fmt: skip
        prep = None
        if kw["mode"] in MODES and (kw["mode"] == "node" or kw["chunk_size"] > 0 or auto):
            prep = plan_native.prepare_plan(**kw) if plan_native.ENABLED else None
        got = self._gargs[key] = (kw, prep)
        return got

    def fill_small(self, shape: AttentionShape) -> int:
        """Rows of the small tile that takes a filled chunk's rest (0: none, or ``fill_tiles`` off)."""
        if not self.fill_tiles:  # the default, on every plan: skip the tile arithmetic
            return 0
        small = small_tile_rows(shape.group_size, self.block_m, self.small_m)
        return small if small < self.block_m else 0

    def chunk_policy(self, shape: AttentionShape) -> tuple[int, int, int, int]:
        """``(kv_heads, chunk_min, chunk_max, target programs)``: how :meth:`chunk_for` picks a chunk size from a
        tree's seen tokens (:func:`~deft.kernels.kv_groups.auto_chunk_size`); the C plan applies it itself."""
        return (shape.n_kv_heads, self.chunk_min, self.chunk_max, int(self.ctas_per_sm * self.n_sms))

    def wide_budget(self, shape: AttentionShape, share: float | None = None) -> int:
        """(chunk x tile) programs per KV head that ``wide_waves`` (or ``share`` of a wave) allows the wide nodes (0: off)."""
        share = self.wide_waves if share is None else share
        if share <= 0 or self.mode == "node":
            return 0
        return max(1, int(share * self.wide_ctas_per_sm * self.n_sms) // shape.n_kv_heads)

    def _launch_config(self, rows: int, head_dim: int) -> tuple[int, int]:
        warps = self.num_warps or (8 if rows * head_dim >= 128 * 128 else 4)
        stages = self.num_stages or 3
        return warps, stages

    def _maybe_autotune(self, shape: AttentionShape, device: torch.device) -> None:
        if not self.autotune or device.type != "cuda":
            return
        key = (shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.dtype)
        if key in self._tuned:
            return
        from deft.kernels.autotune import tuned_config

        cfg, source = tuned_config(type(self), shape, device)
        self._tuned[key] = cfg
        for k, v in cfg.items():
            setattr(self, k, v)
        self._config_source = source

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "chunk_size": self.chunk_size
            if self.chunk_size
            else f"auto[{self.chunk_min},{self.chunk_max}]x{self.ctas_per_sm}/SM",
            "block_m": self.block_m,
            "block_n": self.block_n,
            "num_warps": self.num_warps or "auto",
            "num_stages": self.num_stages or "auto",
            "partial_dtype": self.partial_dtype,
            "prefetch": self.prefetch,
            "snap": self.snap,
            "few_split": self.few_split,
            "contiguous": self.contiguous,
            "wide_waves": self.wide_waves,
            "wide_ctas_per_sm": self.wide_ctas_per_sm,
            "lpt": self.lpt,
            "mix": self.mix,
            "fill_tiles": self.fill_tiles,
            "reduce_heads": self.reduce_heads or "auto",
            "pdl": self.pdl,
            "unified_mask": self.unified_mask,
            "specialise": self.specialise,
            "split_launch": self.split_launch,
            "prompt_kernel": self.prompt_kernel,
            "prompt_min_tokens": self.prompt_min_tokens,
            "prompt_share": self.prompt_share,
            "small_rest": self.small_rest,
            "rest_stages": self.rest_stages,
            "branch_heads": self.branch_heads,
            "branch_block_n": self.branch_block_n,
            "branch_stages": self.branch_stages,
            "branch_warps": self.branch_warps,
            "branch_spread": self.branch_spread,
            "prompt_order": self.prompt_order,
            "branch_merge": self.branch_merge,
            "branch_block_h": self.branch_block_h,
            "branch_maxnreg": self.branch_maxnreg,
            "small_block_n": self.small_block_n,
            "rest_chunk": self.rest_chunk,
            "small_stages": self.small_stages,
            "small_block": self.small_block,
            "wide_pick": self.wide_pick,
            "small_affine": self.small_affine,
            "fused_reduce": self.fused_reduce,
            "l2_prefetch": self.l2_prefetch,
            "big_gather_block": self.big_gather_block,
            "big_gather_stages": self.big_gather_stages,
            "idx_inloop": self.idx_inloop,
            "small_m": self.small_m,
            "config_source": self._config_source,
        }

    def _workspace(self, n_part: int, shape: AttentionShape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial outputs and LSE, owned by the method and grown geometrically: plans on one stream
        run in order, so consecutive plans may share it (plans run concurrently on several streams
        may not). The whole buffers are returned (a plan uses their first ``n_part`` rows; the kernels
        index them through the plan, so no per-plan slicing)."""
        p_dtype = shape.torch_dtype if self.partial_dtype == "input" else torch.float32
        key = (device, p_dtype, shape.n_heads, shape.head_dim)
        ws = self._ws.get(key)
        if ws is None or ws[0].shape[0] < n_part:
            n = max(n_part, 2 * ws[0].shape[0] if ws is not None else 0)
            ws = (
                torch.empty(n, shape.n_heads, shape.head_dim, dtype=p_dtype, device=device),
                torch.empty(n, shape.n_heads, dtype=torch.float32, device=device),
            )
            self._ws[key] = ws
        return ws

    def _counter_space(self, n: int, device: torch.device) -> torch.Tensor:
        """``fused_reduce``'s per-(query, head) counters: zeros, grown geometrically; every launch leaves the ones it
        used at zero again (the program that completes a count resets it), so consecutive plans share them."""
        c = self._counters.get(device)
        if c is None or c.numel() < n:
            c = self._counters[device] = torch.zeros(max(n, 2 * c.numel() if c is not None else 0), dtype=torch.int32, device=device)
        return c

    # ------------------------------------------------------------------ plan / run / io
    def plan(self, tree: DecodingTree, shape: AttentionShape, device: str | torch.device = "cuda") -> DeftPlan:
        device = device if isinstance(device, torch.device) else torch.device(device)
        ctx = self._ctx.get((device, shape))
        if ctx is None:
            ctx = self._plan_context(device, shape)
        staging = ctx.staging
        gluon, g = self.plan_groups(tree, shape, staging.alloc if staging is not None else None)
        n_big = small = -1
        n_prompt = n_pairs = rest_rows = rest_heads = rest_programs = 0
        merge = False
        if self.split_launch:  # before the upload: the records are reordered in place
            small = small_tile_rows(shape.group_size, g.rows, self.small_m)
            if small < g.rows:
                n_big = partition_small_last(g, shape.group_size, small)
        elif gluon:  # likewise: the prompt kernel's records first
            from deft.kernels.prompt_gluon import partition_prompt_tiles

            small = small_tile_rows(shape.group_size, g.rows, self.small_m)
            n_prompt, n_pairs = partition_prompt_tiles(
                g, shape.group_size, small if small < g.rows else 0, self.prompt_min_tokens
            )
            g, rest_heads, rest_programs, merge = self._branch_plan(
                g, n_prompt, n_pairs, small, shape, tree.n_queries, staging.alloc if staging is not None else None
            )
            if not rest_heads and self.small_rest and n_prompt and small < g.rows and rest_all_small(g, n_prompt, shape.group_size, small):
                rest_rows = small
        meta = staging.upload(g.packed.size) if staging is not None else torch.from_numpy(g.packed)
        part_o, part_lse = self._workspace(max(g.n_partials, 1), shape, device)
        launch = ctx.launch.get(g.rows)
        if launch is None:
            launch = ctx.launch[g.rows] = self._launch_config(g.rows, shape.head_dim)
        block_p = reduce_block(g.max_parts)
        heads = ctx.heads.get(block_p)
        if heads is None:
            heads = ctx.heads[block_p] = reduce_heads(shape.n_heads, shape.head_dim, block_p, self.reduce_heads)
        plan = DeftPlan(
            n_queries=tree.n_queries, shape=shape, device=ctx.device_name, groups=g, meta=meta,
            part_o=part_o, part_lse=part_lse, block_m=g.rows, block_n=self.block_n,
            num_warps=launch[0], num_stages=launch[1], block_p=block_p, reduce_heads=heads,
            pdl=ctx.pdl and n_big < 0 and not self.fused_reduce and n_prompt == 0, unified=self.unified_for(g, shape),
            affine_big=self.specialise and n_big < 0 and n_prompt == 0 and self.affine_for(g, shape), n_big=n_big,
            small_rows=small if n_big >= 0 else 0,
            split=self._split_launches(g, meta, n_big, small, shape.head_dim, launch) if n_big >= 0 else (),
            counters=self._counter_space(tree.n_queries * shape.n_heads, device) if self.fused_reduce else None,
            n_prompt=n_prompt, n_pairs=n_pairs, rest=self._shifted(g, meta, n_prompt) if n_prompt else (),
            rest_rows=rest_rows, rest_args=self.rest_launch_args(rest_rows, shape.head_dim) if rest_rows else None,
            rest_heads=rest_heads, rest_programs=rest_programs,
            merge=merge,
        )  # fmt: skip
        if not ctx.compiled:
            self._precompile(plan, device)
            ctx.compiled = True
        return plan

    def kernel_knobs(self) -> dict[str, Any]:
        """:func:`~deft.kernels.tree_attention.launch_partials`' keyword arguments that come from the method's knobs (the
        plan supplies the rest): one place for ``run``, the up-front compile, :meth:`launch_digest` and the probes."""
        return dict(
            prefetch=self.prefetch, idx_inloop=self.idx_inloop, small_m=self.small_m, contiguous=self.contiguous,
            head_fastest=self.lpt, small_stages=self.small_stages, small_block_n=self.small_block,
            small_affine=self.small_affine and self.contiguous, l2_prefetch=self.l2_prefetch,
            big_gather_block=self.big_gather_block, big_gather_stages=self.big_gather_stages,
        )  # fmt: skip

    def launch_digest(self, plan: DeftPlan) -> str:
        """A short hash of everything ``run`` launches for ``plan``: its packed index array (call it before the next
        plan reuses a staging buffer) and the launch's parameters and kernel knobs. Two methods (DeFT-Flatten and
        DeFT-Node-Chunk on a few-shot tree past its first step, say) with equal digests run the same kernels on the
        same data, so a latency gap between them is run-to-run spread."""
        g = plan.groups
        launch = (
            plan.n_queries, plan.shape, plan.block_m, plan.block_n, plan.num_warps, plan.num_stages, plan.block_p,
            plan.reduce_heads, plan.pdl, plan.unified, plan.affine_big, plan.n_big, plan.small_rows,
            plan.counters is not None, plan.n_prompt, plan.n_pairs, sorted(g.offsets.items()), g.n_tiles, g.n_partials,
            self.partial_dtype,
            *((plan.rest_rows, sorted(plan.rest_args.items())) if plan.rest_rows else ()),
            *((plan.rest_heads, plan.rest_programs, self.branch_args()) if plan.rest_heads else ()),
            self.small_block_n if plan.n_big >= 0 else 0, sorted(self.kernel_knobs().items()),
            *((self.prompt_order,) if plan.n_prompt else ()), *(("merge",) if plan.merge else ()),
        )  # fmt: skip
        h = hashlib.blake2b(repr(launch).encode(), digest_size=8)
        h.update(memoryview(np.ascontiguousarray(g.packed)).cast("B"))
        return h.hexdigest()

    def classes_of(self, g: KVGroups, shape: AttentionShape) -> int:
        """The tile classes plan ``g`` holds (:func:`~deft.kernels.kv_groups.tile_classes`), as the C plan found
        them while ordering its tiles when it did."""
        small = small_tile_rows(shape.group_size, g.rows, self.small_m)
        if small < g.rows and g.classes >= 0 and self.contiguous:  # found by the C plan while ordering
            return g.classes
        return tile_classes(g, shape.group_size, small if small < g.rows else 0, self.contiguous)

    def unified_for(self, g: KVGroups, shape: AttentionShape) -> bool:
        """Whether plan ``g`` runs the partial kernel's ``UNIFIED`` variant: always with ``unified_mask=True``; with
        ``"auto"`` when no tile would run the big tile's plain gathered loop (``CLASS_BIG_PLAIN``), the one loop that
        variant makes slower (a shared prompt's affine tiles, masked tiles and small branch tiles are what the
        few-shot and speculative trees hold; a reasoning tree's multi-query branches are plain big tiles)."""
        if self.unified_mask != "auto":
            return bool(self.unified_mask)
        return not self.classes_of(g, shape) & CLASS_BIG_PLAIN

    def affine_for(self, g: KVGroups, shape: AttentionShape) -> bool:
        """Whether plan ``g`` runs the partial kernel's ``AFFINE_BIG`` variant (``specialise``): its tiles are all
        big ones over consecutive slots without a masked phase and unmasked small ones (a shared prompt and its
        branches), so the big tile compiles the affine loop alone and the small tile its plain gathered loop."""
        if not (self.specialise and self.contiguous):
            return False
        return self.classes_of(g, shape) & ~(CLASS_BIG_AFFINE | CLASS_SMALL_PLAIN) == 0

    def _plan_context(self, device: torch.device, shape: AttentionShape) -> _PlanContext:
        """What every plan for ``(device, shape)`` shares, looked up once: the pinned staging, whether the
        reduction is a programmatic dependent launch, launch configurations by tile rows and reduction heads by
        width. Setting a knob drops it (:meth:`__setattr__`); the autotuner sets its knobs before it is made."""
        _check_shape(shape)
        self._maybe_autotune(shape, device)
        staging = None
        if device.type == "cuda":
            staging = self._staging.get(device)
            if staging is None:
                staging = self._staging[device] = PinnedStaging(device)
        ctx = _PlanContext(staging, str(device), self.pdl and pdl_supported(device))
        self._ctx[(device, shape)] = ctx
        return ctx

    def run(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        plan: DeftPlan,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Partial attention per (tile, KV head), then the global reduction into ``out`` (new if ``None``)."""
        check_inputs(q, k_pool, v_pool, HEAD_DIMS, KERNEL_DTYPES)
        s = plan.shape
        if (
            q.shape[0] != plan.n_queries
            or q.shape[1] != s.n_heads
            or k_pool.shape[1] != s.n_kv_heads
            or q.shape[2] != s.head_dim
        ):
            raise UnsupportedInput(
                f"inputs q {tuple(q.shape)}, pool {tuple(k_pool.shape)} do not match the plan "
                f"({plan.n_queries} queries, {s.n_heads}/{s.n_kv_heads} heads, head_dim {s.head_dim})"
            )
        if q.dtype != s.torch_dtype:
            raise UnsupportedInput(f"q is {q.dtype} but the plan was made for {s.dtype}")
        if q.stride(2) != 1 or k_pool.stride(2) != 1 or v_pool.stride(2) != 1:
            raise UnsupportedInput("q, k_pool and v_pool need a contiguous head_dim (stride 1)")
        if str(q.device) != plan.device and not (q.device.type == "cuda" and plan.device.startswith("cuda")):
            raise UnsupportedInput(f"q is on {q.device} but the plan was made for {plan.device}")
        if out is None:
            out = torch.empty_like(q)
        elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(2) != 1:
            raise UnsupportedInput(f"out {tuple(out.shape)} {out.dtype} must match q {tuple(q.shape)} {q.dtype}")
        if plan.n_queries == 0:
            return out
        g = plan.groups
        if plan.n_big >= 0:
            self._run_split(q, k_pool, v_pool, plan)
        elif plan.n_prompt > 0:
            if self._run_prompt(q, k_pool, v_pool, plan, out=out):
                return out  # branch_merge: the branches' kernel wrote it
        else:
            self.last_kernel = launch_partials(
                q, k_pool, v_pool, plan.part_o, plan.part_lse, plan.meta, g.offsets, g.n_tiles,
                plan.block_m, plan.block_n, plan.num_warps, plan.num_stages, pdl_trigger=plan.pdl,
                unified=plan.unified, affine_big=plan.affine_big, fused_out=out if plan.counters is not None else None,
                counters=plan.counters, **self.kernel_knobs(),
            )  # fmt: skip
        if plan.counters is None:
            launch_reduce(
                out, plan.part_o, plan.part_lse, plan.meta, g.offsets, plan.block_p, heads=plan.reduce_heads, pdl=plan.pdl
            )
        return out

    def _split_launches(
        self, g: KVGroups, meta: torch.Tensor, n_big: int, small_rows: int, head_dim: int, launch: tuple[int, int]
    ) -> tuple[tuple[torch.Tensor, dict, int, tuple], ...]:
        """A split plan's launches: (meta, section offsets, tiles, (rows, block_n, warps, stages, contiguous)) for
        the big tiles (no small tile compiled in) and for the small ones (their own rows and K/V block, from their
        records onwards: the meta view and the section offsets shift by the big tiles' records)."""
        out = []
        if n_big > 0:
            out.append((meta, g.offsets, n_big, (g.rows, self.block_n, *launch, self.contiguous)))
        if n_big < g.n_tiles:
            rest, offs = self._shifted(g, meta, n_big)
            warps, stages = self._launch_config(small_rows, head_dim)
            out.append((rest, offs, g.n_tiles - n_big, (small_rows, self.small_block_n, warps, stages, False)))
        return tuple(out)

    @staticmethod
    def _shifted(g: KVGroups, meta: torch.Tensor, n: int) -> tuple[torch.Tensor, dict]:
        """The packed array seen from tile record ``n`` on: the meta view and the section offsets, shifted by the
        records before it (a launch over records [n, n_tiles) indexes its tiles from 0)."""
        shift = n * TILE_FIELDS
        return meta[shift:], {k: (a - shift, b - shift) for k, (a, b) in g.offsets.items()}

    def _run_prompt(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        plan: DeftPlan,
        timelines: tuple[torch.Tensor, torch.Tensor] | None = None,
        out: torch.Tensor | None = None,
    ) -> bool:
        """``prompt_kernel="gluon"``: the prompt tiles in the Gluon kernel on the current stream, then the rest (the
        fused kernel, or the small-tile or branches' launch) so that it takes the SMs the prompt's CTAs leave and then
        theirs: with ``prompt_order="chain"`` on the same stream as a programmatic dependent of the prompt kernel, whose
        CTAs let it launch as they start; with ``"streams"`` on a side stream that starts with it, joined after. Where
        the Gluon kernel cannot run (no Hopper GPU, the interpreter, pools a TMA descriptor cannot address) the prompt
        tiles run in the fused kernel, in a launch of their own, and the rest on the side stream.
        ``timelines`` (diagnostics, Gluon path only; ``scripts/gluon_timeline.py``): int64 tensors the prompt
        kernel's CTAs and the rest's programs write their start, end and SM into.
        With a ``merge`` plan (``branch_merge``) and the chain (or no GPU: the interpreter runs the launches one after
        the other) the branches' kernel writes the final rows into ``out``, the prompt kernel counting its warpgroups
        done in the method's ``sync`` words, and this returns True (no reduction to launch); otherwise False."""
        g = plan.groups
        n_rest = g.n_tiles - plan.n_prompt
        cuda = q.device.type == "cuda"
        gluon = cuda and os.environ.get("TRITON_INTERPRET") != "1"
        if gluon:
            from deft.kernels import prompt_gluon

            gluon = prompt_gluon.supported(q, k_pool, v_pool)
        chain = bool(gluon and n_rest) and self.prompt_order == "chain"  # needs the Gluon kernel's trigger
        merge = plan.merge and out is not None and (chain or not cuda)
        sync = target = None
        if merge:
            sync = self._sync_words(q.device)
            target = prompt_gluon.signal_target(plan.n_prompt, plan.n_pairs, k_pool.shape[1]) if gluon else 1
        two = cuda and n_rest and not chain  # "streams": the rest on the side stream
        if two:
            cur, side = self._fork(q.device)
        knobs = self.kernel_knobs()
        if gluon:
            prompt_gluon.launch_prompt_partials(
                q, k_pool, v_pool, plan.part_o, plan.part_lse, plan.meta, g.offsets, plan.n_prompt, plan.n_pairs,
                timeline=None if timelines is None else timelines[0], descriptors=self._descriptors,
                pdl_trigger=self.prompt_order == "chain", signal=sync,
            )
        else:
            if timelines is not None:
                raise ValueError("timelines are for the Gluon prompt kernel, which cannot run here")
            self.last_kernel = launch_partials(
                q, k_pool, v_pool, plan.part_o, plan.part_lse, plan.meta, g.offsets, plan.n_prompt, plan.block_m,
                plan.block_n, plan.num_warps, plan.num_stages, unified=plan.unified, **knobs,
            )  # fmt: skip
            if merge:  # no GPU here: the launches run one after the other, so the prompt's partials are stored
                sync[0] = target
        if n_rest:
            meta, offs = plan.rest
            with torch.cuda.stream(side) if two else contextlib.nullcontext():
                if plan.rest_heads:  # branch_heads: one program per branch tile and block of KV heads
                    self.last_kernel = launch_branch_heads(
                        q, k_pool, v_pool, plan.part_o, plan.part_lse, meta, offs, n_rest, plan.rest_heads,
                        plan.rest_programs, **self.branch_args(), timeline=None if timelines is None else timelines[1],
                        launch_pdl=chain, merge=(out, sync, target) if merge else None,
                    )  # fmt: skip
                elif plan.rest_rows:  # small_rest: the partial kernel compiled for the small tiles alone
                    self.last_kernel = launch_partials(
                        q, k_pool, v_pool, plan.part_o, plan.part_lse, meta, offs, n_rest, plan.rest_rows,
                        **plan.rest_args, unified=plan.unified, timeline=None if timelines is None else timelines[1],
                        launch_pdl=chain,
                    )  # fmt: skip
                else:
                    self.last_kernel = launch_partials(
                        q, k_pool, v_pool, plan.part_o, plan.part_lse, meta, offs, n_rest, plan.block_m, plan.block_n,
                        plan.num_warps, plan.num_stages, unified=plan.unified,
                        timeline=None if timelines is None else timelines[1], launch_pdl=chain, **knobs,
                    )  # fmt: skip
            if two:
                cur.wait_stream(side)
        return merge

    def _sync_words(self, device: torch.device) -> torch.Tensor:
        """``branch_merge``'s int32 words (the prompt kernel's count, the merging programs past it, an error count),
        zero between steps: the branches' kernel sets the first two back to zero (:mod:`deft.kernels.branch_heads`)."""
        w = self._sync.get(device)
        if w is None:
            w = self._sync[device] = torch.zeros(4, dtype=torch.int32, device=device)
        return w

    def merge_errors(self, device: str | torch.device = "cuda") -> int:
        """``branch_merge``: how many merging programs gave up waiting for the prompt kernel's count since the method
        was made (a bug if not 0: the rows they wrote lack the prompt's partials). Synchronises."""
        w = self._sync.get(torch.device(device))
        return 0 if w is None else int(w[2].item())

    def _fork(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        """(the current stream, this method's side stream on ``device``, made to wait for the current one's work so far)."""
        cur = torch.cuda.current_stream(device)
        side = self._side.get(device)
        if side is None:
            side = self._side[device] = torch.cuda.Stream(device)
        side.wait_stream(cur)
        return cur, side

    def _branch_plan(
        self, g: KVGroups, n_prompt: int, n_pairs: int, small: int, shape: AttentionShape, n_queries: int, out_alloc
    ) -> tuple[KVGroups, int, int, bool]:
        """``branch_heads``: ``(plan, rows, runs, merge)``: whether the tiles after the prompt kernel's ``n_prompt`` go to
        the branches' kernel (``rows``, its rows per KV head; 0: they do not) and, with ``branch_spread``, the plan with
        them cut into ``runs`` equal runs (:func:`~deft.kernels.kv_groups.spread_rest_tiles`; 0: one program per tile);
        with ``branch_merge``, whether that kernel merges (every query in one of its tiles). ``plan`` and ``io`` both
        take it from here."""
        if not (self.branch_heads and n_prompt and small < g.rows) or not rest_small_unmasked(
            g, n_prompt, shape.group_size, small
        ):
            return g, 0, 0, False
        if self.branch_spread <= 0:
            return g, small, 0, self.branch_merge and one_rest_tile_per_query(g, n_prompt, n_queries)
        runs = self.branch_programs(n_prompt - n_pairs, small, shape)
        return spread_rest_tiles(g, n_prompt, runs, out_alloc), small, runs, False

    def branch_programs(self, prompt_ctas: int, rows: int, shape: AttentionShape) -> int:
        """``branch_spread``: the branches' kernel's programs per block of KV heads, ``branch_spread`` x the SMs the prompt
        kernel's ``prompt_ctas`` x KV heads CTAs leave (one CTA per SM), or x all SMs when they leave fewer than an eighth
        (the branches then run after the prompt)."""
        free = self.n_sms - prompt_ctas * shape.n_kv_heads
        if free < self.n_sms // 8:
            free = self.n_sms
        return max(1, round(self.branch_spread * free / self.branch_head_blocks(shape, rows)))

    def branch_head_blocks(self, shape: AttentionShape, rows: int) -> int:
        """``branch_heads``: the blocks of KV heads the branches' kernel runs a tile in (programs per tile)."""
        return -(-shape.n_kv_heads // heads_per_program(shape.n_kv_heads, rows, shape.head_dim, self.branch_block_h))

    def branch_args(self) -> dict[str, int]:
        """``branch_heads``: :func:`~deft.kernels.branch_heads.launch_branch_heads`' keyword arguments from the knobs."""
        return dict(
            block_n=self.branch_block_n, stages=self.branch_stages, num_warps=self.branch_warps,
            block_h=self.branch_block_h, maxnreg=self.branch_maxnreg,
        )

    def rest_launch_args(self, rows: int = 16, head_dim: int = 128) -> dict[str, Any]:
        """``small_rest``: :func:`~deft.kernels.tree_attention.launch_partials`' arguments (after the tile rows) for the
        rest's launch: ``small_block`` tokens per K/V block, gathered loops ``rest_stages`` deep (0: ``small_stages``),
        no small tile and no affine loop compiled in."""
        block = self.small_block or self.block_n
        warps, stages = self._launch_config(rows, head_dim)
        return dict(
            block_n=block, num_warps=warps, num_stages=stages, prefetch=self.prefetch, idx_inloop=self.idx_inloop,
            small_m=0, contiguous=False, head_fastest=self.lpt, big_gather_block=block,
            big_gather_stages=self.rest_stages or self.small_stages or stages,
        )  # fmt: skip

    def _run_split(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: DeftPlan) -> None:
        """``split_launch``: the big tiles' launch on the current stream and the small tiles' on a side stream that
        starts with it, so the small programs take the SMs the big ones leave free and then the rest; the current
        stream then waits for the side one (the reduction reads both launches' partials). Each launch is the partial
        kernel compiled for its own tile rows, without the other's loops. Sequential off the GPU."""
        launches = plan.split
        cuda = q.device.type == "cuda" and len(launches) == 2
        if cuda:
            cur, side = self._fork(q.device)
        for i, (meta, offs, n, (rows, block_n, warps, stages, contig)) in enumerate(launches):
            ctx = torch.cuda.stream(side) if cuda and i == 1 else contextlib.nullcontext()
            with ctx:
                self.last_kernel = launch_partials(
                    q, k_pool, v_pool, plan.part_o, plan.part_lse, meta, offs, n, rows, block_n, warps, stages,
                    self.prefetch, self.idx_inloop, 0, contig, head_fastest=self.lpt, unified=plan.unified,
                )  # fmt: skip
        if cuda:
            cur.wait_stream(side)

    def _precompile_prompt(self, plan: DeftPlan, device: torch.device) -> None:
        """``prompt_kernel="gluon"``: compile the Gluon prompt kernel for the plan's shape (on a Hopper GPU). A failed
        compile here only warns: the first run compiles it again, and raises there."""
        from deft.kernels import prompt_gluon

        s = plan.shape
        q = torch.empty(1, s.n_heads, s.head_dim, dtype=s.torch_dtype, device=device)
        pool = torch.empty(prompt_gluon.BLOCK_N, s.n_kv_heads, s.head_dim, dtype=s.torch_dtype, device=device)
        if not prompt_gluon.supported(q, pool, pool):
            return
        try:
            for signal in [None] + ([self._sync_words(device)] if self.branch_merge else []):
                prompt_gluon.launch_prompt_partials(
                    q, pool, pool, plan.part_o, plan.part_lse, plan.meta, plan.groups.offsets, 1, 0, warmup=True,
                    pdl_trigger=self.prompt_order == "chain", signal=signal,
                )
        except Exception as e:  # noqa: BLE001 (a warm-up; the run reports the error itself)
            warnings.warn(f"prompt_kernel='gluon': compiling ahead of the first run failed: {e!r}", stacklevel=2)

    def _precompile(self, plan: DeftPlan, device: torch.device) -> None:
        """Compile, once per process, shape and configuration, every kernel variant a plan can pick: the
        partial kernel for each tile height (16 up to ``block_m``) and the reduction for each width. A plan
        picks them from its tree, so without this a run compiled one the first time a tree needed it: a few
        hundred milliseconds inside a timed engine step (seen on the H100). Done here, once per plan (a set
        lookup after the first), not in ``run``, which is called once per layer. The kernels are specialised
        for the layouts of contiguous q/out ``[n, heads, d]`` and pools ``[slots, kv_heads, d]`` (the engine's
        and the benchmarks'); other layouts compile on first use. Not under the interpreter."""
        if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            return
        s = plan.shape
        key = (
            device, s.dtype, plan.part_o.dtype, s.n_heads, s.n_kv_heads, s.head_dim, self.block_m, self.block_n,
            self.num_warps, self.num_stages, self.reduce_heads, plan.pdl, self.unified_mask, self.specialise,
            self.split_launch, self.small_block_n, self.fused_reduce, self.prompt_kernel, self.small_rest, self.rest_stages, self.prompt_order,
            *sorted(self.kernel_knobs().items()), self.branch_heads, self.branch_spread > 0, *sorted(self.branch_args().items()),
            self.branch_merge,
        )  # fmt: skip
        if key in _PRECOMPILED:
            return
        q = torch.empty(1, s.n_heads, s.head_dim, dtype=s.torch_dtype, device=device)  # layouts only: not run
        kv = torch.empty(1, s.n_kv_heads, s.head_dim, dtype=s.torch_dtype, device=device)
        g = plan.groups
        variants = [(u, False) for u in ((False, True) if self.unified_mask == "auto" else (bool(self.unified_mask),))]
        if self.specialise and self.contiguous:  # an AFFINE_BIG plan has no plain big tile: UNIFIED unless it is off
            variants.append((self.unified_mask is not False, True))
        # a split plan's launches have none, nor has a fused reduction (no second launch); the method's other plans do
        pdl = self.pdl and pdl_supported(device) and not self.fused_reduce
        chain = self._gluon_on and self.prompt_order == "chain" and pdl_supported(device)  # the Gluon plans' rest
        for unified, affine_big in variants:
            rows = max(16, 1 << max(0, s.group_size - 1).bit_length())  # tile_rows' smallest answer
            while True:
                warps, stages = self._launch_config(rows, s.head_dim)
                # prompt_kernel="gluon": the rest's launch has no PDL trigger (its plans reduce after two launches);
                # with prompt_order="chain" it is a programmatic dependent of the prompt kernel
                launches = [(pdl, False)]
                if self._gluon_on and not affine_big:
                    launches += [(False, False)] if pdl else []
                    launches += [(False, True)] if chain else []
                for p, dependent in launches:
                    launch_partials(
                        q, kv, kv, plan.part_o, plan.part_lse, plan.meta, g.offsets, 1, rows, self.block_n, warps,
                        stages, warmup=True, pdl_trigger=p, unified=unified, affine_big=affine_big,
                        fused_out=q if self.fused_reduce else None, counters=plan.counters, launch_pdl=dependent,
                        **self.kernel_knobs(),
                    )  # fmt: skip
                small = small_tile_rows(s.group_size, rows, self.small_m)
                if self.split_launch and small < rows and not affine_big:  # a split plan's big and small launches
                    for r, bn, contig in ((rows, self.block_n, self.contiguous), (small, self.small_block_n, False)):
                        w, st = self._launch_config(r, s.head_dim)
                        launch_partials(
                            q, kv, kv, plan.part_o, plan.part_lse, plan.meta, g.offsets, 1, r, bn, w, st,
                            self.prefetch, self.idx_inloop, 0, contig, warmup=True, head_fastest=self.lpt,
                            unified=unified,
                        )  # fmt: skip
                if rows >= self.block_m:
                    break
                rows *= 2
            small = small_tile_rows(s.group_size, self.block_m, self.small_m)
            if self._gluon_on and self.small_rest and small < self.block_m and not affine_big:  # the rest's launch
                launch_partials(
                    q, kv, kv, plan.part_o, plan.part_lse, plan.meta, g.offsets, 1, small,
                    **self.rest_launch_args(small, s.head_dim), warmup=True, unified=unified, launch_pdl=chain,
                )  # fmt: skip
        two = (self.split_launch or self._gluon_on) and pdl  # plans of two launches reduce without PDL
        if self._gluon_on:
            self._precompile_prompt(plan, device)
            small = small_tile_rows(s.group_size, self.block_m, self.small_m)
            if self.branch_heads and small < self.block_m:  # the branches' kernel, for the rest of a Gluon plan
                spread = int(self.branch_spread > 0)  # a plan with the branches' kernel spreads its tiles when this is on
                merges = [None] + ([(q, self._sync_words(device), 0)] if self.branch_merge and chain else [])
                for merge in merges:  # a branch_merge plan whose queries have several rest tiles does not merge
                    launch_branch_heads(
                        q, kv, kv, plan.part_o, plan.part_lse, plan.meta, {**g.offsets, "progs": (0, 0)}, 1, small,
                        spread, **self.branch_args(), warmup=True, launch_pdl=chain, merge=merge,
                    )  # fmt: skip
        for block_p in REDUCE_BLOCKS:
            heads = reduce_heads(s.n_heads, s.head_dim, block_p, self.reduce_heads)
            for p in (pdl, False) if two else (pdl,):
                launch_reduce(q, plan.part_o, plan.part_lse, plan.meta, g.offsets, block_p, True, heads, p)
        _PRECOMPILED.add(key)

    def tensor_flops(self, tree: DecodingTree, shape: AttentionShape) -> tuple[int, int]:
        """``(executed, useful)`` tensor-core flops of one layer: what the partial kernel's tiles multiply, rows padded
        to the tile (:func:`groups_tensor_flops`), and what the tree needs (each query's visible tokens, every head,
        ``4 x head_dim`` each). Their ratio is the padding's cost; the executed flops over a measured tensor throughput
        are the compute side of the floor that bytes over bandwidth are the memory side of."""
        _, g = self.plan_groups(tree, shape)
        small = small_tile_rows(shape.group_size, g.rows, self.small_m)
        executed = groups_tensor_flops(g, shape, small if small < g.rows else 0, self.unified_for(g, shape))
        return executed, tree.path_kv_tokens * shape.n_heads * 4 * shape.head_dim

    def io(self, tree: DecodingTree, shape: AttentionShape) -> IOCounts:
        gluon, g = self.plan_groups(tree, shape)
        small = small_tile_rows(shape.group_size, g.rows, self.small_m)
        heads = reduce_heads(shape.n_heads, shape.head_dim, reduce_block(g.max_parts), self.reduce_heads)
        prefetch = (self.block_n, self.small_block or self.block_n) if self.l2_prefetch else None
        prompt = (0, 0, 0)
        if gluon:  # the records reordered as the plan reorders them
            from deft.kernels.prompt_gluon import BLOCK_N, partition_prompt_tiles

            prompt = (
                *partition_prompt_tiles(g, shape.group_size, small if small < g.rows else 0, self.prompt_min_tokens),
                BLOCK_N,
            )
        branch = (0, 0, 0)
        g, rows, runs, merge = self._branch_plan(g, prompt[0], prompt[1], small, shape, tree.n_queries, None)
        if rows:
            heads = reduce_heads(shape.n_heads, shape.head_dim, reduce_block(g.max_parts), self.reduce_heads)
            branch = (prompt[0], self.branch_head_blocks(shape, rows), runs)
        return groups_io(g, tree.n_queries, shape, self.partial_dtype, self.contiguous, small, heads,
                         self.unified_for(g, shape), self.small_affine, self.fused_reduce, prefetch, prompt,
                         branch, merge)  # fmt: skip


#: attributes whose change invalidates a method's cached plan arguments and contexts
_KNOBS = frozenset(inspect.signature(DeftAttention.__init__).parameters) - {"self"} | {"mode", "_n_sms"}


def _runs_small(t: dict[str, np.ndarray], rows: int, group: int, small_rows: int, unified: bool) -> np.ndarray:
    """Per tile record (``KVGroups.records("tiles")``), whether the partial kernel runs it on its small tile: its
    queries' rows fit ``small_rows`` (a small tile the plan's ``rows`` leave room for) and, under ``unified``, it has
    no masked phase (the kernel's dispatch, :func:`~deft.kernels.tree_attention.deft_partial_kernel`)."""
    small = ((t["q_hi"] - t["q_lo"]) * group <= small_rows) & (small_rows < rows)
    return small & ((t["flags"] & FLAG_MASK) == 0) if unified else small


def groups_tensor_flops(g: KVGroups, shape: AttentionShape, small_rows: int = 0, unified: bool = False) -> int:
    """Tensor-core flops of the partial kernel for grouping ``g``: every (tile, KV head) program multiplies its tile's
    rows, padded to its height (a big tile's ``g.rows``, a small one's ``small_rows``), by each of its tokens twice
    (QK^T and PV: ``4 x head_dim`` flops per row and token). A K/V block's masked tail is not counted."""
    t = g.records("tiles")
    ntok = (t["tok_hi"] - t["tok_lo"]).astype(np.int64)
    rows = np.where(_runs_small(t, g.rows, shape.group_size, small_rows, unified), small_rows, g.rows)
    return int((rows * ntok).sum()) * shape.n_kv_heads * 4 * shape.head_dim


def reduce_block(max_parts: int) -> int:
    """The reduction's width for a plan: the smallest of :data:`REDUCE_BLOCKS` holding its most partials per query
    (the largest when none does: the kernel then loops)."""
    return min(REDUCE_BLOCKS[-1], max(REDUCE_BLOCKS[0], 1 << max(0, (max_parts - 1).bit_length())))


def _check_shape(shape: AttentionShape) -> None:
    if shape.head_dim not in HEAD_DIMS:
        raise UnsupportedInput(f"head_dim {shape.head_dim} not supported by the DeFT kernels; supported: {HEAD_DIMS}")
    if DTYPES[shape.dtype] not in KERNEL_DTYPES:
        raise UnsupportedInput(f"dtype {shape.dtype} not supported by the DeFT kernels; use float16 or bfloat16")


def groups_io(
    g: KVGroups,
    n_queries: int,
    shape: AttentionShape,
    partial_dtype: str = "input",
    contiguous: bool = True,
    small_rows: int = 0,
    reduce_heads: int = 1,
    unified: bool = False,
    small_affine: bool = False,
    fused_reduce: bool = False,
    l2_prefetch: tuple[int, int] | None = None,
    prompt: tuple[int, int, int] = (0, 0, 0),
    branch: tuple[int, int, int] = (0, 0, 0),
    merge: bool = False,
) -> IOCounts:
    """HBM bytes of one layer for grouping ``g``, following the kernels' real loads and stores (``unified``: the
    kernel's ``unified_mask``, under which a masked tile runs the big tile, affine first phase included).

    - kv: every (tile, KV head) program loads its chunk's K and V rows once (masked tail rows are not
      fetched), so a chunk split into two query tiles counts twice.
    - q: each tile's queries, all heads (the KV-head programs of a tile split the row between them).
    - o: the reduction writes every query row once.
    - partial: each (chunk, query) partial row, all heads, output plus fp32 log-sum-exp, written by the
      attention kernel and read back by the reduction.
    - mask: per program, the node index of each token of its masked phase (int32); the per-node table
      it indexes (offset, DFS entry, subtree end) is a few KB, counted once.
    - meta: per program the tile record, one slot index per token (one in all for an affine first
      phase: a big tile over consecutive slots) and its queries' records (index,
      entry, visible); per reduction program (a query and ``reduce_heads`` of its heads) its list pointers,
      query index and partial-row indices. With ``fused_reduce`` no reduction program: every tile row (a query
      and head of a program) reads its list pointers and adds to its counter (4 bytes read, 4 written), and the
      program that merges a (query, head) reads its partial-row indices and zeroes the counter.
    ``small_affine``: a small tile whose first phase is over consecutive slots reads its first slot only too.
    ``l2_prefetch`` (the big and the small tile's K/V block): each program also loads the slot indices of its first two
    blocks (their K/V lines are prefetched, not loaded: the tile's own first rows, counted under kv).
    ``prompt`` (``prompt_kernel="gluon"``: the Gluon kernel's tiles, pairs and K/V box, records laid out by
    :func:`~deft.kernels.prompt_gluon.partition_prompt_tiles`): each of its CTAs (a pair of tiles over one chunk, or a
    single) loads the chunk's K and V once, in whole boxes (the last one overlaps the one before), and its slot once.
    ``branch`` (``branch_heads``: the first record of the branches' kernel, its programs per tile or run, and the runs
    of ``branch_spread``, 0 without): the records from the first on are read once per block of KV heads instead of once
    per KV head, each with one slot index per token and one word per query (its index), and each program reads its
    run's two bounds.
    ``merge`` (``branch_merge``, with ``branch``): no reduction launch; every partial row is still written and read
    back once (a branches' program stores its own rows and merges them with the prompt kernel's from the workspace);
    each of the prompt kernel's CTAs adds to the count twice (one word each), and each branches' program reads its
    queries' list pointers (two words each) and partial-row indices and makes three atomic accesses to the count words
    (one word each).
    """
    t = g.records("tiles")
    ntok = t["tok_hi"] - t["tok_lo"]
    nq_t = t["q_hi"] - t["q_lo"]
    masked = (t["flags"] & FLAG_MASK) != 0
    unmasked = t["flags"] >> FLAG_SHIFT  # each tile's first phase; the rest is tested token by token
    masked_tok = ntok - unmasked
    # a first phase over consecutive slots reads its first slot only (affine addresses; big tiles, and small ones
    # with small_affine)
    small = _runs_small(t, g.rows, shape.group_size, small_rows, unified)
    takes_affine = np.ones_like(small) if small_affine else ~small
    affine = ((t["flags"] & FLAG_CONTIG) != 0) & takes_affine if contiguous else np.zeros_like(masked)
    slot_tile = np.where(affine, 1, unmasked) + masked_tok
    slot_reads = int(slot_tile.sum())
    kv_tok = int(ntok.sum())
    n_prompt, n_pairs, box = prompt
    if n_prompt:  # the CTAs' first records: the pairs' even ones, then the singles
        first = np.r_[np.arange(0, 2 * n_pairs, 2), np.arange(2 * n_pairs, n_prompt)]
        kv_tok += int((-(-ntok[first] // box) * box).sum()) - int(ntok[:n_prompt].sum())
        slot_reads -= n_pairs  # a pair reads its chunk's first slot once
    kvh, heads, d = shape.n_kv_heads, shape.n_heads, shape.head_dim
    p_bytes = shape.elem_bytes if partial_dtype == "input" else 4
    per_program_meta = g.n_tiles * TILE_FIELDS * 4 + slot_reads * 4 + int(nq_t.sum()) * 12
    if l2_prefetch is not None:
        per_program_meta += int(np.minimum(2 * np.where(small, l2_prefetch[1], l2_prefetch[0]), ntok).sum()) * 4
    first, blocks, runs = branch
    if blocks:  # the branches' kernel's records: per block of heads, every slot and one word per query
        before = (first * TILE_FIELDS + int(slot_tile[:first].sum()) - n_pairs + int(nq_t[:first].sum()) * 3) * 4
        after = ((g.n_tiles - first) * TILE_FIELDS + int(ntok[first:].sum()) + int(nq_t[first:].sum()) + 2 * runs) * 4
        programs_meta = kvh * before + blocks * after
    else:
        programs_meta = kvh * per_program_meta
    if merge:
        ctas = (n_prompt - n_pairs) * kvh
        reduce_meta = ctas * 2 * 4 + blocks * ((2 * n_queries + g.n_partials) * 4 + (g.n_tiles - first) * 12)
    elif fused_reduce:
        reduce_meta = int(nq_t.sum()) * heads * 16 + heads * (n_queries * 4 + g.n_partials * 4)
    else:
        reduce_meta = heads // reduce_heads * (n_queries * 3 * 4 + g.n_partials * 4)
    return IOCounts(
        kv=kv_tok * shape.kv_token_bytes,
        q=int(nq_t.sum()) * shape.q_row_bytes,
        o=n_queries * shape.q_row_bytes,
        partial=2 * g.n_partials * heads * (d * p_bytes + 4),
        mask=kvh * int(masked_tok.sum()) * 4 + (g.section("nodes").size * 4 if masked.any() else 0),
        meta=programs_meta + reduce_meta,
    )

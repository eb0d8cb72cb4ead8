"""``prompt_kernel="gluon"``: the shared prompt's row tiles in the Gluon kernel (deft/kernels/prompt_gluon.py).

On the CPU: the plan's partition (which records, pairs over one token range, the CTA -> record map the kernel
computes), the two-launch run against the fp64 reference under the interpreter (there the prompt tiles run in
the fused kernel, in a launch of their own), and the kernel's sm_90 build (no spills, fits shared memory). On a
Hopper GPU: the Gluon kernel itself against the fp64 reference, with NaN-poisoned partials and output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deft.attention import AttentionShape
from deft.kernels import prompt_gluon
from deft.kernels.deft_flatten import DeftFlatten
from deft.kernels.deft_node import DeftNodeChunk
from deft.kernels.kv_groups import FLAG_CONTIG, FLAG_MASK, TILE_FIELDS
from deft.tree import DecodingTree
from tests.test_deft_kernels import check  # NaN-poisoned partials and output, against fp64

ROOT = Path(__file__).resolve().parents[1]
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and not INTERP


def fan(prompt: int, width: int, branch: int, rng: np.random.Generator, scatter_branches: bool = True) -> DecodingTree:
    """A prompt in consecutive slots (as prefill writes it) and ``width`` branches of ``branch`` tokens (scattered
    slots when ``scatter_branches``), one query at each branch's newest token; the query order is shuffled."""
    n_br = width * branch
    br_slots = prompt + (rng.permutation(n_br + 11)[:n_br] if scatter_branches else np.arange(n_br))
    slots = np.r_[np.arange(prompt), br_slots]
    order = rng.permutation(width)
    return DecodingTree.from_arrays(
        [-1] + [0] * width, [prompt] + [branch] * width, slots, 1 + order, [branch] * width, n_slots=prompt + n_br + 11
    )


def tile_records(plan) -> np.ndarray:
    return plan.groups.section("tiles").reshape(-1, len(TILE_FIELDS)).astype(np.int64)


# ---------------------------------------------------------------------- the plan
@pytest.mark.parametrize("width", [40, 50, 37])
def test_partition_puts_prompt_tiles_first_in_pairs_over_one_token_range(width):
    """Records [0, 2 x pairs) pair up over one token range; then the singles; every prompt tile (unmasked,
    consecutive slots, rows over the small tile's, 128+ tokens) is in front, nothing else is, nothing is lost."""
    rng = np.random.default_rng(width)
    tree = fan(1500, width, 9, rng)
    shape = AttentionShape(32, 8, 128, "bfloat16")
    base = DeftFlatten(n_sms=132, prompt_kernel="triton")
    ref = tile_records(base.plan(tree, shape, "cpu"))
    plan = DeftFlatten(n_sms=132, prompt_kernel="gluon", prompt_min_tokens=0).plan(tree, shape, "cpu")
    t = tile_records(plan)
    assert sorted(map(tuple, t)) == sorted(map(tuple, ref))  # a reordering of the same records
    n, pairs = plan.n_prompt, plan.n_pairs
    rows = (t[:, 3] - t[:, 2]) * 4
    eligible = (rows > 16) & (rows <= 64) & (t[:, 5] & FLAG_MASK == 0) & (t[:, 5] & FLAG_CONTIG != 0)
    eligible &= t[:, 1] - t[:, 0] >= prompt_gluon.BLOCK_N
    assert n == eligible.sum() > 0 and eligible[:n].all() and not eligible[n:].any()
    # near-equal row slices (50 queries x 4 heads: 4 tiles of 48-52 rows per chunk; 37: 3 of 48-52): every chunk's
    # tiles pair up two by two, an odd one left over
    _, per_range = np.unique(t[:n, :2], axis=0, return_counts=True)
    assert (per_range == -(-width * 4 // 64)).all() and pairs == (per_range // 2).sum()
    a, b = t[0 : 2 * pairs : 2], t[1 : 2 * pairs : 2]
    assert (a[:, :2] == b[:, :2]).all()  # a pair shares its token range
    # the kernel's map from CTA c to its records covers every prompt record once
    c = np.arange(n - pairs)
    rec_a, rec_b = c + np.minimum(c, pairs), c + np.minimum(c + 1, pairs)
    seen = np.r_[rec_a, rec_b[rec_b != rec_a]]
    assert sorted(seen) == list(range(n))
    assert plan.rest[0].numel() == plan.meta.numel() - n * len(TILE_FIELDS)


@pytest.mark.parametrize("width", [50, 37])
def test_io_counts_each_cta_s_boxes_once(width):
    """K/V bytes from the plan, CTA by CTA as the kernel loads them: a pair or a single loads its chunk once in
    whole 128-token boxes; every other tile its own tokens. The rest of the count is the one-launch plan's but for
    a pair's second slot read."""
    rng = np.random.default_rng(width)
    tree = fan(3001, width, 9, rng)
    shape = AttentionShape(32, 8, 128, "bfloat16")
    m = DeftFlatten(n_sms=132, prompt_kernel="gluon", prompt_min_tokens=0, branch_heads=False)  # the fused rest
    base = DeftFlatten(n_sms=132, prompt_kernel="triton")
    plan = m.plan(tree, shape, "cpu")
    t = tile_records(plan)
    n, pairs = plan.n_prompt, plan.n_pairs
    ctas = [(2 * c, 2 * c + 1) for c in range(pairs)] + [(r, r) for r in range(2 * pairs, n)]
    tokens = sum(-(-(t[a, 1] - t[a, 0]) // 128) * 128 for a, _ in ctas) + (t[n:, 1] - t[n:, 0]).sum()
    io, io_base = m.io(tree, shape), base.io(tree, shape)
    assert io.kv == tokens * shape.kv_token_bytes
    assert io.kv > io_base.kv / 2 and io.kv < io_base.kv  # pairs read a chunk once where two 64-row tiles read it twice
    assert io_base.meta - io.meta == pairs * 8 * 4  # a pair's second slot read, per KV head
    assert (io.q, io.o, io.partial, io.mask) == (io_base.q, io_base.o, io_base.partial, io_base.mask)


@pytest.mark.parametrize("seed", range(8))
def test_native_partition_orders_records_as_numpy_does(seed):
    """The C partition (plan_native.c) against the numpy reference, on random tile records: many token ranges of
    1-5 tiles each, in random order, some ineligible (masked, gathered, short, few or too many rows)."""
    from deft.kernels.kv_groups import KVGroups
    from deft.kernels.plan_native import native_available

    if not native_available():
        pytest.fail("the native plan did not build: the C partition is untested")
    rng = np.random.default_rng(seed)
    recs = []
    for _ in range(int(rng.integers(1, 30))):
        lo = int(rng.integers(0, 10**6))
        hi = lo + int(rng.integers(1, 3000))
        for _ in range(int(rng.integers(1, 6))):
            q_lo = int(rng.integers(0, 500))
            q_hi = q_lo + int(rng.integers(1, 20))
            flags = (int(rng.integers(0, hi - lo + 1)) << 2) | int(rng.integers(0, 4))
            recs.append([lo, hi, q_lo, q_hi, int(rng.integers(0, 10**4)), flags])
    recs = np.array(recs, dtype=np.int32)[rng.permutation(len(recs))]
    small, min_tok = int(rng.choice([0, 16])), int(rng.choice([0, 128, 1024]))

    def parted(native: bool):
        g = KVGroups(packed=recs.ravel().copy(), offsets={"tiles": (0, recs.size)}, n_tiles=len(recs), n_chunks=0,
                     n_tokens=0, n_partials=0, max_parts=1, rows=64, chunk_size=0)  # fmt: skip
        res = prompt_gluon.partition_prompt_tiles(g, 4, small, min_tok, native=native)
        return res, g.section("tiles").reshape(-1, 6).copy()

    (n_c, p_c), t_c = parted(True)
    (n_n, p_n), t_n = parted(False)
    assert (n_c, p_c) == (n_n, p_n) and np.array_equal(t_c, t_n)
    assert sorted(map(tuple, t_c)) == sorted(map(tuple, recs))


@pytest.mark.parametrize("seed", range(6))
def test_native_wide_tokens_match_numpy(seed):
    """``_prompt_share``'s count of the wide nodes' tokens (plan_native.c) against its numpy reference, on random
    trees with many queries (some nodes wide at GQA 4 and 64-row tiles, some not) and on a few-shot fan."""
    from deft.kernels.deft_attention import wide_tokens
    from deft.kernels.plan_native import native_available, wide_tokens_native
    from tests.conftest import random_tree

    if not native_available():
        pytest.fail("the native plan did not build: the C count is untested")
    rng = np.random.default_rng(seed)
    trees = [random_tree(rng, max_nodes=int(rng.integers(2, 60)), max_len=50, max_queries=int(rng.integers(1, 40)))
             for _ in range(5)] + [fan(1000, int(rng.integers(10, 60)), 7, rng)]  # fmt: skip
    for tree in trees:
        for group, block_m in ((4, 64), (1, 16), (8, 64)):
            got = wide_tokens_native(tree, group, block_m)
            assert got == wide_tokens(tree, group, block_m), (tree, group, block_m)
    assert any(wide_tokens(t, 4, 16)[1] > 0 for t in trees)  # the trees do have wide nodes


def test_short_prompt_chunks_stay_in_the_fused_kernel():
    """``prompt_min_tokens`` (2048 by default): a 4k prompt's chunks of 500-700 tokens stay in the one launch (the
    Gluon kernel was slower on them, H100, session 16); 0 sends them (at least 128 tokens) to the Gluon kernel."""
    rng = np.random.default_rng(0)
    tree = fan(4096, 50, 9, rng)
    shape = AttentionShape(32, 8, 128, "bfloat16")
    one = DeftFlatten(n_sms=132, prompt_kernel="triton").plan(tree, shape, "cpu")
    default = DeftFlatten(n_sms=132, prompt_kernel="gluon").plan(tree, shape, "cpu")
    assert default.n_prompt == 0 and np.array_equal(default.groups.packed, one.groups.packed) and default.pdl == one.pdl
    assert DeftFlatten(n_sms=132, prompt_kernel="gluon", prompt_min_tokens=0).plan(tree, shape, "cpu").n_prompt > 0
    long = DeftFlatten(n_sms=132, prompt_kernel="gluon").plan(fan(16384, 50, 9, rng), shape, "cpu")
    assert long.n_prompt > 0 and not long.pdl


@pytest.mark.parametrize(
    "width,prompt,gluon", [(20, 16000, False), (30, 20000, False), (32, 16000, False), (50, 16000, True), (50, 20000, True)]
)
def test_only_prompts_with_long_chunks_take_the_gluon_kernel(width, prompt, gluon):
    """``prompt_min_tokens`` 2048 (session 18, H100, the paper sweeps over the whole trace): prompts of 16k-20k with
    two row tiles per chunk (few-shot width 20 and 30, Medusa 32: 14 chunks of 1.1-1.4k tokens at the wide budget)
    were 8-13 % slower in the Gluon kernel and keep the one-launch plan; four row tiles (width 50: 7 chunks of 2.3k
    tokens and more) go to it."""
    tree = fan(prompt, width, 1, np.random.default_rng(width))
    shape = AttentionShape(32, 8, 128, "bfloat16")
    plan = DeftFlatten(n_sms=132).plan(tree, shape, "cpu")
    assert (plan.n_prompt > 0) == gluon
    if not gluon:
        one = DeftFlatten(n_sms=132, prompt_kernel="triton").plan(tree, shape, "cpu")
        assert np.array_equal(plan.groups.packed, one.groups.packed)


@pytest.mark.parametrize("branch,share,chunks", [(1, 0.9, 7), (200, 0.78, 6), (399, 0.56, 4)])
def test_prompt_share_follows_the_prompt_s_share_of_the_tokens(branch, share, chunks):
    """``prompt_share``: a 16k prompt under 50 branches of ``branch`` tokens (few-shot steps 1, 200, 399) takes 1.25 x
    its share of the step's tokens, at most ``wide_waves`` (0.9), and the chunk counts that gives on 132 SMs (session
    16's best shares, with the branches in the fused kernel, were 1.1 x: 0.68 and 5 chunks at step 200; session 22's
    branches' kernel leaves the prompt a sixth chunk)."""
    tree = fan(16384, 50, branch, np.random.default_rng(branch))
    shape = AttentionShape(32, 8, 128, "bfloat16")
    m = DeftFlatten(n_sms=132, prompt_kernel="gluon")
    assert m.prompt_plan(tree, shape) == (True, share)
    plan = m.plan(tree, shape, "cpu")
    t = tile_records(plan)
    assert len(np.unique(t[: plan.n_prompt, :2], axis=0)) == chunks and plan.n_pairs == 2 * chunks
    assert DeftFlatten(n_sms=132, prompt_kernel="gluon", prompt_share=0).prompt_plan(tree, shape) == (True, None)
    assert DeftFlatten(n_sms=132, prompt_kernel="triton").prompt_plan(tree, shape) == (False, None)


def test_no_prompt_tile_leaves_the_plan_as_it_was():
    """A tree without a shared prompt (scattered slots everywhere, one query per branch) has no tile for the
    kernel: the plan is the one-launch plan (same digest) with the programmatic dependent reduction."""
    rng = np.random.default_rng(3)
    parent = [-1] + [0] * 12
    lens = [40] + [6] * 12
    n = sum(lens)
    tree = DecodingTree.from_arrays(parent, lens, rng.permutation(n), np.arange(1, 13), [6] * 12)
    shape = AttentionShape(8, 2, 16, "float16")
    a, b = DeftFlatten(chunk_size=16, prompt_kernel="triton"), DeftFlatten(chunk_size=16, prompt_kernel="gluon")
    pa, pb = a.plan(tree, shape, "cpu"), b.plan(tree, shape, "cpu")
    assert pb.n_prompt == 0 and pb.rest == ()
    assert np.array_equal(pa.groups.packed, pb.groups.packed)


def test_gluon_is_the_default_for_every_variant():
    """Session 16's default (the rule keeps the one-launch plan where the Gluon kernel did not pay)."""
    assert DeftFlatten().prompt_kernel == DeftNodeChunk().prompt_kernel == "gluon"
    assert (DeftFlatten().prompt_min_tokens, DeftFlatten().prompt_share) == (2048, 1.25)


def test_bad_prompt_kernel_settings_are_refused():
    with pytest.raises(ValueError, match="prompt_kernel"):
        DeftFlatten(prompt_kernel="cuda")
    with pytest.raises(ValueError, match="prompt_min_tokens"):
        DeftFlatten(prompt_min_tokens=-1)
    with pytest.raises(ValueError, match="prompt_share"):
        DeftFlatten(prompt_share=-0.5)
    with pytest.raises(ValueError, match="prompt_order"):
        DeftFlatten(prompt_order="priority")


@pytest.mark.parametrize("knob", ["fused_reduce", "split_launch", "wide_pick"])
def test_knobs_with_launches_or_shares_of_their_own_turn_the_gluon_path_off(knob):
    """``fused_reduce`` and ``split_launch`` (launches of their own) and ``wide_pick`` (a share of its own) plan as
    before: no tree goes to the Gluon kernel, even at ``prompt_share=0``."""
    tree = fan(16384, 50, 200, np.random.default_rng(0))
    shape = AttentionShape(32, 8, 128, "bfloat16")
    for share in (1.1, 0.0):
        m = DeftFlatten(n_sms=132, prompt_share=share, **{knob: True})
        assert m.prompt_plan(tree, shape) == (False, None) and m.plan(tree, shape, "cpu").n_prompt == 0


# ---------------------------------------------------------------------- the two launches, interpreter or GPU
needs_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() and not INTERP, reason="DeFT kernels need a CUDA GPU or TRITON_INTERPRET=1"
)


@needs_kernels
@pytest.mark.parametrize("cls", [DeftFlatten, DeftNodeChunk])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [40, 37])
@pytest.mark.parametrize("small_rest", [False, True])
def test_prompt_tiles_in_their_own_launch_match_reference(cls, dtype, width, small_rest):
    """Prompt of 700 consecutive slots, chunks of 150-250 tokens (not multiples of 128), 37 or 40 queries at GQA 4:
    64 + 64 + 20 or 32 rows per chunk, so every chunk has a pair and a single. Off a Hopper GPU the prompt tiles run
    in the fused kernel in a launch of their own; the rest on the side stream's launch: the branches' kernel (the
    default) or with ``small_rest`` the partial kernel compiled for the branches' 16-row tiles alone (every rest
    tile is one query's)."""
    rng = np.random.default_rng(width)
    tree = fan(700, width, 5, rng)
    m = cls(chunk_size=int(rng.integers(150, 250)), block_n=16, prompt_kernel="gluon", prompt_min_tokens=0,
            small_rest=small_rest, rest_stages=(0, 3)[width % 2], branch_heads=not small_rest)  # fmt: skip
    plan = check(m, tree, 8, 2, 16 if INTERP else 64, dtype)
    assert plan.n_prompt > 0 and plan.n_pairs > 0 and plan.n_prompt > 2 * plan.n_pairs
    assert plan.n_prompt < plan.groups.n_tiles  # the branches are left to the fused kernel
    rest = tile_records(plan)[plan.n_prompt :]
    assert plan.rest_rows == (16 if small_rest and ((rest[:, 3] - rest[:, 2]) * 4 <= 16).all() else 0)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_rest_launch_matches_reference(dtype):
    """``small_rest``: a prompt in 128-token chunks (every one a prompt kernel tile) and 20 one-query branches of 30
    tokens in per-node tiles, so every tile after the prompt's is small and the rest's launch is the partial kernel
    compiled for 16-row tiles alone (gathered loops 3 deep here)."""
    rng = np.random.default_rng(3)
    tree = fan(512, 20, 30, rng)
    m = DeftNodeChunk(chunk_size=128, block_n=16, prompt_min_tokens=0, small_rest=True, rest_stages=3, branch_heads=False)
    plan = check(m, tree, 8, 2, 16 if INTERP else 64, dtype)
    assert plan.n_prompt == 4 * 2 and plan.rest_rows == 16 and plan.groups.n_tiles == plan.n_prompt + 20


def test_small_rest_keeps_the_fused_launch_when_a_rest_tile_is_big():
    """``small_rest`` only where every tile after the prompt kernel's is small: branches of two queries (8 rows at
    GQA 4, small) qualify; a branch of eight queries (32 rows) does not, and the launch digest shows the change."""
    shape = AttentionShape(32, 8, 128, "bfloat16")
    rng = np.random.default_rng(0)
    m = DeftFlatten(n_sms=132, small_rest=True, branch_heads=False)
    small = fan(16000, 50, 200, rng)
    plan = m.plan(small, shape, "cpu")
    assert plan.n_prompt > 0 and plan.rest_rows == 16
    fused = DeftFlatten(n_sms=132, branch_heads=False)
    assert m.launch_digest(plan) != fused.launch_digest(fused.plan(small, shape, "cpu"))
    qn = np.r_[np.arange(1, 50), np.full(8, 50)]  # the last branch: 8 queries over its last 8 tokens (causal)
    qv = np.r_[np.full(49, 200), np.arange(193, 201)]
    wide = DecodingTree.from_arrays([-1] + [0] * 50, [16000] + [200] * 50, np.arange(26000), qn, qv)
    plan = m.plan(wide, shape, "cpu")
    assert plan.n_prompt > 0 and plan.rest_rows == 0


@needs_kernels
def test_prompt_tiles_with_a_speculative_tree_match_reference():
    """A token tree under a consecutive prompt: masked candidate tiles stay in the fused kernel's launch."""
    from tests.conftest import speculative_tree

    rng = np.random.default_rng(5)
    tree = speculative_tree(rng, 400, 37, spare_slots=5)
    m = DeftFlatten(chunk_size=140, block_n=16, prompt_kernel="gluon", prompt_min_tokens=0, small_rest=True)
    check(m, tree, 8, 2, 16 if INTERP else 64, torch.bfloat16)


# ---------------------------------------------------------------------- the kernel's build and its GPU run
CHILD = """
import json
from scripts.gluon_probe import resource_usage
from scripts.kernel_aot import compile_prompt_for_hopper
out = {}
for d, dt, pdl in [(128, "bf16", True), (64, "fp16", False)]:
    k = compile_prompt_for_hopper(d, dt, pdl_trigger=pdl, signal=pdl)
    ptx = k.asm["ptx"]
    out[f"{d}_{dt}"] = {**resource_usage(k), "pdl": pdl, "trigger": "griddepcontrol.launch_dependents" in ptx,
                        "signal": "fence.acq_rel.gpu" in ptx and "atom.global.gpu.release.add" in ptx}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_prompt_kernel_compiles_for_hopper_without_spills(tmp_path):
    """sm_90 build in a child process without the interpreter and with an empty cache (see test_gluon_probe.py), with
    and without ``prompt_order="chain"``'s trigger and ``branch_merge``'s count (each in the PTX exactly when asked
    for)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    res = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    for name, r in json.loads(res.stdout.strip().splitlines()[-1]).items():
        assert r["spill_st"] == 0 and r["local_ops"] == 0 and not r["serialized"], (name, r)
        assert 0 < r["smem"] <= 232448 and {24, 240} <= set(r["setmaxnreg"]), (name, r)
        assert r["warps"] == prompt_gluon.NUM_WARPS
        assert r["trigger"] == r["pdl"] and r["signal"] == r["pdl"], (name, r)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on a Hopper GPU (sm_90)")
@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width,prompt", [(50, 16384), (37, 3000), (20, 2500)])
def test_gluon_prompt_kernel_matches_reference_on_the_gpu(monkeypatch, head_dim, dtype, width, prompt):
    """The Gluon kernel runs (a spy counts its launches) and the step matches fp64: chunk lengths not multiples of
    128 (the last block overlaps the one before), pairs and singles, GQA 4."""
    calls = []
    real = prompt_gluon.launch_prompt_partials

    def spy(*args, warmup=False, **kw):
        if not warmup:
            calls.append(args[-2:])
        real(*args, warmup=warmup, **kw)

    monkeypatch.setattr(prompt_gluon, "launch_prompt_partials", spy)
    rng = np.random.default_rng(width + prompt)
    tree = fan(prompt, width, 30, rng)
    m = DeftFlatten(prompt_kernel="gluon", prompt_min_tokens=0)
    plan = check(m, tree, 32, 8, head_dim, dtype)
    assert calls and calls[0] == (plan.n_prompt, plan.n_pairs) and plan.n_prompt > 0
    # and again with Node-Chunk's fixed chunks, one of which is shorter than the others
    m = DeftNodeChunk(chunk_size=700, prompt_kernel="gluon", prompt_min_tokens=0)
    check(m, tree, 32, 8, head_dim, dtype, seed=1)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on a Hopper GPU (sm_90)")
@pytest.mark.parametrize("order", ["chain", "streams"])
@pytest.mark.parametrize("width,prompt,branch", [(50, 16384, 200), (37, 3000, 30), (50, 4096, 1)])
def test_prompt_orders_read_no_partial_early(order, width, prompt, branch):
    """``prompt_order``: with ``"chain"`` the branches' launch is a programmatic dependent of the prompt kernel, and the
    reduction (a plain launch after it) must still see both launches' partials, also where the branches end long before
    the prompt (one-token branches); ``"streams"``, the two-stream form, likewise. Partials and output are NaN-poisoned
    before each of five runs, so a partial read early shows."""
    rng = np.random.default_rng(width + prompt)
    tree = fan(prompt, width, branch, rng)
    for seed in range(5):
        m = DeftFlatten(prompt_order=order, prompt_min_tokens=0)
        plan = check(m, tree, 32, 8, 128, torch.bfloat16, seed=seed)
        assert plan.n_prompt > 0 and plan.groups.n_tiles > plan.n_prompt


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on a Hopper GPU (sm_90)")
def test_steps_with_other_offsets_run_the_kernels_compiled_for_the_first():
    """The plan's section offsets, the pair count and the rest launch's shifted ``meta`` view are not specialised:
    steps whose values fall in other specialisation classes (1, a multiple of 16, neither; 16-byte aligned or not)
    run the kernels the first step's plan compiled. A recompile took 2 s inside one end-to-end step (session 18)."""
    from deft.kernels.tree_attention import deft_partial_kernel

    def n_compiled() -> int:
        return sum(len(c[0]) for k in (prompt_gluon.prompt_partial_kernel, deft_partial_kernel) for c in k.device_caches.values())

    def cls(v: int) -> str:
        return "one" if v == 1 else "x16" if v % 16 == 0 else "other"

    rng = np.random.default_rng(5)
    m = DeftFlatten(prompt_kernel="gluon", prompt_min_tokens=0)
    classes, counts = set(), []
    for width, prompt, branch in [(50, 16384, 30), (37, 3000, 7), (20, 2500, 12), (17, 5000, 1), (33, 4000, 64), (9, 2100, 5)]:
        plan = check(m, fan(prompt, width, branch, rng), 32, 8, 128, torch.bfloat16)
        off = plan.groups.offsets
        classes.add((cls(off["tok_slot"][0]), cls(off["queries"][0]), cls(plan.n_pairs), plan.n_prompt * len(TILE_FIELDS) % 4))
        counts.append(n_compiled())
    assert len(classes) > 2, classes  # the steps do differ in what a specialisation would see
    assert counts == [counts[0]] * len(counts), counts


def test_tma_descriptors_are_made_once_per_pool_object_and_dropped_with_it():
    """``run`` reuses a pool's TMA descriptors while the caller holds the same pool tensor (an engine's per-layer
    pools), makes new ones for another tensor, and drops the entries of pools the caller let go at the next miss (an
    entry references its pool's memory)."""
    import gc

    cache: dict = {}
    k = torch.zeros(256, 8, 128, dtype=torch.bfloat16)
    v = torch.zeros_like(k)
    a = prompt_gluon._descriptor(k, cache)
    assert prompt_gluon._descriptor(k, cache) is a and prompt_gluon._descriptor(v, cache) is not a
    assert len(cache) == 2 and a.block_shape == [prompt_gluon.BLOCK_N, 128] and list(a.shape) == [256, 1024]
    assert prompt_gluon._descriptor(k) is not a  # no cache: made anew
    del v
    gc.collect()
    other = torch.zeros(512, 8, 128, dtype=torch.bfloat16)
    prompt_gluon._descriptor(other, cache)
    assert len(cache) == 2 and prompt_gluon._descriptor(k, cache) is a  # v's entry went, k's stayed

"""The branches' kernel (``branch_heads``: one program per small unmasked tile and block of KV heads, or per run of
tile pieces with ``branch_spread``): its plan on the CPU, its results against the fp64 reference under the
interpreter (or on a GPU), and its choice per tree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deft.attention import AttentionShape
from deft.kernels import branch_heads
from deft.kernels.deft_flatten import DeftFlatten
from deft.kernels.deft_node import DeftNodeChunk
from deft.kernels.kv_groups import FLAG_MASK, FLAG_SHIFT, TILE_FIELDS, spread_rest_tiles
from deft.tree import DecodingTree
from tests.test_deft_kernels import check, tensors  # check: NaN-poisoned partials and output, against fp64
from tests.test_prompt_gluon import HOPPER, INTERP, fan, needs_kernels, tile_records


def branch_tree(
    rng: np.random.Generator, prompt: int, lens: list[int], queries: list[int], causal: bool = True
) -> DecodingTree:
    """A prompt in consecutive slots and one branch per entry of ``lens`` (scattered slots) whose last ``queries[i]``
    tokens are queries: causal among them (several queries per branch make it a masked tile), or with ``causal``
    off each seeing the whole branch (an unmasked tile of several queries)."""
    n_br = int(sum(lens))
    slots = np.r_[np.arange(prompt), prompt + rng.permutation(n_br + 7)[:n_br]]
    qn = np.concatenate([np.full(nq, i + 1) for i, nq in enumerate(queries)])
    qv = np.concatenate([np.arange(n - nq + 1, n + 1) if causal else np.full(nq, n) for n, nq in zip(lens, queries, strict=True)])
    return DecodingTree.from_arrays([-1] + [0] * len(lens), [prompt, *lens], slots, qn, qv, n_slots=prompt + n_br + 7)


# ---------------------------------------------------------------------- the plan
@pytest.mark.parametrize("seed", range(6))
def test_spread_cuts_the_rest_into_equal_runs_and_keeps_every_token_and_row(seed):
    """The rest's records cut so each program's run has its exact share of the tokens (the shares differ by at most
    one token), every token of every tile in exactly one piece, a tile's first piece on its old partial rows, the
    others on new rows after the plan's, and the reduction's lists holding every row of every query once."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 90, size=int(rng.integers(17, 40))).tolist()  # 68+ rows: two row tiles on the prompt
    lens = [40] * len(lens) if seed == 0 else lens  # equal branches, as a few-shot step's
    tree = branch_tree(rng, 700, lens, [1] * len(lens))
    shape = AttentionShape(8, 2, 16, "float16")
    m = DeftNodeChunk(chunk_size=128, block_n=16, prompt_min_tokens=0, branch_heads=True, branch_spread=0, n_sms=24)
    plan = m.plan(tree, shape, "cpu")
    g, first = plan.groups, plan.n_prompt
    assert first > 0 and plan.rest_heads == 16 and plan.rest_programs == 0
    n_prog = int(rng.integers(1, 3 * (g.n_tiles - first)))
    s = spread_rest_tiles(g, first, n_prog)
    old, new = tile_records(plan), s.section("tiles").reshape(-1, len(TILE_FIELDS)).astype(np.int64)
    assert np.array_equal(new[:first], old[:first])
    rest_old, rest_new = old[first:], new[first:]
    total = int((rest_old[:, 1] - rest_old[:, 0]).sum())
    progs = s.section("progs").astype(np.int64)
    n_prog = min(n_prog, total)
    assert progs.size == n_prog + 1 and progs[0] == 0 and progs[-1] == len(rest_new) and (np.diff(progs) >= 0).all()
    per_prog = [int((rest_new[a:b, 1] - rest_new[a:b, 0]).sum()) for a, b in zip(progs[:-1], progs[1:], strict=True)]
    assert sum(per_prog) == total and max(per_prog) - min(per_prog) <= 1
    # each old tile's tokens, exactly once, by its pieces (same queries), first piece on the old rows
    for rec in rest_old:
        mine = rest_new[(rest_new[:, 2] == rec[2]) & (rest_new[:, 0] >= rec[0]) & (rest_new[:, 1] <= rec[1])]
        mine = mine[np.argsort(mine[:, 0])]
        assert mine[0, 0] == rec[0] and mine[-1, 1] == rec[1] and (mine[1:, 0] == mine[:-1, 1]).all()
        assert (mine[:, 3] == rec[3]).all() and mine[0, 4] == rec[4] and (mine[1:, 4] >= g.n_partials).all()
        assert ((mine[:, 5] >> FLAG_SHIFT) == mine[:, 1] - mine[:, 0]).all() and not (mine[:, 5] & FLAG_MASK).any()
    ptr, idx = s.section("red_ptr").astype(np.int64), s.section("red_idx").astype(np.int64)
    assert np.array_equal(np.sort(idx), np.arange(s.n_partials)) and ptr[-1] == s.n_partials
    assert s.n_partials == g.n_partials + int(((new[first:, 4] >= g.n_partials) * (new[first:, 3] - new[first:, 2])).sum())


def test_spread_programs_follow_the_sms_the_prompt_leaves():
    """Few-shot 16k at step 200 on 132 SMs: the prompt kernel's 80 CTAs leave 52 SMs, so 52 programs of 193-194
    tokens over the 50 branches of 200; with ``branch_spread=0`` one program per branch."""
    shape = AttentionShape(32, 8, 128, "bfloat16")
    tree = fan(16000, 50, 200, np.random.default_rng(0))
    kw = dict(n_sms=132, branch_heads=True, branch_block_h=0, branch_warps=8, prompt_share=1.1)
    plan = DeftFlatten(branch_spread=1.0, **kw).plan(tree, shape, "cpu")
    ctas = (plan.n_prompt - plan.n_pairs) * 8
    assert ctas == 80 and plan.rest_heads == 16 and plan.rest_programs == 132 - ctas
    flat = DeftFlatten(branch_spread=0, **kw).plan(tree, shape, "cpu")
    assert flat.rest_programs == 0 and flat.groups.n_tiles - flat.n_prompt == 50
    assert DeftFlatten(n_sms=132, branch_heads=False).plan(tree, shape, "cpu").rest_heads == 0


def test_the_default_runs_the_branches_in_their_kernel_beside_a_larger_prompt_share():
    """Session 22's default: few-shot 16k step 200 gives the prompt kernel 96 CTAs (6 chunks; 80 at the old share
    of 1.1) and its 50 branches one program per (branch, pair of KV heads): 200 programs of 2 warps on the 36 SMs left."""
    shape = AttentionShape(32, 8, 128, "bfloat16")
    tree = fan(16000, 50, 200, np.random.default_rng(0))
    m = DeftFlatten(n_sms=132)
    plan = m.plan(tree, shape, "cpu")
    assert (plan.n_prompt - plan.n_pairs) * 8 == 96 and plan.rest_heads == 16 and plan.rest_programs == 0
    assert plan.groups.n_tiles - plan.n_prompt == 50 and m.branch_head_blocks(shape, 16) == 4
    assert (m.branch_heads, m.branch_spread, m.branch_block_h, m.branch_warps, m.prompt_share) == (True, 0.0, 2, 2, 1.25)


def test_a_masked_or_big_rest_tile_keeps_the_fused_launch():
    """``branch_heads`` only where every tile after the prompt kernel's is small and unmasked: a branch of eight
    queries (32 rows, causal among them) keeps the fused kernel's launch."""
    shape = AttentionShape(32, 8, 128, "bfloat16")
    rng = np.random.default_rng(0)
    m = DeftFlatten(n_sms=132)
    tree = branch_tree(rng, 16000, [200] * 50, [1] * 49 + [8])
    plan = m.plan(tree, shape, "cpu")
    assert plan.n_prompt > 0 and plan.rest_heads == 0 and "progs" not in plan.groups.offsets


def test_leaf_split_gives_few_shot_step_1_node_chunk_s_launch_beside_the_prompt_kernel():
    """Few-shot 16k step 1 (50 one-token leaves, 132 SMs): with ``leaf_split`` (the default) Flatten cuts the leaves at
    their nodes, one-query tiles for the branches' kernel, Node-Chunk's launch byte for byte; without it the 50 tokens
    pack into masked tiles of the fused launch, four query slices each reading all 50. At 4k (no prompt kernel) the
    packed tiles stay either way."""
    shape = AttentionShape(32, 8, 128, "bfloat16")
    tree = fan(16000, 50, 1, np.random.default_rng(0))
    m, packed, nc = DeftFlatten(n_sms=132), DeftFlatten(n_sms=132, leaf_split=False), DeftNodeChunk(n_sms=132)
    plan, plan_packed, plan_nc = m.plan(tree, shape, "cpu"), packed.plan(tree, shape, "cpu"), nc.plan(tree, shape, "cpu")
    assert plan.rest_heads == 16 and plan.groups.n_tiles - plan.n_prompt == 50
    assert m.launch_digest(plan) == nc.launch_digest(plan_nc)
    assert plan_packed.rest_heads == 0 and (tile_records(plan_packed)[plan_packed.n_prompt :, 5] & FLAG_MASK).all()
    # each leaf's token once, where the packed tiles (four query slices of the 50 leaves) read the 50 tokens four times
    assert packed.io(tree, shape).kv == m.io(tree, shape).kv + 3 * 50 * shape.kv_token_bytes
    small = fan(4000, 50, 1, np.random.default_rng(0))
    p4, p4_packed = m.plan(small, shape, "cpu"), packed.plan(small, shape, "cpu")
    assert p4.n_prompt == 0 and m.launch_digest(p4) == packed.launch_digest(p4_packed)
    assert DeftNodeChunk(leaf_split=True).leaf_split_for(True) is False  # Flatten's re-cut only


def test_bad_branch_settings_are_refused():
    for kw, msg in (({"branch_block_n": 8}, "branch_block_n"), ({"branch_stages": 0}, "branch_stages"),
                    ({"branch_warps": 3}, "branch_warps"), ({"branch_spread": -1}, "branch_spread"),
                    ({"branch_block_h": 3}, "branch_block_h"), ({"branch_maxnreg": 8}, "branch_maxnreg")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            DeftFlatten(**kw)


def test_heads_per_program_keeps_the_accumulator_bounded():
    assert branch_heads.heads_per_program(8, 16, 128) == 8
    assert branch_heads.heads_per_program(8, 16, 64) == 8
    assert branch_heads.heads_per_program(32, 16, 128) == 8 and branch_heads.heads_per_program(32, 16, 64) == 16
    assert branch_heads.heads_per_program(3, 16, 16) == 4  # a power of two; the fourth head is masked
    assert branch_heads.heads_per_program(8, 16, 128, 4) == 4 and branch_heads.heads_per_program(8, 16, 128, 16) == 8


# ---------------------------------------------------------------------- against fp64 (interpreter or GPU)
D = 16 if INTERP else 64


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spread", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("heads", [(8, 2), (16, 2), (6, 3)])
def test_branch_kernel_matches_reference(dtype, spread, heads):
    """Prompt chunks in the prompt's launch, then 1-query and 2-query branches of 1-60 tokens in the branches'
    kernel: GQA 4, 8 and 2 (3 KV heads: a masked fourth head in the program's block); one program per tile, or
    runs of pieces over a twelfth, a quarter of the SMs or three per SM."""
    rng = np.random.default_rng(int(spread * 10) + heads[0])
    group = heads[0] // heads[1]
    n = int(rng.integers(65 // group + 1, 65 // group + 12))  # two row tiles on the prompt (the Gluon path)
    lens = rng.integers(2, 60, size=n).tolist()
    nq = [int(x) for x in rng.integers(1, 3, size=n)] if group <= 4 else [1] * n
    tree = branch_tree(rng, 512, lens, nq, causal=False)  # two queries seeing their whole branch: 8 rows, unmasked
    m = DeftNodeChunk(chunk_size=128, block_n=16, prompt_min_tokens=0, branch_heads=True, branch_spread=spread, n_sms=24)
    plan = check(m, tree, heads[0], heads[1], D, dtype, seed=n)
    assert plan.n_prompt > 0 and plan.rest_heads == 16
    assert (plan.rest_programs > 0) == (spread > 0)


@needs_kernels
@pytest.mark.parametrize("block", [(16, 3, 8), (32, 2, 4), (16, 5, 4)])
def test_branch_kernel_blocks_and_head_blocks_match_reference(block, monkeypatch):
    """Other K/V blocks, depths and warps, and more than one block of KV heads (the accumulator bound lowered so a
    program takes two of the four KV heads)."""
    monkeypatch.setattr(branch_heads, "ACC_ELEMS", 16 * D * 2)
    rng = np.random.default_rng(block[0] + block[1])
    tree = branch_tree(rng, 400, rng.integers(1, 70, size=20).tolist(), [1] * 20)
    m = DeftFlatten(chunk_size=128, block_n=16, prompt_min_tokens=0, branch_heads=True, branch_block_n=block[0],
                    branch_stages=block[1], branch_warps=block[2], branch_spread=1.0, branch_block_h=0, n_sms=16)  # fmt: skip
    plan = check(m, tree, 16, 4, D, torch.bfloat16, seed=3)
    assert plan.n_prompt > 0 and plan.rest_heads == 16 and plan.rest_programs > 0


@needs_kernels
@pytest.mark.parametrize("block_h,warps,maxnreg", [(1, 4, 128), (2, 2, 0), (2, 8, 128)])
@pytest.mark.parametrize("spread", [0.0, 1.0])
def test_branch_kernel_with_fewer_heads_per_program_matches_reference(block_h, warps, maxnreg, spread):
    """``branch_block_h``: a tile's KV heads split over programs of one or two heads (four KV heads, GQA 4), at 2, 4
    and 8 warps (2 warps and two heads: the default), with ``branch_maxnreg`` or without; one program per tile or spread."""
    rng = np.random.default_rng(block_h + warps + int(spread))
    tree = branch_tree(rng, 400, rng.integers(1, 70, size=20).tolist(), [1] * 20)
    m = DeftFlatten(chunk_size=128, block_n=16, prompt_min_tokens=0, branch_heads=True, branch_spread=spread,
                    branch_block_h=block_h, branch_warps=warps, branch_maxnreg=maxnreg, n_sms=16)  # fmt: skip
    plan = check(m, tree, 16, 4, D, torch.bfloat16, seed=5)
    assert plan.n_prompt > 0 and plan.rest_heads == 16 and m.branch_head_blocks(plan.shape, 16) == 4 // block_h
    assert (plan.rest_programs > 0) == (spread > 0)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("leaf_len", [1, 3])
def test_leaf_split_matches_reference(dtype, leaf_len):
    """``leaf_split``: 30 leaves of 1 or 3 tokens and one query each (120 rows with GQA 4: too many for ``few_split``'s
    64) beside a prompt in the prompt's launch; the leaves cut at their nodes go to the branches' kernel. NaN-poisoned
    partials and output, against fp64; the same tree without it packs them into masked tiles of the fused launch."""
    rng = np.random.default_rng(leaf_len)
    tree = branch_tree(rng, 512, [leaf_len] * 30, [1] * 30)
    kw = dict(chunk_size=128, block_n=16, prompt_min_tokens=0, n_sms=16)
    plan = check(DeftFlatten(**kw), tree, 16, 4, D, dtype, seed=leaf_len)
    assert plan.n_prompt > 0 and plan.rest_heads == 16 and plan.groups.n_tiles - plan.n_prompt == 30
    packed = check(DeftFlatten(leaf_split=False, **kw), tree, 16, 4, D, dtype, seed=leaf_len)
    assert packed.n_prompt > 0 and packed.rest_heads == 0


@pytest.mark.parametrize("block_h", [0, 4])
@pytest.mark.parametrize("spread", [0.0, 1.0])
def test_io_counts_the_branch_kernel_s_reads_from_the_plan(spread, block_h):
    """``io()`` with ``branch_heads``, from the plan's records: the same K/V as without it (every piece's tokens once,
    all heads); the prompt kernel's records read per KV head as before; the branches' records (pieces, with
    ``branch_spread``) once per block of KV heads, each with a slot index per token and one word per query, plus each
    run's two bounds; partial rows and the reduction's lists as the plan has them."""
    shape = AttentionShape(32, 8, 128, "bfloat16")
    tree = fan(16000, 50, 200, np.random.default_rng(0))
    m = DeftFlatten(n_sms=132, branch_heads=True, branch_spread=spread, branch_block_h=block_h)
    base = DeftFlatten(n_sms=132, branch_heads=False)
    plan, io, io_base = m.plan(tree, shape, "cpu"), m.io(tree, shape), base.io(tree, shape)
    blocks = 8 // (block_h or 8)
    t = tile_records(plan)
    first, pairs, n = plan.n_prompt, plan.n_pairs, len(t)
    ntok, nq = t[:, 1] - t[:, 0], t[:, 3] - t[:, 2]
    assert first > 0 and plan.rest_heads == 16 and not (t[first:, 5] & FLAG_MASK).any()
    assert io.kv == io_base.kv
    assert io.q == int(nq.sum()) * shape.q_row_bytes and io.o == io_base.o
    assert io.partial == 2 * plan.groups.n_partials * shape.n_heads * (shape.head_dim * 2 + 4)
    before = (first * 6 + first - pairs + int(nq[:first].sum()) * 3) * 4  # prompt tiles: affine, one slot (a pair's once)
    after = ((n - first) * 6 + int(ntok[first:].sum()) + int(nq[first:].sum()) + 2 * plan.rest_programs) * 4
    reduce = shape.n_heads * (tree.n_queries * 12 + plan.groups.n_partials * 4)
    assert io.meta == 8 * before + blocks * after + reduce
    if spread == 0:
        assert io.partial == io_base.partial and n == base.plan(tree, shape, "cpu").groups.n_tiles


# ---------------------------------------------------------------------- branch_merge: no reduction launch
def test_branch_merge_needs_one_program_per_branch_tile():
    with pytest.raises(ValueError, match="branch_merge"):
        DeftFlatten(branch_merge=True, branch_heads=False)
    with pytest.raises(ValueError, match="branch_merge"):
        DeftFlatten(branch_merge=True, branch_spread=1.0)
    assert DeftFlatten(branch_merge=True).branch_merge  # the defaults: the branches' kernel, one program per tile


def test_one_rest_tile_per_query_tells_which_plans_merge():
    """A plan merges only where every query is in exactly one tile after the prompt kernel's: a branch cut into two
    tiles (longer than the chunk) gives its query two, and the reduction stays."""
    shape = AttentionShape(32, 8, 128, "bfloat16")
    rng = np.random.default_rng(2)
    kw = dict(n_sms=132, branch_heads=True, branch_spread=0, branch_merge=True)
    plan = DeftFlatten(**kw).plan(branch_tree(rng, 16000, [200] * 50, [1] * 50), shape, "cpu")
    assert plan.n_prompt > 0 and plan.rest_heads == 16 and plan.merge
    long = DeftNodeChunk(chunk_size=256, prompt_min_tokens=0, **kw).plan(branch_tree(rng, 4000, [300] + [20] * 39, [1] * 40), shape, "cpu")
    assert long.n_prompt > 0 and long.rest_heads == 16 and not long.merge
    t = tile_records(long)[long.n_prompt :]
    assert ((t[:, 2] <= 0) & (t[:, 3] > 0)).sum() == 2  # query 0's branch: two rest tiles


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 2), (16, 2), (6, 3)])
def test_branch_merge_matches_reference_without_a_reduction(dtype, heads, monkeypatch):
    """``branch_merge``: the branches' programs merge the prompt's partial rows into their own and write the output;
    no reduction launch (a spy), the sync words back at zero after each of three runs, no merge gave up. 1- and
    2-query branches (unmasked) of 1-60 tokens, GQA 4, 8 and 2 (a masked fourth KV head in the block); partials and
    output NaN-poisoned before each run."""
    from deft.kernels import deft_attention

    calls = []
    real = deft_attention.launch_reduce
    def spy(*a, **k):  # the runs' reductions, not the up-front compile's (warmup, the seventh argument)
        if not (k.get("warmup") or (len(a) > 6 and a[6])):
            calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(deft_attention, "launch_reduce", spy)
    rng = np.random.default_rng(heads[0] + 7)
    group = heads[0] // heads[1]
    n = int(rng.integers(65 // group + 1, 65 // group + 12))
    lens = rng.integers(1, 60, size=n).tolist()
    nq = [int(x) for x in rng.integers(1, 3, size=n)] if group <= 4 else [1] * n
    tree = branch_tree(rng, 512, lens, nq, causal=False)
    m = DeftNodeChunk(chunk_size=128, block_n=16, prompt_min_tokens=0, branch_heads=True, branch_spread=0,
                      branch_merge=True, n_sms=24)  # fmt: skip
    for seed in range(3):
        plan = check(m, tree, heads[0], heads[1], D, dtype, seed=seed)
        assert plan.n_prompt > 0 and plan.rest_heads == 16 and plan.merge
        dev = plan.part_o.device
        assert m._sync_words(dev)[:3].tolist() == [0, 0, 0] and m.merge_errors(dev) == 0
    assert calls == []


@pytest.mark.parametrize("merge", [False, True])
def test_io_of_a_merging_plan_drops_the_branches_partials_and_the_reduction(merge):
    """``io()`` with ``branch_merge``: K/V, q, o and the partial rows (each written and read back once) as without
    it; meta: the reduction's programs replaced by the branches' reads of their queries' lists and the count words."""
    shape = AttentionShape(32, 8, 128, "bfloat16")
    tree = fan(16000, 50, 200, np.random.default_rng(0))
    m = DeftFlatten(n_sms=132, branch_heads=True, branch_spread=0, branch_merge=merge)
    base = DeftFlatten(n_sms=132, branch_heads=True, branch_spread=0)
    plan, io, io_base = m.plan(tree, shape, "cpu"), m.io(tree, shape), base.io(tree, shape)
    assert plan.merge == merge
    if not merge:
        assert io == io_base
        return
    t = tile_records(plan)
    first, pairs, n = plan.n_prompt, plan.n_pairs, len(t)
    assert (io.kv, io.q, io.o, io.mask, io.partial) == (io_base.kv, io_base.q, io_base.o, io_base.mask, io_base.partial)
    assert io.partial == 2 * plan.groups.n_partials * shape.n_heads * (shape.head_dim * 2 + 4)
    reduce_base = shape.n_heads * (tree.n_queries * 12 + plan.groups.n_partials * 4)
    blocks = m.branch_head_blocks(shape, plan.rest_heads)  # each block of KV heads' program merges its own heads
    merge_meta = (first - pairs) * 8 * 8 + blocks * ((2 * tree.n_queries + plan.groups.n_partials) * 4 + (n - first) * 12)
    assert io.meta == io_base.meta - reduce_base + merge_meta


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on a Hopper GPU (sm_90)")
@pytest.mark.parametrize("width,prompt,branch", [(50, 16384, 200), (37, 3000, 30), (50, 4096, 16)])
def test_branch_merge_waits_for_the_prompt_kernel_on_the_gpu(width, prompt, branch):
    """``branch_merge`` on the GPU: the branches' programs (chained to the Gluon prompt kernel) merge only once its
    warpgroups have counted their partials stored, also where the branches end long before the prompt (16-token
    branches: shorter ones share masked tiles, which keep the fused launch and the reduction); five eager runs and five replays of one CUDA graph, partials and output NaN-poisoned before each, the
    count words back at zero after each and no merge given up."""
    from deft.reference import TOLERANCE, reference_attention, relative_error

    rng = np.random.default_rng(width + prompt)
    tree = fan(prompt, width, branch, rng)
    m = DeftFlatten(prompt_min_tokens=0, branch_heads=True, branch_spread=0, branch_merge=True)
    for seed in range(5):
        plan = check(m, tree, 32, 8, 128, torch.bfloat16, seed=seed)
        assert plan.merge and plan.n_prompt > 0
        assert m._sync_words(plan.part_o.device)[:3].tolist() == [0, 0, 0]
    q, k, v = tensors(tree, 32, 8, 128, torch.bfloat16, 9)
    ref = reference_attention(q, k, v, tree)
    out = torch.empty_like(q)
    m.run(q, k, v, plan, out=out)  # compiled and warm before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        m.run(q, k, v, plan, out=out)
    for _ in range(5):
        plan.part_o.fill_(float("nan"))
        plan.part_lse.fill_(float("nan"))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(out, ref) < TOLERANCE[torch.bfloat16]
        assert m._sync_words(q.device)[:3].tolist() == [0, 0, 0]
    assert m.merge_errors(q.device) == 0

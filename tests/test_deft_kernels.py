"""DeFT-Flatten / Node / Node-Chunk against the fp64 reference, under the Triton interpreter on CPU.

Small trees and head_dim 16/32 keep the interpreter fast; every shape feature the GPU sees (chunk
boundaries inside and across nodes, split query tiles, GQA 1/4/8, causal speculative nodes) is here.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from deft.attention import AttentionShape, UnsupportedInput
from deft.kernels import deft_attention, kv_groups
from deft.kernels.deft_flatten import DeftFlatten
from deft.kernels.deft_node import DeftNode, DeftNodeChunk
from deft.kernels.kv_groups import build_groups
from deft.kernels.tree_attention import small_tile_rows
from deft.reference import TOLERANCE, reference_attention, relative_error
from deft.tree import DecodingTree
from tests.conftest import speculative_tree as _speculative

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="DeFT kernels need a CUDA GPU or TRITON_INTERPRET=1",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METHODS = {
    "flatten": lambda **kw: DeftFlatten(**kw),
    "node": lambda **kw: DeftNode(**{k: v for k, v in kw.items() if k != "chunk_size"}),
    "node_chunk": lambda **kw: DeftNodeChunk(**kw),
}


# ---------------------------------------------------------------------- tree builders
def random_tree(rng, n_nodes: int, max_len: int, extra_queries: int = 0, pool_extra: int = 37) -> DecodingTree:
    """Random parents, lengths and scattered pool slots; one query per leaf (full node) plus
    ``extra_queries`` at random nodes with a random visible prefix."""
    parent = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n_nodes)])
    lens = rng.integers(1, max_len + 1, n_nodes)
    n_tok = int(lens.sum())
    slots = rng.permutation(n_tok + pool_extra)[:n_tok]
    leaves = np.setdiff1d(np.arange(n_nodes), parent[parent >= 0])
    qn = list(leaves)
    qv = list(lens[leaves])
    for _ in range(extra_queries):
        n = int(rng.integers(0, n_nodes))
        qn.append(n)
        qv.append(int(rng.integers(1, lens[n] + 1)))
    perm = rng.permutation(len(qn))  # query order must not matter
    return DecodingTree.from_arrays(
        parent, lens, slots, np.array(qn)[perm], np.array(qv)[perm], n_slots=n_tok + pool_extra
    )


def fan_tree(prompt: int, width: int, branch: int, rng=None) -> DecodingTree:
    """Few-shot shape: a prompt and ``width`` branches, one query at each branch's newest token."""
    lens = [prompt] + [branch] * width
    n_tok = sum(lens)
    slots = np.arange(n_tok) if rng is None else rng.permutation(n_tok)
    return DecodingTree.from_arrays([-1] + [0] * width, lens, slots, np.arange(1, width + 1), [branch] * width)


def chain_tree(depth: int, node_len: int, rng) -> DecodingTree:
    """A deep chain; queries at several depths, some seeing only part of their node."""
    lens = [node_len] * depth
    n_tok = depth * node_len
    qn = [depth - 1, depth // 2, 3, 0]
    qv = [node_len, 1, node_len - 1, node_len]
    return DecodingTree.from_arrays([-1] + list(range(depth - 1)), lens, rng.permutation(n_tok), qn, qv)


def speculative_tree(prompt: int, n_candidates: int, rng) -> DecodingTree:
    """A prompt node and a random token tree of candidates under it. Candidate nodes are chains of 1..4
    tokens; every candidate token is a query (causal inside its node via ``visible``)."""
    return _speculative(rng, prompt, n_candidates, spare_slots=5)


def tensors(tree: DecodingTree, heads: int, kv_heads: int, head_dim: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_slots = tree.n_slots or int(tree.slots.max()) + 1
    q = torch.randn(tree.n_queries, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(n_slots, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(n_slots, kv_heads, head_dim, generator=g).to(dtype)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def check(method, tree, heads=8, kv_heads=2, head_dim=16, dtype=torch.float16, seed=0):
    """Run with NaN-poisoned partials and output; compare with the fp64 reference."""
    q, k, v = tensors(tree, heads, kv_heads, head_dim, dtype, seed)
    shape = AttentionShape(heads, kv_heads, head_dim, {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype])
    plan = method.plan(tree, shape, DEVICE)
    plan.part_o.fill_(float("nan"))
    plan.part_lse.fill_(float("nan"))
    out = torch.full_like(q, float("nan"))
    method.run(q, k, v, plan, out=out)
    err = relative_error(out, reference_attention(q, k, v, tree))
    assert err < TOLERANCE[dtype], f"{method.name} rel err {err:.2e} on {tree}"
    return plan


# ---------------------------------------------------------------------- correctness
@pytest.mark.parametrize("mode", list(METHODS))
@pytest.mark.parametrize("seed", range(4))
def test_random_trees_chunk_boundaries_inside_and_across_nodes_match_reference(mode, seed):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, n_nodes=int(rng.integers(2, 14)), max_len=40, extra_queries=3)
    dtype = (torch.float16, torch.bfloat16)[seed % 2]
    # small_stages: the small tile's loops pipelined deeper (on the GPU; the interpreter checks the plumbing)
    # small_block: the small tile's own K/V block (32 tokens against the big tile's 16 here)
    # l2_prefetch: a hint the interpreter skips; on a GPU this runs the prefetching kernel against fp64
    # big_gather_block/stages: the big tile's gathered loops on their own block (32 against the big tile's 16 here)
    m = METHODS[mode](chunk_size=int(rng.integers(5, 40)), block_n=16, small_stages=(0, 5)[seed // 2],
                      small_block=(0, 32)[seed % 2], l2_prefetch=seed % 2 == 1, big_gather_block=(0, 32)[seed // 2],
                      big_gather_stages=(0, 5)[seed // 2])  # fmt: skip
    check(m, tree, dtype=dtype, seed=seed)


@pytest.mark.parametrize("mode", ["flatten", "node_chunk"])
def test_node_longer_than_many_chunks_matches_reference(mode):
    rng = np.random.default_rng(1)
    tree = fan_tree(300, 3, 5, rng)
    plan = check(METHODS[mode](chunk_size=16, block_n=16), tree)
    assert plan.groups.n_chunks >= 300 // 16


@pytest.mark.parametrize("mode", list(METHODS))
@pytest.mark.parametrize("fill", [False, True])
def test_more_queries_than_a_tile_holds_split_and_match_reference(mode, fill):
    rng = np.random.default_rng(2)
    tree = fan_tree(40, 12, 3, rng)  # 12 queries x 4 heads; tiles of 16 rows hold 4 queries
    plan = check(METHODS[mode](chunk_size=32, block_m=16, block_n=16, fill_tiles=fill), tree)
    assert plan.groups.n_tiles > plan.groups.n_chunks
    # 14 queries (one more than 13, so the rest is not empty) in 32-row tiles of 8: slices of 7 + 7, or 8 + 6
    tree = fan_tree(40, 14, 3, rng)
    plan = check(METHODS[mode](chunk_size=64, block_m=32, block_n=16, small_m=0, fill_tiles=fill), tree)
    t = plan.groups.section("tiles").reshape(-1, 6)
    wide = t[t[:, 0] == 0]  # the prompt's first chunk: every query sees it
    assert sorted((wide[:, 3] - wide[:, 2]).tolist()) == ([6, 8] if fill else [7, 7])


def test_filled_tiles_leave_the_rest_to_a_small_tile_and_match_reference():
    """``fill_tiles``: 13 queries x GQA 4 in 64-row tiles = 16 queries... here 18 queries: one full tile of 16
    and a small tile of 2 (8 rows), instead of two big tiles of 9; the output is the same."""
    rng = np.random.default_rng(4)
    tree = fan_tree(96, 18, 5, rng)
    for fill in (False, True):
        plan = check(DeftFlatten(chunk_size=48, block_n=16, fill_tiles=fill), tree, dtype=torch.bfloat16)
        t = plan.groups.section("tiles").reshape(-1, 6)
        prompt = t[t[:, 1] <= 96]
        n_q = np.sort(prompt[:, 3] - prompt[:, 2])
        assert n_q.tolist() == ([2, 2, 16, 16] if fill else [9, 9, 9, 9])


@pytest.mark.parametrize("mode", ["flatten", "node_chunk"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rest_tiles_cut_into_pieces_match_reference(mode, dtype):
    """``rest_chunk``: the filled chunks' small rest tiles (2 of 18 queries) longer than 20 tokens run in pieces of
    at most 20, each with partial rows of its own (poisoned: a piece that is not run, or whose rows the reduction
    does not list, fails); the other tiles keep theirs."""
    rng = np.random.default_rng(5)
    tree = fan_tree(96, 18, 5, rng)
    base = check(METHODS[mode](chunk_size=48, block_n=16, fill_tiles=True), tree, dtype=dtype)
    plan = check(METHODS[mode](chunk_size=48, block_n=16, fill_tiles=True, rest_chunk=20), tree, dtype=dtype)
    t0, t = (p.groups.records("tiles") for p in (base, plan))
    rest0 = (t0["q_hi"] - t0["q_lo"] == 2) & (t0["tok_hi"] - t0["tok_lo"] > 20)
    rest = (t["q_hi"] - t["q_lo"] == 2) & (t["tok_hi"] - t["tok_lo"] > 0) & (t["tok_hi"] <= 96)
    assert rest0.sum() == 2 and rest.sum() == 2 * 3  # two 48-token chunks of the prompt, three pieces each
    assert (t["tok_hi"] - t["tok_lo"])[rest].max() <= 20
    assert plan.groups.n_partials == base.groups.n_partials + 2 * 2 * 2  # 2 more pieces x 2 queries, per chunk
    assert np.diff(plan.groups.section("red_ptr")).max() == plan.groups.max_parts
    assert (t["flags"][rest] >> 2).tolist() == (t["tok_hi"] - t["tok_lo"])[rest].tolist()  # unmasked, whole


@pytest.mark.parametrize("rest_chunk", [0, 20])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_affine_rest_tiles_take_the_affine_loop(rest_chunk, dtype):
    """``small_affine``: a filled chunk's rest tile (2 of 18 queries) over the prompt's consecutive slots runs the
    affine loop, which reads only a tile's first slot. Every other prompt slot in the plan is overwritten with slot 0
    before the run, so a tile that gathers the prompt gets wrong K/V and fails the fp64 check."""
    tree = fan_tree(96, 18, 5)  # consecutive slots
    m = DeftFlatten(chunk_size=48, block_n=16, fill_tiles=True, rest_chunk=rest_chunk, small_affine=True)
    q, k, v = tensors(tree, 8, 2, 16, dtype)
    shape = AttentionShape(8, 2, 16, {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype])
    plan = m.plan(tree, shape, DEVICE)
    t = plan.groups.records("tiles")
    small = (t["q_hi"] - t["q_lo"]) * shape.group_size <= small_tile_rows(shape.group_size, plan.block_m, m.small_m)
    prompt = t["tok_hi"] <= 96
    assert (small & prompt).sum() == (2 if rest_chunk == 0 else 6)  # the rest tiles, whole or in pieces of 16
    assert ((t["flags"][small & prompt] & 2) != 0).all()  # flagged consecutive by the plan
    a = plan.groups.offsets["tok_slot"][0]
    keep = np.zeros(96, dtype=bool)
    keep[t["tok_lo"][prompt]] = True
    plan.meta[a : a + 96][torch.from_numpy(~keep)] = 0
    plan.part_o.fill_(float("nan"))
    plan.part_lse.fill_(float("nan"))
    out = torch.full_like(q, float("nan"))
    m.run(q, k, v, plan, out=out)
    assert relative_error(out, reference_attention(q, k, v, tree)) < TOLERANCE[dtype]
    gather = DeftFlatten(chunk_size=48, block_n=16, fill_tiles=True, rest_chunk=rest_chunk)  # the same poison fails
    plan = gather.plan(tree, shape, DEVICE)
    plan.meta[a : a + 96][torch.from_numpy(~keep)] = 0
    out = gather.run(q, k, v, plan)
    assert not relative_error(out, reference_attention(q, k, v, tree)) < TOLERANCE[dtype]


@pytest.mark.parametrize("unified", [False, True])
@pytest.mark.parametrize("seed", range(2))
def test_small_affine_on_random_trees_with_consecutive_slots_matches_reference(unified, seed):
    """``small_affine`` on trees whose slots are consecutive in DFS order (every tile's first phase affine): small
    tiles with a masked phase too (``unified_mask=False`` keeps them small: affine first phase, tested second)."""
    rng = np.random.default_rng(60 + seed)
    t = random_tree(rng, n_nodes=int(rng.integers(3, 12)), max_len=30, extra_queries=4)
    lens = np.diff(t.slot_ptr)
    tree = DecodingTree.from_arrays(t.parent, lens, np.arange(int(lens.sum())), t.query_node, t.query_visible)
    m = DeftFlatten(chunk_size=int(rng.integers(8, 30)), block_n=16, small_affine=True, unified_mask=unified)
    plan = check(m, tree, dtype=(torch.float16, torch.bfloat16)[seed])
    rec = plan.groups.records("tiles")
    small = (rec["q_hi"] - rec["q_lo"]) * 4 <= small_tile_rows(4, plan.block_m, m.small_m)
    assert (small & ((rec["flags"] & 2) != 0)).any()


@pytest.mark.parametrize("unified", [False, True])
@pytest.mark.parametrize("block,stages", [(32, 5), (64, 0)])
def test_big_tile_gathered_loops_on_their_own_block_match_reference(unified, block, stages):
    """``big_gather_block`` / ``big_gather_stages``: a scattered prefix seen by 12 queries (big tiles over gathered
    slots) and speculative-style queries inside nodes (masked phases), the gathered loops on 32- or 64-token blocks
    while the tile's own block is 16."""
    rng = np.random.default_rng(70 + block)
    tree = random_tree(rng, n_nodes=10, max_len=40, extra_queries=8)
    m = DeftFlatten(chunk_size=30, block_n=16, big_gather_block=block, big_gather_stages=stages, unified_mask=unified)
    plan = check(m, tree, dtype=torch.bfloat16)
    t = plan.groups.records("tiles")
    big = (t["q_hi"] - t["q_lo"]) * 4 > small_tile_rows(4, plan.block_m, m.small_m)
    assert (big & ((t["flags"] & 2) == 0)).any() and (big & ((t["flags"] & 1) != 0)).any()


@pytest.mark.parametrize("mode", list(METHODS))
@pytest.mark.parametrize("seed", range(3))
def test_fused_reduce_matches_reference_and_leaves_counters_zero(mode, seed):
    """``fused_reduce``: no reduction launch; the last program to store each (query, head)'s partial merges it.
    Output and partials poisoned; random trees, a wide fan (many partials per query: small chunks), GQA 4; the
    counters are zero after every run, and a second plan on the same method (counters reused) is right too."""
    rng = np.random.default_rng(40 + seed)
    trees = [
        random_tree(rng, n_nodes=int(rng.integers(2, 12)), max_len=30, extra_queries=3),
        fan_tree(int(rng.integers(20, 90)), int(rng.integers(2, 20)), int(rng.integers(1, 6)), rng),
    ]
    # lpt off on one seed: the 2-D grid runs the programs in another order, so another program merges each row
    m = METHODS[mode](chunk_size=int(rng.integers(5, 24)), block_n=16, fused_reduce=True, lpt=seed != 1)
    dtype = (torch.float16, torch.bfloat16)[seed % 2]
    parts = []
    for tree in trees:
        plan = check(m, tree, dtype=dtype, seed=seed)
        assert plan.counters is not None and not plan.counters.any()
        parts.append(int(np.diff(plan.groups.section("red_ptr")).max()))
    assert max(parts) > 1  # some query merges several partials
    if mode != "node" and seed == 1:
        assert max(parts) > 8  # more than one block of the merge (8 partials at a time)


def test_fused_reduce_with_split_launch_is_refused():
    with pytest.raises(ValueError, match="fused_reduce"):
        DeftFlatten(fused_reduce=True, split_launch=True)


@pytest.mark.parametrize("mode", list(METHODS))
def test_deep_chain_with_partial_visibility_matches_reference(mode):
    check(METHODS[mode](chunk_size=7, block_n=16), chain_tree(30, 3, np.random.default_rng(3)), dtype=torch.bfloat16)


@pytest.mark.parametrize("mode", list(METHODS))
def test_wide_fan_width_64_matches_reference(mode):
    tree = fan_tree(60, 64, 2, np.random.default_rng(4))
    check(METHODS[mode](chunk_size=48, block_n=16), tree, heads=4, kv_heads=1, head_dim=32)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gqa_ratios_and_dtypes_match_reference(heads, kv_heads, dtype):
    rng = np.random.default_rng(5)
    tree = random_tree(rng, n_nodes=8, max_len=20, extra_queries=2)
    check(DeftFlatten(chunk_size=19, block_n=16, block_m=32), tree, heads, kv_heads, 32, dtype)


@pytest.mark.parametrize("n_candidates,mode", [(5, "flatten"), (37, "flatten"), (256, "flatten"), (37, "node_chunk")])
def test_speculative_tree_causal_inside_nodes_matches_reference(n_candidates, mode):
    rng = np.random.default_rng(n_candidates)
    tree = speculative_tree(50, n_candidates, rng)
    check(METHODS[mode](chunk_size=24, block_n=16), tree, heads=4, kv_heads=1, dtype=torch.bfloat16)


def test_speculative_tree_node_mode_matches_reference():
    check(DeftNode(block_n=16), speculative_tree(30, 20, np.random.default_rng(9)), heads=4, kv_heads=1)


@pytest.mark.parametrize("mode", list(METHODS))
def test_single_sequence_plain_decoding_matches_reference(mode):
    rng = np.random.default_rng(6)
    tree = DecodingTree.from_arrays([-1], [77], rng.permutation(77), [0], [77])
    check(METHODS[mode](chunk_size=20, block_n=16), tree, head_dim=64)


def test_single_node_many_causal_queries_matches_reference():
    tree = DecodingTree.from_arrays([-1], [40], np.arange(40), np.zeros(20, dtype=int), np.arange(21, 41))
    check(DeftFlatten(chunk_size=9, block_n=16), tree)


@pytest.mark.parametrize("partial_dtype", ["input", "float32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_partials_in_either_dtype_match_reference(dtype, partial_dtype):
    tree = random_tree(np.random.default_rng(7), n_nodes=6, max_len=30, extra_queries=2)
    check(DeftFlatten(chunk_size=16, block_n=16, partial_dtype=partial_dtype), tree, dtype=dtype)


@pytest.mark.parametrize("mode", list(METHODS))
def test_paper_style_options_match_reference(mode):
    # exact balanced cuts, slot indices prefetched by hand one block ahead, one tile size
    tree = random_tree(np.random.default_rng(17), n_nodes=9, max_len=35, extra_queries=3)
    kw = {"chunk_size": 29, "block_n": 16, "snap": 0.0, "idx_inloop": False, "small_m": 0}
    check(METHODS[mode](**kw), tree, dtype=torch.bfloat16)


@pytest.mark.parametrize("mode", ["flatten", "node"])
def test_register_prefetch_pipeline_matches_reference(mode):
    tree = random_tree(np.random.default_rng(12), n_nodes=7, max_len=40, extra_queries=2)
    check(METHODS[mode](chunk_size=40, block_n=16, prefetch=True), tree, dtype=torch.bfloat16)


@pytest.mark.parametrize("seed", range(3))
def test_index_loads_inside_the_loop_match_reference(seed):
    tree = random_tree(np.random.default_rng(40 + seed), n_nodes=8, max_len=45, extra_queries=3)
    check(DeftFlatten(chunk_size=37, block_n=16, idx_inloop=True), tree, dtype=torch.bfloat16, seed=seed)


@pytest.mark.parametrize("seed", range(3))
def test_flatten_cuts_snapped_to_node_boundaries_match_reference(seed):
    tree = random_tree(np.random.default_rng(50 + seed), n_nodes=12, max_len=30, extra_queries=3)
    check(DeftFlatten(chunk_size=23, block_n=16, snap=0.4), tree, seed=seed)


def test_snapped_cuts_sit_on_node_boundaries_when_one_is_near():
    tree = fan_tree(100, 6, 20, np.random.default_rng(3))  # node starts at 0, 100, 120, ..., 200
    shape = AttentionShape(8, 2, 64, "float16")
    plain = DeftFlatten(chunk_size=44).groups(tree, shape)
    snapped = DeftFlatten(chunk_size=44, snap=0.3).groups(tree, shape)
    node_starts = {0, *range(100, 221, 20)}
    cuts = set(np.unique(snapped.records("tiles")["tok_lo"]).tolist())
    plain_cuts = set(np.unique(plain.records("tiles")["tok_lo"]).tolist())
    assert not plain_cuts <= node_starts  # the balanced cut straddles nodes ...
    # ... the snapped one only where no boundary is within 0.3 x 44 tokens (inside the prompt)
    assert all(c in node_starts or c < 100 - 13 for c in cuts)
    assert snapped.n_tokens == plain.n_tokens
    with pytest.raises(ValueError, match="snap"):
        DeftFlatten(snap=0.7)


@pytest.mark.parametrize("mode", ["flatten", "node_chunk"])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (8, 1)])
def test_small_tiles_for_few_query_chunks_match_reference(mode, heads, kv_heads):
    # a wide fan: the prompt's chunks need the big tile, the branches' fit the small one
    tree = fan_tree(70, 9, 13, np.random.default_rng(21))
    check(METHODS[mode](chunk_size=24, block_n=16, block_m=64, small_m=16), tree, heads, kv_heads, dtype=torch.bfloat16)


def test_small_tile_rows_hold_a_query_and_stay_below_the_big_tile():
    from deft.kernels.tree_attention import small_tile_rows

    assert small_tile_rows(4, 64, 16) == 16
    assert small_tile_rows(4, 64, 20) == 32
    assert small_tile_rows(8, 64, 0) == 64  # off
    assert small_tile_rows(4, 16, 16) == 16  # no smaller tile than the big one
    assert small_tile_rows(32, 32, 16) == 32


def test_head_dim_128_default_tiles_match_reference():
    check(DeftFlatten(chunk_size=64), fan_tree(100, 3, 9, np.random.default_rng(8)), heads=4, kv_heads=1, head_dim=128)


def test_one_plan_serves_every_layer():
    tree = random_tree(np.random.default_rng(10), n_nodes=5, max_len=20)
    m = DeftFlatten(chunk_size=16, block_n=16)
    plan = m.plan(tree, AttentionShape(8, 2, 16, "float16"), DEVICE)
    for layer in range(2):
        q, k, v = tensors(tree, 8, 2, 16, torch.float16, seed=layer)
        assert relative_error(m.run(q, k, v, plan), reference_attention(q, k, v, tree)) < TOLERANCE[torch.float16]


# ---------------------------------------------------------------------- errors before launch
@pytest.fixture
def no_launch(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("kernel launched on bad input")

    monkeypatch.setattr(deft_attention, "launch_partials", boom)
    monkeypatch.setattr(deft_attention, "launch_reduce", boom)


def test_bad_inputs_raise_before_launch(no_launch):
    tree = fan_tree(10, 2, 2)
    m = DeftFlatten()
    with pytest.raises(UnsupportedInput, match="head_dim 80"):
        m.plan(tree, AttentionShape(8, 2, 80, "float16"), DEVICE)
    with pytest.raises(UnsupportedInput, match="float32"):
        m.plan(tree, AttentionShape(8, 2, 64, "float32"), DEVICE)
    with pytest.raises(UnsupportedInput, match="multiple"):
        AttentionShape(6, 4, 64, "float16")
    plan = m.plan(tree, AttentionShape(8, 2, 16, "float16"), DEVICE)
    q, k, v = tensors(tree, 8, 2, 16, torch.float16)
    with pytest.raises(UnsupportedInput, match="dtype mismatch"):
        m.run(q, k.bfloat16(), v.bfloat16(), plan)
    with pytest.raises(UnsupportedInput, match="not a multiple"):
        m.run(q[:, :6], k[:, :1].expand(-1, 4, -1), v[:, :1].expand(-1, 4, -1), plan)
    with pytest.raises(UnsupportedInput, match="do not match the plan"):
        m.run(q[:1], k, v, plan)
    k24 = torch.zeros(k.shape[0], 2, 24, dtype=torch.float16, device=DEVICE)
    with pytest.raises(UnsupportedInput, match="head_dim 24"):
        m.run(torch.zeros(q.shape[0], 8, 24, dtype=torch.float16, device=DEVICE), k24, k24, plan)
    with pytest.raises(UnsupportedInput, match="plan was made for"):
        m.run(q.bfloat16(), k.bfloat16(), v.bfloat16(), plan)


# ---------------------------------------------------------------------- plan structure and io
def _plan_counts(
    g, tree: DecodingTree, g_size: int = 4, small_rows: int = 0, unified: bool = False, small_affine: bool = False,
    prefetch_blocks: tuple[int, int] | None = None,
):
    """Walk the plan tile by tile: check that it covers exactly the visible (query, token) pairs, and
    count what the kernels move."""
    tiles, nodes, queries = g.records("tiles"), g.records("nodes"), g.records("queries")
    tok_slot = g.section("tok_slot").astype(np.int64)
    tok_node = g.section("tok_node").astype(np.int64)
    n_tok = tok_slot.size
    # the plan's flat tokens are exactly the tree's seen tokens, each once, grouped by node
    assert np.array_equal(np.sort(tok_slot), np.sort(tree.token_table()[0][_seen_mask(tree)]))
    assert np.array_equal(tok_node, np.searchsorted(nodes["off"], np.arange(n_tok), side="right") - 1)
    slot_to_flat = {int(s): i for i, s in enumerate(tok_slot)}
    slot, node, pos = tree.token_table()
    vis = tree.visibility(node, pos)  # [Q, T_all] in token_table order
    flat_of_col = np.array([slot_to_flat.get(int(s), -1) for s in slot])
    covered = np.zeros((tree.n_queries, n_tok), dtype=np.int64)
    counts = dict(kv_tokens=0, q_rows=0, masked_tokens=0, slot_reads=0, prefetch_slots=0)
    rows_seen = set()
    for t in range(g.n_tiles):
        lo, hi = tiles["tok_lo"][t], tiles["tok_hi"][t]
        qs = queries["idx"][tiles["q_lo"][t] : tiles["q_hi"][t]]
        counts["kv_tokens"] += hi - lo
        counts["q_rows"] += qs.size
        flags = int(tiles["flags"][t])
        mid = lo + (flags >> 2)  # first phase [lo, mid) without the visibility test, then [mid, hi) with it
        assert lo <= mid <= hi and bool(flags & 1) == (mid < hi)
        counts["masked_tokens"] += hi - mid
        # bit 1: the first phase's slots are consecutive; a big tile then reads only its first slot
        contig = mid > lo and bool(np.all(np.diff(tok_slot[lo:mid]) == 1))
        assert bool(flags & 2) == contig
        # unified: masked -> big; small_affine: the small tile takes the affine loop too
        affine = contig and (qs.size * g_size > small_rows or (unified and mid < hi) or small_affine)
        counts["slot_reads"] += (1 if affine else mid - lo) + hi - mid
        if prefetch_blocks is not None:  # l2_prefetch: the first two blocks' slot indices (the tile's own block size)
            is_small = qs.size * g_size <= small_rows and not (unified and mid < hi)
            counts["prefetch_slots"] += min(2 * prefetch_blocks[is_small], hi - lo)
        rows_seen.update(range(int(tiles["pbase"][t]), int(tiles["pbase"][t]) + qs.size))
        cols = (flat_of_col >= lo) & (flat_of_col < hi)
        sub = vis[:, cols]
        covered[np.ix_(qs, flat_of_col[cols])] += sub[qs].astype(np.int64)
        first = (flat_of_col >= lo) & (flat_of_col < mid)  # the first phase: all its queries see all of it
        assert vis[np.ix_(qs, first.nonzero()[0])].all()
    assert len(rows_seen) == g.n_partials
    counts["partial_rows"] = g.n_partials
    # partials per (sorted) query, and per tile its queries that have more than one
    parts = np.zeros(tree.n_queries, dtype=np.int64)
    for t in range(g.n_tiles):
        parts[tiles["q_lo"][t] : tiles["q_hi"][t]] += 1
    counts["parts"] = parts
    # every visible (query, token) pair is computed exactly once
    want = np.zeros_like(covered)
    want[:, flat_of_col[flat_of_col >= 0]] = vis[:, flat_of_col >= 0]
    assert np.array_equal(covered, want)
    # the reduction merges, per query, exactly the partial rows its tiles wrote
    ptr, idx = g.section("red_ptr"), g.section("red_idx")
    assert ptr[-1] == g.n_partials and np.array_equal(np.sort(idx), np.arange(g.n_partials))
    return counts


def _seen_mask(tree: DecodingTree) -> np.ndarray:
    _, node, pos = tree.token_table()
    return pos < tree.node_seen_len[node]


@pytest.mark.parametrize("mode", list(METHODS))
@pytest.mark.parametrize("seed", range(6))
def test_io_matches_counts_taken_from_the_plan(mode, seed):
    rng = np.random.default_rng(100 + seed)
    if seed < 3:
        tree = random_tree(rng, n_nodes=int(rng.integers(1, 25)), max_len=30, extra_queries=int(rng.integers(0, 6)))
    elif seed == 3:
        tree = speculative_tree(40, 60, rng)
    else:  # seed 5: consecutive slots (the prompt's tiles, big and small, affine)
        tree = fan_tree(int(rng.integers(30, 200)), int(rng.integers(1, 60)), int(rng.integers(1, 9)), rng if seed == 4 else None)
    shape = AttentionShape(32, 8, 128, "bfloat16")
    m = METHODS[mode](chunk_size=int(rng.integers(8, 64)), block_m=int(rng.choice([16, 64, 128])), fill_tiles=seed % 2 == 1,
                      unified_mask=seed % 3 == 2, rest_chunk=int(rng.choice([0, 5, 17])), small_affine=seed >= 4,
                      fused_reduce=seed % 2 == 0, l2_prefetch=seed % 3 == 0)  # fmt: skip
    g = m.groups(tree, shape)
    small = small_tile_rows(shape.group_size, g.rows, m.small_m)
    blocks = (m.block_n, m.small_block or m.block_n) if m.l2_prefetch else None
    c = _plan_counts(g, tree, shape.group_size, small if small < g.rows else 0, m.unified_mask, m.small_affine, blocks)
    io = m.io(tree, shape)
    assert io.kv == c["kv_tokens"] * shape.kv_token_bytes
    assert io.q == c["q_rows"] * shape.q_row_bytes
    assert io.o == tree.n_queries * shape.q_row_bytes
    p_bytes = 4 if m.partial_dtype == "float32" else shape.elem_bytes
    row = shape.n_heads * (shape.head_dim * p_bytes + 4)
    assert io.mask >= shape.n_kv_heads * c["masked_tokens"] * 4
    tile_meta = g.n_tiles * 6 * 4 + c["slot_reads"] * 4 + c["q_rows"] * 12 + c["prefetch_slots"] * 4
    parts = c["parts"]
    assert np.array_equal(np.diff(g.section("red_ptr")), parts)  # the reduction's lists agree with the tiles
    assert io.partial == 2 * c["partial_rows"] * row
    # one reduction program per query and group of query heads (1 by default; 0: as many as fit its tile)
    width = max(2, 1 << max(0, int(parts.max()) - 1).bit_length())
    programs = shape.n_heads // (m.reduce_heads or max(1, min(32, 4096 // (min(width, 64) * shape.head_dim))))
    if m.fused_reduce:  # every tile row: its list bounds and a counter increment; each (query, head) once: its list
        reduce_meta = c["q_rows"] * shape.n_heads * 16 + shape.n_heads * (tree.n_queries * 4 + g.n_partials * 4)
    else:  # every reduction program: its query's list bounds and index, then its list
        reduce_meta = programs * (tree.n_queries * 12 + g.n_partials * 4)
    assert io.meta == shape.n_kv_heads * tile_meta + reduce_meta
    assert io.kv >= tree.unique_kv_tokens * shape.kv_token_bytes  # never below the floor
    if g.n_tiles == g.n_chunks:
        assert io.kv == tree.unique_kv_tokens * shape.kv_token_bytes


@pytest.mark.parametrize("mode", ["flatten", "node_chunk"])
def test_tensor_flops_count_padded_rows_against_the_tree_s_need(mode):
    """``tensor_flops``: a prompt under 16 one-query branches at GQA 4 fills a 64-row tile exactly; each branch's
    4 rows run a 16-row small tile (4x its need); the useful count is every query's visible tokens."""
    prompt, width, branch = 120, 16, 7
    tree = fan_tree(prompt, width, branch)
    shape = AttentionShape(32, 8, 128, "bfloat16")
    m = METHODS[mode](chunk_size=40)
    executed, useful = m.tensor_flops(tree, shape)
    per_row_token = shape.n_kv_heads * 4 * shape.head_dim
    assert executed == per_row_token * (prompt * 64 + width * branch * 16)
    assert useful == shape.n_heads * 4 * shape.head_dim * width * (prompt + branch)


def test_launch_digest_is_equal_for_identical_launches_only():
    """Flatten and Node-Chunk build byte-identical plans for a few-shot tree of 50 branches of 200 tokens over a 4k
    prompt (Flatten cuts few-query runs as Node-Chunk does), so their digests match; a kernel knob, or one entry of
    the packed plan, changes it."""
    tree = fan_tree(4000, 50, 200)
    shape = AttentionShape(32, 8, 128, "bfloat16")
    fl, nc = DeftFlatten(), DeftNodeChunk()
    pf, pn = fl.plan(tree, shape, "cpu"), nc.plan(tree, shape, "cpu")
    assert np.array_equal(pf.groups.packed, pn.groups.packed)
    assert fl.launch_digest(pf) == nc.launch_digest(pn)
    assert DeftFlatten(small_stages=3).launch_digest(pf) != fl.launch_digest(pf)
    pf.groups.packed[-1] += 1
    assert fl.launch_digest(pf) != nc.launch_digest(pn)


def test_flatten_chunks_are_near_equal_and_node_chunks_follow_nodes():
    tree = random_tree(np.random.default_rng(11), n_nodes=20, max_len=50)
    shape = AttentionShape(8, 2, 64, "float16")
    g = DeftFlatten(chunk_size=33, snap=0.0, few_split=0).groups(tree, shape)  # the paper's cut
    lo, hi = g.records("tiles")["tok_lo"], g.records("tiles")["tok_hi"]
    sizes = np.unique(np.stack([lo, hi]), axis=1)
    sizes = sizes[1] - sizes[0]
    assert sizes.max() - sizes.min() <= 1 and sizes.max() <= 33
    gn = DeftNode().groups(tree, shape)
    assert gn.n_chunks == int((tree.node_seen_len > 0).sum())
    gc = DeftNodeChunk(chunk_size=10).groups(tree, shape)
    assert gc.n_chunks == int(np.ceil(tree.node_seen_len[tree.node_seen_len > 0] / 10).sum())


def test_plan_with_no_queries_runs_to_empty_output():
    tree = DecodingTree.from_arrays([-1], [5], np.arange(5), [], [])
    m = DeftFlatten()
    q, k, v = tensors(tree, 8, 2, 16, torch.float16)
    assert m(q, k, v, tree).shape == (0, 8, 16)


def test_describe_reports_tunables():
    d = DeftFlatten(chunk_size=256, block_m=64).describe()
    assert d["chunk_size"] == 256 and d["block_m"] == 64 and d["mode"] == "flatten"


# ---------------------------------------------------------------------- few_split (experimental)
@pytest.mark.parametrize("seed", range(3))
def test_flatten_few_query_chunks_split_at_nodes_match_reference(seed):
    rng = np.random.default_rng(70 + seed)
    tree = fan_tree(60, 7, 11, rng) if seed == 0 else random_tree(rng, n_nodes=12, max_len=25, extra_queries=2)
    check(DeftFlatten(chunk_size=29, block_n=16, few_split=16, snap=0.3 * (seed % 2)), tree, dtype=torch.bfloat16, seed=seed)


def test_few_split_cuts_few_query_chunks_as_node_chunk_does():
    rng = np.random.default_rng(5)
    shape = AttentionShape(8, 2, 64, "float16")  # group 4: a 16-row tile holds 4 queries
    for tree in [fan_tree(100, 9, 30, rng)] + [random_tree(rng, n_nodes=15, max_len=30, extra_queries=2) for _ in range(20)]:
        base = DeftFlatten(chunk_size=70, few_split=0).groups(tree, shape)
        split = DeftFlatten(chunk_size=70, few_split=16).groups(tree, shape)
        t0, t1 = base.records("tiles"), split.records("tiles")
        nodes = split.records("nodes")
        end = np.append(nodes["off"][1:], split.n_tokens)
        node_cuts = {int(o) + k for o, e in zip(nodes["off"], end, strict=True) for k in range(0, int(e - o), 70)}
        cuts0, cuts1 = set(t0["tok_lo"].tolist()), set(t1["tok_lo"].tolist())
        assert cuts1 - cuts0 <= node_cuts  # new cuts are Node-Chunk's: node starts, every 70 tokens inside
        # every chunk of the split plan that spans several nodes has more queries than 16 rows hold
        chunk_q = {}
        for lo, hi, qlo, qhi in zip(t1["tok_lo"], t1["tok_hi"], t1["q_lo"], t1["q_hi"], strict=True):
            chunk_q.setdefault((int(lo), int(hi)), []).append((int(qlo), int(qhi)))
        for (lo, hi), qs in chunk_q.items():
            n_q = max(q[1] for q in qs) - min(q[0] for q in qs)
            spans = np.searchsorted(end, lo, "right") != np.searchsorted(end, hi - 1, "right")
            assert not (spans and n_q * 4 <= 16), (lo, hi, n_q)
    fan = fan_tree(100, 9, 30, rng)
    assert DeftFlatten(chunk_size=70, few_split=16).groups(fan, shape).n_chunks > DeftFlatten(chunk_size=70, few_split=0).groups(fan, shape).n_chunks
    assert DeftFlatten().few_split == 64 and DeftNodeChunk().few_split == 0  # Flatten's default only


def _sliver_free_and_not(tree, monkeypatch, chunk_size=32):
    """Flatten's few-query cuts of ``tree`` (group 4, 16-row tiles, numpy) with and without the edge move."""
    args = (tree, 4, "flatten", chunk_size, 16, None, 0.0)
    moved = build_groups(*args, native=False, few_split=16)
    with monkeypatch.context() as mp:
        mp.setattr(kv_groups, "SLIVER_DIV", 1 << 40)  # chunk_size // SLIVER_DIV == 0: no edge moves
        kept = build_groups(*args, native=False, few_split=16)
    return moved, kept


def test_few_split_moves_a_run_edge_onto_a_node_cut_next_to_it(monkeypatch):
    """A chunk inside one branch is kept as it was; the few run after it used to start a token or two short of the
    branch's Node-Chunk cut and leave a sliver there. The edge now moves onto the cut: fewer tiles, and every cut is
    a node start or a chunk's multiple from one, as Node-Chunk's are."""
    tree = fan_tree(20, 5, 30)
    moved, kept = _sliver_free_and_not(tree, monkeypatch)
    assert moved.n_tiles < kept.n_tiles
    t, nodes = moved.records("tiles"), moved.records("nodes")
    end = np.append(nodes["off"][1:], moved.n_tokens)
    node_cuts = {int(o) + k for o, e in zip(nodes["off"], end, strict=True) for k in range(0, int(e - o), 32)}
    assert set(t["tok_lo"].tolist()) - set(kept.records("tiles")["tok_lo"].tolist()) <= node_cuts
    lens = kept.records("tiles")["tok_hi"] - kept.records("tiles")["tok_lo"]
    assert lens.min() <= 32 // kv_groups.SLIVER_DIV  # the sliver the move removes


@pytest.mark.parametrize("seed", range(2))
def test_few_split_moved_edges_match_reference(seed):
    rng = np.random.default_rng(90 + seed)
    tree = fan_tree(20, 5, 30, rng) if seed == 0 else fan_tree(20, 5, 22, rng)
    check(DeftFlatten(chunk_size=32 - 16 * seed, block_n=16, few_split=16, snap=0.0), tree, dtype=torch.bfloat16, seed=seed)


def test_few_shot_4k_step_399_cuts_as_node_chunk():
    """Few-shot 4k step 399 on 132 SMs (chunk 363, branches of 399): 5 branches were cut 362 + 1 + 36 (133 tiles
    against Node-Chunk's 128, sessions 13-22); now Flatten's tile lengths are Node-Chunk's."""
    shape = AttentionShape(32, 8, 128, "bfloat16")
    tree = fan_tree(4000, 50, 399)

    def lens(m) -> list[int]:
        t = m.groups(tree, shape).records("tiles")
        return sorted((t["tok_hi"] - t["tok_lo"]).tolist())

    flat = lens(DeftFlatten(n_sms=132))
    assert flat == lens(DeftNodeChunk(n_sms=132)) and len(flat) == 128 and min(flat) == 36


# ---------------------------------------------------------------------- consecutive slots (affine addresses)
def runs_tree(rng, n_nodes: int, max_len: int, extra_queries: int = 2) -> DecodingTree:
    """A random tree whose nodes sit in the pool as a paged allocator leaves them: each node's tokens in
    one run of consecutive slots (a few nodes scattered instead), runs in random order, some with a gap
    after them, so chunks are consecutive within a node, across adjacent runs, or not at all."""
    parent = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n_nodes)])
    lens = rng.integers(1, max_len + 1, n_nodes)
    start, pos = np.zeros(n_nodes, dtype=np.int64), 0
    for n in rng.permutation(n_nodes):
        start[n] = pos
        pos += int(lens[n]) + int(rng.integers(0, 2)) * int(rng.integers(1, 5))
    slots = np.concatenate([start[n] + np.arange(lens[n]) for n in range(n_nodes)])
    for n in rng.choice(n_nodes, size=max(1, n_nodes // 4), replace=False):
        a = int(lens[:n].sum())
        slots[a : a + lens[n]] = rng.permutation(slots[a : a + lens[n]])
    leaves = np.setdiff1d(np.arange(n_nodes), parent[parent >= 0])
    qn = list(leaves) + [int(x) for x in rng.integers(0, n_nodes, extra_queries)]
    qv = list(lens[leaves]) + [int(rng.integers(1, lens[n] + 1)) for n in qn[len(leaves) :]]
    return DecodingTree.from_arrays(parent, lens, slots, qn, qv, n_slots=pos)


@pytest.mark.parametrize("mode", list(METHODS))
@pytest.mark.parametrize("seed", range(4))
def test_affine_tiles_over_consecutive_slots_match_reference_and_the_gather_path(mode, seed):
    rng = np.random.default_rng(300 + seed)
    tree = runs_tree(rng, n_nodes=int(rng.integers(3, 12)), max_len=60)
    # one kernel variant for both (with unified_mask "auto" the two address modes could pick different loops, whose
    # blocks, and so sums, differ)
    kw = dict(chunk_size=int(rng.integers(9, 50)), block_n=16, small_m=16 if seed % 2 else 0, unified_mask=False)
    dtype = torch.bfloat16 if seed % 2 else torch.float16
    plan = check(METHODS[mode](**kw), tree, dtype=dtype, seed=seed)
    flags = plan.groups.records("tiles")["flags"]
    assert ((flags & 2) != 0).any(), "the tree should give tiles over consecutive slots"
    assert ((flags & 1) != 0).any() or ((flags & 2) == 0).any(), "and tokens that take the gather path"
    check(METHODS[mode](contiguous=False, **kw), tree, dtype=dtype, seed=seed)
    q, k, v = tensors(tree, 8, 2, 16, dtype, seed)
    affine = METHODS[mode](**kw)(q, k, v, tree)
    gather = METHODS[mode](contiguous=False, **kw)(q, k, v, tree)
    assert torch.equal(affine, gather)  # same values loaded, same arithmetic


def test_prompt_tiles_of_a_prefilled_fan_are_flagged_consecutive():
    tree = fan_tree(300, 6, 5)  # slots in order: prompt, then each branch
    g = DeftFlatten(chunk_size=64, snap=0.0).groups(tree, AttentionShape(8, 2, 16, "float16"))
    t = g.records("tiles")
    in_prompt = t["tok_hi"] <= 300
    assert in_prompt.any() and ((t["flags"][in_prompt] & 2) != 0).all()
    assert ((t["flags"][in_prompt] & 1) == 0).all()  # and they need no mask: the affine path runs them
    scattered = fan_tree(300, 6, 5, np.random.default_rng(0))
    g2 = DeftFlatten(chunk_size=64, snap=0.0).groups(scattered, AttentionShape(8, 2, 16, "float16"))
    assert ((g2.records("tiles")["flags"] & 2) == 0).all()


@pytest.mark.parametrize("mode", ["flatten", "node_chunk"])
def test_masked_tiles_run_their_shared_prefix_without_the_mask_and_match_reference(mode):
    # a chunk that holds the prompt's tail and the first branches: the tail is seen by every query
    tree = fan_tree(300, 6, 5)
    m = METHODS[mode](chunk_size=70, snap=0.0, block_n=16, few_split=0) if mode == "flatten" else METHODS[mode](chunk_size=70)
    plan = check(m, tree)
    t = plan.groups.records("tiles")
    prefix = t["flags"] >> 2
    straddle = (t["tok_lo"] < 300) & (t["tok_hi"] > 300)
    if mode == "flatten":
        assert straddle.any() and (t["flags"][straddle] & 1).all()
        assert (prefix[straddle] == 300 - t["tok_lo"][straddle]).all()
    # causal queries inside a node: the prefix stops where the least-seeing query of the tile stops
    spec = speculative_tree(40, 30, np.random.default_rng(5))
    plan = check(METHODS[mode](chunk_size=23, block_n=16), spec, dtype=torch.bfloat16)
    t = plan.groups.records("tiles")
    assert ((t["flags"] & 1) != 0).any() and ((t["flags"] >> 2) > 0).any()


# ---------------------------------------------------------------------- wide nodes (experimental knob)
@pytest.mark.parametrize("mode", ["flatten", "node_chunk"])
def test_wide_nodes_get_long_chunks_within_the_budget_and_match_reference(mode):
    tree = fan_tree(600, 12, 20)  # 12 queries x group 4 = 48 rows: two 32-row tiles on the prompt
    shape = AttentionShape(8, 2, 16, "float16")
    m = METHODS[mode](chunk_size=40, block_m=32, block_n=16, wide_waves=1.0, wide_ctas_per_sm=2, n_sms=20)
    budget = m.wide_budget(shape)
    assert budget == 20  # 1 wave x 2 per SM x 20 SMs / 2 KV heads
    g = m.groups(tree, shape)
    t = g.records("tiles")
    prompt = t["tok_hi"] <= 600
    n_prompt_chunks = np.unique(t["tok_lo"][prompt]).size
    assert n_prompt_chunks == 10  # 20 programs / 2 tiles, each 60 tokens (>= chunk_size 40)
    assert n_prompt_chunks * 2 <= budget
    branches = t["tok_lo"] >= 600
    assert (t["tok_hi"][branches] - t["tok_lo"][branches]).max() <= 40  # the rest keeps its chunk size
    check(m, tree)
    check(m, random_tree(np.random.default_rng(9), n_nodes=15, max_len=40, extra_queries=8))
    spec = speculative_tree(200, 40, np.random.default_rng(3))
    check(METHODS[mode](chunk_size=30, block_m=32, block_n=16, wide_waves=0.5, n_sms=8), spec, dtype=torch.bfloat16)


@pytest.mark.parametrize("mode", ["flatten", "node_chunk"])
def test_filled_tiles_count_only_big_tiles_against_the_wide_budget(mode):
    """17 queries x group 4 = 68 rows in 32-row tiles: near-equal, 3 big tiles per prompt chunk; filled, 2 full
    tiles and a one-query rest (4 rows, a small tile), so the same budget of 18 programs buys 9 prompt chunks
    instead of 6. A rest too big for the small tile still counts."""
    shape = AttentionShape(8, 2, 16, "float16")
    kw = dict(chunk_size=40, block_m=32, block_n=16, wide_waves=1.0, wide_ctas_per_sm=2, n_sms=18)
    for fill, width, chunks in ((False, 17, 6), (True, 17, 9), (True, 22, 6)):  # 22 queries: a rest of 6 (24 rows)
        tree = fan_tree(600, width, 20)
        m = METHODS[mode](fill_tiles=fill, **kw)
        assert m.wide_budget(shape) == 18
        t = m.groups(tree, shape).records("tiles")
        prompt = t["tok_hi"] <= 600
        assert np.unique(t["tok_lo"][prompt]).size == chunks, (fill, width)
        check(m, tree)


@pytest.mark.parametrize("mode", ["flatten", "node_chunk"])
def test_wide_pick_takes_the_share_the_launch_model_prices_fastest(mode):
    """``wide_pick``: the plan is the candidate share's (``wide_waves`` or WIDE_PICK_SHARES) that the launch model
    prices fastest, ``wide_waves``' unless another is a margin faster; the picked plan is that share's plan exactly,
    copied into the caller's buffer, and matches the fp64 reference."""
    from deft.kernels.launch_model import lpt_makespan

    shape = AttentionShape(32, 8, 128, "bfloat16")  # Llama-3-8B's heads on an H100's 132 SMs: the session-13 picks
    picks = {}
    for name, tree in (("16k_step1", fan_tree(16000, 50, 1)), ("4k_step200", fan_tree(4000, 50, 200))):
        m = METHODS[mode](n_sms=132, wide_pick=True)
        bufs: list[np.ndarray] = []

        def alloc(n: int, bufs=bufs) -> np.ndarray:  # a staging buffer's stand-in
            bufs.append(np.empty(n, dtype=np.int32))
            return bufs[-1]

        g = m.groups(tree, shape, out_alloc=alloc)
        assert len(bufs) == 1 and g.packed is bufs[0]
        cost = {}
        for share in dict.fromkeys((0.9, *deft_attention.WIDE_PICK_SHARES)):
            c = METHODS[mode](n_sms=132, wide_waves=share).groups(tree, shape)
            cost[share] = (lpt_makespan(c, shape.group_size, 16, 2 * 132 / 8), c)
        best = min(cost, key=lambda s: cost[s][0])
        if cost[best][0] > (1 - deft_attention.WIDE_PICK_MARGIN) * cost[0.9][0]:
            best = 0.9
        assert np.array_equal(g.packed, cost[best][1].packed)
        picks[name] = best
    # Flatten's step-1 tree (its 50 one-token branches in one chunk: 4 tiles per KV head) costs little past one wave,
    # so the prompt gets the whole wave; Node-Chunk cuts the branches into 50 tiles, which a second wave would cost. A
    # prompt beside 50 branches of 200 tokens gets less than 0.9 in both.
    assert picks == {"16k_step1": 1.0 if mode == "flatten" else 0.9, "4k_step200": 0.75}
    # small trees: whatever it picks runs correctly
    check(METHODS[mode](chunk_size=40, block_m=32, block_n=16, wide_pick=True, n_sms=20), fan_tree(600, 12, 20))
    check(METHODS[mode](chunk_size=30, block_m=32, block_n=16, wide_pick=True, n_sms=8),
          speculative_tree(200, 40, np.random.default_rng(3)), dtype=torch.bfloat16)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for a GPU")
def test_first_run_compiles_every_variant_so_later_plans_compile_nothing():
    """After one run, plans with other tile heights and reduction widths (one query, a wide fan, a long chain)
    reuse compiled kernels: no compile inside a timed engine step."""
    from deft.kernels.global_reduce import global_reduce_kernel
    from deft.kernels.tree_attention import deft_partial_kernel

    def n_compiled() -> int:
        return sum(len(c[0]) for c in deft_partial_kernel.device_caches.values()) + sum(
            len(c[0]) for c in global_reduce_kernel.device_caches.values()
        )

    shape = AttentionShape(n_heads=8, n_kv_heads=2, head_dim=64, dtype="bfloat16")
    m = DeftFlatten(chunk_min=16)
    rng = np.random.default_rng(7)
    trees = [random_tree(rng, 3, 40), random_tree(rng, 60, 30), random_tree(rng, 2, 3000), random_tree(rng, 30, 300, 40)]
    before = None
    plans = []
    for tree in trees:
        q, k, v = (x.to(DEVICE) for x in tensors(tree, 8, 2, 64, torch.bfloat16))
        plan = m.plan(tree, shape, DEVICE)
        plans.append((plan.block_m, plan.block_p))
        out = m.run(q, k, v, plan)
        assert relative_error(out, reference_attention(q, k, v, tree)) < TOLERANCE[torch.bfloat16]
        if before is None:
            before = n_compiled()
    assert len(set(plans)) > 1, plans  # the trees really pick different variants
    assert n_compiled() == before, plans


# ---------------------------------------------------------------------- the reduction's head groups
@pytest.mark.parametrize("heads", [0, 1, 2, 8])
def test_reduction_programs_over_head_groups_match_reference(heads):
    """One reduction program per query and ``reduce_heads`` query heads (0: as many as fit its tile)."""
    from deft.kernels.global_reduce import reduce_heads

    rng = np.random.default_rng(60 + heads)
    tree = random_tree(rng, n_nodes=14, max_len=40, extra_queries=3)
    plan = check(DeftFlatten(chunk_size=17, block_n=16, reduce_heads=heads), tree, dtype=torch.bfloat16)
    assert plan.reduce_heads == (heads or reduce_heads(8, 16, plan.block_p))


def test_reduce_heads_must_divide_the_query_heads():
    from deft.kernels.global_reduce import reduce_heads

    assert reduce_heads(32, 128, 16, 0) == 2 and reduce_heads(32, 128, 2, 0) == 16 and reduce_heads(32, 128, 64, 0) == 1
    assert reduce_heads(12, 64, 2, 0) == 4  # a power of two that divides the heads
    assert reduce_heads(32, 128, 16, 8) == 8
    with pytest.raises(ValueError, match="divide"):
        DeftFlatten(reduce_heads=3).plan(random_tree(np.random.default_rng(0), 3, 5), AttentionShape(8, 2, 16, "float16"), DEVICE)


# ---------------------------------------------------------------------- longest-first launch order (lpt)
@pytest.mark.parametrize("mode", list(METHODS))
@pytest.mark.parametrize("seed", range(2))
def test_longest_first_launch_order_matches_reference(mode, seed):
    rng = np.random.default_rng(90 + seed)
    tree = random_tree(rng, n_nodes=14, max_len=40, extra_queries=3) if seed else fan_tree(120, 9, 25, rng)
    kw = {} if mode == "node" else {"chunk_size": 24}
    check(METHODS[mode](lpt=True, block_n=16, **kw), tree, dtype=torch.bfloat16, seed=seed)
    check(METHODS[mode](lpt=True, mix=1e9, block_n=16, **kw), tree, dtype=torch.bfloat16, seed=seed)  # alternated


def test_mix_alternates_big_and_small_tiles_exactly_when_the_big_ones_are_short():
    """``mix``: the longest-first order, then big and small tiles alternate (each kind in its own longest-first
    order) when the costliest big tile x slots <= mix x the total cost; at the threshold's other side, or with
    only one kind of tile, the plain longest-first order. Nothing but the tiles' order changes."""
    from deft.kernels.kv_groups import LPT_BIG, LPT_PROGRAM, LPT_SMALL

    rng = np.random.default_rng(5)
    shape = AttentionShape(8, 2, 64, "float16")
    for tree in [fan_tree(300, 12, 40, rng), fan_tree(40, 30, 60, rng), fan_tree(500, 6, 9, rng)]:
        lpt = DeftFlatten(chunk_size=50, mix=0).groups(tree, shape)
        t0 = lpt.section("tiles").reshape(-1, 6)
        n_tok = t0[:, 1] - t0[:, 0]
        masked = np.where(t0[:, 5] & 1, n_tok - (t0[:, 5] >> 2), 0)
        big = (t0[:, 3] - t0[:, 2]) * 4 > small_tile_rows(4, lpt.rows, 16)
        assert big.any() and not big.all()
        cost = (n_tok + masked) * np.where(big, LPT_BIG, LPT_SMALL) + LPT_PROGRAM
        m = DeftFlatten(chunk_size=50, n_sms=10)
        slots = m.wide_ctas_per_sm * m.n_sms / shape.n_kv_heads  # resident programs per KV head
        ratio = cost[big].max() * slots / cost.sum()  # the rule's quantity
        for mix, alternates in ((ratio * 1.001, True), (ratio * 0.999, False), (1e9, True), (0.0, False)):
            g = DeftFlatten(chunk_size=50, n_sms=10, mix=mix).groups(tree, shape)
            t1 = g.section("tiles").reshape(-1, 6)
            assert np.array_equal(lpt.packed[t0.size :], g.packed[t1.size :])  # nothing else moves
            if not alternates:
                assert np.array_equal(t0, t1)
                continue
            k = min(big.sum(), (~big).sum())
            kinds = (t1[:, 3] - t1[:, 2]) * 4 > small_tile_rows(4, g.rows, 16)
            assert kinds[: 2 * k : 2].all() and not kinds[1 : 2 * k : 2].any()  # big, small, big, small, ...
            assert len(set(kinds[2 * k :].tolist())) <= 1  # then the rest of one kind
            assert np.array_equal(t1[kinds], t0[big]) and np.array_equal(t1[~kinds], t0[~big])  # each kind in order
    with pytest.raises(ValueError, match="mix"):
        DeftFlatten(mix=-1)


def test_longest_first_only_reorders_tiles_most_work_first():
    from deft.kernels.kv_groups import LPT_BIG, LPT_PROGRAM, LPT_SMALL

    rng = np.random.default_rng(3)
    shape = AttentionShape(8, 2, 64, "float16")
    for tree in [fan_tree(200, 12, 40, rng)] + [random_tree(rng, n_nodes=15, max_len=60, extra_queries=3) for _ in range(10)]:
        base = DeftFlatten(chunk_size=50).groups(tree, shape)
        lpt = DeftFlatten(chunk_size=50, lpt=True, mix=0).groups(tree, shape)
        t0 = base.section("tiles").reshape(-1, 6)
        t1 = lpt.section("tiles").reshape(-1, 6)
        assert sorted(map(tuple, t0.tolist())) == sorted(map(tuple, t1.tolist()))  # the same records
        assert np.array_equal(base.packed[t0.size :], lpt.packed[t1.size :])  # nothing else moves
        n_tok = t1[:, 1] - t1[:, 0]
        masked = np.where(t1[:, 5] & 1, n_tok - (t1[:, 5] >> 2), 0)
        big = (t1[:, 3] - t1[:, 2]) * 4 > small_tile_rows(4, lpt.rows, 16)
        cost = (n_tok + masked) * np.where(big, LPT_BIG, LPT_SMALL) + LPT_PROGRAM
        assert np.all(np.diff(cost) <= 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="runs on a GPU")
def test_fused_reduce_under_contention_on_the_gpu():
    """``fused_reduce`` where programs really run at once (the interpreter runs them one by one): a few-shot tree
    of 50 branches over a 4k prompt and a wide random tree at Llama-3-8B's head shape, many partials per query, each
    run 20 times with poisoned output and partials, eagerly and as CUDA-graph replays; a merge that reads a partial
    before its store is visible, or a counter left nonzero, fails the fp64 check or the zero check."""
    shape = AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128, dtype="bfloat16")
    rng = np.random.default_rng(12)
    trees = [fan_tree(4096, 50, 200, rng), random_tree(rng, 60, 200, 40)]
    for tree in trees:
        m = DeftFlatten(fused_reduce=True, chunk_size=256, l2_prefetch=True)
        q, k, v = tensors(tree, 32, 8, 128, torch.bfloat16)
        ref = reference_attention(q, k, v, tree)
        plan = m.plan(tree, shape, DEVICE)
        assert plan.groups.max_parts > 4
        out = torch.empty_like(q)
        graph = torch.cuda.CUDAGraph()
        m.run(q, k, v, plan, out)  # compiled before the capture
        with torch.cuda.graph(graph):
            m.run(q, k, v, plan, out)
        for i in range(40):
            plan.part_o.fill_(float("nan"))
            plan.part_lse.fill_(float("nan"))
            out.fill_(float("nan"))
            if i % 2:
                graph.replay()
            else:
                m.run(q, k, v, plan, out)
            torch.cuda.synchronize()
            assert relative_error(out, ref) < TOLERANCE[torch.bfloat16], i
            assert not plan.counters.any()


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for a GPU")
@pytest.mark.parametrize("mode", list(METHODS))
def test_plans_through_pinned_staging_in_both_launch_orders_match_reference_on_the_gpu(mode):
    """The CUDA plan path end to end at Llama-3-8B's head shape: the C plan fills (and, with ``lpt``, reorders)
    the pinned staging buffer, three plans in a row reuse the two buffers, every plan's output is checked; the
    upload through torch (``DEFT_CUDART_UPLOAD=0``) and through the CUDA runtime (the default), which must load."""
    from deft.kernels.staging import cudart

    shape = AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128, dtype="bfloat16")
    rng = np.random.default_rng(11)
    trees = [random_tree(rng, 3, 40), random_tree(rng, 60, 30), random_tree(rng, 2, 3000), random_tree(rng, 30, 300, 40)]
    for lpt, via_runtime in ((True, False), (False, False), (True, True), (False, True)):
        m = METHODS[mode](lpt=lpt)
        m.plan(trees[0], shape, DEVICE)
        staging = m._staging[torch.device(DEVICE)]
        staging.lib = cudart() if via_runtime else None
        assert staging.lib is not None or not via_runtime, "the CUDA runtime cannot be loaded"
        for tree in trees:
            q, k, v = tensors(tree, 32, 8, 128, torch.bfloat16)
            ref = reference_attention(q, k, v, tree)
            for _ in range(3):
                plan = m.plan(tree, shape, DEVICE)
                out = torch.full_like(q, float("nan"))
                m.run(q, k, v, plan, out)
                assert relative_error(out, ref) < TOLERANCE[torch.bfloat16], (mode, lpt, via_runtime)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="reads GPU timers")
@pytest.mark.parametrize("lpt", [True, False])
def test_timeline_records_every_program_and_leaves_the_output_unchanged_on_the_gpu(lpt):
    """The diagnostic timeline (scripts/timeline_probe.py): every program writes a start no later than its end and
    a real SM id, and the partials it computes are the ones the plain kernel computes."""
    from deft.kernels.global_reduce import launch_reduce
    from deft.kernels.tree_attention import launch_partials

    shape = AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128, dtype="bfloat16")
    tree = random_tree(np.random.default_rng(5), 30, 300, 40)
    q, k, v = tensors(tree, 32, 8, 128, torch.bfloat16)
    m = DeftFlatten(lpt=lpt)
    plan = m.plan(tree, shape, DEVICE)
    g = plan.groups
    n_prog = g.n_tiles * 8
    timeline = torch.full((n_prog * 4,), -1, dtype=torch.int64, device=DEVICE)
    launch_partials(
        q, k, v, plan.part_o, plan.part_lse, plan.meta, g.offsets, g.n_tiles, plan.block_m, plan.block_n,
        plan.num_warps, plan.num_stages, m.prefetch, m.idx_inloop, m.small_m, m.contiguous, head_fastest=lpt,
        timeline=timeline, unified=plan.unified, affine_big=plan.affine_big,
    )  # fmt: skip
    out = torch.full_like(q, float("nan"))
    launch_reduce(out, plan.part_o, plan.part_lse, plan.meta, g.offsets, plan.block_p)
    assert relative_error(out, reference_attention(q, k, v, tree)) < TOLERANCE[torch.bfloat16]
    t = timeline.view(-1, 4).cpu()
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert (t[:, 0] > 0).all() and (t[:, 1] >= t[:, 0]).all()
    assert ((t[:, 2] >= 0) & (t[:, 2] < n_sms)).all() and t[:, 2].unique().numel() > 1


def test_mix_counts_resident_programs_so_its_default_is_session_10s_measured_rule():
    """The rule measured in session 10 counted ``ctas_per_sm`` x SMs / KV heads programs with ``mix=1.5``; it
    now counts the resident ones (``wide_ctas_per_sm`` x SMs / KV heads) with ``mix=0.75``: at the defaults
    (``ctas_per_sm = 2 x wide_ctas_per_sm``) the plans are the same bit for bit, and a ``ctas_per_sm`` change no
    longer enters the rule."""
    from deft.kernels.kv_groups import build_groups

    rng = np.random.default_rng(11)
    shape = AttentionShape(32, 8, 128, "bfloat16")
    m = DeftFlatten(n_sms=132)
    assert m.ctas_per_sm == 2 * m.wide_ctas_per_sm and m.mix == 0.75
    trees = [fan_tree(p, 50, s, rng) for p in (600, 2500) for s in (1, 40, 80)]
    trees += [random_tree(rng, n_nodes=20, max_len=90, extra_queries=3) for _ in range(8)]
    alternated = 0
    for tree in trees:
        g = m.groups(tree, shape)
        old = build_groups(
            tree, shape.group_size, "flatten", 0, m.block_m, None, m.snap, few_split=m.few_split,
            wide_budget=m.wide_budget(shape), chunk_policy=m.chunk_policy(shape), lpt_small_m=m.small_m,
            lpt_mix=(1.5, m.ctas_per_sm * m.n_sms / shape.n_kv_heads),
        )  # fmt: skip
        assert np.array_equal(g.packed, old.packed)
        alternated += not np.array_equal(g.packed, DeftFlatten(n_sms=132, mix=0).groups(tree, shape).packed)
    assert alternated  # the rule took effect on some of these trees


# ---------------------------------------------------------------------- the plan's per-shape arguments, cached
@pytest.mark.parametrize("cls", [DeftFlatten, DeftNodeChunk, DeftNode])
def test_method_groups_from_cached_arguments_equal_the_numpy_plan(cls):
    """``groups`` takes build_groups' arguments (and their C form) from a per-shape cache: on random trees and
    knob settings its plan is the numpy reference's, built from arguments derived here as ``groups`` once did."""
    from deft.kernels.kv_groups import build_groups

    rng = np.random.default_rng(11)
    shape = AttentionShape(8, 2, 16, "float16")
    knobs = [{}, {"chunk_size": 40}, {"wide_waves": 0.0, "mix": 0.0}, {"lpt": False, "snap": 0.0},
             {"fill_tiles": True}, {"few_split": 0, "n_sms": 10, "ctas_per_sm": 2.0}]  # fmt: skip
    for kw in knobs:
        m = cls(**kw)
        for _ in range(4):
            tree = random_tree(rng, int(rng.integers(2, 30)), int(rng.integers(1, 300)), int(rng.integers(0, 6)))
            auto = m.mode != "node" and not m.chunk_size
            ref = build_groups(
                tree, shape.group_size, m.mode, 0 if auto else m.chunk_for(tree, shape), m.block_m, None,
                m.snap if m.mode == "flatten" else 0.0, native=False,
                few_split=m.few_split if m.mode == "flatten" else 0, wide_budget=m.wide_budget(shape),
                chunk_policy=m.chunk_policy(shape) if auto else None, lpt_small_m=m.small_m if m.lpt else None,
                lpt_mix=(m.mix, m.wide_ctas_per_sm * m.n_sms / shape.n_kv_heads), fill_tiles=m.fill_tiles,
                fill_small=m.fill_small(shape),
            )  # fmt: skip
            for _ in range(2):  # the second call takes the cached arguments
                got = m.groups(tree, shape)
                assert np.array_equal(got.packed, ref.packed), kw
                assert (got.n_tiles, got.n_partials, got.rows, got.chunk_size) == (
                    ref.n_tiles, ref.n_partials, ref.rows, ref.chunk_size,
                )  # fmt: skip


def test_setting_a_knob_after_a_plan_changes_the_next_plan():
    """The cached per-shape arguments and plan context are dropped when a knob is set (as the autotuner does)."""
    shape = AttentionShape(32, 8, 128, "bfloat16")
    tree = fan_tree(4000, 50, 1)
    m = DeftFlatten(n_sms=132)
    before = m.plan(tree, shape, "cpu").groups
    m.wide_waves = 1.0
    after = m.plan(tree, shape, "cpu").groups
    assert np.array_equal(after.packed, DeftFlatten(n_sms=132, wide_waves=1.0).groups(tree, shape).packed)
    assert after.n_tiles != before.n_tiles
    m.block_m = 32  # the launch configuration and tile rows follow too
    assert m.plan(tree, shape, "cpu").block_m == 32


# ---------------------------------------------------------------------- one gathered loop for both phases
@pytest.mark.parametrize("mode", list(METHODS))
@pytest.mark.parametrize("seed", range(4))
def test_unified_mask_loop_matches_reference(mode, seed):
    """``unified_mask``: a tile's gathered tokens run one loop that tests visibility from ``t_mid`` on. Random
    trees, speculative trees (masked tiles with a shared prefix) and prefilled runs (affine first phases followed by
    masked tokens), with and without the small tile, against fp64."""
    rng = np.random.default_rng(700 + seed)
    dtype = (torch.float16, torch.bfloat16)[seed % 2]
    prefixed = 0
    for tree in (
        random_tree(rng, int(rng.integers(2, 14)), 40, extra_queries=3),
        speculative_tree(int(rng.integers(20, 60)), int(rng.integers(5, 80)), rng),
        runs_tree(rng, n_nodes=int(rng.integers(3, 12)), max_len=60),
    ):
        kw = dict(block_n=16, unified_mask=True, small_m=16 if seed % 2 else 0)
        if mode != "node":
            kw["chunk_size"] = int(rng.integers(9, 50))
        plan = check(METHODS[mode](**kw), tree, dtype=dtype, seed=seed)
        f = plan.groups.records("tiles")["flags"]
        prefixed += int((((f & 1) != 0) & ((f >> 2) > 0)).sum())
    assert prefixed > 0, "some tile should have an unmasked prefix before its masked tokens"


def test_unified_mask_auto_picks_the_variant_per_plan_and_both_match_reference():
    """``unified_mask="auto"``: the UNIFIED kernel when no tile runs the big tile's plain gathered loop (a fan whose
    prompt sits in consecutive slots: affine prompt tiles, small branch tiles), the default kernel when some do (a
    tree with scattered slots and several queries per branch); each plan against fp64."""
    from deft.kernels.kv_groups import CLASS_BIG_PLAIN, tile_classes

    shape = AttentionShape(8, 2, 16, "float16")
    fan = fan_tree(300, 6, 5)
    m = DeftFlatten(chunk_size=40, block_n=16, unified_mask="auto")
    plan = check(m, fan)
    assert plan.unified and not tile_classes(plan.groups, 4, 16) & CLASS_BIG_PLAIN
    rng = np.random.default_rng(21)
    scattered = random_tree(rng, 12, 60, extra_queries=12)
    plan = check(m, scattered, seed=1)
    assert not plan.unified and tile_classes(plan.groups, 4, 16) & CLASS_BIG_PLAIN
    assert m.unified_for(plan.groups, shape) is False and DeftFlatten(unified_mask=True).unified_for(plan.groups, shape)
    with pytest.raises(ValueError, match="unified_mask"):
        DeftFlatten(unified_mask="sometimes")


@pytest.mark.parametrize("mode", ["flatten", "node_chunk"])
def test_specialise_runs_the_affine_kernel_only_where_every_tile_fits_it(mode):
    """``specialise``: the AFFINE_BIG kernel (the big tile's affine loop alone) for a plan of unmasked big tiles over
    consecutive slots and unmasked small tiles (a prefilled prompt with one query per branch), against fp64; a plan
    with a masked tile (a speculative tree) or a gathered big tile keeps the full kernel, and so does the method
    with ``specialise`` off. A kernel compiled with the affine loop alone gives wrong rows for a gathered tile, so
    a wrong choice fails the reference check."""
    from deft.kernels.kv_groups import CLASS_BIG_AFFINE, CLASS_SMALL_PLAIN, tile_classes

    shape = AttentionShape(8, 2, 16, "float16")
    cls = DeftFlatten if mode == "flatten" else DeftNodeChunk
    m = cls(chunk_size=40, block_n=16, specialise=True)
    fan = fan_tree(300, 6, 5)  # prompt in slots 0..299, branches of 5 decoded tokens, one query each
    plan = check(m, fan)
    classes = tile_classes(plan.groups, shape.group_size, 16)
    assert plan.affine_big and classes == CLASS_BIG_AFFINE | CLASS_SMALL_PLAIN, classes
    assert m.classes_of(plan.groups, shape) == classes
    assert not check(cls(chunk_size=40, block_n=16), fan).affine_big
    spec = speculative_tree(90, 20, np.random.default_rng(4))
    plan = check(m, spec, seed=2)
    assert not plan.affine_big
    rng = np.random.default_rng(22)
    plan = check(m, random_tree(rng, 12, 60, extra_queries=12), seed=3)
    assert not plan.affine_big


@pytest.mark.parametrize("mode", ["flatten", "node_chunk"])
@pytest.mark.parametrize("seed", range(3))
def test_split_launch_runs_big_and_small_tiles_apart_and_matches_reference(mode, seed):
    """``split_launch``: the plan's tile records, big ones first then small ones (each kind keeping the launch
    order), run in two launches of the partial kernel compiled for their own rows; against fp64 on random trees with
    several queries per branch, a fan of one-query branches, speculative token trees (masked small tiles), GQA 1 / 4 /
    8 and both dtypes, outputs and partials poisoned first."""
    from deft.kernels.kv_groups import small_tile_rows

    rng = np.random.default_rng(700 + seed)
    cls = DeftFlatten if mode == "flatten" else DeftNodeChunk
    heads, kv_heads = [(8, 8), (8, 2), (16, 2)][seed]
    dtype = (torch.float16, torch.bfloat16)[seed % 2]
    trees = [random_tree(rng, 14, 40, extra_queries=6), fan_tree(120, 9, 7), speculative_tree(60, 24, rng)]
    split = 0
    for i, tree in enumerate(trees):
        m = cls(chunk_size=32, block_n=16, small_block_n=16, split_launch=True)
        plan = check(m, tree, heads=heads, kv_heads=kv_heads, dtype=dtype, seed=i)
        group = heads // kv_heads
        t = plan.groups.records("tiles")
        rows = (t["q_hi"] - t["q_lo"]) * group
        small = small_tile_rows(group, plan.block_m, m.small_m)
        if plan.n_big >= 0:
            split += 1
            assert plan.small_rows == small < plan.block_m and not plan.pdl
            assert (rows[: plan.n_big] > small).all() and (rows[plan.n_big :] <= small).all()
        else:  # one launch only when the plan's tiles are no taller than the small tile
            assert small >= plan.block_m
    assert split >= 1, "no plan was split: the test would not exercise the two launches"

"""Library baselines (FlashInfer paged and cascade, xformers split-K, FlexAttention) vs the fp64 reference.

GPU tests are marked ``gpu`` and skip, naming the method and the reason, where the method cannot run. The
CPU tests pin what runs everywhere: one-line unavailability reasons, ``io`` without a GPU, the host-side
layouts (checked by emulating the library's algorithm in fp64), and eager FlexAttention on the CPU.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import baselines.flex_attention as flex_mod
from baselines.flashinfer_cascade import FlashInferCascade, cascade_layout
from baselines.flashinfer_paged import FlashInferPaged, split_kv_chunks
from baselines.flex_attention import (
    FlexAttention,
    flex_call,
    kv_bucket,
    pad_mask_tables,
    query_bucket,
    tree_mask_tables,
)
from baselines.path_decode import device_path_slots, path_indptr, path_slots
from baselines.xformers_splitk import XformersSplitK, xformers_split_k
from deft.attention import AttentionShape, IOCounts, UnsupportedInput, floor_io
from deft.reference import TOLERANCE, reference_attention, relative_error
from deft.tree import DecodingTree

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "flashinfer_paged": FlashInferPaged,
    "flashinfer_cascade": FlashInferCascade,
    "xformers_splitk": XformersSplitK,
    "flex_attention": FlexAttention,
}
GPU_ONLY = ("flashinfer_paged", "flashinfer_cascade", "xformers_splitk")
SHAPE = AttentionShape(n_heads=8, n_kv_heads=2, head_dim=128, dtype="bfloat16")  # GQA group 4, head_dim 128


# ---------------------------------------------------------------------------------------------- trees
def multi_level_tree(rng: np.random.Generator, depth: int = 3, fanout: int = 3, max_len: int = 40) -> DecodingTree:
    """Root prompt plus ``depth`` levels of branches with multi-token nodes; one query per leaf (plain decoding),
    plus a query on one internal node and two on the root (queries whose path ends above the deepest level)."""
    parent, lens = [-1], [int(rng.integers(64, 300))]
    frontier = [0]
    for _ in range(depth):
        nxt = []
        for p in frontier:
            for _ in range(int(rng.integers(1, fanout + 1))):
                parent.append(p)
                lens.append(int(rng.integers(1, max_len + 1)))
                nxt.append(len(parent) - 1)
        frontier = nxt
    leaves = sorted(set(range(len(parent))) - set(parent))
    queries = [(v, lens[v]) for v in rng.permutation(leaves)]  # not in DFS order: run must reorder
    queries += [(1, lens[1]), (0, lens[0]), (0, int(rng.integers(1, lens[0])))]
    return _scattered(parent, lens, queries, rng)


def speculative_tree(rng: np.random.Generator, prompt: int = 200, n_cand: int = 24) -> DecodingTree:
    """Medusa-style: a prompt, a random tree of single-token candidates (one query each), plus a multi-token
    node whose every token is a query (partial visibility inside a node)."""
    parent, lens = [-1], [prompt]
    for i in range(1, n_cand + 1):
        parent.append(int(rng.integers(0, i)))
        lens.append(1)
    parent.append(int(rng.integers(1, n_cand + 1)))
    lens.append(7)
    queries = [(v, 1) for v in range(1, n_cand + 1)] + [(n_cand + 1, k) for k in range(1, 8)]
    return _scattered(parent, lens, queries, rng)


def _scattered(parent, lens, queries, rng, spare: int = 100) -> DecodingTree:
    lens = np.asarray(lens)
    n_slots = int(lens.sum()) + spare
    slots = rng.permutation(n_slots)[: lens.sum()]
    ptr = np.concatenate([[0], np.cumsum(lens)])
    return DecodingTree.from_lists(parent, [slots[ptr[i] : ptr[i + 1]] for i in range(len(lens))], queries, n_slots=n_slots)


def bucket_tree(rng: np.random.Generator, n_q: tuple[int, int], kv_len: tuple[int, int]) -> DecodingTree:
    """A speculative-style tree with a query count and a highest slot + 1 drawn from the given (inclusive)
    ranges: a prompt, single-token candidates (one query each) and a multi-token node whose every token is a
    query; slots scattered below ``kv_len``; no declared pool (``n_slots=None``)."""
    nq, kv = int(rng.integers(n_q[0], n_q[1] + 1)), int(rng.integers(kv_len[0], kv_len[1] + 1))
    multi = int(rng.integers(2, 8))
    n_cand = nq - multi
    parent = [-1] + [int(rng.integers(0, i)) for i in range(1, n_cand + 1)] + [int(rng.integers(0, n_cand + 1))]
    lens = [int(rng.integers(50, 300))] + [1] * n_cand + [multi]
    slots = np.append(rng.choice(kv - 1, sum(lens) - 1, replace=False), kv - 1)[rng.permutation(sum(lens))]
    ptr = np.cumsum([0, *lens])
    queries = [(v, 1) for v in range(1, n_cand + 1)] + [(n_cand + 1, k) for k in range(1, multi + 1)]
    queries = [queries[i] for i in rng.permutation(nq)]
    return DecodingTree.from_lists(parent, [slots[ptr[i] : ptr[i + 1]] for i in range(len(lens))], queries)


def _inputs(tree: DecodingTree, shape: AttentionShape, device, seed: int = 0, n_slots: int | None = None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = shape.torch_dtype
    n_slots = n_slots or tree.n_slots
    q = torch.randn(tree.n_queries, shape.n_heads, shape.head_dim, generator=g).to(device, dt)
    k = torch.randn(n_slots, shape.n_kv_heads, shape.head_dim, generator=g).to(device, dt)
    v = torch.randn(n_slots, shape.n_kv_heads, shape.head_dim, generator=g).to(device, dt)
    return q, k, v


# ---------------------------------------------------------------------------------------------- GPU
def _skip_unless_runs(name: str) -> None:
    reason = METHODS[name].unavailable_reason()
    if reason is None and name in GPU_ONLY + ("flex_attention",) and not torch.cuda.is_available():
        reason = "needs a CUDA GPU (torch sees none)"
    if reason is not None:
        pytest.skip(f"{name}: {reason}")


def _method(name: str):
    return METHODS[name]()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["multi_level", "speculative", "random"])
@pytest.mark.parametrize("name", list(METHODS))
def test_library_baseline_matches_reference_on_gpu(name, kind, dtype, make_random_tree):
    _skip_unless_runs(name)
    rng = np.random.default_rng(zlib.crc32(f"{name}{kind}{dtype}".encode()))
    shape = AttentionShape(SHAPE.n_heads, SHAPE.n_kv_heads, SHAPE.head_dim, dtype)
    method = _method(name)
    if kind == "multi_level":
        trees = [multi_level_tree(rng)]
    elif kind == "speculative":
        trees = [speculative_tree(rng)]
    else:
        n = 2 if name == "flex_attention" else 3  # flex compiles once per tree shape
        trees = [make_random_tree(rng, max_nodes=12, max_len=20, max_queries=6) for _ in range(n)]
    for tree in trees:
        q, k, v = _inputs(tree, shape, "cuda")
        out = method.run(q, k, v, method.plan(tree, shape, "cuda"))
        torch.cuda.synchronize()
        assert out.shape == q.shape and out.dtype == q.dtype
        err = relative_error(out, reference_attention(q, k, v, tree))
        assert err < TOLERANCE[shape.torch_dtype], f"{name} on {tree}: rel err {err:.2e}"


@pytest.mark.gpu
def test_flashinfer_paged_without_tensor_cores_matches_reference():
    _skip_unless_runs("flashinfer_paged")
    tree = multi_level_tree(np.random.default_rng(1))
    q, k, v = _inputs(tree, SHAPE, "cuda")
    method = FlashInferPaged(use_tensor_cores=False)
    err = relative_error(method.run(q, k, v, method.plan(tree, SHAPE, "cuda")), reference_attention(q, k, v, tree))
    assert err < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("force", [True, False])
def test_flex_attention_forced_kernel_matches_reference(force):
    _skip_unless_runs("flex_attention")
    tree = speculative_tree(np.random.default_rng(3), n_cand=40)  # 47 queries x 4 heads: taller than 128 rows
    q, k, v = _inputs(tree, SHAPE, "cuda")
    method = FlexAttention(force_flex_attention=force)
    err = relative_error(method.run(q, k, v, method.plan(tree, SHAPE, "cuda")), reference_attention(q, k, v, tree))
    assert err < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flashinfer_paged", "flashinfer_cascade"])
def test_flashinfer_plans_in_the_ring_stay_valid_and_reused_wrappers_refuse_older_ones(name):
    """The last ``size`` plans all run correctly, newest first; a plan older than that is refused where the
    ring reuses its wrappers (both methods' default) and still correct where every plan has its own."""
    _skip_unless_runs(name)
    rng = np.random.default_rng(2)
    method = METHODS[name]()
    trees = [multi_level_tree(rng)]
    n_levels = len(cascade_layout(trees[0]).levels)  # cascade keys its rings by level count: keep it fixed
    while len(trees) <= method._wrappers.size:
        t = multi_level_tree(rng)
        if name == "flashinfer_paged" or len(cascade_layout(t).levels) == n_levels:
            trees.append(t)
    plans = [method.plan(t, SHAPE, "cuda") for t in trees]
    checked = list(zip(trees, plans, strict=True))[::-1]
    if method._wrappers.reuse:
        q, k, v = _inputs(trees[0], SHAPE, "cuda")
        with pytest.raises(RuntimeError, match="superseded"):
            method.run(q, k, v, plans[0])
        checked = checked[:-1]
    for t, p in checked:
        q, k, v = _inputs(t, SHAPE, "cuda")
        err = relative_error(method.run(q, k, v, p), reference_attention(q, k, v, t))
        assert err < TOLERANCE[SHAPE.torch_dtype], f"{name}: rel err {err:.2e}"


# ---------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("name", GPU_ONLY)
def test_unavailable_reason_is_one_line_without_gpu(name):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    reason = METHODS[name].unavailable_reason()
    assert isinstance(reason, str) and reason and "\n" not in reason and "Traceback" not in reason


def test_flex_attention_is_available_on_cpu_in_eager_form():
    assert FlexAttention.unavailable_reason() is None


@pytest.mark.parametrize("name", list(METHODS))
def test_io_runs_without_gpu_and_respects_the_floor(name, make_random_tree):
    rng = np.random.default_rng(3)
    shape = AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128, dtype="bfloat16")
    method = METHODS[name]()
    for tree in [multi_level_tree(rng), speculative_tree(rng)] + [make_random_tree(rng) for _ in range(5)]:
        io = method.io(tree, shape)
        assert isinstance(io, IOCounts)
        assert all(getattr(io, f) >= 0 for f in ("kv", "q", "o", "partial", "mask", "logits", "meta"))
        floor = floor_io(tree, shape)
        assert io.kv >= floor.kv and io.q >= floor.q and io.o >= floor.o


def test_sequence_based_io_reads_every_path():
    tree = multi_level_tree(np.random.default_rng(4))
    io = FlashInferPaged().io(tree, SHAPE)
    assert io.kv == tree.path_kv_tokens * SHAPE.kv_token_bytes
    assert XformersSplitK().io(tree, SHAPE).kv == 3 * io.kv  # gather read + packed write + kernel read


def test_cascade_reads_each_shared_node_once_per_query_tile():
    # root shared by 50 leaves, group 4: 200 packed rows, two 128-row tiles read the root twice
    parent = [-1] + [0] * 50
    lens = [4096] + [200] * 50
    tree = _scattered(parent, lens, [(i, 200) for i in range(1, 51)], np.random.default_rng(5))
    shape = AttentionShape(32, 8, 128, "bfloat16")
    io = FlashInferCascade().io(tree, shape)
    assert io.kv == (2 * 4096 + 50 * 200) * shape.kv_token_bytes


def test_path_slots_are_each_querys_visible_slots_on_random_trees(make_random_tree):
    rng = np.random.default_rng(6)
    for _ in range(20):
        tree = make_random_tree(rng)
        indptr, slots = path_slots(tree)
        for j in range(tree.n_queries):
            np.testing.assert_array_equal(slots[indptr[j] : indptr[j + 1]], tree.query_slots(j))
        # what FlashInfer paged's plan passes with device_indices: the same lists, built by torch
        np.testing.assert_array_equal(path_indptr(tree), indptr)
        dev = device_path_slots(tree, torch.device("cpu"))
        assert dev.dtype == torch.int32
        np.testing.assert_array_equal(dev.numpy(), slots)


def test_split_kv_planner_splits_only_when_the_grid_is_underfilled():
    assert (split_kv_chunks(np.array([50, 60]), 8, 264) == 1).all()  # short: one chunk each
    assert split_kv_chunks(np.array([4296] * 50), 8, 264).sum() == 50  # 400 CTAs already exceed the grid
    assert split_kv_chunks(np.array([16384]), 8, 264).sum() > 1
    assert xformers_split_k(1, 16384) == 64 and xformers_split_k(64, 300) == 4  # xformers FwOp.get_split_k


def _emulate_cascade(q, k, v, tree: DecodingTree, scale: float) -> torch.Tensor:
    """FlashInfer's cascade algorithm in fp64 on the host layout: per-level attention with log-sum-exp
    (zero output and -inf for empty segments), merged in the wrapper's order (last level first)."""
    layout = cascade_layout(tree)
    group = q.shape[1] // k.shape[1]
    qs = q[torch.from_numpy(layout.order)].double()
    out = torch.zeros_like(qs)
    lse = torch.full(qs.shape[:2], float("-inf"), dtype=torch.float64)
    for lv in layout.levels[-1:] + layout.levels[:-1]:
        assert lv.qo_indptr[0] == 0 and lv.qo_indptr[-1] == tree.n_queries
        seq_len = np.maximum(np.diff(lv.kv_indptr) - 1, 0) + lv.last_page_len  # FlashInfer's get_seq_lens
        np.testing.assert_array_equal(seq_len, np.diff(lv.kv_indptr))
        o_l = torch.zeros_like(qs)
        s_l = torch.full(qs.shape[:2], float("-inf"), dtype=torch.float64)
        for i in range(lv.qo_indptr.size - 1):
            rows = slice(int(lv.qo_indptr[i]), int(lv.qo_indptr[i + 1]))
            idx = torch.from_numpy(lv.kv_indices[lv.kv_indptr[i] : lv.kv_indptr[i + 1]].astype(np.int64))
            if idx.numel() == 0:
                continue
            kk = k[idx].double().repeat_interleave(group, 1)
            vv = v[idx].double().repeat_interleave(group, 1)
            s = torch.einsum("qhd,thd->qht", qs[rows], kk) * scale
            s_l[rows] = torch.logsumexp(s, -1)
            o_l[rows] = torch.einsum("qht,thd->qhd", torch.softmax(s, -1), vv)
        m = torch.maximum(lse, s_l)
        w0, w1 = torch.exp(lse - m).nan_to_num(0.0), torch.exp(s_l - m).nan_to_num(0.0)
        out = (out * w0[..., None] + o_l * w1[..., None]) / (w0 + w1)[..., None]
        lse = m + torch.log(w0 + w1)
        assert torch.isfinite(lse).all()  # the own-node level, merged first, is never empty
    return out[torch.from_numpy(np.argsort(layout.order))]


def test_cascade_layout_gives_reference_attention(make_random_tree):
    rng = np.random.default_rng(7)
    trees = [multi_level_tree(rng, max_len=6), speculative_tree(rng, prompt=9, n_cand=10)]
    trees += [make_random_tree(rng, max_nodes=10) for _ in range(30)]
    for tree in trees:
        q, k, v = _inputs(tree, AttentionShape(4, 2, 16, "float32"), "cpu")
        err = relative_error(_emulate_cascade(q, k, v, tree, 16**-0.5), reference_attention(q, k, v, tree))
        assert err < 1e-10, f"{tree}: {err}"


def test_cascade_levels_follow_depth_and_own_nodes():
    tree = multi_level_tree(np.random.default_rng(8), depth=3)
    layout = cascade_layout(tree)
    assert len(layout.levels) == int(tree.depth[tree.query_node].max()) + 1
    qn = tree.query_node[layout.order]
    assert (np.diff(tree.tin[qn]) >= 0).all()  # DFS order: a node's queries are contiguous
    root_level = layout.levels[0]
    assert root_level.seg_len.max() == tree.node_len[tree.root]  # the root span is one shared segment


def test_flex_decoding_kernel_only_where_its_tile_fits_a_query_block():
    llama = AttentionShape(32, 8, 128, "bfloat16")
    assert not FlexAttention()._force(32, llama) and FlexAttention()._force(50, llama)
    assert FlexAttention(force_flex_attention=False)._decoding(50, llama)
    assert not FlexAttention(force_flex_attention=False)._decoding(128, llama)


def test_flex_mask_tables_equal_tree_visibility(make_random_tree):
    rng = np.random.default_rng(9)
    for _ in range(30):
        tree = make_random_tree(rng, max_nodes=10)
        t = tree_mask_tables(tree)
        slot, node, pos = tree.token_table()
        mine = (t.slot_pos[slot][None, :] < t.q_end[:, None]) & (t.q_start[:, None] < t.slot_end[slot][None, :])
        np.testing.assert_array_equal(mine, tree.visibility(node, pos))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_eager_on_cpu_matches_reference(make_random_tree):
    rng = np.random.default_rng(10)
    shape = AttentionShape(4, 2, 16, "float32")
    method = FlexAttention()
    trees = [multi_level_tree(rng, max_len=6), speculative_tree(rng, prompt=9, n_cand=10)]
    trees += [make_random_tree(rng, max_nodes=10) for _ in range(10)]
    for tree in trees:
        q, k, v = _inputs(tree, shape, "cpu")
        out = method.run(q, k, v, method.plan(tree, shape, "cpu"))
        assert relative_error(out, reference_attention(q, k, v, tree)) < TOLERANCE[torch.float32]


def test_flex_buckets_bound_the_padding_and_the_number_of_shapes():
    for n in range(1, 1000):
        b = query_bucket(n)
        assert n <= b and -(-b // 128) == -(-n // 128)  # never an extra 128-row query block
        assert (b & (b - 1) == 0 and b >= 16) if n <= 128 else b % 128 == 0
    sizes = np.arange(1, 1 << 16)
    for per in (8, 2, 1):
        kv = np.array([kv_bucket(int(n), per) for n in sizes])
        assert (kv >= sizes).all() and (kv % 128 == 0).all()
        assert (kv - sizes < np.maximum(128, sizes / per)).all()  # < 1/per padding (one block below 128 * per)
        for k in range(10, 16):  # per key lengths an octave
            assert np.unique(kv[(sizes > 1 << k) & (sizes <= 2 << k)]).size == per
    with pytest.raises(ValueError, match="power of two"):
        FlexAttention(kv_buckets_per_octave=3)


def test_flex_padded_tables_hide_padded_slots_and_repeat_the_last_query(make_random_tree):
    rng = np.random.default_rng(12)
    for _ in range(20):
        tree = make_random_tree(rng, max_nodes=10)
        t = tree_mask_tables(tree)
        q_len, kv_len = query_bucket(tree.n_queries), kv_bucket(t.slot_pos.size) + 5
        p = pad_mask_tables(t, q_len, kv_len)
        vis = (p.slot_pos[None, :] < p.q_end[:, None]) & (p.q_start[:, None] < p.slot_end[None, :])
        n_q, n_kv = tree.n_queries, t.slot_pos.size
        assert vis.shape == (q_len, kv_len) and not vis[:, n_kv:].any()
        bare = (t.slot_pos < t.q_end[:, None]) & (t.q_start[:, None] < t.slot_end)
        np.testing.assert_array_equal(vis[:n_q, :n_kv], bare)
        assert (vis[n_q:] == vis[n_q - 1]).all()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_flex_attention_bucketed_matches_reference_and_pads_nothing_into_the_output(dtype, make_random_tree):
    rng = np.random.default_rng(zlib.crc32(dtype.encode()))
    shape = AttentionShape(8, 2, 32, dtype)  # GQA group 4
    method = FlexAttention()
    trees = [speculative_tree(rng, prompt=150, n_cand=40), multi_level_tree(rng, max_len=6)]
    trees += [bucket_tree(rng, (130, 150), (700, 800))]  # the main kernel's path: two query blocks
    trees += [make_random_tree(rng, max_nodes=10) for _ in range(6)]
    padded_q = padded_kv = 0
    for tree in trees:
        q, k, v = _inputs(tree, shape, "cpu", n_slots=max(tree.n_slots or 0, kv_bucket(int(tree.slots.max()) + 1)))
        plan = method.plan(tree, shape, "cpu")
        padded_q += plan.q_len > tree.n_queries
        padded_kv += plan.kv_len > int(tree.slots.max()) + 1
        out = method.run(q, k, v, plan)
        assert out.shape == q.shape and out.dtype == q.dtype
        err = relative_error(out, reference_attention(q, k, v, tree))
        assert err < TOLERANCE[shape.torch_dtype], f"{tree}: rel err {err:.2e}"
        assert torch.isfinite(flex_call(flex_mod._flex(), q, k, v, plan)).all()  # padded rows included
    assert padded_q >= 5 and padded_kv >= 2  # the padding really happened


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_compiles_once_per_bucket_not_per_tree(monkeypatch):
    """Dynamo, counting its compiles (``CompileCounter`` backend, dense flex behind it), over six trees of two
    buckets, interleaved: queries 17..32 (decoding kernel) and 33..64 (main kernel), keys 1025..1152. Pools of
    varying size. Unbucketed, the same trees compile once per (queries, key length)."""
    from torch._dynamo.testing import CompileCounter

    rng = np.random.default_rng(11)
    shape = AttentionShape(8, 2, 32, "float32")
    trees = [bucket_tree(rng, (17, 32) if i % 2 else (33, 64), (1025, 1152)) for i in range(6)]

    def compiles(method: FlexAttention) -> int:
        torch._dynamo.reset()
        counter = CompileCounter()
        fn = torch.compile(flex_mod._flex(), backend=counter, dynamic=False)
        monkeypatch.setattr(flex_mod, "_compiled_flex", lambda dynamic: fn)
        try:
            for i, tree in enumerate(trees):
                plan = dataclasses.replace(method.plan(tree, shape, "cpu"), compiled=True)
                q, k, v = _inputs(tree, shape, "cpu", seed=i, n_slots=1152 + 64 * i)
                err = relative_error(method.run(q, k, v, plan), reference_attention(q, k, v, tree))
                assert err < TOLERANCE[torch.float32]
            return counter.frame_count
        finally:
            torch._dynamo.reset()

    assert compiles(FlexAttention()) == 2
    shapes = {(t.n_queries, int(t.slots.max()) + 1) for t in trees}
    assert len(shapes) > 2 and compiles(FlexAttention(bucket=False)) == len(shapes)


def test_flex_io_counts_the_padded_rows_and_the_last_block_read_whole():
    rng = np.random.default_rng(13)
    shape = AttentionShape(32, 8, 128, "bfloat16")
    row = shape.q_row_bytes
    split = 132 // shape.n_kv_heads * 2
    # decoding kernel (<= 128 packed rows), keys padded to 1152; main kernel, keys padded to 1024
    for n_q, kv_len, decoding in [((20, 30), (1025, 1100), True), ((40, 60), (900, 1000), False)]:
        tree = bucket_tree(rng, n_q, kv_len)
        n, q_len = tree.n_queries, query_bucket(tree.n_queries)
        bare, padded = FlexAttention(bucket=False).io(tree, shape), FlexAttention().io(tree, shape)
        tail = -(int(tree.slots.max()) + 1) % 128  # padded slots inside the last visited block
        assert padded.kv - bare.kv == tail * shape.kv_token_bytes * (1 if decoding else shape.group_size)
        assert padded.o == q_len * row and bare.o == n * row
        reads = split if decoding else 1  # programs that load each query row
        assert padded.q == (reads * q_len + n + q_len) * row and bare.q == reads * n * row
    exact = bucket_tree(rng, (32, 32), (1024, 1024))  # already at its buckets: nothing padded, same IO
    assert FlexAttention().io(exact, shape) == FlexAttention(bucket=False).io(exact, shape)


def test_flex_attention_refuses_a_pool_shorter_than_its_padded_keys():
    tree = bucket_tree(np.random.default_rng(14), (20, 20), (1030, 1030))
    shape = AttentionShape(4, 2, 16, "float32")
    q, k, v = _inputs(tree, shape, "cpu", n_slots=1030)
    with pytest.raises(UnsupportedInput, match="padded to a bucket"):
        FlexAttention().run(q, k, v, FlexAttention().plan(tree, shape, "cpu"))


def test_gpu_tests_really_skip_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the GPU tests run here")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__)), "-m", "gpu", "-p", "no:cacheprovider", "-p", "no:xdist"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:]
    assert re.search(r"\b\d+ skipped", res.stdout), res.stdout[-2000:]
    assert not re.search(r"\b\d+ (passed|failed|error)", res.stdout), res.stdout[-2000:]
    for name in METHODS:  # every skip names its method
        assert f"{name}: " in res.stdout, res.stdout[-2000:]

"""Triton and PyTorch baselines (radix, flash_decoding, tree_mask, tree_mask_fused) vs the fp64 reference.

Triton kernels run under ``TRITON_INTERPRET=1`` on the CPU; trees are small so the interpreter stays
fast. Outputs come from ``torch.empty`` filled with NaN (deterministic mode), so a row a kernel never
writes fails the comparison.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from baselines.flash_decoding import FlashDecoding
from baselines.path_decode import path_slots
from baselines.radix import RadixAttention
from baselines.tree_mask import TreeMaskAttention
from baselines.tree_mask_fused import FusedTreeMaskAttention
from deft.attention import AttentionShape, UnsupportedInput, floor_io, shape_of
from deft.reference import TOLERANCE, reference_attention, relative_error
from deft.tree import DecodingTree

ROOT = Path(__file__).resolve().parents[1]
# the interpreter converts 1-element arrays to loop bounds; numpy warns on every program
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
TRITON_METHODS = ("radix", "flash_decoding", "tree_mask_fused")
needs_triton_cpu = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1",
)


@pytest.fixture(autouse=True)
def nan_filled_empty():
    """torch.empty returns NaN-filled memory, so unwritten output or partial rows surface as NaN."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev)


# ---------------------------------------------------------------------------------------------- trees
def _build(parent, lens, queries, rng, pool_extra=7) -> DecodingTree:
    lens = np.asarray(lens, dtype=np.int64)
    n_slots = int(lens.sum()) + pool_extra
    slots = rng.permutation(n_slots)[: lens.sum()]  # scattered over the pool, as a paged cache
    qn = np.array([q[0] for q in queries], dtype=np.int64)
    qv = np.array([q[1] for q in queries], dtype=np.int64)
    return DecodingTree.from_arrays(parent, lens, slots, qn, qv, n_slots=n_slots)


def random_tree(seed: int, n_nodes: int = 9, max_len: int = 9, n_queries: int = 7) -> DecodingTree:
    """Random parents and lengths; queries at random nodes with random visible prefixes."""
    rng = np.random.default_rng(seed)
    parent = [-1] + [int(rng.integers(0, i)) for i in range(1, n_nodes)]
    lens = rng.integers(1, max_len + 1, n_nodes)
    qn = rng.integers(0, n_nodes, n_queries)
    return _build(parent, lens, [(int(n), int(rng.integers(1, lens[n] + 1))) for n in qn], rng)


def chain_tree(seed: int, depth: int = 24) -> DecodingTree:
    """A deep chain of single-token nodes, queries at the bottom, the middle and the root."""
    rng = np.random.default_rng(seed)
    parent = [-1] + list(range(depth - 1))
    return _build(parent, [3] + [1] * (depth - 1), [(depth - 1, 1), (depth // 2, 1), (0, 2)], rng)


def fan_tree(seed: int, width: int = 10, prompt: int = 20) -> DecodingTree:
    """A prompt with many short branches, one query at each leaf's newest token."""
    rng = np.random.default_rng(seed)
    lens = [prompt] + list(rng.integers(1, 5, width))
    return _build([-1] + [0] * width, lens, [(i, int(lens[i])) for i in range(1, width + 1)], rng)


def speculative_tree(seed: int, prompt: int = 13) -> DecodingTree:
    """A prompt plus a candidate token tree: multi-token nodes with one query per candidate token."""
    rng = np.random.default_rng(seed)
    parent = [-1, 0, 0, 1, 1, 2]
    lens = [prompt, 4, 3, 2, 5, 1]
    queries = [(n, v) for n in range(1, 6) for v in range(1, lens[n] + 1)]
    queries += [(0, prompt), (0, 1)]  # queries on the prompt itself (prefill-like rows)
    perm = rng.permutation(len(queries))
    return _build(parent, lens, [queries[i] for i in perm], rng)


def single_node_tree(seed: int) -> DecodingTree:
    rng = np.random.default_rng(seed)
    return _build([-1], [37], [(0, 37), (0, 5)], rng)


TREES = {
    "random_a": lambda: random_tree(1),
    "random_b": lambda: random_tree(2, n_nodes=14, max_len=5, n_queries=9),
    "random_long": lambda: random_tree(3, n_nodes=5, max_len=40, n_queries=4),
    "chain": lambda: chain_tree(4),
    "fan": lambda: fan_tree(5),
    "speculative": lambda: speculative_tree(6),
    "single_node": lambda: single_node_tree(7),
}
#: (n_heads, n_kv_heads, head_dim) per tree: GQA 1 / 4 / 8 and head dims 16..128
SHAPES = {
    "random_a": (8, 2, 32),
    "random_b": (4, 4, 16),
    "random_long": (8, 1, 64),
    "chain": (8, 1, 16),
    "fan": (8, 2, 16),
    "speculative": (8, 2, 32),
    "single_node": (8, 1, 128),
}

# small blocks so the interpreter covers multi-tile loops, splits and partial mask tiles
METHODS = {
    "radix": lambda: RadixAttention(num_kv_splits=3, block_n=16),
    "flash_decoding": lambda: FlashDecoding(target_ctas=64, min_split=8, block_n=16),
    "tree_mask": lambda: TreeMaskAttention(),
    "tree_mask_fused": lambda: FusedTreeMaskAttention(block_m=16, block_n=32),
}


def _inputs(tree: DecodingTree, shape: tuple[int, int, int], dtype: torch.dtype, seed: int = 0):
    h, kvh, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tree.n_queries, h, d, generator=g).to(dtype)
    k = torch.randn(tree.n_slots, kvh, d, generator=g).to(dtype)
    v = torch.randn(tree.n_slots, kvh, d, generator=g).to(dtype)
    return q, k, v


def _check(method, tree, shape, dtype, seed=0):
    q, k, v = _inputs(tree, shape, dtype, seed)
    out = method(q, k, v, tree)
    assert out.shape == q.shape and out.dtype == q.dtype
    err = relative_error(out, reference_attention(q, k, v, tree))
    assert err < TOLERANCE[dtype], f"{method.name}: relative error {err:.2e} >= {TOLERANCE[dtype]:.0e}"


# ------------------------------------------------------------------------------------ correctness
@needs_triton_cpu
def test_uninitialised_memory_is_nan_poisoned():
    assert torch.isnan(torch.empty(64, dtype=torch.bfloat16)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("tree_name", list(TREES))
@pytest.mark.parametrize("method_name", list(METHODS))
def test_method_matches_fp64_reference_on_tree(method_name, tree_name, dtype):
    if method_name in TRITON_METHODS and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    _check(METHODS[method_name](), TREES[tree_name](), SHAPES[tree_name], dtype)


@needs_triton_cpu
@pytest.mark.parametrize(
    "method",
    [
        RadixAttention(num_kv_splits=8, block_n=16),  # SGLang's default split count
        RadixAttention(num_kv_splits=1, block_n=32),  # one split, still through stage 2
        FlashDecoding(block_n=16),  # defaults: one split per query, direct writes, no merge launch
        FusedTreeMaskAttention(block_m=64, block_n=64),  # many queries per block
    ],
    ids=["radix8", "radix1", "fd_direct", "fused_m64"],
)
def test_method_variants_match_reference_on_speculative_and_random_trees(method):
    _check(method, speculative_tree(11), (8, 2, 32), torch.bfloat16, seed=1)
    _check(method, random_tree(12, n_nodes=7, max_len=30, n_queries=5), (4, 1, 64), torch.float16, seed=2)


@needs_triton_cpu
def test_flash_decoding_mixes_direct_and_merged_queries():
    # one long path (merged) and short ones (written directly) in one launch
    rng = np.random.default_rng(8)
    tree = _build([-1, 0, 0], [60, 3, 2], [(1, 3), (2, 1), (0, 4)], rng)
    fd = FlashDecoding(target_ctas=16, min_split=16, block_n=16)
    cut = fd._cut(tree, AttentionShape(8, 2, 16, "float16"))
    assert cut[3].any() and not cut[3].all()
    _check(fd, tree, (8, 2, 16), torch.float16)


@needs_triton_cpu
def test_unwritten_output_rows_fail_the_comparison():
    tree = fan_tree(9, width=4)
    q, k, v = _inputs(tree, (8, 2, 16), torch.float16)
    fd = FlashDecoding(block_n=16)
    plan = fd.plan(tree, shape_of(q, k), "cpu")
    short = type(plan)(**{**plan.__dict__, "n_items": plan.n_items - 1})  # drop the last work item
    assert relative_error(fd.run(q, k, v, short), reference_attention(q, k, v, tree)) == float("inf")


# ------------------------------------------------------------------------------------------- plans
@pytest.mark.parametrize("tree_name", list(TREES))
def test_path_slots_are_each_querys_root_to_node_slots(tree_name):
    tree = TREES[tree_name]()
    indptr, indices = path_slots(tree)
    for j in range(tree.n_queries):
        np.testing.assert_array_equal(indices[indptr[j] : indptr[j + 1]], tree.query_slots(j))


@pytest.mark.parametrize("tree_name", list(TREES))
def test_device_built_path_slots_equal_the_host_ones(tree_name):
    from baselines.path_decode import device_path_slots

    tree = TREES[tree_name]()
    _, indices = path_slots(tree)
    dev = device_path_slots(tree, torch.device("cpu"))
    assert dev.dtype == torch.int32
    np.testing.assert_array_equal(dev.numpy(), indices)


@pytest.mark.parametrize("method_name", TRITON_METHODS)
def test_plan_is_one_upload_of_int32_sections(method_name):
    tree = speculative_tree(3)
    plan = METHODS[method_name]().plan(tree, AttentionShape(8, 2, 32, "bfloat16"), "cpu")
    ptrs = {t.untyped_storage().data_ptr() for t in plan.tensors.values()}
    assert len(ptrs) == 1 and all(t.dtype == torch.int32 for t in plan.tensors.values())


def test_split_plans_cover_every_path_token_once():
    tree = random_tree(21, n_nodes=12, max_len=20, n_queries=8)
    shape = AttentionShape(8, 2, 32, "float16")
    for m in (RadixAttention(num_kv_splits=5), FlashDecoding(target_ctas=40, min_split=4, block_n=16)):
        t = {k: v.numpy() for k, v in m.plan(tree, shape, "cpu").tensors.items()}
        covered = np.zeros(t["kv_indices"].size, dtype=np.int64)
        for lo, hi in zip(t["item_lo"], t["item_hi"], strict=True):
            assert hi > lo
            covered[lo:hi] += 1
        assert (covered == 1).all()


# ---------------------------------------------------------------------------------------------- IO
def _shape(h=32, kvh=8, d=128, dtype="bfloat16") -> AttentionShape:
    return AttentionShape(n_heads=h, n_kv_heads=kvh, head_dim=d, dtype=dtype)


IO_TREES = ["random_a", "random_b", "random_long", "speculative", "fan", "chain"]


def _split_io_by_hand(tree, shape, splits_of):
    """Counts from each query's own slot list and a per-query split rule, looping in Python."""
    e, kvh, h, d = shape.elem_bytes, shape.n_kv_heads, shape.n_heads, shape.head_dim
    kv = q = partial = meta = merged_q = 0
    for j in range(tree.n_queries):
        length = len(tree.query_slots(j))
        n, merged = splits_of(length)
        kv += length * 2 * kvh * d * e
        q += n * h * d * e
        partial += 2 * n * h * (d + 1) * 4 if merged else 0
        meta += kvh * (4 * length + 16 * n)
        merged_q += merged
    meta += h * 12 * merged_q
    return kv, q, partial, meta


@pytest.mark.parametrize("tree_name", IO_TREES)
def test_radix_io_reads_every_querys_whole_path(tree_name):
    tree, shape = TREES[tree_name](), _shape()

    def splits(length, s=8):
        per = -(-length // s)
        return -(-length // per), True  # SGLang merges every request, one split or more

    io = RadixAttention(num_kv_splits=8).io(tree, shape)
    assert (io.kv, io.q, io.partial, io.meta) == _split_io_by_hand(tree, shape, splits)
    assert io.o == tree.n_queries * 32 * 128 * 2
    assert io.kv == tree.path_kv_tokens * shape.kv_token_bytes >= floor_io(tree, shape).kv


@pytest.mark.parametrize("tree_name", IO_TREES)
def test_flash_decoding_io_counts_partials_only_for_split_queries(tree_name):
    tree, shape = TREES[tree_name](), _shape()
    fd = FlashDecoding(target_ctas=256, min_split=4, block_n=4)
    split = fd.split_len(tree, shape)

    def splits(length):
        n = -(-length // split)
        per = -(-length // n)
        return -(-length // per), n > 1

    io = fd.io(tree, shape)
    assert (io.kv, io.q, io.partial, io.meta) == _split_io_by_hand(tree, shape, splits)


@pytest.mark.parametrize("tree_name", IO_TREES)
def test_tree_mask_io_materialises_logits_over_unique_tokens(tree_name):
    tree, shape = TREES[tree_name](), _shape()
    n_tok = len(set(np.concatenate([tree.query_slots(j) for j in range(tree.n_queries)]).tolist()))
    nq = tree.n_queries
    logits = nq * 32 * n_tok * 2
    io = TreeMaskAttention().io(tree, shape)
    assert io.logits == 6 * logits  # bmm write, mask read+write, softmax read+write, bmm read
    assert io.mask == nq * n_tok
    kv_once = n_tok * 2 * 8 * 128 * 2
    assert io.kv == 2 * kv_once + -(-(nq * 4) // 128) * kv_once
    assert io.meta == 8 * n_tok
    assert io.total > floor_io(tree, shape).total


@pytest.mark.parametrize("tree_name", IO_TREES)
@pytest.mark.parametrize("block_m,block_n", [(16, 32), (64, 64)])
def test_tree_mask_fused_io_counts_listed_tiles_by_hand(tree_name, block_m, block_n):
    tree, shape = TREES[tree_name](), _shape()
    method = FusedTreeMaskAttention(block_m=block_m, block_n=block_n)
    t = {k: v.numpy() for k, v in method.plan(tree, shape, "cpu").tensors.items()}
    seq = t["tok_slot"]
    # the sequence is the tree's seen tokens, once each; queries sorted by DFS position of their node
    want = set(np.concatenate([tree.query_slots(j) for j in range(tree.n_queries)]).tolist())
    assert sorted(seq.tolist()) == sorted(want)
    order = t["q_idx"][: tree.n_queries]
    keys = [(int(tree.tin[tree.query_node[j]]), int(tree.query_visible[j])) for j in order]
    assert keys == sorted(keys) and sorted(order.tolist()) == list(range(tree.n_queries))
    seen = [set(tree.query_slots(j).tolist()) for j in order]
    qb = max(1, block_m // shape.group_size)
    toks = tiles = partial_q = 0
    for b0 in range(0, tree.n_queries, qb):
        block = seen[b0 : b0 + qb]
        for t0 in range(0, seq.size, block_n):
            tile = set(seq[t0 : t0 + block_n].tolist())
            if not any(s & tile for s in block):
                continue
            toks += len(tile)
            tiles += 1
            partial_q += 0 if all(tile <= s for s in block) else len(block)
    io = method.io(tree, shape)
    n_blocks = -(-tree.n_queries // qb)
    assert io.kv == toks * shape.kv_token_bytes >= floor_io(tree, shape).kv
    assert io.mask == 8 * partial_q * block_n // 8
    assert io.meta == 8 * (4 * toks + 8 * tiles + 4 * tree.n_queries + 8 * n_blocks)
    assert io.q == io.o == tree.n_queries * shape.q_row_bytes


def test_io_needs_no_device_and_scales_with_layers():
    tree = speculative_tree(2)
    shape = _shape()
    for make in METHODS.values():
        io = make().io(tree, shape)
        assert io.total > 0 and io.scale(32).total == 32 * io.total


# ------------------------------------------------------------------------------------- bad inputs
def test_unsupported_head_dim_is_rejected_at_plan():
    tree = fan_tree(1, width=3)
    for name in TRITON_METHODS:
        with pytest.raises(UnsupportedInput, match=f"{name}: head_dim 24"):
            METHODS[name]().plan(tree, AttentionShape(4, 2, 24, "float16"), "cpu")


@pytest.mark.parametrize("method_name", list(METHODS))
def test_mismatched_inputs_raise_before_launch(method_name):
    tree = fan_tree(1, width=3)
    method = METHODS[method_name]()
    plan = method.plan(tree, AttentionShape(8, 2, 16, "float16"), "cpu")
    q, k, v = _inputs(tree, (8, 2, 16), torch.float16)
    with pytest.raises(UnsupportedInput, match="queries|match the plan"):
        method.run(q[:-1], k, v, plan)
    with pytest.raises(UnsupportedInput, match="slot"):
        method.run(q, k[:2], v[:2], plan)
    with pytest.raises(UnsupportedInput, match="dtype"):
        method.run(q, k.bfloat16(), v.bfloat16(), plan)
    with pytest.raises(UnsupportedInput, match="heads|match the plan"):
        method.run(q, k[:, :1], v[:, :1], plan)
    if method_name in TRITON_METHODS:
        with pytest.raises(UnsupportedInput, match="float32"):
            method.run(q.float(), k.float(), v.float(), plan)


def test_method_configs_instantiate_the_named_class():
    hydra_utils = pytest.importorskip("hydra.utils")
    from omegaconf import OmegaConf

    for name, make in METHODS.items():
        cfg = OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml")
        method = hydra_utils.instantiate(cfg)
        assert type(method) is type(make()) and method.name == name


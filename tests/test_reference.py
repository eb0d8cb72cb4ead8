"""The fp64 reference against a naive per-query softmax on random trees (GQA, multi-token nodes, partial visibility)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deft.reference import TOLERANCE, naive_attention, reference_attention, relative_error
from deft.tree import DecodingTree


def _inputs(tree: DecodingTree, n_kv: int, group: int, d: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tree.n_queries, n_kv * group, d, generator=g).to(dtype)
    k = torch.randn(tree.n_slots, n_kv, d, generator=g).to(dtype)
    v = torch.randn(tree.n_slots, n_kv, d, generator=g).to(dtype)
    return q, k, v


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    group=st.sampled_from([1, 4, 8]),
    n_kv=st.sampled_from([1, 2]),
    d=st.sampled_from([4, 16]),
)
def test_reference_matches_naive_per_query_softmax(seed, group, n_kv, d, make_random_tree):
    tree = make_random_tree(np.random.default_rng(seed), max_nodes=7, max_len=5, max_queries=5)
    q, k, v = _inputs(tree, n_kv, group, d, seed)
    ref = reference_attention(q, k, v, tree)
    assert ref.dtype == torch.float64 and ref.shape == q.shape
    assert relative_error(naive_attention(q, k, v, tree), ref) < 1e-12


def test_reference_on_a_chain_is_causal_attention():
    # one node, one query per token: plain causal self-attention over the sequence
    n, d = 6, 8
    tree = DecodingTree.from_lists([-1], [list(range(n))], [(0, i) for i in range(1, n + 1)], n_slots=n)
    q, k, v = _inputs(tree, 2, 2, d, 0, torch.float64)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * d**-0.5
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    want = torch.einsum("hqk,khd->qhd", s.softmax(-1), vv)
    assert relative_error(reference_attention(q, k, v, tree), want) < 1e-12


def test_single_visible_token_returns_its_value_and_sm_scale_is_used():
    tree = DecodingTree.from_lists([-1], [[3]], [(0, 1)], n_slots=4)
    q, k, v = _inputs(tree, 1, 2, 4, 1)
    out = reference_attention(q, k, v, tree)
    assert torch.allclose(out, v[3].double().expand(2, 4)[None])
    tree2 = DecodingTree.from_lists([-1, 0], [[0, 1], [2]], [(1, 1)], n_slots=3)
    q, k, v = _inputs(tree2, 1, 1, 4, 2)
    a, b = reference_attention(q, k, v, tree2, sm_scale=0.1), reference_attention(q, k, v, tree2, sm_scale=2.0)
    assert relative_error(a, naive_attention(q, k, v, tree2, sm_scale=0.1)) < 1e-12
    assert relative_error(a, b) > 1e-3


def test_shared_prefix_queries_ignore_sibling_branches():
    # two branches under one prompt: changing one branch's K/V must not move the other's output
    tree = DecodingTree.from_lists([-1, 0, 0], [[0, 1, 2], [3, 4], [5, 6]], [(1, 2), (2, 2)], n_slots=7)
    q, k, v = _inputs(tree, 2, 4, 8, 3)
    out = reference_attention(q, k, v, tree)
    k2, v2 = k.clone(), v.clone()
    k2[5:], v2[5:] = 10 * torch.randn_like(k[5:]), torch.randn_like(v[5:])
    out2 = reference_attention(q, k2, v2, tree)
    assert torch.equal(out[0], out2[0]) and not torch.allclose(out[1], out2[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_within_tolerance_of_fp64_truth(dtype, make_random_tree):
    tree = make_random_tree(np.random.default_rng(7), max_nodes=6, max_len=8, max_queries=6)
    q, k, v = _inputs(tree, 2, 4, 16, 7, dtype)
    ref = reference_attention(q, k, v, tree)
    # a low-precision softmax of the same inputs lands well within the method tolerance
    approx = reference_attention(q.float(), k.float(), v.float(), tree).to(dtype)
    assert relative_error(approx, ref) < TOLERANCE[dtype]


def test_relative_error_flags_nan_and_inf():
    ref = torch.ones(2, 2, dtype=torch.float64)
    assert relative_error(ref.clone(), ref) == 0.0
    assert relative_error(torch.tensor([[float("nan"), 1.0], [1.0, 1.0]]), ref) == float("inf")
    assert relative_error(torch.tensor([[float("inf"), 1.0], [1.0, 1.0]]), ref) == float("inf")
    assert set(TOLERANCE) >= {torch.float16, torch.bfloat16}

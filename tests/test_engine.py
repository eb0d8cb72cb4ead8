"""The Llama tree-decoding engine on the tiny preset (CPU; Triton kernels under TRITON_INTERPRET=1)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from deft.attention import AttentionMethod, IOCounts, MethodUnavailable, Plan, UnsupportedInput, floor_io
from deft.engine.branch import KVCapacityError, kv_needs
from deft.engine.model import (
    PRESETS,
    ModelArgs,
    RopeScaling,
    apply_rope,
    build_model,
    hf_state_dict,
    model_args,
    rope_inv_freq,
    save_hf_checkpoint,
)
from deft.engine.runner import TreeDecoder, graph_bucket, run_e2e
from deft.engine.sequence_tree import KVAccountingError, SequenceTree, prefix_len
from deft.reference import reference_attention, relative_error
from deft.tree import DecodingTree
from workloads.trace import StepState, speculative_trace, tree_trace

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, eq=False)
class RefPlan(Plan):
    tree: DecodingTree | None = None


class ReferenceMethod(AttentionMethod):
    """The fp64 reference as an attention method (the truth the kernels are compared with)."""

    name = "reference"

    def __init__(self) -> None:
        self.plans = 0

    def plan(self, tree, shape, device="cpu"):
        self.plans += 1
        return RefPlan(tree.n_queries, shape, str(device), tree)

    def run(self, q, k_pool, v_pool, plan):
        return reference_attention(q, k_pool, v_pool, plan.tree).to(q.dtype)

    def io(self, tree, shape) -> IOCounts:
        return floor_io(tree, shape)


def branching_trace(prompt_len: int = 24):
    """Branches at steps 1, 4 and 6; node 3 ends at step 2 (pruned, its slots reused), node 2's subtree at step 7."""
    parent = [-1, 0, 0, 0, 1, 1, 4, 2]
    start = [0, 1, 1, 1, 4, 4, 6, 6]
    length = [1, 3, 5, 2, 2, 4, 3, 2]
    return tree_trace("branching", prompt_len, parent, start, length, max_seq_len=prompt_len + 40)


def speculative_small(prompt_len: int = 16):
    """Candidate tree 0 -> {1, 2}, 1 -> {3, 4}, 2 -> 5, 3 -> 6: two 2-token chains with a query per token."""
    return speculative_trace("spec", prompt_len, [-1, 0, 0, 1, 1, 2, 3], [0, 1, 3], [1, 2, 3, 1, 2], prompt_len + 8)


TRACES = {"branching": branching_trace, "speculative": speculative_small}


def tiny(dtype: str = "float32", seed: int = 0):
    return build_model(model_args("tiny", dtype=dtype), "cpu", seed=seed)


def decode(model, method, trace, capacity=None, **kw) -> tuple[list[torch.Tensor], list]:
    """Per-step logits (fp32 copies) and batches of a run."""
    logits, batches = [], []

    def keep(b, lg, toks):
        logits.append(lg.float().clone())
        batches.append(b)

    dec = TreeDecoder(model, method, capacity or kv_needs(trace).slots, "cpu", **kw)
    dec.run(trace, on_step=keep)
    return logits, batches


#: interpreter budget: fewer programs per launch, same kernels
OVERRIDES = {"radix": {"num_kv_splits": 2}}


def method_from_conf(name: str) -> AttentionMethod:
    if name == "reference":
        return ReferenceMethod()
    path = ROOT / "conf" / "method" / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{name}: conf/method/{name}.yaml not written yet")
    from hydra.utils import instantiate

    m = instantiate(OmegaConf.load(path), **OVERRIDES.get(name, {}))
    reason = m.unavailable_reason()
    if reason:
        pytest.skip(f"{name}: {reason}")
    return m


# ---------------------------------------------------------------------- model
@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_conf_model_yaml_matches_preset(path):
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem
    assert ModelArgs.from_config(cfg) == PRESETS[cfg.name]


def test_llama31_rope_scaling_keeps_high_and_scales_low_frequencies():
    base = rope_inv_freq(PRESETS["llama3_8b"])
    scaled = rope_inv_freq(PRESETS["llama3_1_8b"])
    assert torch.equal(scaled[:8], base[:8])  # short wavelengths untouched
    torch.testing.assert_close(scaled[-8:], base[-8:] / 8.0)  # long wavelengths divided by the factor
    assert (scaled <= base).all()
    assert RopeScaling().factor == 8.0


def test_rope_matches_hf_rotate_half():
    model = tiny()
    pos = torch.tensor([0, 5, 300])
    cos, sin = model.rope(pos)
    x = torch.randn(3, 4, 16)
    ang = pos.double()[:, None, None] * rope_inv_freq(model.args).double()
    c, s = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
    rot = torch.cat((-x[..., 8:], x[..., :8]), -1).double()
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), x.double() * c + rot * s, rtol=1e-5, atol=1e-5)


def test_prefix_len_by_pointer_jumping_matches_tree():
    tree = DecodingTree.from_lists([-1, 0, 1, 1, 0, 4, 5], [[0, 1], [2], [3, 4], [5], [6, 7, 8], [9], [10]], [(6, 1)])
    np.testing.assert_array_equal(prefix_len(tree.parent, tree.node_len), tree.prefix_len)


def test_decode_steps_match_causal_forward_over_each_path():
    """A query's logits equal a plain causal forward over its path's tokens (KV writes, positions, RoPE)."""
    model = tiny()
    trace = branching_trace()
    dec = TreeDecoder(model, ReferenceMethod(), kv_needs(trace).slots, "cpu", tokens="fixed")
    seen = []
    dec.run(trace, on_step=lambda b, lg, t: seen.append((b, lg.clone(), dec.slot_token.clone())))
    for b, lg, slot_token in seen[::3]:
        for j in range(b.n_queries):
            toks = slot_token[torch.from_numpy(b.tree.query_slots(j))]
            scratch = [torch.zeros(toks.numel(), 2, 16) for _ in range(2)], [torch.zeros(toks.numel(), 2, 16) for _ in range(2)]
            ref = model.prefill(toks, torch.arange(toks.numel()), *scratch)
            assert relative_error(lg[j], ref.double()) < 1e-5, (b.step, j)


# ---------------------------------------------------------------------- methods agree
METHODS = ["reference", "deft_flatten", "deft_node", "radix"]


@pytest.fixture(scope="module")
def fp32_runs():
    model = tiny("float32")
    return {k: decode(model, ReferenceMethod(), f(), tokens="fixed")[0] for k, f in TRACES.items()}


@pytest.mark.parametrize("trace_name", sorted(TRACES))
@pytest.mark.parametrize("method", METHODS)
def test_same_trace_same_logits_every_step_across_methods(method, trace_name, fp32_runs):
    """bf16 runs of every method follow the fp32 reference run step by step, and the bf16 reference run closely."""
    m = method_from_conf(method)
    model = tiny("bfloat16")
    trace = TRACES[trace_name]()
    try:
        got, _ = decode(model, m, trace, tokens="fixed")
    except (UnsupportedInput, MethodUnavailable) as e:
        pytest.skip(f"{method}: {e}")
    ref_bf16, _ = decode(model, ReferenceMethod(), trace, tokens="fixed")
    ref32 = fp32_runs[trace_name]
    assert len(got) == len(ref32) == trace.n_steps
    for step, (a, b, c) in enumerate(zip(got, ref_bf16, ref32, strict=True), start=1):
        assert relative_error(a, c.double()) < 2e-2, f"{method} step {step} vs fp32 run"
        assert relative_error(a, b.double()) < 1e-2, f"{method} step {step} vs bf16 reference run"


def test_graph_segments_with_padding_match_eager():
    """The CUDA-graph path (segments, queries padded to a bucket, pad K/V to a reserved slot) on the CPU."""
    model = tiny()
    for make in TRACES.values():
        trace = make()
        eager, _ = decode(model, ReferenceMethod(), trace)
        graphs, _ = decode(model, ReferenceMethod(), trace, cuda_graphs=True)
        for a, b in zip(eager, graphs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [graph_bucket(n) for n in (1, 3, 5, 8, 9, 50, 64)] == [1, 4, 8, 8, 16, 56, 64]


# ---------------------------------------------------------------------- KV accounting
def test_pruning_frees_exactly_the_pruned_branch_slots():
    trace = branching_trace()
    model = tiny()
    dec = TreeDecoder(model, ReferenceMethod(), kv_needs(trace).slots, "cpu")
    prev: list[DecodingTree] = []
    freed_count = {}

    def check(b, lg, toks):
        tree = b.tree
        in_use = set(dec.pool.allocator.in_use().tolist())
        assert in_use == set(tree.slots.tolist()), f"step {b.step}: the pool holds exactly the tree's slots"
        assert b.n_live == tree.total_tokens
        if prev:
            kept = set(tree.slots.tolist()) - set(b.new_slot.tolist())
            gone = set(prev[-1].slots.tolist()) - kept
            assert set(b.freed.tolist()) == gone, f"step {b.step}: freed = slots the tree dropped (some reused at once)"
        freed_count[b.step] = b.freed.size
        prev.append(tree)

    dec.run(trace, on_step=check)
    lens = dict(enumerate(trace.length.tolist()))
    sub_end = trace.subtree_end
    for t, n in freed_count.items():
        expect = sum(lens[i] for i in np.flatnonzero(sub_end == t - 1) if i > 0)
        assert n == expect, f"step {t}: {n} slots freed, the pruned nodes held {expect}"
    assert freed_count[3] == 2  # node 3 (2 tokens) ends at step 2


def test_sequence_tree_rejects_leaks_double_frees_and_unwritten_slots():
    t1 = DecodingTree.from_lists([-1, 0, 0], [[0, 1, 2], [3], [4]], [(1, 1), (2, 1)])
    seq = SequenceTree(16)
    seq.prefill(t1, 3)
    seq.advance(StepState(1, t1, np.zeros(0, np.int64)))
    t2 = DecodingTree.from_lists([-1, 0], [[0, 1, 2], [3, 5]], [(1, 2)])
    with pytest.raises(KVAccountingError, match="left the tree without being freed"):
        seq.advance(StepState(2, t2, np.zeros(0, np.int64)))
    seq = SequenceTree(16)
    seq.prefill(t1, 3)
    seq.advance(StepState(1, t1, np.zeros(0, np.int64)))
    with pytest.raises(KVAccountingError, match="hold no K/V"):
        seq.advance(StepState(2, t2, np.array([4, 9])))
    t3 = DecodingTree.from_lists([-1, 0], [[0, 1, 2], [3, 7, 6]], [(1, 3)])
    seq = SequenceTree(16)
    seq.prefill(t1, 3)
    seq.advance(StepState(1, t1, np.zeros(0, np.int64)))
    with pytest.raises(KVAccountingError, match=r"slots \[7\] are in the tree but hold no K/V"):
        seq.advance(StepState(2, t3, np.array([4])))


def test_too_small_pool_stops_before_any_step_naming_the_numbers():
    trace = branching_trace()
    need = kv_needs(trace).slots
    method = ReferenceMethod()
    dec = TreeDecoder(tiny(), method, need - 1, "cpu")
    with pytest.raises(KVCapacityError, match=rf"needs a KV pool of {need} slots .* kv_capacity={need - 1}"):
        dec.run(trace)
    assert method.plans == 0
    assert kv_needs(trace, max_steps=2).slots < need  # a budgeted run needs less
    TreeDecoder(tiny(), method, kv_needs(trace, 2).slots, "cpu").run(trace, max_steps=2)
    assert method.plans == 2


# ---------------------------------------------------------------------- checkpoints
def test_hf_checkpoint_roundtrip(tmp_path):
    pytest.importorskip("safetensors")
    model = tiny(seed=1)
    path = save_hf_checkpoint(model, tmp_path / "model.safetensors")
    loaded = build_model(model.args, "cpu", weights=path)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert not torch.equal(tiny(seed=2).output.weight, loaded.output.weight)
    # HF names land where they belong: q_proj is the first rows of the fused QKV
    sd = hf_state_dict(model)
    torch.testing.assert_close(loaded.layers[1].attention.wqkv.weight[:64], sd["model.layers.1.self_attn.q_proj.weight"])
    torch.testing.assert_close(loaded.layers[0].feed_forward.w13.weight[128:], sd["model.layers.0.mlp.up_proj.weight"])
    # a folder of shards with a config.json, and clear errors
    from safetensors.torch import save_file

    shard = tmp_path / "ckpt"
    shard.mkdir()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[::2]}, str(shard / "model-00001.safetensors"))
    save_file({k: sd[k] for k in keys[1::2]}, str(shard / "model-00002.safetensors"))
    (shard / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 256}))
    assert torch.equal(build_model(model.args, "cpu", weights=shard).output.weight, model.output.weight)
    (shard / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="num_hidden_layers=3"):
        build_model(model.args, "cpu", weights=shard)
    bad = dict(sd)
    bad["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"o_proj.weight has shape \(64, 32\)"):
        build_model(model.args, "cpu", weights=tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------- bench entry
def test_run_e2e_rows_and_capacity_error():
    cfg = OmegaConf.create(
        {
            "device": "cpu",
            "seed": 0,
            "model": OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")),
            "bench": {**OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "bench" / "e2e.yaml")), "max_steps": 4},
            "workload": {"_target_": "workloads.few_shot.FewShot", "prompt_len": 30, "width": 5, "max_seq_len": 60},
        }
    )
    from workloads.few_shot import FewShot

    wl = FewShot(prompt_len=30, width=5, max_seq_len=60)
    rows = run_e2e(cfg, ReferenceMethod(), wl)
    agg, steps = rows[0], rows[1:]
    assert agg["kind"] == "aggregate" and [r["kind"] for r in steps] == ["step"] * 4
    assert agg["steps"] == 4 and agg["total_queries"] == 20 and agg["kv_peak_slots"] == 30 + 20
    assert agg["kv_capacity"] == 50 and agg["kv_occupancy_peak"] == 1.0
    for k in ("e2e_ms", "ttft_ms", "decode_ms", "tpot_ms", "step_ms_median", "step_ms_p90", "attn_ms_total", "plan_ms_total"):
        assert agg[k] > 0, k
    assert 0 < agg["attn_share"] < 1
    assert agg["e2e_ms"] >= agg["ttft_ms"] + agg["decode_ms"] * 0.99
    for r in steps:  # thread CPU time in the launch loop can't exceed its wall time (plus clock granularity)
        assert 0 <= r["launch_cpu_ms"] <= r["launch_ms"] + 1.0
    cfg.bench.kv_capacity = 49
    with pytest.raises(KVCapacityError, match="needs a KV pool of 50 slots"):
        run_e2e(cfg, ReferenceMethod(), wl)


def test_greedy_tokens_identical_eager_and_graph_segments():
    model = tiny()
    trace = speculative_small()
    need = kv_needs(trace).slots
    a = TreeDecoder(model, ReferenceMethod(), need, "cpu").run(trace).summary()
    b = TreeDecoder(model, ReferenceMethod(), need, "cpu", cuda_graphs=True).run(trace).summary()
    assert a["greedy_digest"] == b["greedy_digest"] and a["engine"] == "eager" and b["engine"] == "graph_segments"


@pytest.mark.parametrize("every, caught", [(1, True), (2, True), (3, False), (0, False)])
def test_sequence_tree_full_slot_check_runs_on_its_period(every, caught):
    """The O(tree tokens) check runs on the first advance and then every ``every``: a slot that holds no K/V
    at the third advance is caught with periods 1 and 2, not 3 (or 0: never); the cheap checks still run."""
    t1 = DecodingTree.from_lists([-1, 0, 0], [[0, 1, 2], [3], [4]], [(1, 1), (2, 1)])
    t2 = DecodingTree.from_lists([-1, 0, 0], [[0, 1, 2], [3, 5], [4, 6]], [(1, 2), (2, 2)])
    seq = SequenceTree(16, full_check_every=every)
    seq.prefill(t1, 3)
    seq.advance(StepState(1, t1, np.zeros(0, np.int64)))
    seq.advance(StepState(2, t2, np.zeros(0, np.int64)))
    # slot 7 was never written and slot 6 left unfreed: the counts agree (8 and 8), only the full check sees it
    bad = DecodingTree.from_lists([-1, 0, 0], [[0, 1, 2], [3, 5, 7, 8], [4]], [(1, 4)])
    if caught:
        with pytest.raises(KVAccountingError, match=r"slots \[7\] are in the tree"):
            seq.advance(StepState(3, bad, np.zeros(0, np.int64)))
    else:
        seq.advance(StepState(3, bad, np.zeros(0, np.int64)))


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_overlapped_engine_gives_the_same_steps_logits_and_tokens(cuda_graphs):
    """Planning step t + 1 while step t runs changes when things happen, never what: same per-step logits (the
    graph buckets' logits are copied before the next step of that size overwrites them), same greedy tokens,
    one record per step in order."""
    model = tiny()
    for make in TRACES.values():
        trace = make()
        base, b_batches = decode(model, ReferenceMethod(), trace, cuda_graphs=cuda_graphs)
        over, o_batches = decode(model, ReferenceMethod(), trace, cuda_graphs=cuda_graphs, overlap=True)
        assert [b.step for b in o_batches] == [b.step for b in b_batches] == list(range(1, len(b_batches) + 1))
        for a, b in zip(base, over, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        need = kv_needs(trace).slots
        ra = TreeDecoder(model, ReferenceMethod(), need, "cpu", cuda_graphs=cuda_graphs).run(trace)
        rb = TreeDecoder(model, ReferenceMethod(), need, "cpu", cuda_graphs=cuda_graphs, overlap=True).run(trace)
        sa, sb = ra.summary(), rb.summary()
        assert sa["greedy_digest"] == sb["greedy_digest"] and sb["engine"] == sa["engine"] + "+overlap"
        assert [r["step"] for r in rb.steps] == [r["step"] for r in ra.steps]
        assert all(r["step_ms"] > 0 for r in rb.steps)


def test_aggregate_counts_steps_whose_attention_stalled():
    from deft.engine.runner import SLOW_FACTOR, RunResult

    res = RunResult("t", 10, 100, "graph_segments")
    base = {"n_queries": 2, "step_ms": 5.0, "gpu_ms": 4.0, "plan_ms": 0.1, "replay_ms": 0.1, "host_ms": 0.2,
            "launch_ms": 1.0, "launch_cpu_ms": 1.0, "overhead_ms": 1.0, "kv_live": 50}  # fmt: skip
    for a in [1.0, 1.1, 0.9, 1.0, 1.0, 1.0, 0.99 * SLOW_FACTOR, 1.01 * SLOW_FACTOR, 40.0]:
        res.steps.append({**base, "attn_ms": a})
    agg = res.summary()
    assert agg["attn_slow_steps"] == 2 and agg["attn_ms_max"] == 40.0
    assert RunResult("t", 10, 100, "eager").summary()["attn_slow_steps"] == 0

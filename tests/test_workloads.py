"""Workloads and replay: every trace file in the traces directory, the paper's counts, slot accounting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deft.kv_pool import KVPoolFull, SlotAllocator
from workloads import files
from workloads.few_shot import FewShot
from workloads.reasoning import Reasoning
from workloads.speculative import Speculative
from workloads.synthetic import Synthetic
from workloads.trace import Trace, TraceError, replay, step_counts, trace_stats


def _trace_files(root: Path, kind: str) -> list[Path]:
    found = sorted((root / kind).glob("*.json"))
    assert found, f"no {kind} trace files in {root / kind}"
    return found


def check_replay(trace: Trace):
    """Replay with validation and check every invariant; returns the last step's tree."""
    sc = step_counts(trace)
    alloc = SlotAllocator(int(sc.kv_slots.max()))
    cap = alloc.capacity
    written = np.zeros(cap, dtype=bool)  # slots holding a live token's K/V
    prev = None
    prev_mask = np.zeros(cap, dtype=bool)
    prev_node_slots: dict[int, np.ndarray] = {}
    n_steps = 0
    for state in replay(trace, validate=True, allocator=alloc):
        n_steps += 1
        t, tree = state.step, state.tree
        assert t == n_steps
        slots = tree.slots
        mask = np.zeros(cap, dtype=bool)
        mask[slots] = True
        # the pool holds exactly this step's tree: nothing leaked, nothing missing (slots are unique: validated)
        used = np.zeros(cap, dtype=bool)
        used[alloc.in_use()] = True
        assert np.array_equal(mask, used)
        qmask = np.zeros(cap, dtype=bool)
        qmask[tree.query_slot] = True
        # freed: last step's slots that left the tree (a freed slot may be reused at once by a new token)
        if prev is None:
            assert state.freed.size == 0
            written[slots[tree.slot_ptr[tree.root] : tree.slot_ptr[tree.root + 1]]] = True  # prefill
        else:
            fmask = np.zeros(cap, dtype=bool)
            fmask[state.freed] = True
            assert fmask.sum() == state.freed.size and prev_mask[state.freed].all()
            assert not (prev_mask & ~fmask & ~mask).any()  # kept tokens stay
            assert not (fmask & mask & ~qmask).any()  # a freed slot comes back only as a new token
        written[state.freed] = False
        # queries write fresh slots; then every slot of the tree holds a prompt token or a query's own token
        assert qmask.sum() == tree.n_queries and not written[qmask].any()
        written |= qmask
        assert np.array_equal(written, mask)
        # the fast-path counts agree with the tree
        i = t - 1
        assert tree.unique_kv_tokens == sc.unique_kv_tokens[i]
        assert tree.path_kv_tokens == sc.path_kv_tokens[i]
        assert tree.n_queries == sc.n_queries[i] and tree.n_nodes == sc.n_nodes[i]
        assert tree.query_path_len.max() == sc.max_path_kv_tokens[i]
        assert tree.total_tokens == sc.kv_slots[i]
        if trace.kind == "tree":
            _check_tree_step(trace, state, prev_node_slots)
        else:
            _check_speculative_step(trace, state, prev)
        prev, prev_mask = tree, mask
    assert n_steps == trace.n_steps
    assert alloc.n_used == prev.total_tokens  # no slot leaked at the end
    return prev


def _check_tree_step(trace: Trace, st, prev_node_slots: dict[int, np.ndarray]) -> None:
    t, tree, nodes = st.step, st.tree, st.nodes
    # lifetime: a node is in the tree from its start until its whole subtree has ended
    alive = np.flatnonzero((trace.start <= t) & (trace.subtree_end >= t))
    assert np.array_equal(nodes, alive)
    assert np.array_equal(tree.parent[1:], np.searchsorted(nodes, trace.parent[nodes[1:]]))
    # length: one token per step while active, then the full length
    assert np.array_equal(tree.node_len, np.minimum(t - trace.start[nodes] + 1, trace.length[nodes]))
    # one query per active node, its newest token
    active = np.flatnonzero((trace.start <= t) & (trace.end >= t))
    assert np.array_equal(nodes[tree.query_node], active)
    assert np.array_equal(tree.query_visible, tree.node_len[tree.query_node])
    # a node's tokens keep their slots: each step extends the previous slot list
    for k, v in enumerate(nodes.tolist()):
        s = tree.node_slots(k)
        old = prev_node_slots.get(v)
        if old is not None:
            assert np.array_equal(s[: old.size], old)
        prev_node_slots[v] = s.copy()
    for v in np.flatnonzero(trace.subtree_end == t - 1).tolist():
        prev_node_slots.pop(v, None)
        assert v not in nodes


def _check_speculative_step(trace: Trace, st, prev) -> None:
    tree = st.tree
    m = trace.cand_parent.size
    assert tree.n_queries == m and tree.node_len[0] == trace.prompt_len
    spine = tree.node_slots(1)
    acc_before = int(trace.accept[: st.step - 1].sum())
    assert spine.size == acc_before + 1
    # the candidate root is the spine's last token, a query of this step
    assert tree.query_node[0] == 1 and tree.query_visible[0] == spine.size
    # every candidate is a query: the spine query plus one per token of the compressed nodes
    assert tree.node_len[2:].sum() == m - 1
    if prev is not None:
        # the accepted tokens are exactly what one query of the previous step saw: same slots, no copies
        seen = tree.query_slots(0)[:-1]
        assert any(np.array_equal(prev.query_slots(j), seen) for j in range(prev.n_queries))
        assert np.array_equal(spine[: prev.node_len[1]], prev.node_slots(1))


# ---------------------------------------------------------------------- the paper's counts
def test_few_shot_paper_counts():
    s = trace_stats(FewShot(prompt_len=4000, width=20, max_seq_len=4400).trace())
    assert s["steps"] == 399
    assert s["unique_kv_token_steps"] == 4000 * 399 + 20 * 399 * 400 // 2 == 3192000
    assert s["path_kv_token_steps"] == 20 * (4000 * 399 + 399 * 400 // 2) == 33516000
    assert (s["max_queries"], s["max_nodes"], s["peak_unique_kv_tokens"]) == (20, 21, 4000 + 20 * 399)


def test_few_shot_replay_invariants():
    check_replay(FewShot(prompt_len=64, width=5, max_seq_len=100).trace())


@pytest.mark.parametrize("size", [32, 64])
def test_speculative_record0_runs_239_steps_at_prompt_plus_1000(size, traces_root):
    tr = Speculative(file=f"APPS_tree_size{size}.json", record_index=0, prompt_len=4000, max_seq_len=5000).trace()
    assert tr.n_steps == 239
    s = trace_stats(tr)
    assert s["steps"] == 239 and s["max_queries"] == size and s["accept_clipped_steps"] == 0
    assert int(tr.accept[:238].sum()) < 1000 <= int(tr.accept.sum())


# ---------------------------------------------------------------------- every file in the traces directory
def _reasoning_cases(root: Path) -> list[tuple[Path, int]]:
    """Per file: tree 0 and the paper's tree (the first complete one)."""
    cases = []
    for path in _trace_files(root, "reasoning"):
        trees = json.loads(path.read_text())
        first_complete = next(i for i, t in enumerate(trees) if not t["incompleted"])
        cases += [(path, i) for i in sorted({0, first_complete})]
    return cases


def _collect_reasoning_cases() -> list:
    try:
        root = files.traces_dir(None)
    except TraceError as e:
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=f"trace files absent: {e}"))]
    return [pytest.param(p.name, i, id=f"{p.stem}-{i}") for p, i in _reasoning_cases(root)]


@pytest.mark.parametrize(("file", "index"), _collect_reasoning_cases())
def test_replay_invariants_on_every_reasoning_file(file, index, traces_root):
    path = traces_root / "reasoning" / file
    # any padding works as long as one decode step is left
    assert Reasoning(file=file, tree_index=index, prompt_len=10**6, max_seq_len=10**6 + 2).trace().n_steps == 1
    p = int(json.loads(path.read_text())[index]["data"]["0"]["value"])
    tr = Reasoning(file=file, tree_index=index, prompt_len=p, max_seq_len=p + 2000).trace()
    assert tr.n_steps <= 1999
    check_replay(tr)


def test_reasoning_lengths_and_lifetimes_follow_the_template(traces_root):
    path, index = _reasoning_cases(traces_root)[0]
    nodes = json.loads(path.read_text())[index]["data"]
    tr = Reasoning(file=path.name, tree_index=index, prompt_len=5000, max_seq_len=10**7).trace()  # no cut
    assert tr.n_nodes == len(nodes) and tr.n_steps == max(n["end"] for n in nodes.values())
    assert sorted(tr.length[1:].tolist()) == sorted(n["value"] for n in nodes.values() if n["id"] != 0)
    assert tr.length[0] == 5000 and tr.start[0] == 1 - 5000
    # each node is active for exactly `value` steps; finished leaves leave right after their last step
    sc = step_counts(tr)
    assert int(sc.n_queries.sum()) == sum(n["value"] for n in nodes.values() if n["id"] != 0)
    leaves = tr.length[1:][np.isin(np.arange(1, tr.n_nodes), tr.parent, invert=True)]
    assert leaves.size == sum(1 for n in nodes.values() if not n["children"])


def test_replay_invariants_on_every_speculative_file(traces_root):
    for path in _trace_files(traces_root, "speculative"):
        tr = Speculative(file=path.name, record_index=0, prompt_len=300, max_seq_len=1300).trace()
        check_replay(tr)
        declared = json.loads(path.read_text())["Token_Tree_size"]
        assert tr.info["declared_tree_size"] == declared
        if tr.info["accept_clipped_steps"] == 0:
            assert tr.n_steps == 239, path.name  # every record file shares record 0's accept lengths


def test_speculative_clips_accepts_beyond_the_tree_depth(traces_root):
    tr = Speculative(file="APPS_tree_size5.json", prompt_len=100, max_seq_len=1100).trace()
    depth = tr.accept_leaf.size - 1
    assert depth == 2 and tr.accept.max() == depth + 1 and tr.info["accept_clipped_steps"] > 0
    assert tr.n_steps > 239


def test_speculative_record_exhausted_ends_the_trace(traces_root):
    tr = Speculative(file="APPS_tree_size32.json", prompt_len=100, max_seq_len=100 + 10**6).trace()
    assert tr.n_steps == 401 and tr.info["record_exhausted"]


def test_replay_on_20k_prompt_stays_fast(traces_root):
    import time

    t0 = time.perf_counter()
    tr = Reasoning(file="sorting128ToT.json", tree_index=1, prompt_len=20000, max_seq_len=22000).trace()
    n = sum(1 for _ in replay(tr))
    assert n == 1999 and time.perf_counter() - t0 < 10


# ---------------------------------------------------------------------- synthetic and determinism
@settings(max_examples=25, deadline=None)
@given(
    depth=st.integers(1, 3),
    branching=st.integers(1, 3),
    node_len=st.integers(1, 6),
    extra=st.integers(2, 30),
    seed=st.integers(0, 1000),
    fanout=st.sampled_from(["regular", "random"]),
    lengths=st.sampled_from(["fixed", "random"]),
)
def test_synthetic_replay_invariants(depth, branching, node_len, extra, seed, fanout, lengths):
    wl = Synthetic(
        prompt_len=5, depth=depth, branching=branching, node_len=node_len, max_seq_len=5 + extra,
        seed=seed, fanout=fanout, lengths=lengths,
    )  # fmt: skip
    tr = wl.trace()
    check_replay(tr)
    again = wl.trace()
    for f in ("parent", "start", "length"):
        assert np.array_equal(getattr(tr, f), getattr(again, f))
    if fanout == "regular" and lengths == "fixed":
        assert tr.n_steps == min(depth * node_len, extra - 1)


def test_synthetic_regular_shape_and_seed():
    tr = Synthetic(prompt_len=10, depth=3, branching=4, node_len=2, max_seq_len=1000).trace()
    assert tr.n_nodes == 1 + 4 + 16 + 64 and tr.n_steps == 6
    assert step_counts(tr).n_queries.tolist() == [4, 4, 16, 16, 64, 64]
    a = Synthetic(fanout="random", lengths="random", seed=1).trace()
    b = Synthetic(fanout="random", lengths="random", seed=2).trace()
    assert not (a.n_nodes == b.n_nodes and np.array_equal(a.length, b.length))


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (FewShot, {"width": 0}, "width must be at least 1"),
        (FewShot, {"prompt_len": 100, "max_seq_len": 101}, "max_seq_len must be at least 102"),
        (FewShot, {"width": "3"}, "width must be an integer"),
        (Synthetic, {"fanout": "wild"}, "fanout must be 'regular' or 'random'"),
        (Synthetic, {"lengths": "odd"}, "lengths must be"),
        (Synthetic, {"depth": True}, "depth must be an integer"),
        (Reasoning, {"tree_index": -1}, "tree_index must be at least 0"),
        (Speculative, {"record_index": -2}, "record_index must be at least 0"),
    ],
)
def test_bad_parameters_are_rejected_naming_the_parameter(cls, kwargs, match):
    with pytest.raises(TraceError, match=match):
        cls(**kwargs)


def test_params_are_flat_and_leave_out_paths():
    assert FewShot().params() == {"prompt_len": 4000, "width": 20, "max_seq_len": 4400}
    assert Reasoning(traces_dir="/x").params() == {
        "file": "sorting128ToT.json", "tree_index": 1, "prompt_len": 4000, "max_seq_len": 6000,
    }  # fmt: skip
    assert set(Synthetic().params()) == {
        "prompt_len", "depth", "branching", "node_len", "max_seq_len", "seed", "fanout", "lengths",
    }  # fmt: skip


def test_events_name_grow_branch_prune():
    from workloads.trace import tree_trace

    # root -> a (steps 1..2) -> {b (3..3), c (3..5)}
    t = tree_trace("toy", 4, [-1, 0, 1, 1], [-3, 1, 3, 3], [4, 2, 1, 3], max_seq_len=100)
    assert t.n_steps == 5
    assert t.events(3)["grow"].tolist() == [2, 3] and t.events(3)["branch"].tolist() == [2, 3]
    assert t.events(3)["prune"].tolist() == [2]
    assert t.events(5)["prune"].tolist() == [0, 1, 3]
    states = list(replay(t, validate=True))
    assert [s.tree.n_nodes for s in states] == [2, 2, 4, 3, 3]
    assert [s.freed.size for s in states] == [0, 0, 0, 1, 0]


def test_max_seq_len_cuts_paths_below_the_limit():
    from workloads.trace import tree_trace

    t = tree_trace("toy", 4, [-1, 0, 1, 1], [-3, 1, 3, 3], [4, 2, 1, 3], max_seq_len=8)
    assert t.n_steps == 3 and t.n_nodes == 4 and t.length.tolist() == [4, 2, 1, 1]
    assert int(step_counts(t).max_path_kv_tokens.max()) == 7
    t = tree_trace("toy", 4, [-1, 0, 1, 1], [-3, 1, 3, 3], [4, 2, 1, 3], max_seq_len=7)
    assert t.n_nodes == 2 and t.n_steps == 2


def test_full_pool_during_replay_names_the_step():
    tr = FewShot(prompt_len=10, width=3, max_seq_len=20).trace()
    with pytest.raises(KVPoolFull, match=r"step 4: KV pool full: 3 slots asked, 2 free of 21"):
        list(replay(tr, capacity=21))
    with pytest.raises(KVPoolFull, match="prefill"):
        list(replay(tr, capacity=5))


# ---------------------------------------------------------------------- the traces directory
def test_traces_dir_resolution(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    assert files.traces_dir(tmp_path / "mine") == (tmp_path / "mine").resolve()
    monkeypatch.setattr(files, "FETCHED_TRACES_DIR", tmp_path / "fetched")
    with pytest.raises(TraceError, match=r"run `make traces`.*workload.traces_dir=") as e:
        files.traces_dir(tmp_path / "absent")
    assert "\n" not in str(e.value)
    (tmp_path / "fetched").mkdir()
    assert files.traces_dir(tmp_path / "absent") == (tmp_path / "fetched").resolve()


def test_relative_traces_dir_resolves_against_repo_root(traces_root):
    assert files.traces_dir("../shared/data/traces") == traces_root or files.traces_dir(None) == traces_root
    tr = Speculative(file=str(traces_root / "speculative" / "APPS_tree_size32.json")).trace()  # absolute file
    assert tr.n_steps == 239
    with pytest.raises(TraceError, match="APPS_tree_size64.json"):
        Speculative(file="nope.json").trace()

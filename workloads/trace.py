"""Traces: how a decoding tree evolves over a run, and the replayer that turns one into per-step trees.

A trace is plain numpy data; the same config and seed give the same arrays. Two kinds:

*Tree traces* (``few_shot``, ``reasoning``, ``synthetic``). One row per node, numbered so that every
parent precedes its children; node 0 is the root, the prompt, written at prefill. ``parent``, ``start``
(first decode step of the node; the root's is ``1 - prompt_len``) and ``length`` (tokens, already cut at
``n_steps``). A node gains one token per step on steps ``start .. end``, ``end = start + length - 1``,
and its query is that newest token. The events are these numbers: *grow* (a node is active at t),
*branch* (children start at their parent's ``end + 1``), *prune* (a node whose whole subtree has ended
leaves the tree and its KV is freed before the next step; finished leaves no longer count).

*Speculative traces* (Medusa token-tree verification). A static candidate tree ``cand_parent``
(candidate 0 is its root, parents precede children) and ``accept`` (tokens kept per step). At step s
the tree is ``prompt -> spine -> candidate nodes``. The spine holds the ``A`` tokens accepted in earlier
steps followed by the candidate root: the *last accepted token*, sampled at the previous step (or at
prefill). Its K/V is not in the cache yet, so it is one of the step's queries and writes its K/V now;
every ``Accept_length`` counts it, so it is always kept. The other ``N - 1`` candidates hang below it,
single-child chains compressed into multi-token nodes with one query per token (causal inside the node
through ``visible``). After verification the candidate root and the ``accept - 1`` candidates on the
accepted path keep the slots they were written to (no copies) and join the spine; every other candidate
slot is freed before the next step. ``accept_leaf[k]`` is the candidate accepted at depth ``k``
(the importer picks the lexicographically smallest path of each depth: Medusa's top-1 chain).
Steps run while ``A < max_seq_len - prompt_len`` and the record has steps left.

Replay invariant the engine relies on: every slot in a step's tree is a prompt slot or the own token
(``query_slot``) of a query in this or an earlier step. Replay does no per-token Python work.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from deft.tree import DecodingTree

if TYPE_CHECKING:
    from deft.kv_pool import SlotAllocator


class TraceError(ValueError):
    """An invalid trace, template file or workload parameter; the message names the file, node or parameter."""


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int of at least ``minimum``, or a :class:`TraceError` naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TraceError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise TraceError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _i64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def _ragged(offsets: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Flat indices ``offsets[i] + 0..lens[i]-1`` for every i, concatenated (vectorised)."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.cumsum(lens) - lens
    return np.repeat(offsets - starts, lens) + np.arange(total, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Trace:
    """How a decoding tree evolves over ``n_steps`` decode steps (see the module docstring for the two kinds)."""

    name: str
    prompt_len: int
    n_steps: int
    parent: np.ndarray
    start: np.ndarray
    length: np.ndarray
    cand_parent: np.ndarray | None = None
    accept: np.ndarray | None = None
    accept_leaf: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in ("parent", "start", "length", "cand_parent", "accept", "accept_leaf"):
            v = getattr(self, f)
            if v is not None:
                object.__setattr__(self, f, _i64(v))
        self._check()

    @property
    def kind(self) -> str:
        return "speculative" if self.accept is not None else "tree"

    @property
    def n_nodes(self) -> int:
        return int(self.parent.size)

    @cached_property
    def end(self) -> np.ndarray:
        """Last decode step of each node (the root's is 0)."""
        return self.start + self.length - 1

    @cached_property
    def subtree_end(self) -> np.ndarray:
        """Last step any node of each subtree is active: the node is pruned after it."""
        sub = self.end.tolist()
        par = self.parent.tolist()
        for i in range(len(sub) - 1, 0, -1):  # per node; parents precede children
            p = par[i]
            if sub[i] > sub[p]:
                sub[p] = sub[i]
        return np.asarray(sub, dtype=np.int64)

    @cached_property
    def prefix_len(self) -> np.ndarray:
        """Tokens of each node's strict ancestors (full spans, the prompt included)."""
        pre = [0] * self.n_nodes
        par = self.parent.tolist()
        lens = self.length.tolist()
        for i in range(1, len(pre)):
            p = par[i]
            pre[i] = pre[p] + lens[p]
        return np.asarray(pre, dtype=np.int64)

    def events(self, step: int) -> dict[str, np.ndarray]:
        """The events of ``step`` as node ids: ``grow`` (active), ``branch`` (starting), ``prune`` (leaving after it).

        Speculative traces: ``grow`` is every candidate, ``branch`` is empty and ``prune`` the rejected ones.
        """
        if self.kind == "speculative":
            lay = candidate_layout(self.cand_parent)
            keep = lay.keep_pos(self.accept_leaf, int(self.accept[step - 1]))
            rejected = np.setdiff1d(np.arange(self.cand_parent.size), lay.order[keep])
            return {"grow": np.arange(self.cand_parent.size), "branch": np.zeros(0, np.int64), "prune": rejected}
        return {
            "grow": np.flatnonzero((self.start <= step) & (self.end >= step)),
            "branch": np.flatnonzero(self.start == step),
            "prune": np.flatnonzero(self.subtree_end == step),
        }

    # ------------------------------------------------------------------ validation
    def _check(self) -> None:
        n = self.parent.size
        if self.start.size != n or self.length.size != n or n == 0:
            raise TraceError(f"trace {self.name}: parent, start and length must be equal-length and non-empty")
        if self.prompt_len < 1:
            raise TraceError(f"trace {self.name}: prompt_len must be at least 1, got {self.prompt_len}")
        if self.n_steps < 1:
            raise TraceError(f"trace {self.name}: it has no decode step")
        if self.parent[0] != -1 or self.length[0] != self.prompt_len or self.start[0] != 1 - self.prompt_len:
            raise TraceError(f"trace {self.name}: node 0 must be the root holding the prompt ({self.prompt_len} tokens)")
        ids = np.arange(n)
        bad = np.flatnonzero((self.parent[1:] < 0) | (self.parent[1:] >= ids[1:])) + 1
        if bad.size:
            raise TraceError(f"trace {self.name}: node {int(bad[0])} has parent {int(self.parent[bad[0]])}; parents precede children")
        bad = np.flatnonzero(self.length < 1)
        if bad.size:
            raise TraceError(f"trace {self.name}: node {int(bad[0])} has length {int(self.length[bad[0]])}; a node needs a token")
        if self.kind == "tree":
            bad = np.flatnonzero(self.start[1:] != self.end[self.parent[1:]] + 1) + 1
            if bad.size:
                i = int(bad[0])
                raise TraceError(
                    f"trace {self.name}: node {i} starts at step {int(self.start[i])}, not right after its parent "
                    f"node {int(self.parent[i])} ends (step {int(self.end[self.parent[i]])})"
                )
            if n == 1 or int(self.end.max()) != self.n_steps:
                raise TraceError(f"trace {self.name}: its nodes end at step {int(self.end.max())}, not at n_steps={self.n_steps}")
            return
        # speculative: only the prompt in the node table, the candidate tree and per-step acceptance
        if n != 1 or self.cand_parent is None or self.accept_leaf is None:
            raise TraceError(f"trace {self.name}: a speculative trace holds the prompt node, cand_parent and accept_leaf")
        m = self.cand_parent.size
        if m < 1 or self.cand_parent[0] != -1:
            raise TraceError(f"trace {self.name}: candidate 0 must be the candidate root (parent -1)")
        bad = np.flatnonzero((self.cand_parent[1:] < 0) | (self.cand_parent[1:] >= np.arange(1, m))) + 1
        if bad.size:
            raise TraceError(f"trace {self.name}: candidate {int(bad[0])} has parent {int(self.cand_parent[bad[0]])}; parents precede children")
        if self.accept.size != self.n_steps or (self.accept < 1).any() or (self.accept > self.accept_leaf.size).any():
            raise TraceError(
                f"trace {self.name}: accept needs n_steps={self.n_steps} entries in 1..{self.accept_leaf.size} (depth + 1)"
            )
        depth = candidate_layout(self.cand_parent).depth
        if (depth[self.accept_leaf] != np.arange(self.accept_leaf.size)).any():
            raise TraceError(f"trace {self.name}: accept_leaf[k] must be a candidate at depth k")


def tree_trace(name: str, prompt_len: int, parent, start, length, max_seq_len: int, info: dict | None = None) -> Trace:
    """A tree trace from a template (root first, parents before children), the prompt padded to ``prompt_len``.

    Steps run while some node is active and ``t <= max_seq_len - prompt_len - 1`` (no path reaches
    ``max_seq_len``); nodes starting later are dropped and the others cut at the last step.
    """
    parent, start, length = _i64(parent), _i64(start).copy(), _i64(length).copy()
    limit = max_seq_len - prompt_len - 1
    if limit < 1:
        raise TraceError(
            f"max_seq_len={max_seq_len} leaves no decode step after a {prompt_len}-token prompt "
            f"(it must be at least prompt_len + 2)"
        )
    if parent.size < 2:
        raise TraceError(f"trace {name}: the template has no node below the prompt")
    start[0], length[0] = 1 - prompt_len, prompt_len
    n_steps = min(int((start + length - 1).max()), limit)
    keep = start <= n_steps
    new_id = np.cumsum(keep) - 1
    parent = np.where(parent[keep] >= 0, new_id[np.maximum(parent[keep], 0)], -1)
    start = start[keep]
    length = np.minimum(length[keep], n_steps - start + 1)
    return Trace(name, int(prompt_len), n_steps, parent, start, length, info=dict(info or {}))


# ---------------------------------------------------------------------- speculative layout
@dataclass(frozen=True, eq=False)
class CandidateLayout:
    """The candidate tree with single-child chains compressed: token order, nodes and queries of one step.

    Tree nodes of a step: 0 the prompt, 1 the spine (accepted tokens + candidate root), ``2..`` the
    compressed candidate nodes. ``order[p]`` is the candidate at token position ``p`` (``order[0]`` is the
    root); each compressed node's tokens are contiguous.
    """

    order: np.ndarray
    pos: np.ndarray
    depth: np.ndarray
    node_parent: np.ndarray  # tree-node ids of the compressed nodes' parents (1 = spine)
    node_len: np.ndarray
    query_node: np.ndarray  # queries of the candidates order[1:], tree-node ids
    query_visible: np.ndarray
    cand_parent: np.ndarray

    def keep_pos(self, accept_leaf: np.ndarray, accept: int) -> np.ndarray:
        """Token positions kept when ``accept`` tokens are accepted: the root and the chain down to depth ``accept - 1``."""
        chain = []
        c = int(accept_leaf[accept - 1])
        while c >= 0:
            chain.append(c)
            c = int(self.cand_parent[c])
        return self.pos[np.asarray(chain[::-1], dtype=np.int64)]


def candidate_layout(cand_parent: np.ndarray) -> CandidateLayout:
    """Compress the candidate tree's single-child chains (per candidate, done once per trace)."""
    cand_parent = _i64(cand_parent)
    m = cand_parent.size
    children: list[list[int]] = [[] for _ in range(m)]
    for c in range(1, m):
        children[int(cand_parent[c])].append(c)
    depth = np.zeros(m, dtype=np.int64)
    for c in range(1, m):
        depth[c] = depth[cand_parent[c]] + 1
    order = [0]
    node_of = np.full(m, 1, dtype=np.int64)  # the root sits in the spine (node 1)
    node_parent: list[int] = []
    node_len: list[int] = []
    stack = [(c, 1) for c in reversed(children[0])]
    while stack:
        c, pnode = stack.pop()
        nid = 2 + len(node_len)
        chain = [c]
        while len(children[chain[-1]]) == 1:
            chain.append(children[chain[-1]][0])
        node_of[chain] = nid
        order.extend(chain)
        node_parent.append(pnode)
        node_len.append(len(chain))
        stack.extend((k, nid) for k in reversed(children[chain[-1]]))
    order_a = np.asarray(order, dtype=np.int64)
    pos = np.empty(m, dtype=np.int64)
    pos[order_a] = np.arange(m)
    nl = np.asarray(node_len, dtype=np.int64)
    q_node = np.repeat(np.arange(2, 2 + nl.size, dtype=np.int64), nl)
    q_vis = np.arange(m - 1, dtype=np.int64) - np.repeat(np.cumsum(nl) - nl, nl) + 1
    return CandidateLayout(
        order_a, pos, depth, np.asarray(node_parent, dtype=np.int64), nl, q_node, q_vis, cand_parent
    )


def speculative_trace(
    name: str, prompt_len: int, cand_parent, accept_leaf, accept_record, max_seq_len: int, info: dict | None = None
) -> Trace:
    """A speculative trace: verify the candidate tree each step, keep the record's accepted tokens.

    Accept lengths beyond the tree's depth + 1 are clipped to it (counted in ``info["accept_clipped_steps"]``).
    """
    budget = max_seq_len - prompt_len
    if budget < 1:
        raise TraceError(f"max_seq_len={max_seq_len} leaves no token to accept after a {prompt_len}-token prompt")
    accept_leaf = _i64(accept_leaf)
    rec = _i64(accept_record)
    clipped = np.minimum(rec, accept_leaf.size)
    before = np.cumsum(clipped) - clipped  # accepted tokens before each step
    n_steps = int(np.searchsorted(before, budget, side="left"))  # steps with A < budget
    info = dict(info or {})
    info["accept_clipped_steps"] = int((rec[:n_steps] > accept_leaf.size).sum())
    info["record_exhausted"] = bool(n_steps == rec.size and before[-1] + clipped[-1] < budget)
    return Trace(
        name, int(prompt_len), n_steps, [-1], [1 - prompt_len], [prompt_len],
        cand_parent=cand_parent, accept=clipped[:n_steps], accept_leaf=accept_leaf, info=info,
    )  # fmt: skip


# ---------------------------------------------------------------------- workloads
class Workload(abc.ABC):
    """A trace source built by Hydra from ``conf/workload/<name>.yaml``; subclasses are dataclasses."""

    name: str = "workload"

    @abc.abstractmethod
    def trace(self) -> Trace:
        """The trace this configuration describes (deterministic)."""

    def params(self) -> dict[str, Any]:
        """Config parameters, flat, for results rows (machine-local paths left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "traces_dir"}


# ---------------------------------------------------------------------- replay
@dataclass(frozen=True, eq=False)
class StepState:
    """One decode step: the tree (queries = tokens decoded now) and the slots freed just before it."""

    step: int
    tree: DecodingTree
    freed: np.ndarray
    nodes: np.ndarray | None = None  # tree traces: trace node id of each tree node


@dataclass(frozen=True, eq=False)
class StepCounts:
    """Per-step counts of a trace (index ``t - 1`` is step t), computed without building slot arrays."""

    n_queries: np.ndarray
    n_nodes: np.ndarray
    unique_kv_tokens: np.ndarray
    path_kv_tokens: np.ndarray
    max_path_kv_tokens: np.ndarray
    kv_slots: np.ndarray  # pool slots in use during the step


def _interval_add(arr: np.ndarray, lo: np.ndarray, hi: np.ndarray, val) -> None:
    np.add.at(arr, lo, val)
    np.add.at(arr, hi + 1, -np.asarray(val))


def step_counts(trace: Trace) -> StepCounts:
    """Counts of every step in O(nodes + steps) numpy: the fast path for consumers that need no slots."""
    T, P = trace.n_steps, trace.prompt_len
    t = np.arange(1, T + 1, dtype=np.int64)
    if trace.kind == "speculative":
        lay = candidate_layout(trace.cand_parent)
        m = trace.cand_parent.size
        acc = np.cumsum(trace.accept) - trace.accept
        unique = P + acc + m
        return StepCounts(
            n_queries=np.full(T, m, dtype=np.int64),
            n_nodes=np.full(T, 2 + lay.node_len.size, dtype=np.int64),
            unique_kv_tokens=unique,
            path_kv_tokens=m * (P + acc) + int((lay.depth + 1).sum()),
            max_path_kv_tokens=P + acc + int(lay.depth.max()) + 1,
            kv_slots=unique,
        )
    s, e, L = trace.start[1:], trace.end[1:], trace.length[1:]
    sub, pre = trace.subtree_end[1:], trace.prefix_len[1:]
    c = np.zeros((6, T + 2), dtype=np.int64)  # unique const/slope, path const/slope, queries
    _interval_add(c[0], s, e, 1 - s)
    _interval_add(c[1], s, e, np.ones_like(s))
    _interval_add(c[0], e + 1, sub, L)
    _interval_add(c[2], s, e, pre + 1 - s)
    _interval_add(c[3], s, e, np.ones_like(s))
    _interval_add(c[4], s, e, np.ones_like(s))
    c = np.cumsum(c, axis=1)[:, 1 : T + 1]
    unique = P + c[0] + t * c[1]
    live = 1 + np.searchsorted(np.sort(s), t, side="right") - np.searchsorted(np.sort(sub), t, side="left")
    mx = np.zeros(T + 1, dtype=np.int64)
    for si, ei, base in zip(s.tolist(), e.tolist(), (pre + 1 - s).tolist(), strict=True):  # per node
        np.maximum(mx[si : ei + 1], base + np.arange(si, ei + 1), out=mx[si : ei + 1])
    return StepCounts(c[4], live, unique, c[2] + t * c[3], mx[1:], unique)


def trace_stats(trace: Trace) -> dict[str, Any]:
    """The describe counts of a trace, from :func:`step_counts`."""
    sc = step_counts(trace)
    u, p = int(sc.unique_kv_tokens.sum()), int(sc.path_kv_tokens.sum())
    out: dict[str, Any] = {
        "steps": trace.n_steps,
        "total_queries": int(sc.n_queries.sum()),
        "max_queries": int(sc.n_queries.max()),
        "max_nodes": int(sc.n_nodes.max()),
        "peak_unique_kv_tokens": int(sc.unique_kv_tokens.max()),
        "unique_kv_token_steps": u,
        "path_kv_token_steps": p,
        "peak_path_kv_tokens": int(sc.max_path_kv_tokens.max()),
        "peak_kv_slots": int(sc.kv_slots.max()),
        "kv_sharing_ratio": round(p / u, 4),
    }
    if trace.kind == "speculative":
        out["tree_size"] = int(trace.cand_parent.size)
        out["accepted_tokens"] = int(trace.accept.sum())
        out["accept_clipped_steps"] = int(trace.info.get("accept_clipped_steps", 0))
    return out


def replay(
    trace: Trace, capacity: int | None = None, validate: bool = False, allocator: SlotAllocator | None = None
) -> Iterator[StepState]:
    """Yield the tree of every step, allocating slots from ``allocator`` (default: a fresh pool of ``capacity``,
    or just enough). The prompt takes the root's slots first (prefill). Raises ``KVPoolFull`` naming the step."""
    from deft.kv_pool import KVPoolFull, SlotAllocator

    if allocator is None:
        allocator = SlotAllocator(capacity or int(step_counts(trace).kv_slots.max()))
    n_slots = allocator.capacity
    step = 0

    def alloc(n: int) -> np.ndarray:
        try:
            return allocator.alloc(n)
        except KVPoolFull as e:
            where = f"step {step}" if step else "prefill"
            raise KVPoolFull(f"{trace.name} {where}: {e}") from None

    prompt_slots = alloc(trace.prompt_len)
    steps = _replay_speculative if trace.kind == "speculative" else _replay_tree
    for state in steps(trace, prompt_slots, allocator, alloc, n_slots, validate):
        step = state.step + 1
        yield state


def _replay_tree(trace: Trace, prompt_slots, allocator, alloc, n_slots, validate) -> Iterator[StepState]:
    start, end, length, parent = trace.start, trace.end, trace.length, trace.parent
    sub = trace.subtree_end
    off = np.cumsum(length) - length  # each node's tokens in one flat buffer
    tok_slot = np.full(int(length.sum()), -1, dtype=np.int64)
    tok_slot[: trace.prompt_len] = prompt_slots
    by_prune = np.argsort(sub, kind="stable")
    prune_at = np.searchsorted(sub[by_prune], np.arange(trace.n_steps + 1), side="left")
    remap = np.full(trace.n_nodes, -1, dtype=np.int64)
    for t in range(1, trace.n_steps + 1):
        gone = by_prune[prune_at[t - 1] : prune_at[t]]  # subtrees that ended at step t - 1
        freed = tok_slot[_ragged(off[gone], length[gone])]
        allocator.free(freed)
        act = np.flatnonzero((start <= t) & (end >= t))
        tok_slot[off[act] + t - start[act]] = alloc(act.size)
        live = np.flatnonzero((start <= t) & (sub >= t))
        cur = np.minimum(t - start[live] + 1, length[live])
        remap[live] = np.arange(live.size)
        tree = DecodingTree.from_arrays(
            np.where(parent[live] >= 0, remap[parent[live]], -1),
            cur,
            tok_slot[_ragged(off[live], cur)],
            remap[act],
            t - start[act] + 1,
            n_slots=n_slots,
            validate=validate,
        )
        yield StepState(t, tree, freed, live)


def _replay_speculative(trace: Trace, prompt_slots, allocator, alloc, n_slots, validate) -> Iterator[StepState]:
    lay = candidate_layout(trace.cand_parent)
    m = trace.cand_parent.size
    P = trace.prompt_len
    keep = {a: lay.keep_pos(trace.accept_leaf, a) for a in np.unique(trace.accept).tolist()}
    kept = np.zeros(int(trace.accept.sum()), dtype=np.int64)  # accepted tokens' slots, in sequence order
    parent = np.concatenate([[-1, 0], lay.node_parent])
    q_node = np.concatenate([[1], lay.query_node])
    freed = np.zeros(0, dtype=np.int64)
    A = 0
    for t in range(1, trace.n_steps + 1):
        allocator.free(freed)
        cs = alloc(m)  # candidate slots in token order; cs[0] is the candidate root
        tree = DecodingTree.from_arrays(
            parent,
            np.concatenate([[P, A + 1], lay.node_len]),
            np.concatenate([prompt_slots, kept[:A], cs]),
            q_node,
            np.concatenate([[A + 1], lay.query_visible]),
            n_slots=n_slots,
            validate=validate,
        )
        yield StepState(t, tree, freed)
        a = int(trace.accept[t - 1])
        kp = keep[a]
        kept[A : A + a] = cs[kp]
        mask = np.ones(m, dtype=bool)
        mask[kp] = False
        freed = cs[mask]
        A += a

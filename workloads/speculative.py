"""Speculative decoding: Medusa token-tree verification from the DeFT authors' APPS records.

The file holds ``Tree_Structure`` (one child-index path per candidate below the candidate root),
``Token_Tree_size`` and ``Records[i].Accept_length`` (tokens kept per step). The structure, not the
declared size, defines the tree (two of the authors' files disagree with their size: size 5 lists 5
paths, size 10 lists 31; ``info`` records both). The accepted chain of each depth is the
lexicographically smallest path of that depth (Medusa's top-1 chain). How a step is replayed:
:mod:`workloads.trace`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from workloads.files import load_json, template_path
from workloads.trace import Trace, TraceError, Workload, check_int, speculative_trace


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_candidate_tree(paths: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(cand_parent, accept_leaf)`` from ``Tree_Structure``: candidates ordered by depth, then file order."""
    if not isinstance(paths, list) or not paths:
        raise TraceError(f"{where}: Tree_Structure must be a non-empty list of child-index paths")
    seen: dict[tuple[int, ...], int] = {}
    for k, p in enumerate(paths):
        if not isinstance(p, list) or not p or not all(_is_int(x) and x >= 0 for x in p):
            raise TraceError(f"{where}: Tree_Structure[{k}] = {p!r} is not a non-empty list of child indices >= 0")
        if tuple(p) in seen:
            raise TraceError(f"{where}: Tree_Structure[{k}] = {p} repeats Tree_Structure[{seen[tuple(p)]}]")
        seen[tuple(p)] = k
    ordered = sorted(seen, key=lambda p: (len(p), seen[p]))
    index = {(): 0} | {p: i + 1 for i, p in enumerate(ordered)}
    parent = [-1]
    for p in ordered:
        if p[:-1] not in index:
            raise TraceError(f"{where}: path {list(p)} has no parent path {list(p[:-1])} in Tree_Structure")
        parent.append(index[p[:-1]])
    max_depth = max(len(p) for p in ordered)
    leaf = [0] + [index[min(p for p in ordered if len(p) == d)] for d in range(1, max_depth + 1)]
    return np.asarray(parent, dtype=np.int64), np.asarray(leaf, dtype=np.int64)


@dataclass
class Speculative(Workload):
    """Record ``record_index`` of ``file``: verify the candidate tree each step until ``max_seq_len`` (paper: prompt + 1000)."""

    file: str = "APPS_tree_size64.json"
    record_index: int = 0
    prompt_len: int = 4000
    max_seq_len: int = 5000
    traces_dir: str | None = None

    name = "speculative"

    def __post_init__(self) -> None:
        check_int("record_index", self.record_index, 0)
        check_int("prompt_len", self.prompt_len)
        check_int("max_seq_len", self.max_seq_len, self.prompt_len + 1)

    def trace(self) -> Trace:
        path = template_path(self.file, "speculative", self.traces_dir)
        obj = load_json(path)
        where = path.name
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: expected a JSON object with Tree_Structure and Records")
        for k in ("Tree_Structure", "Records"):
            if k not in obj:
                raise TraceError(f"{where}: lacks key {k!r}")
        cand_parent, accept_leaf = parse_candidate_tree(obj["Tree_Structure"], where)
        records = obj["Records"]
        if not isinstance(records, list) or not 0 <= self.record_index < len(records):
            n = len(records) if isinstance(records, list) else 0
            raise TraceError(f"{where}: record_index {self.record_index} out of range (the file has {n} records)")
        rec = records[self.record_index]
        if not isinstance(rec, dict) or "Accept_length" not in rec:
            raise TraceError(f"{where}: Records[{self.record_index}] lacks key 'Accept_length'")
        acc = rec["Accept_length"]
        if not isinstance(acc, list) or not acc:
            raise TraceError(f"{where}: Records[{self.record_index}].Accept_length must be a non-empty list")
        for k, a in enumerate(acc):
            if not _is_int(a) or a < 1:
                raise TraceError(
                    f"{where}: Records[{self.record_index}].Accept_length[{k}] = {a!r}: every step accepts at least one token"
                )
        info = {"file": path.name, "declared_tree_size": obj.get("Token_Tree_size"), "tree_size": int(cand_parent.size)}
        return speculative_trace(
            f"{path.stem}[{self.record_index}]", self.prompt_len, cand_parent, accept_leaf, acc, self.max_seq_len, info
        )

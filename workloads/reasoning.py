"""Multi-step reasoning: replay a Graph-of-Thoughts tree template in the DeFT authors' format.

The file is a JSON list of trees; each tree's ``data`` maps node ids to ``{id, children, value, start,
end}`` (``../shared/data/traces/README.md``). Every rule of the format is checked per node, and a broken
one is a :class:`TraceError` naming the file, tree and node.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from workloads.files import load_json, template_path
from workloads.trace import Trace, TraceError, Workload, check_int, tree_trace

_NODE_KEYS = ("id", "children", "value", "start", "end")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_tree(tree: Any, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(parent, start, length)`` of one template tree, root first and parents before children (BFS)."""
    if not isinstance(tree, dict) or not isinstance(tree.get("data"), dict):
        raise TraceError(f"{where}: expected an object with a 'data' object of nodes")
    data = tree["data"]
    if not data:
        raise TraceError(f"{where}: 'data' has no nodes")
    nodes: dict[int, dict] = {}
    for key, node in data.items():
        if not isinstance(node, dict):
            raise TraceError(f"{where}: node {key!r} is not an object")
        for k in _NODE_KEYS:
            if k not in node:
                raise TraceError(f"{where}: node {key!r} lacks key {k!r}")
        for k in ("id", "value", "start", "end"):
            if not _is_int(node[k]):
                raise TraceError(f"{where}: node {key!r} has {k}={node[k]!r}, expected an integer")
        if not isinstance(node["children"], list) or not all(_is_int(c) for c in node["children"]):
            raise TraceError(f"{where}: node {key!r} has children={node['children']!r}, expected a list of node ids")
        i = node["id"]
        if str(i) != str(key):
            raise TraceError(f"{where}: node {key!r} has id {i}; the key and the id must agree")
        if node["value"] <= 0:
            raise TraceError(f"{where}: node {i} has value {node['value']}: a node needs at least one token")
        if node["end"] - node["start"] + 1 != node["value"]:
            raise TraceError(
                f"{where}: node {i} spans steps {node['start']}..{node['end']} "
                f"({node['end'] - node['start'] + 1} tokens) but its value is {node['value']}"
            )
        nodes[i] = node
    parent: dict[int, int] = {}
    for i, node in nodes.items():
        for c in node["children"]:
            if c == i:
                raise TraceError(f"{where}: node {i} lists itself as a child (cycle)")
            if c not in nodes:
                raise TraceError(f"{where}: node {i} lists child {c}, which is not a node of the tree")
            if c in parent:
                raise TraceError(
                    f"{where}: node {c} is a child of both node {parent[c]} and node {i} "
                    f"(a tree node has one parent; a cycle or a shared child)"
                )
            parent[c] = i
    roots = [i for i in nodes if i not in parent]
    if not roots:
        raise TraceError(f"{where}: no root: every node is some node's child (the children lists form a cycle)")
    if len(roots) > 1:
        raise TraceError(f"{where}: {len(roots)} roots (nodes {roots[:8]}): a tree has one root, the prompt")
    root = roots[0]
    if nodes[root]["end"] != 0:
        raise TraceError(f"{where}: root node {root} ends at step {nodes[root]['end']}; the prompt must end at step 0")
    order = [root]
    queue = deque([root])
    while queue:  # per node
        i = queue.popleft()
        for c in nodes[i]["children"]:
            order.append(c)
            queue.append(c)
    if len(order) != len(nodes):
        lost = sorted(set(nodes) - set(order))
        raise TraceError(f"{where}: nodes {lost[:8]} do not reach the root node {root}: their children lists form a cycle")
    for c, p in parent.items():
        cs, pe = nodes[c]["start"], nodes[p]["end"]
        if cs <= pe:
            raise TraceError(f"{where}: node {c} starts at step {cs}, before its parent node {p} ends (step {pe})")
        if cs != pe + 1:
            raise TraceError(
                f"{where}: node {c} starts at step {cs}, leaving a gap after its parent node {p} ends (step {pe}); "
                f"a child starts at its parent's end + 1"
            )
    new = {i: k for k, i in enumerate(order)}
    par = np.array([-1] + [new[parent[i]] for i in order[1:]], dtype=np.int64)
    start = np.array([nodes[i]["start"] for i in order], dtype=np.int64)
    length = np.array([nodes[i]["value"] for i in order], dtype=np.int64)
    return par, start, length


@dataclass
class Reasoning(Workload):
    """Tree ``tree_index`` of ``file``, prompt padded to ``prompt_len``, cut at ``max_seq_len`` (paper: prompt + 2000)."""

    file: str = "sorting128ToT.json"
    tree_index: int = 1
    prompt_len: int = 4000
    max_seq_len: int = 6000
    traces_dir: str | None = None

    name = "reasoning"

    def __post_init__(self) -> None:
        check_int("tree_index", self.tree_index, 0)
        check_int("prompt_len", self.prompt_len)
        check_int("max_seq_len", self.max_seq_len, self.prompt_len + 2)

    def trace(self) -> Trace:
        path = template_path(self.file, "reasoning", self.traces_dir)
        trees = load_json(path)
        if not isinstance(trees, list):
            raise TraceError(f"{path.name}: expected a JSON list of trees, got {type(trees).__name__}")
        if not 0 <= self.tree_index < len(trees):
            raise TraceError(f"{path.name}: tree_index {self.tree_index} out of range (the file has {len(trees)} trees)")
        where = f"{path.name} tree {self.tree_index}"
        parent, start, length = parse_tree(trees[self.tree_index], where)
        if self.prompt_len < length[0]:
            raise TraceError(
                f"{where}: prompt_len={self.prompt_len} is shorter than the template's prompt ({int(length[0])} tokens)"
            )
        info = {"file": path.name, "template_prompt_len": int(length[0]), "incompleted": trees[self.tree_index].get("incompleted")}
        return tree_trace(f"{path.stem}[{self.tree_index}]", self.prompt_len, parent, start, length, self.max_seq_len, info)

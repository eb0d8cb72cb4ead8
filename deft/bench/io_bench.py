"""``bench=io``: the analytic HBM traffic of every step of a trace, for one method. No GPU needed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from deft.attention import AttentionMethod, AttentionShape, IOCounts, floor_io
from deft.bench.results import FLOOR_FIELDS, IO_FIELDS
from deft.bench.steps import step_weights
from deft.tree import DecodingTree


def io_rows(
    method: AttentionMethod,
    trees: Sequence[tuple[int, DecodingTree]],
    shape: AttentionShape,
    n_steps: int,
    step_rows: bool = False,
    progress: bool = True,
) -> list[dict]:
    """IO per category of each given step (one layer) and an aggregate row: summed over steps, times
    ``shape.n_layers``, scaled by the steps each sample stands for when not every step is given."""
    steps = [s for s, _ in trees]
    w = step_weights(steps, n_steps)
    io = np.zeros((len(trees), len(IO_FIELDS)), dtype=np.float64)
    fl = np.zeros((len(trees), len(FLOOR_FIELDS)), dtype=np.float64)
    tok = np.zeros((len(trees), 4), dtype=np.float64)
    rows: list[dict] = []
    it = tqdm(trees, desc=f"io {method.name}", unit="step", disable=not progress, leave=False)
    for i, (step, tree) in enumerate(it):
        c: IOCounts = method.io(tree, shape)
        f = floor_io(tree, shape)
        io[i] = list(c.as_dict().values())
        fl[i] = list(f.as_dict(prefix="floor_").values())
        tok[i] = (tree.n_nodes, tree.n_queries, tree.unique_kv_tokens, tree.path_kv_tokens)
        if step_rows:
            rows.append(
                {
                    "kind": "step", "step": step, "weight": w[i],
                    "n_nodes": tree.n_nodes, "n_queries": tree.n_queries,
                    "unique_kv_tokens": tree.unique_kv_tokens, "path_kv_tokens": tree.path_kv_tokens,
                    "kv_floor_bytes": f.kv, **c.as_dict(), **f.as_dict(prefix="floor_"),
                }  # fmt: skip
            )
    io_sum = (w[:, None] * io).sum(0) * shape.n_layers
    fl_sum = (w[:, None] * fl).sum(0) * shape.n_layers
    tok_sum = (w[:, None] * tok).sum(0)
    agg = {
        "kind": "aggregate", "step": None, "weight": float(w.sum()), "n_steps": n_steps, "n_sampled": len(trees),
        "n_nodes": tok_sum[0], "n_queries": tok_sum[1], "unique_kv_tokens": tok_sum[2], "path_kv_tokens": tok_sum[3],
        "kv_floor_bytes": fl_sum[0],
        **{k: _int_if_whole(v) for k, v in zip(IO_FIELDS, io_sum, strict=True)},
        **{k: _int_if_whole(v) for k, v in zip(FLOOR_FIELDS, fl_sum, strict=True)},
    }  # fmt: skip
    for k in ("n_nodes", "n_queries", "unique_kv_tokens", "path_kv_tokens", "kv_floor_bytes"):
        agg[k] = _int_if_whole(agg[k])
    return [*rows, agg]


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)

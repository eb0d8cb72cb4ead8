"""A short correctness check of every method on a few tiny trees, against the fp64 reference.

Meant for machines without a GPU: run with ``TRITON_INTERPRET=1`` so the Triton kernels execute in the
interpreter (``python -m deft.bench.interp_check [out.csv]``). Methods that cannot run here print one
``skip <method>: <reason>`` line. This checks numbers, never speed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from deft.attention import AttentionShape
from deft.bench.provenance import provenance
from deft.reference import TOLERANCE, reference_attention, relative_error
from deft.tree import DecodingTree

CONF = Path(__file__).resolve().parents[2] / "conf" / "method"


def tiny_trees() -> dict[str, DecodingTree]:
    """A branching tree with a chunk-crossing layout, a speculative-style node with causal queries, a chain."""

    def build(parent, lens, queries):
        slots, s = [], 0
        for n in lens:
            slots.append(list(range(s + 3, s + 3 + n)))  # offset: slots need not start at 0
            s += n
        return DecodingTree.from_lists(parent, slots, queries, n_slots=s + 3)

    return {
        "branching": build([-1, 0, 0, 0, 1, 1], [37, 9, 5, 12, 4, 7], [(2, 5), (3, 12), (4, 4), (5, 7)]),
        "speculative": build([-1, 0, 1, 1], [29, 1, 6, 3], [(1, 1), (2, 1), (2, 2), (2, 3), (2, 6), (3, 1), (3, 3)]),
        "chain": build([-1, 0, 1], [20, 11, 3], [(2, 3)]),
    }


def check_all(dtype: str = "float16", seed: int = 0) -> pd.DataFrame:
    shape = AttentionShape(n_heads=4, n_kv_heads=2, head_dim=32, dtype=dtype, n_layers=1)
    rows = []
    prov = provenance()
    for yml in sorted(CONF.glob("*.yaml")):
        method = instantiate(OmegaConf.load(yml))
        reason = method.unavailable_reason()
        if reason is not None:
            print(f"skip {method.name}: {reason}", flush=True)
            continue
        for tname, tree in tiny_trees().items():
            g = torch.Generator().manual_seed(seed)
            q = torch.randn(tree.n_queries, shape.n_heads, shape.head_dim, generator=g).to(shape.torch_dtype)
            k = torch.randn(tree.n_slots, shape.n_kv_heads, shape.head_dim, generator=g).to(shape.torch_dtype)
            v = torch.randn(tree.n_slots, shape.n_kv_heads, shape.head_dim, generator=g).to(shape.torch_dtype)
            t0 = time.perf_counter()
            try:
                out = method.run(q, k, v, method.plan(tree, shape, "cpu"))
                err = relative_error(out, reference_attention(q, k, v, tree))
                status = "ok" if err <= TOLERANCE[shape.torch_dtype] else "FAIL"
            except Exception as e:  # noqa: BLE001 (report every method, then fail at the end)
                err, status = float("nan"), f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(
                {"method": method.name, "tree": tname, "queries": tree.n_queries, "dtype": dtype, "rel_error": err,
                 "tolerance": TOLERANCE[shape.torch_dtype], "status": status, "seconds": round(time.perf_counter() - t0, 2),
                 "triton_interpret": prov["triton_interpret"], "git_commit": prov["git_commit"], "torch": prov["torch"], "triton": prov["triton"]}
            )  # fmt: skip
            print(f"{method.name:20s} {tname:12s} rel_error={err:.2e} {status}", flush=True)
    return pd.DataFrame(rows)


def main(argv: list[str]) -> int:
    df = check_all()
    if argv:
        from deft.bench.results import write_atomic

        write_atomic(df, argv[0])
    return 0 if (df["status"] == "ok").all() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

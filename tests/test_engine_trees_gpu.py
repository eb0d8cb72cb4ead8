"""Every engine tree of a real trace through each GPU method, one layer, checked against fp64 on a sample.

The attention bench samples 16 steps of a trace, each with the workload's own slot layout; the engine runs
every step with its allocator's slots (freed slots reused), so layouts the bench never sees occur there. A
method that crashes or goes wrong on one of them shows up here, naming the step. Set ``DEFT_ENGINE_TREES``
to ``case:prompt`` pairs (default ``sorting128ToT:4000``) and ``DEFT_ENGINE_TREES_STEPS`` to cap the steps.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from deft.attention import AttentionShape
from deft.engine.branch import engine_batches
from deft.reference import TOLERANCE, reference_attention, relative_error

CASES = {
    "sorting128ToT": dict(file="sorting128ToT.json", tree_index=1),
    "docmergeToT": dict(file="docmergeToT.json", tree_index=0),
}
METHODS = ["deft_flatten", "radix", "flashinfer_paged", "flashinfer_cascade", "tree_mask_fused"]
SHAPE = AttentionShape(n_heads=32, n_kv_heads=8, head_dim=128, dtype="bfloat16")
CHECK_EVERY = 97


def _method(name: str):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.conftest import REPO

    with initialize_config_dir(str(REPO / "conf" / "method"), version_base=None):
        return instantiate(compose(config_name=name))


def _cases() -> list[tuple[str, int]]:
    spec = os.environ.get("DEFT_ENGINE_TREES", "sorting128ToT:4000")
    return [(c, int(p)) for c, p in (s.split(":") for s in spec.split(","))]


@pytest.mark.gpu
@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{c[0]}_{c[1]}")
def test_every_engine_tree(method_name: str, case: tuple[str, int], traces_root) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from workloads.reasoning import Reasoning

    m = _method(method_name)
    reason = m.unavailable_reason()
    if reason:
        pytest.skip(f"{method_name}: {reason}")
    name, prompt = case
    wl = Reasoning(**CASES[name], prompt_len=prompt, max_seq_len=prompt + 2000, traces_dir=str(traces_root))
    trace = wl.trace()
    cap_steps = os.environ.get("DEFT_ENGINE_TREES_STEPS")
    batches = list(engine_batches(trace, max_steps=int(cap_steps) if cap_steps else None))
    n_slots = max(int(b.tree.slots.max()) for b in batches) + 2
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(n_slots, SHAPE.n_kv_heads, SHAPE.head_dim, device="cuda", generator=g).to(torch.bfloat16)
    v = torch.randn(n_slots, SHAPE.n_kv_heads, SHAPE.head_dim, device="cuda", generator=g).to(torch.bfloat16)
    worst = 0.0
    for i, b in enumerate(batches):
        q = torch.randn(b.n_queries, SHAPE.n_heads, SHAPE.head_dim, device="cuda", generator=g).to(torch.bfloat16)
        try:
            out = m.run(q, k, v, m.plan(b.tree, SHAPE, "cuda"))
            if i % CHECK_EVERY == 0 or i == len(batches) - 1:
                err = relative_error(out, reference_attention(q, k, v, b.tree))
                worst = max(worst, err)
                assert err <= TOLERANCE[SHAPE.torch_dtype], f"step {b.step}: relative error {err:.3g}"
            else:
                torch.cuda.synchronize()  # a crash names this step (with CUDA_LAUNCH_BLOCKING=1, its launch)
        except Exception as e:
            path = os.environ.get("DEFT_ENGINE_TREES_DUMP")
            if path:
                t = b.tree
                np.savez(path, parent=t.parent, slot_ptr=t.slot_ptr, slots=t.slots, query_node=t.query_node,
                         query_visible=t.query_visible, step=b.step)  # fmt: skip
            raise AssertionError(f"{method_name} on {name} prompt {prompt}, engine step {b.step}: {e}") from e
    assert np.isfinite(worst)


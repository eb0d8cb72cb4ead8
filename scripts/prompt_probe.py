"""The Gluon prompt kernel alone, on the prompt tiles DeFT-Flatten's plan gives it, with its launcher's variants.

For each few-shot 16k snapshot of :mod:`scripts.kernel_snapshots` (the trees whose plans use the kernel), the
default method's plan; then, for each variant (module settings of :mod:`deft.kernels.prompt_gluon`: ``BLOCK_N`` and
``STAGES``, the K/V blocks and the ring's depth), the kernel alone
(:func:`~deft.kernels.prompt_gluon.launch_prompt_partials`) and the whole step, each in a CUDA graph, cold L2, median
of 50, the largest difference of the kernel's partials from the first variant's, and the step's error against fp64. Rows go to ``$OUT/prompt_probe_<date>.csv`` with :func:`~scripts.kernel_snapshots.provenance`; a table
is printed. Run on a Hopper GPU: ``python -m scripts.prompt_probe``.
"""

from __future__ import annotations

import torch

from deft.bench.timing import time_device
from deft.kernels import prompt_gluon
from deft.kernels.deft_flatten import DeftFlatten
from deft.reference import relative_error
from scripts.kernel_snapshots import SHAPE, graph_of, inputs, save_probe_rows, snapshots

#: module settings of :mod:`deft.kernels.prompt_gluon` per variant (read by its launcher at each launch)
#: (session 17 also swept the softmax's scale folded into the exponent, since then the only form of `_softmax_step`,
#: and, at e4368f6, a consumer issuing the S GEMM a block ahead at 64-token blocks, 20-32 % slower)
VARIANTS = {
    "base": {"BLOCK_N": 128, "STAGES": 2},
    "s3": {"BLOCK_N": 128, "STAGES": 3},
    "b64_s4": {"BLOCK_N": 64, "STAGES": 4},
}


def apply_variant(name: str | None, prov: dict) -> None:
    """Set the Gluon prompt kernel's module settings to :data:`VARIANTS` ``[name]`` for the rest of the process and
    record the name in ``prov["prompt_gluon"]`` (nothing when ``name`` is empty): the ``DEFT_PROMPT_VARIANT`` /
    ``DEFT_GT_PROMPT_VARIANT`` of ``kernel_snapshots`` and ``gluon_timeline``."""
    if not name:
        return
    for attr, val in VARIANTS[name].items():
        setattr(prompt_gluon, attr, val)
    prov["prompt_gluon"] = name


def probe(name: str, tree, dev: torch.device) -> list[dict]:
    """The rows of one snapshot: per variant, the prompt kernel alone and the whole step (CUDA graphs, cold L2), the
    kernel's partials' largest difference from the first variant's, and the step's error against fp64."""
    q, k, v, ref = inputs(tree, dev)
    m = DeftFlatten()
    plan = m.plan(tree, SHAPE, dev)
    if plan.n_prompt == 0:
        return []
    g = plan.groups
    saved = {a: getattr(prompt_gluon, a) for a in VARIANTS["base"]}
    rows, first = [], None

    def launch():
        prompt_gluon.launch_prompt_partials(
            q, k, v, plan.part_o, plan.part_lse, plan.meta, g.offsets, plan.n_prompt, plan.n_pairs
        )

    def step():
        m.run(q, k, v, plan)

    try:
        for vname, settings in VARIANTS.items():
            for a, val in settings.items():
                setattr(prompt_gluon, a, val)
            plan.part_o.fill_(float("nan"))
            launch()
            torch.cuda.synchronize()
            written = ~plan.part_o.isnan().flatten(1).any(1)
            out = (plan.part_o[written].float().clone(), plan.part_lse[written].clone())
            diff = 0.0
            if first is None:
                first = out
            else:
                diff = max((out[0] - first[0]).abs().max().item(), (out[1] - first[1]).abs().max().item())
            us = time_device(graph_of(launch).replay, reps=50, device=dev).median_ms * 1e3
            err = relative_error(m.run(q, k, v, plan), ref)
            whole = time_device(graph_of(step).replay, reps=50, device=dev).median_ms * 1e3
            rows.append(dict(snapshot=name, variant=vname, prompt_us=us, step_us=whole, rel_err=err,
                             n_prompt=plan.n_prompt, n_pairs=plan.n_pairs, rows_written=int(written.sum()),
                             max_diff_vs_first=diff, **settings))  # fmt: skip
            print(rows[-1], flush=True)
    finally:
        for a, val in saved.items():
            setattr(prompt_gluon, a, val)
    return rows


def main() -> None:
    dev = torch.device("cuda")
    rows = [r for name, tree in snapshots() if name.startswith("fewshot_16k") for r in probe(name, tree, dev)]
    df = save_probe_rows(rows, "prompt_probe", dev)
    print(df.pivot(index="snapshot", columns="variant", values="prompt_us").round(2).to_string())
    print(df.pivot(index="snapshot", columns="variant", values="step_us").round(2).to_string())


if __name__ == "__main__":
    main()

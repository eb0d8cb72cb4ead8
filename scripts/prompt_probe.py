"""The Gluon prompt kernel alone, on the prompt tiles DeFT-Flatten's plan gives it, with its launcher's variants.

For each few-shot 16k snapshot of :mod:`scripts.kernel_snapshots` (the trees whose plans use the kernel), the
default method's plan; then :func:`~deft.kernels.prompt_gluon.launch_prompt_partials` alone, in a CUDA graph, cold
L2, median of 50, for each variant (``fold``: the softmax's scale folded into the exponent), and the largest
difference of its partials from the first variant's on the rows the kernel writes. Also the step's whole run for
reference. Rows go to ``$OUT/prompt_probe_<date>.csv`` with :func:`~scripts.kernel_snapshots.provenance`; a table
is printed. Run on a Hopper GPU: ``python -m scripts.prompt_probe``.
"""

from __future__ import annotations

import torch

from deft.bench.timing import time_device
from deft.kernels import prompt_gluon
from deft.kernels.deft_flatten import DeftFlatten
from scripts.kernel_snapshots import SHAPE, graph_of, inputs, save_probe_rows, snapshots

VARIANTS = {"base": {"fold": False}, "fold": {"fold": True}}


def probe(name: str, tree, dev: torch.device) -> list[dict]:
    """The rows of one snapshot: each variant's time and its partials' largest difference from the first's."""
    q, k, v, _ = inputs(tree, dev)
    m = DeftFlatten()
    plan = m.plan(tree, SHAPE, dev)
    if plan.n_prompt == 0:
        return []
    g = plan.groups
    whole = time_device(graph_of(lambda: m.run(q, k, v, plan)).replay, reps=50, device=dev).median_ms * 1e3
    rows, first = [], None
    for vname, kw in VARIANTS.items():
        plan.part_o.fill_(float("nan"))

        def launch(kw=kw):
            prompt_gluon.launch_prompt_partials(
                q, k, v, plan.part_o, plan.part_lse, plan.meta, g.offsets, plan.n_prompt, plan.n_pairs, **kw
            )

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
        rows.append(dict(snapshot=name, variant=vname, prompt_us=us, step_us=whole, n_prompt=plan.n_prompt,
                         n_pairs=plan.n_pairs, rows_written=int(written.sum()), max_diff_vs_first=diff))  # fmt: skip
    return rows


def main() -> None:
    dev = torch.device("cuda")
    rows = [r for name, tree in snapshots() if name.startswith("fewshot_16k") for r in probe(name, tree, dev)]
    df = save_probe_rows(rows, "prompt_probe", dev)
    print(df.pivot(index="snapshot", columns="variant", values="prompt_us").round(2).to_string())
    print(df[["snapshot", "variant", "step_us", "n_prompt", "n_pairs", "rows_written", "max_diff_vs_first"]].to_string())


if __name__ == "__main__":
    main()

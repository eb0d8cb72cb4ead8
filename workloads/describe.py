"""``python -m workloads.describe <hydra overrides>``: a workload's trace counts, one ``key: value`` per line.

Counts come from the fast path (:func:`workloads.trace.trace_stats`, no slot arrays). With ``replay=true``
or ``kv_capacity=<slots>`` every step is also replayed slot by slot (validated trees, a pool of that size)
and checked against them. Bad input is one ``describe: error: ...`` line on stderr and exit status 1.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from deft.tree import TreeError
from workloads.trace import TraceError, Workload, check_int, replay, step_counts, trace_stats


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (TraceError, TreeError)
    if "deft.kv_pool" in sys.modules:  # only a replay can fill the pool, and it imports the module
        errors += (sys.modules["deft.kv_pool"].KVPoolFull,)
    return errors


def build_workload(cfg: DictConfig) -> Workload:
    """Instantiate ``cfg.workload``; a bad parameter is a :class:`TraceError` with the target's own message."""
    try:
        wl = instantiate(cfg.workload)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, _user_errors()):
            raise cause from None
        raise TraceError(" ".join(str(e).split())) from None
    if not isinstance(wl, Workload):
        raise TraceError(f"workload target {cfg.workload.get('_target_')} does not build a workloads.trace.Workload")
    return wl


def describe(cfg: DictConfig) -> dict[str, Any]:
    """Everything the command prints, in order."""
    wl = build_workload(cfg)
    trace = wl.trace()
    out: dict[str, Any] = {
        "workload": wl.name,
        "trace": trace.name,
        "params": " ".join(f"{k}={v}" for k, v in wl.params().items()),
    }
    out.update(trace_stats(trace))
    capacity = cfg.get("kv_capacity")
    if capacity is not None or cfg.get("replay", False):
        if capacity is not None:
            capacity = check_int("kv_capacity", capacity)
        sc = step_counts(trace)
        n = 0
        for st in replay(trace, capacity=capacity, validate=True):
            i = st.step - 1
            got = (st.tree.unique_kv_tokens, st.tree.path_kv_tokens, st.tree.n_queries)
            want = (sc.unique_kv_tokens[i], sc.path_kv_tokens[i], sc.n_queries[i])
            if got != tuple(int(x) for x in want):
                raise AssertionError(f"{trace.name} step {st.step}: replay counts {got} != fast-path counts {want}")
            n += 1
        out["replayed_steps"] = n
        if capacity is not None:
            out["kv_capacity"] = capacity
    return out


@hydra.main(config_path="../conf", config_name="describe", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        out = describe(cfg)
    except _user_errors() as e:
        sys.exit(f"describe: error: {' '.join(str(e).split())}")
    print("\n".join(f"{k}: {v}" for k, v in out.items()), flush=True)


if __name__ == "__main__":
    main()

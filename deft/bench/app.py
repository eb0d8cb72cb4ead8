"""One bench job: build the method and workload from the config, skip what is done or cannot run here,
measure, and write the run's rows atomically (see :mod:`deft.bench.results`)."""

from __future__ import annotations

import json
import sys
import time

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from deft.attention import AttentionMethod, AttentionShape, MethodUnavailable, UnsupportedInput
from deft.bench import results
from deft.bench.provenance import provenance
from deft.bench.steps import sampled_trees, select_steps
from workloads.trace import TraceError

BENCHES = ("attention", "io", "e2e")


def bench_name(cfg: DictConfig) -> str:
    """The bench mode: ``bench.name``, else the ``bench`` group choice Hydra made."""
    name = cfg.bench.get("name") if "bench" in cfg else None
    if not name:
        from hydra.core.hydra_config import HydraConfig

        name = HydraConfig.get().runtime.choices.get("bench") if HydraConfig.initialized() else None
    if name not in BENCHES:
        raise ValueError(f"bench must be one of {BENCHES}, got {name!r}")
    return name


def resolve_device(cfg: DictConfig) -> str:
    dev = str(cfg.get("device", "auto"))
    if dev == "auto" or (dev.startswith("cuda") and not torch.cuda.is_available()):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return dev


def attention_shape(cfg: DictConfig) -> AttentionShape:
    m = cfg.model
    return AttentionShape(
        n_heads=int(m.n_heads),
        n_kv_heads=int(m.n_kv_heads),
        head_dim=int(m.head_dim),
        dtype=str(cfg.bench.get("dtype") or m.dtype),
        n_layers=int(m.n_layers),
    )


def skip(method: str, reason: str) -> str:
    """The one line a method that cannot run prints; no row is written."""
    print(f"skip {method}: {reason}", flush=True)
    return "skipped"


def run_job(cfg: DictConfig) -> str:
    """Run one configuration; returns ``done`` (already there), ``skipped``, or ``written``."""
    bench = bench_name(cfg)
    device = resolve_device(cfg)
    if bench == "attention" and not device.startswith("cuda"):
        sys.exit(
            "bench=attention needs a CUDA GPU and none is visible here: it times kernels with CUDA events "
            "and never reports interpreter or CPU timings. Use bench=io for the analytic IO on this machine."
        )
    if device.startswith("cuda"):
        from deft.bench.devices import claim_gpu

        device = claim_gpu(device)
    method: AttentionMethod = instantiate(cfg.method)
    workload = instantiate(cfg.workload)
    prov = provenance(device if device.startswith("cuda") else None)
    key = results.run_key(cfg)
    path = results.run_path(cfg.results_dir, prov["gpu"], bench, workload.name, method.name, key)
    done = results.finished_run(path)
    if done is not None and not cfg.bench.get("force", False):
        print(f"done {done} (bench.force=true redoes it)", flush=True)
        return "done"
    if bench != "io":
        reason = method.unavailable_reason()
        if reason is not None:
            return skip(method.name, reason)

    shape = attention_shape(cfg)
    t0 = time.perf_counter()
    try:
        if bench == "e2e":
            rows = _e2e_rows(cfg, method, workload)
            if rows is None:
                return "skipped"
            trace = None
        else:
            trace, rows = _replay_rows(cfg, bench, method, workload, shape, device)
    except (MethodUnavailable, UnsupportedInput, ImportError) as e:
        return skip(method.name, str(e).splitlines()[0])
    except TraceError as e:
        return skip(method.name, f"invalid workload for this run: {str(e).splitlines()[0]}")
    except RuntimeError as e:
        from deft.bench.attention_bench import OutOfMemory

        if isinstance(e, OutOfMemory):
            return skip(method.name, str(e))
        raise
    common = {
        "bench": bench,
        "run_key": key,
        "workload": workload.name,
        "trace": trace.name if trace is not None else None,
        "prompt_len": trace.prompt_len if trace is not None else None,
        "method": method.name,
        "case": _choice("case"),
        "experiment": _choice("experiment"),
        "model": cfg.model.name,
        "n_layers": shape.n_layers,
        "n_heads": shape.n_heads,
        "n_kv_heads": shape.n_kv_heads,
        "head_dim": shape.head_dim,
        "dtype": shape.dtype,
        "device": device,
        **prov,
        **results.flatten("wl.", workload.params()),
        **results.flatten("m.", method.describe()),
        **results.flatten("bench.", {k: v for k, v in OmegaConf.to_container(cfg.bench, resolve=True).items() if k not in ("force", "progress")}),
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    df = results.to_frame([{**common, **r} for r in rows])
    results.write_atomic(df, path)
    if done is not None and done != path:  # redone (bench.force) in the current layout
        done.unlink()
    print(f"wrote {path} ({len(df)} rows)", flush=True)
    return "written"


def _replay_rows(cfg, bench, method, workload, shape, device):
    from workloads.trace import replay

    b = cfg.bench
    trace = _trace(cfg, workload)
    n_steps = int(trace.n_steps)
    steps = select_steps(
        n_steps,
        stride=b.get("step_stride"),
        steps=OmegaConf.to_container(b.steps) if b.get("steps") is not None else None,
        samples=b.get("samples"),
    )
    if not steps:
        raise UnsupportedInput(f"no steps selected (trace has {n_steps} steps; bench.steps={b.get('steps')})")
    trees = _sampled_trees(cfg, trace, steps, replay)
    progress = bool(b.get("progress", True))
    if bench == "io":
        from deft.bench.io_bench import io_rows

        return trace, io_rows(method, trees, shape, n_steps, step_rows=bool(b.get("step_rows", False)), progress=progress)
    from deft.bench.attention_bench import attention_rows

    check = b.get("check", "first")
    if check is not None and not isinstance(check, str):
        check = list(check)
    rows = attention_rows(
        method, trees, shape, n_steps, device=device, reps=int(b.get("reps", 50)), warmup=int(b.get("warmup", 5)),
        plan_reps=int(b.get("plan_reps", 10)), check=check, seed=int(cfg.get("seed", 0)), progress=progress,
    )  # fmt: skip
    return trace, rows


_TREES: dict[str, list] = {}
_TRACES: dict[str, object] = {}


def _trace(cfg: DictConfig, workload):
    """The workload's trace, built once per process for consecutive jobs on the same workload config."""
    key = json.dumps(OmegaConf.to_container(cfg.workload, resolve=True), sort_keys=True, default=str)
    if key not in _TRACES:
        _TRACES.clear()
        _TRACES[key] = workload.trace()
    return _TRACES[key]


def _sampled_trees(cfg: DictConfig, trace, steps: list[int], replay) -> list:
    """The trees at ``steps``, replayed once per process for consecutive jobs on the same workload
    (a sweep whose method varies fastest replays each trace once)."""
    key = json.dumps([OmegaConf.to_container(cfg.workload, resolve=True), steps], sort_keys=True, default=str)
    if key not in _TREES:
        _TREES.clear()
        _TREES[key] = list(sampled_trees(trace, lambda tr: replay(tr, validate=False), steps))
    return _TREES[key]


def _choice(group: str) -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def _e2e_rows(cfg, method, workload) -> list[dict] | None:
    try:
        from deft.engine.runner import run_e2e
    except ImportError as e:
        print(f"skip e2e: the engine (deft.engine.runner.run_e2e) is not available: {e}", flush=True)
        return None
    rows = run_e2e(cfg, method, workload)
    return [{"kind": "aggregate", **r} for r in rows]



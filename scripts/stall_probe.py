"""Find what stalls an engine step: run the bench app with hooks that log Triton compiles, long GC passes
and slow host-side calls, then print them in time order.

    python -m scripts.stall_probe experiment=e2e_reasoning case=sorting128ToT workload.prompt_len=4000 \\
        method=deft_flatten bench.cuda_graphs=true bench.overlap=true

Arguments are the bench app's (one run, not a multirun). Logged, with seconds since start:
- ``compile``: every Triton compile or cache load (kernel name, warm-up or not, milliseconds, the
  specialisation key), the usual cause of a slow first step with a new tile height;
- ``gc``: garbage-collection passes over ``STALL_PROBE_GC_MS`` (default 2 ms);
- host calls over ``STALL_PROBE_CALL_MS`` (default 1.5 ms): DeFT's two launches, every CUDA-graph replay, and
  the engine's ``_prepare`` / ``_launch`` (logged over 8 ms only, as they always take a few), each with wall
  and thread-CPU milliseconds.

In session 7 this showed that the 5-45 ms attention steps of the H100 e2e runs came from neither compiles nor
GC: ``_launch`` itself took 8-30 ms of CPU in stretches, with no single launch over 1.5 ms
(``notes/deft_kernels.md``).
"""

from __future__ import annotations

import atexit
import gc
import os
import runpy
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

T0 = time.perf_counter()
GC_MS = float(os.environ.get("STALL_PROBE_GC_MS", "2"))
CALL_MS = float(os.environ.get("STALL_PROBE_CALL_MS", "1.5"))
STEP_MS = 8.0  # engine step phases: logged above this only
LOG: list[tuple[float, str, str]] = []


def _log(t: float, kind: str, text: str) -> None:
    LOG.append((t - T0, kind, text))


def _hook_compiles() -> None:
    from triton.runtime.jit import JITFunction

    orig = JITFunction._do_compile

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        t = time.perf_counter()
        kernel = orig(self, key, signature, device, constexprs, options, attrs, warmup)
        ms = (time.perf_counter() - t) * 1e3
        _log(t, "compile", f"{self.fn.__name__} warmup={warmup} {ms:.1f} ms {str(key)[:300]}")
        return kernel

    JITFunction._do_compile = do_compile


def _hook_gc() -> None:
    start: dict[str, float] = {}

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            start["t"] = time.perf_counter()
        elif "t" in start:
            ms = (time.perf_counter() - start["t"]) * 1e3
            if ms > GC_MS:
                _log(start["t"], "gc", f"generation {info.get('generation')} collected {info.get('collected')} {ms:.1f} ms")

    gc.callbacks.append(callback)


def _timed(name: str, fn: Callable, least_ms: float) -> Callable:
    def wrapper(*args, **kwargs):
        t, c = time.perf_counter(), time.thread_time()
        out = fn(*args, **kwargs)
        ms, cpu = (time.perf_counter() - t) * 1e3, (time.thread_time() - c) * 1e3
        if ms > least_ms:
            _log(t, name, f"{ms:.2f} ms wall, {cpu:.2f} ms cpu")
        return out

    return wrapper


def _hook_calls() -> None:
    import torch

    import deft.engine.runner as runner
    import deft.kernels.deft_attention as deft_attention

    deft_attention.launch_partials = _timed("launch_partials", deft_attention.launch_partials, CALL_MS)
    deft_attention.launch_reduce = _timed("launch_reduce", deft_attention.launch_reduce, CALL_MS)
    torch.cuda.CUDAGraph.replay = _timed("graph_replay", torch.cuda.CUDAGraph.replay, CALL_MS)
    for name in ("_prepare", "_launch"):
        setattr(runner.TreeDecoder, name, _timed(f"step{name}", getattr(runner.TreeDecoder, name), STEP_MS))


@atexit.register
def _report() -> None:
    print(f"== stall_probe: {len(LOG)} events {dict(Counter(kind for _, kind, _ in LOG))}")
    for t, kind, text in sorted(LOG):
        print(f"{t:9.3f} s  {kind:16s} {text}")


def main() -> None:
    _hook_compiles()
    _hook_gc()
    _hook_calls()
    sys.argv = ["deft.bench", *sys.argv[1:]]
    runpy.run_module("deft.bench", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

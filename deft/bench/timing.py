"""Device timing with CUDA events: warm-up, cold L2 between repetitions, median and spread."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TimingStats:
    """Latency of one callable in milliseconds over ``reps`` cold-L2 repetitions."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    reps: int
    passes: int = 1  # measurement passes taken (see :func:`steadiest`)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in self.__dict__.items()}


def _stats(samples: list[float]) -> TimingStats:
    a = np.asarray(samples, dtype=np.float64)
    return TimingStats(
        median_ms=float(np.median(a)),
        p10_ms=float(np.percentile(a, 10)),
        p90_ms=float(np.percentile(a, 90)),
        min_ms=float(a.min()),
        mean_ms=float(a.mean()),
        reps=int(a.size),
    )


_FLUSH: dict[torch.device, torch.Tensor] = {}


def l2_flush_buffer(device: torch.device, nbytes: int = 256 << 20) -> torch.Tensor:
    """A buffer larger than L2 (50 MB on H100); reading or writing it evicts whatever the last repetition left."""
    buf = _FLUSH.get(device)
    if buf is None or buf.numel() * 4 < nbytes:
        buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
        _FLUSH[device] = buf
    return buf


#: how :func:`flush_l2` evicts the last repetition's data: ``"read"`` (the default from session 21) reads the flush
#: buffer, so L2 holds clean lines of it and the timed work starts from the state the design asks for (L2 not warm, as
#: with rotating K/V pools larger than L2: what a decode loop leaves, the previous layers having read other tensors);
#: ``"write"`` zeroes it, as Triton's ``do_bench`` does (sessions 1-20, and every row without an ``l2_flush`` column),
#: which leaves L2 full of dirty lines (50 MB on the H100) that the timed work's misses write back to HBM beside its own
#: traffic (9.4 µs on a 106 MB read, session 19). ``DEFT_L2_FLUSH`` picks it; rows carry it in their ``l2_flush``
#: column (:func:`~deft.bench.provenance.provenance`) and the tables say which they hold.
L2_FLUSHES = ("read", "write")
_L2_FLUSH = [os.environ.get("DEFT_L2_FLUSH", "read")]


def l2_flush_mode() -> str:
    """The flush :func:`time_device` and the probes use (``DEFT_L2_FLUSH``, or :func:`set_l2_flush`)."""
    mode = _L2_FLUSH[0]
    if mode not in L2_FLUSHES:
        raise ValueError(f"DEFT_L2_FLUSH must be one of {L2_FLUSHES}, got {mode!r}")
    return mode


def set_l2_flush(mode: str) -> None:
    """Use ``mode`` (one of :data:`L2_FLUSHES`) for the flushes from now on."""
    if mode not in L2_FLUSHES:
        raise ValueError(f"l2 flush must be one of {L2_FLUSHES}, got {mode!r}")
    _L2_FLUSH[0] = mode


def flush_l2(buf: torch.Tensor) -> None:
    """Evict L2 with ``buf`` (:func:`l2_flush_buffer`) as :func:`l2_flush_mode` says: zero it, or read it."""
    if l2_flush_mode() == "write":
        buf.zero_()
    else:
        torch.sum(buf, dtype=torch.int64)


_SPUN_UP: set[torch.device] = set()


def spin_up(device: torch.device, seconds: float = 0.3) -> None:
    """Keep the GPU busy for ``seconds`` once per process, so the first measurement does not pay for an
    idle GPU ramping its clocks up (seen on the H100: a bimodal first run, p10 51 us vs p90 131 us)."""
    if device in _SPUN_UP or device.type != "cuda":
        return
    buf = l2_flush_buffer(device)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            buf.zero_()
        torch.cuda.synchronize(device)
    _SPUN_UP.add(device)


#: GPU clock cycles of ``torch.cuda._sleep`` queued before each repetition's start event (~150 us at the
#: H100's 1.98 GHz): see :func:`time_device`.
BACKLOG_CYCLES = 300_000
#: GPU clock cycles of ``torch.cuda._sleep`` queued once before the first repetition (~10 ms on the H100): a
#: lead the host keeps, since each repetition's sleep outlasts its enqueueing; see :func:`time_device`.
LEAD_CYCLES = 20_000_000


def time_device(
    fn: Callable[[], object],
    reps: int = 50,
    warmup: int = 5,
    cold_l2: bool = True,
    device: torch.device | str | None = None,
    backlog_cycles: int = BACKLOG_CYCLES,
    lead_cycles: int = LEAD_CYCLES,
) -> TimingStats:
    """Median CUDA-event time of ``fn`` (device work only), flushing L2 before every repetition.

    Before each start event the stream gets ``backlog_cycles`` of ``torch.cuda._sleep``, so the GPU is still
    busy when the host has finished enqueueing the repetition: without it a kernel shorter than its own
    Python launch path is timed as host latency (seen on the H100: a 24 us DeFT kernel measured at 55 us, p90
    72 us, on a slower host). ``backlog_cycles=0`` times the launch path too. ``lead_cycles`` of sleep before
    the first repetition let the host enqueue that far ahead, so a host stall shorter than the lead (session 7's
    GPU host had 5-40 ms ones, and stretches of 2x slower launches) delays no repetition; the per-repetition
    backlog, longer than the enqueueing of one repetition, keeps the lead growing. Not yet measured with the lead.
    """
    device = torch.device(device or "cuda")
    spin_up(device)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    flush = l2_flush_buffer(device) if cold_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    if lead_cycles > 0 and backlog_cycles > 0:
        torch.cuda._sleep(int(lead_cycles))
    for i in range(reps):
        if flush is not None:
            flush_l2(flush)
        if backlog_cycles > 0:
            torch.cuda._sleep(int(backlog_cycles))
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return _stats([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])


def time_device_interleaved(
    fns: Mapping[str, Sequence[Callable[[], object]]],
    rounds: int = 200,
    warmup: int = 5,
    device: torch.device | str | None = None,
    seed: int = 0,
    backlog_cycles: int = BACKLOG_CYCLES,
    lead_cycles: int = LEAD_CYCLES,
) -> dict[str, np.ndarray]:
    """Millisecond samples of each named launch, taken in rounds: round ``r`` runs instance ``r % len(fns[name])`` of
    every name once, cold L2 and backlogged as :func:`time_device` does, the names in a random order (``seed``).

    A clock or temperature drift, or a neighbour's burst, then falls on every name of a round alike, so sample ``r``
    of two names is a pair (:func:`paired_ratio`); sequential passes (one launch's repetitions, then the next's)
    cannot tell a 0.5 % difference from drift (identical launches measured 43.4-44.3 µs apart in one call, session
    22). The instances are the same launch built apart (own plan, buffers and graph). H100, session 23: with one build
    each and a fixed rotated order, two identical launches read 26.0 and 25.3 µs, steadily over 400 rounds; with the
    order random and 4 builds each, identical launches read within 0.5 % of each other, while 8 builds of one launch
    spread by 0.6-1.3 % in their own medians. So a comparison that is to hold for the launch needs several builds."""
    device = torch.device(device or "cuda")
    spin_up(device)
    names = list(fns)
    if not names or any(len(fns[n]) == 0 for n in names):
        raise ValueError("every name needs at least one instance to time")
    for name in names:
        for fn in fns[name]:
            for _ in range(warmup):
                fn()
    torch.cuda.synchronize(device)
    flush = l2_flush_buffer(device)
    events = {
        n: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
        for n in names
    }
    order = np.random.default_rng(seed)
    if lead_cycles > 0 and backlog_cycles > 0:
        torch.cuda._sleep(int(lead_cycles))
    for r in range(rounds):
        for k in order.permutation(len(names)):
            name = names[k]
            flush_l2(flush)
            if backlog_cycles > 0:
                torch.cuda._sleep(int(backlog_cycles))
            start, end = events[name][r]
            start.record()
            fns[name][r % len(fns[name])]()
            end.record()
    torch.cuda.synchronize(device)
    return {n: np.array([s.elapsed_time(e) for s, e in events[n]]) for n in names}


def paired_ratio(
    a: np.ndarray,
    b: np.ndarray,
    instances: int = 1,
    boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Median of the per-round ratios ``a[r] / b[r]`` of two paired samples (:func:`time_device_interleaved`) and its
    bootstrap interval at ``level`` (percentile method, ``boot`` resamples): ``a`` is slower than ``b`` with that
    confidence when the interval's low end is above 1. With ``instances`` > 1, round ``r`` timed instance
    ``r % instances`` of each, and each resample draws instances first, then rounds within each drawn instance
    (two levels), so the interval holds for the launches, not for one placement of their buffers."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired samples need one equal, non-empty length, got {a.shape} and {b.shape}")
    if not 1 <= instances <= a.size:
        raise ValueError(f"instances must be in [1, {a.size}], got {instances}")
    r = a / b
    rng = np.random.default_rng(seed)
    per = [r[i::instances] for i in range(instances)]
    n = min(p.size for p in per)
    per = np.stack([p[:n] for p in per])  # instances x rounds of each
    inst = rng.integers(0, instances, size=(boot, instances)) if instances > 1 else np.zeros((boot, 1), dtype=np.int64)
    rows = rng.integers(0, n, size=(boot, instances, n))
    meds = np.median(per[inst[:, :, None], rows].reshape(boot, -1), axis=1)
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(meds, [tail, 1.0 - tail])
    return float(np.median(r)), float(lo), float(hi)


def steadiest(measure: Callable[[], TimingStats], retries: int = 2, spread: float = 1.3) -> TimingStats:
    """Run ``measure`` (one pass of repetitions) again, up to ``retries`` more times, while its median is more than
    ``spread`` x its fastest repetition, and keep the pass with the lowest median (its ``passes`` says how many ran).

    A pass whose median sits far above its own minimum saw a stall that outlasted the host's lead for many
    repetitions (session 8's H100 host: one sampled step of a DeFT sweep at 7.5x its neighbours, p90 17x), not the
    kernel: the kernel's repetitions agree within a few percent (p90/p10 1.01-1.19 for DeFT's snapshots)."""
    best = measure()
    passes = 1
    while passes <= retries and best.median_ms > spread * best.min_ms:
        again = measure()
        passes += 1
        if again.median_ms < best.median_ms:
            best = again
    return TimingStats(**{**best.__dict__, "passes": passes})


@contextlib.contextmanager
def pinned_thread(core: int | None = None):
    """Run the block with the calling thread pinned to one CPU (``core``; default the last one it may use), then
    restore its affinity: host timings of the plan on a shared GPU host varied 2-5x from one process to the next
    unpinned (sessions 11-12). Does nothing where the OS has no thread affinity."""
    if not hasattr(os, "sched_getaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    cpu = max(before) if core is None else int(core)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def time_host(
    fn: Callable[[], object], reps: int = 20, warmup: int = 2, sync: Callable[[], None] | None = None
) -> TimingStats:
    """Median wall time of host work (plans), synchronising the device after each call if ``sync`` is given."""
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _stats(samples)


def copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    stats = time_device(lambda: dst.copy_(src), reps=reps, warmup=3, cold_l2=False, device=device)
    return 2 * nbytes / (stats.median_ms * 1e-3)

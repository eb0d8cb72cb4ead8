"""``steadiest``: a pass of repetitions whose median sits far above its fastest repetition is measured again."""

from __future__ import annotations

from deft.bench.timing import TimingStats, steadiest


def stats(median: float, low: float) -> TimingStats:
    return TimingStats(median_ms=median, p10_ms=low, p90_ms=median * 2, min_ms=low, mean_ms=median, reps=50)


def feed(*passes: TimingStats):
    it = iter(passes)
    calls = []

    def measure() -> TimingStats:
        calls.append(1)
        return next(it)

    return measure, calls


def test_a_steady_pass_is_kept_without_measuring_again():
    measure, calls = feed(stats(1.1, 1.0), stats(0.5, 0.5))
    r = steadiest(measure)
    assert r.median_ms == 1.1 and r.passes == 1 and len(calls) == 1


def test_a_stalled_pass_is_measured_again_and_the_lowest_median_kept():
    measure, calls = feed(stats(7.5, 1.0), stats(1.05, 1.0), stats(9.0, 1.0))
    r = steadiest(measure)
    assert r.median_ms == 1.05 and r.passes == 2 and len(calls) == 2


def test_retries_are_bounded_and_the_best_of_all_passes_wins():
    measure, calls = feed(stats(5.0, 1.0), stats(3.0, 1.0), stats(4.0, 1.0), stats(0.1, 0.1))
    r = steadiest(measure, retries=2)
    assert r.median_ms == 3.0 and r.passes == 3 and len(calls) == 3


def test_pinned_thread_runs_on_one_core_and_restores_the_affinity():
    import os

    import pytest

    from deft.bench.timing import pinned_thread

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no thread affinity on this OS")
    before = os.sched_getaffinity(0)
    with pinned_thread() as cpu:
        assert os.sched_getaffinity(0) == {cpu} and cpu == max(before)
    assert os.sched_getaffinity(0) == before
    with pinned_thread(min(before)) as cpu:
        assert os.sched_getaffinity(0) == {min(before)}
    assert os.sched_getaffinity(0) == before

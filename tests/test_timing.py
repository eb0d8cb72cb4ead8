"""``steadiest``: a pass of repetitions whose median sits far above its fastest repetition is measured again;
``paired_ratio`` and ``time_device_interleaved``: paired comparisons of two launches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deft.bench.timing import TimingStats, paired_ratio, steadiest, time_device_interleaved


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


def test_paired_ratio_finds_a_two_percent_gap_under_a_shared_drift():
    """Rounds drift by up to 20 % together; b is 2 % slower in every round, plus 0.5 % noise of its own: the
    interval excludes 1 though the two samples' ranges overlap almost wholly."""
    rng = np.random.default_rng(0)
    drift = 40.0 * (1.0 + 0.2 * rng.random(300))
    a = drift * (1.0 + 0.005 * rng.standard_normal(300))
    b = 1.02 * drift * (1.0 + 0.005 * rng.standard_normal(300))
    med, lo, hi = paired_ratio(b, a)
    assert 1.0 < lo < med < hi and abs(med - 1.02) < 0.005
    med, lo, hi = paired_ratio(a, b)
    assert lo < med < hi < 1.0


def test_paired_ratio_of_one_launch_against_itself_straddles_one():
    rng = np.random.default_rng(1)
    drift = 40.0 * (1.0 + 0.2 * rng.random(300))
    a, b = (drift * (1.0 + 0.01 * rng.standard_normal(300)) for _ in range(2))
    med, lo, hi = paired_ratio(a, b)
    assert lo < 1.0 < hi and hi - lo < 0.01


def test_paired_ratio_refuses_unpaired_samples():
    with pytest.raises(ValueError, match="paired samples"):
        paired_ratio(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="paired samples"):
        paired_ratio(np.ones(0), np.ones(0))


def test_two_level_interval_holds_for_the_launch_not_for_one_placement():
    """Four instances a side, each with its own steady offset (+-2 %, as buffer placement gave identical launches on
    the H100) and no difference between the launches: one level (rounds only) calls the placement's offset a
    difference; two levels (instances, then rounds) do not."""
    rng = np.random.default_rng(2)
    rounds, k = 400, 4
    drift = 40.0 * (1.0 + 0.1 * rng.random(rounds))
    off_a, off_b = 1.0 + 0.02 * rng.standard_normal(k), 1.0 + 0.02 * rng.standard_normal(k)
    inst = np.arange(rounds) % k
    a = drift * off_a[inst] * (1.0 + 0.005 * rng.standard_normal(rounds))
    b = drift * off_b[inst] * (1.0 + 0.005 * rng.standard_normal(rounds))
    _, lo1, hi1 = paired_ratio(a, b)
    _, lo2, hi2 = paired_ratio(a, b, instances=k)
    assert not lo1 < 1.0 < hi1 and lo2 < 1.0 < hi2 and hi2 - lo2 > 3 * (hi1 - lo1)
    with pytest.raises(ValueError, match="instances"):
        paired_ratio(a, b, instances=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_interleaved_rounds_give_each_name_one_sample_a_round():
    x = torch.ones(1 << 20, device="cuda")
    out = time_device_interleaved({"small": [lambda: x[:1024].sum()], "big": [lambda: (x * 2).sum()] * 2}, rounds=20)
    assert set(out) == {"small", "big"} and all(v.shape == (20,) and (v > 0).all() for v in out.values())
    with pytest.raises(ValueError, match="instance"):
        time_device_interleaved({"none": []}, rounds=2)

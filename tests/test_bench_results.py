"""Results schema, run keys, atomic writes, step selection and integration weights."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from deft.bench import results
from deft.bench.steps import select_steps, step_weights


def test_run_key_is_stable_and_ignores_paths_and_resume_switches():
    a = OmegaConf.create({"method": {"x": 1}, "bench": {"name": "io", "force": False}, "results_dir": "r1", "traces_dir": "t"})
    b = OmegaConf.create({"results_dir": "elsewhere", "bench": {"force": True, "name": "io"}, "method": {"x": 1}, "traces_dir": "u"})
    c = OmegaConf.create({"method": {"x": 2}, "bench": {"name": "io", "force": False}, "results_dir": "r1"})
    assert results.run_key(a) == results.run_key(b)
    assert results.run_key(a) != results.run_key(c)
    assert len(results.run_key(a)) == 12


def test_to_frame_puts_schema_columns_first_and_keeps_extras():
    df = results.to_frame([{"zz_extra": 1, "method": "m", "bench": "io"}])
    assert list(df.columns[: len(results.SCHEMA)]) == list(results.SCHEMA)
    assert df.columns[-1] == "zz_extra"
    for col in ("io_kv", "io_partial", "io_total", "floor_total", "latency_ms", "plan_ms", "bw_fraction", "git_commit", "gpu_name"):
        assert col in results.SCHEMA


def test_write_atomic_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "cpu" / "io" / "w__m__abc.csv"
    results.write_atomic(pd.DataFrame({"a": [1, 2]}), path)
    results.write_atomic(pd.DataFrame({"a": [3]}), path)
    assert pd.read_csv(path)["a"].tolist() == [3]
    assert os.listdir(path.parent) == [path.name]


def test_write_atomic_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "x.csv"
    results.write_atomic(pd.DataFrame({"a": [1]}), path)

    class Boom(pd.DataFrame):
        def to_csv(self, *a, **k):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        results.write_atomic(Boom({"a": [2]}), path)
    assert pd.read_csv(path)["a"].tolist() == [1]
    assert os.listdir(tmp_path) == ["x.csv"]


def test_select_steps_stride_list_samples_and_all():
    assert select_steps(10) == list(range(1, 11))
    assert select_steps(10, stride=4) == [1, 5, 9]
    assert select_steps(399, steps=[1, 200, 399, 500]) == [1, 200, 399]
    assert select_steps(399, steps=["last", -1, 1]) == [1, 399]
    assert len(select_steps(1999, samples=16)) == 16


@pytest.mark.parametrize("sampled,n", [([1, 5, 9], 10), ([1, 200, 399], 399), ([3, 4], 4), (list(range(1, 8)), 7)])
def test_step_weights_cover_every_step_once(sampled, n):
    w = step_weights(sampled, n)
    assert w.sum() == n and (w >= 1).all()
    if sampled == [1, 5, 9]:
        assert w.tolist() == [4, 4, 2]


def test_load_results_concatenates_runs_and_skips_temporaries(tmp_path):
    for i in range(2):
        results.write_atomic(results.to_frame([{"bench": "io", "method": f"m{i}"}]), tmp_path / "cpu" / "io" / f"w__m{i}__k.csv")
    (tmp_path / "cpu" / "io" / ".w__m9__k.csv.123.tmp").write_text("garbage")
    df = results.load_results(tmp_path, bench="io")
    assert sorted(df["method"]) == ["m0", "m1"]
    assert np.all(df["source_file"].str.startswith("cpu/io/"))


def test_e2e_runs_are_gzipped_reproducibly_and_found_in_either_layout(tmp_path):
    path = results.run_path(tmp_path, "h100", "e2e", "w", "m", "k")
    assert path.name == "w__m__k.csv.gz" and results.run_path(tmp_path, "h100", "io", "w", "m", "k").suffix == ".csv"
    df = results.to_frame([{"bench": "e2e", "method": "m", "step": s, "run_key": "1e5"} for s in range(300)])
    results.write_atomic(df, path)
    first = path.read_bytes()
    assert first[:2] == b"\x1f\x8b"  # gzip magic
    results.write_atomic(df, path)
    assert path.read_bytes() == first  # fixed mtime: equal rows, equal bytes
    assert results.finished_run(path) == path
    old = tmp_path / "h100" / "e2e" / "w__old__k.csv"  # a run written before e2e files were gzipped
    results.write_atomic(results.to_frame([{"bench": "e2e", "method": "old"}]), old)
    assert results.finished_run(results.run_path(tmp_path, "h100", "e2e", "w", "old", "k")) == old
    assert results.finished_run(results.run_path(tmp_path, "h100", "e2e", "w", "new", "k")) is None
    loaded = results.load_results(tmp_path, bench="e2e")
    assert sorted(set(loaded["method"])) == ["m", "old"] and len(loaded) == 301
    assert loaded.loc[loaded["method"] == "m", "run_key"].iloc[0] == "1e5"  # still a string, not 100000.0

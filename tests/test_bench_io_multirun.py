"""The bench app end to end: ``bench=io`` under Hydra multirun, resume, skips, and the CPU refusal of
``bench=attention``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from deft.bench import results

REPO = Path(__file__).resolve().parents[1]
FAKE_W = "+workload._target_=tests.fixtures.fake_bench.FakeFewShot"


def bench(tmp_path, *args, check=True):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "deft.bench", *args, f"results_dir={tmp_path / 'res'}", f"hydra.sweep.dir={tmp_path / 'mr'}",
           f"hydra.run.dir={tmp_path / 'run'}", "bench.progress=false"]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"rc {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def _fake(tmp_path, *extra):
    return bench(tmp_path, "-m", "bench=io", "~workload", "+workload._target_=tests.fixtures.fake_bench.FakeFewShot",
                 "+workload.width=2,3", "+workload.gen=5", "~method", "+method._target_=tests.fixtures.fake_bench.FakeSequenceMethod",
                 "+method.scale=1,2", *extra)  # fmt: skip


def test_io_multirun_writes_one_file_per_run_then_resumes(tmp_path):
    p = _fake(tmp_path)
    files = sorted((tmp_path / "res" / "cpu" / "io").glob("*.csv"))
    assert len(files) == 4, p.stdout
    df = results.load_results(tmp_path / "res", bench="io")
    assert set(df["kind"]) == {"aggregate"} and (df["n_steps"] == 5).all()
    # sequence method with scale 1: KV IO = path tokens x KV bytes per token x layers
    one = df[(df["m.scale"] == 1) & (df["wl.width"] == 2)].iloc[0]
    assert one["io_kv"] == one["path_kv_tokens"] * 2 * 8 * 128 * 2 * 32
    assert one["floor_kv"] == one["unique_kv_tokens"] * 2 * 8 * 128 * 2 * 32
    mtimes = [f.stat().st_mtime_ns for f in files]
    p2 = _fake(tmp_path)
    assert p2.stdout.count("done ") == 4
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    p3 = _fake(tmp_path, "bench.force=true")
    assert p3.stdout.count("wrote ") == 4


def test_real_few_shot_io_deft_flatten_and_radix_multirun(tmp_path):
    bench(tmp_path, "-m", "bench=io", "case=few_shot", "method=deft_flatten,radix", "workload.prompt_len=1000,4000", "workload.width=20,50")
    df = results.load_results(tmp_path / "res", bench="io")
    assert len(df) == 8 and (df["n_steps"] == 399).all()
    piv = df.pivot_table(index=["prompt_len", "wl.width"], columns="method", values="io_kv")
    # DeFT-Flatten reads each K/V at least once (the floor) and less than Radix, which reads every query's path
    floor = df.groupby(["prompt_len", "wl.width"])["floor_kv"].first()
    assert (floor <= piv["deft_flatten"]).all() and (piv["deft_flatten"] < 0.5 * piv["radix"]).all()
    assert (df["git_commit"].notna()).all() and (df["gpu"] == "cpu").all()


def test_unavailable_method_prints_one_skip_line_and_writes_nothing(tmp_path):
    p = bench(tmp_path, "bench=attention", "device=cuda", "~workload", FAKE_W, "~method",
              "+method._target_=tests.fixtures.fake_bench.FakeSequenceMethod", "+method.available=false", check=False)  # fmt: skip
    # without a GPU the bench refuses before anything else; with one, the fake method is skipped in one line
    if "needs a CUDA GPU" in p.stderr:
        assert p.returncode != 0
    else:
        assert "skip fake_seq: fake reason for the test" in p.stdout
    assert not list((tmp_path / "res").rglob("*.csv"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
def test_attention_bench_refuses_plainly_without_a_gpu(tmp_path):
    p = bench(tmp_path, "bench=attention", "workload.prompt_len=100", "workload.width=2", "workload.max_seq_len=110", check=False)
    assert p.returncode != 0
    assert "bench=attention needs a CUDA GPU" in p.stderr
    assert not list((tmp_path / "res").rglob("*.csv"))


def test_io_step_rows_and_explicit_steps(tmp_path):
    bench(tmp_path, "bench=io", "case=snap_few_shot_4000", "method=radix", "bench.step_rows=true")
    df = results.load_results(tmp_path / "res", bench="io")
    steps = df[df["kind"] == "step"]
    assert steps["step"].tolist() == [1, 200, 399]
    agg = df[df["kind"] == "aggregate"].iloc[0]
    assert agg["weight"] == 399 and agg["n_sampled"] == 3
    assert pd.notna(agg["bench.steps"])

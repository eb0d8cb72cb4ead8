"""Tables and figures are built from result rows alone, deterministically."""

from __future__ import annotations

import pandas as pd
import pytest

from deft.bench import results
from scripts import plots, tables

PROV = {"gpu": "h100", "gpu_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0",
        "git_commit": "abc123def456", "git_dirty": False, "date": "2026-01-02T03:04:05Z", "model": "llama3_8b",
        "dtype": "bfloat16", "n_layers": 32}  # fmt: skip
TIMES = {"deft_flatten": 1.0, "radix": 2.5, "flashinfer_cascade": 1.25}


def _attention_rows():
    rows = []
    for width in (20, 50):
        for p in (1000, 4000):
            for m, t in TIMES.items():
                rows.append({**PROV, "bench": "attention", "kind": "aggregate", "workload": "few_shot", "wl.width": width,
                             "prompt_len": p, "method": m, "total_attn_ms": 1000 * t * p / 1000, "run_key": f"{m}{width}{p}"})  # fmt: skip
                for step in (1, 200):
                    rows.append({**PROV, "bench": "attention", "kind": "step", "step": step, "bench.steps": "[1, 200]",
                                 "workload": "few_shot", "wl.width": width, "prompt_len": p, "method": m, "latency_ms": 0.1 * t,
                                 "latency_p10_ms": 0.09 * t, "latency_p90_ms": 0.11 * t, "plan_ms": 0.2, "n_queries": width,
                                 "unique_kv_tokens": p + width, "achieved_bw_gbps": 2000 / t, "copy_bw_gbps": 2900.0,
                                 "bw_fraction": 0.69 / t, "rel_error": 1e-3})  # fmt: skip
    return rows


def _io_rows():
    rows = []
    for m, kv, part in (("deft_flatten", 1e9, 0.0), ("radix", 1e10, 1e8), ("tree_mask", 4e9, 3e9)):
        rows.append({**PROV, "gpu": "cpu", "bench": "io", "kind": "aggregate", "workload": "reasoning", "wl.file": "sorting128ToT.json",
                     "prompt_len": 4000, "method": m, "io_kv": kv, "io_partial": part, "io_q": 1e6, "io_o": 1e6, "io_mask": 0,
                     "io_logits": 0, "io_meta": 1e3, "io_total": kv + part + 2e6, "floor_kv": 9e8, "floor_total": 9.02e8,
                     "run_key": f"1e{len(m)}5a"})  # fmt: skip
    return rows


def _write(root, rows, sub):
    df = results.to_frame(rows)
    for i, (_, g) in enumerate(df.groupby(["method", "bench"])):
        results.write_atomic(g, root / sub / str(g["bench"].iloc[0]) / f"w__{i}__k.csv")


def test_attention_table_speedups_from_fixture_rows(tmp_path):
    _write(tmp_path, _attention_rows(), "h100")
    df = results.load_results(tmp_path, gpu="h100")
    t = tables.attention_table(df)
    assert list(t["label"].unique()) == ["few-shot b=20", "few-shot b=50"]
    assert (t["x Radix"].round(6) == 2.5).all() and (t["x FlashInfer cascade"].round(6) == 1.25).all()
    assert (t["x best other"].round(6) == 1.25).all()
    snap = tables.snapshot_table(df)
    assert set(snap["step"]) == {1, 200} and (snap["x Radix"].round(6) == 2.5).all()
    bw = tables.bandwidth_table(df)
    assert (bw["fraction of copy BW"].round(6) == 0.69).all()


def test_snapshot_table_names_the_methods_with_deft_flatten_s_launch(tmp_path):
    """Rows with ``launch_digest``: a method whose digest equals DeFT-Flatten's at a step is listed there (the same
    kernels on the same plan); rows without digests (older runs) add no column."""
    rows = _attention_rows()
    for r in rows:
        if r["kind"] == "step" and r["method"] != "radix":  # cascade shares Flatten's digest at step 200 only
            r["launch_digest"] = "a" if r["method"] == "deft_flatten" or r["step"] == 200 else "b"
    _write(tmp_path, rows, "h100")
    snap = tables.snapshot_table(results.load_results(tmp_path, gpu="h100"))
    same = snap.set_index("step")["same launch as ref"]
    assert set(same.loc[200]) == {"FlashInfer cascade"} and set(same.loc[1]) == {""}
    _write(tmp_path / "old", _attention_rows(), "h100")
    assert "same launch as ref" not in tables.snapshot_table(results.load_results(tmp_path / "old", gpu="h100"))


def test_io_table_reductions(tmp_path):
    _write(tmp_path, _io_rows(), "cpu")
    df = results.load_results(tmp_path, bench="io")
    row = tables.io_reduction_table(df).iloc[0]
    assert row["label"] == "sorting128ToT"
    assert round(row["KV vs Radix"], 6) == 90.0 and round(row["KV vs Tree-mask (PyTorch)"], 6) == 75.0
    assert round(row["partial vs Radix"], 6) == 100.0
    kv = tables.io_table(df, "kv").iloc[0]
    assert kv["unique-KV floor (GB)"] == 0.9 and kv["Radix (GB)"] == 10.0
    assert tables.io_table(df, "partial").iloc[0]["Tree-mask (PyTorch) (GB)"] == 3.0


def test_build_all_is_deterministic_and_states_provenance(tmp_path):
    _write(tmp_path, _attention_rows(), "h100")
    _write(tmp_path, _io_rows(), "cpu")
    first = {p.name: p.read_text() for p in tables.build_all(tmp_path)}
    second = {p.name: p.read_text() for p in tables.build_all(tmp_path)}
    assert first == second
    assert {"attention_h100.md", "snapshots_h100.md", "bandwidth_h100.md", "io_reduction.md", "io_kv.md", "io_partial.md"} <= set(first)
    text = first["attention_h100.md"]
    assert "NVIDIA H100 80GB HBM3" in text and "abc123def456" in text and "torch 2.11.0" in text and "2026-01-02" in text
    assert "73-99%" in first["io_reduction.md"]


def test_figures_from_fixture_rows(tmp_path):
    _write(tmp_path, _attention_rows(), "h100")
    _write(tmp_path, _io_rows(), "cpu")
    names = {p.name for p in plots.build_all(tmp_path)}
    assert {"speedup_h100.png", "bandwidth_h100.png", "io_breakdown.png", "tree_chunks.png"} <= names


def test_tree_figure_uses_the_deft_flatten_plan():
    bounds, qranges, note = plots.flatten_chunks(plots.example_tree(), chunk_size=128)
    assert "DeftFlatten" in note and bounds[0] == 0 and bounds[-1] == plots.example_tree().unique_kv_tokens
    assert len(qranges) == len(bounds) - 1


def test_markdown_renders_missing_values():
    md = tables.to_markdown(pd.DataFrame({"a": [1.0, None], "b": ["x", "y"]}))
    assert md.splitlines()[0] == "| a | b |" and "–" in md


def _e2e_rows():
    rows = []
    for engine, scale in (("eager", 2.0), ("cuda_graphs", 1.0)):
        for m, t in (("deft_flatten", 1.0), ("radix", 1.5 if engine == "eager" else 2.0)):
            rows.append({**PROV, "bench": "e2e", "kind": "aggregate", "workload": "few_shot", "wl.width": 50, "prompt_len": 16000,
                         "method": m, "engine": engine, "e2e_ms": 1000 * t * scale, "attn_ms_total": 300 * t * scale,
                         "run_key": f"{m}{engine}"})  # fmt: skip
    return rows


def test_e2e_table_keeps_eager_and_cuda_graph_runs_apart(tmp_path):
    _write(tmp_path, _e2e_rows(), "h100")
    df = results.load_results(tmp_path, gpu="h100")
    t = tables.e2e_table(df).set_index("engine")
    assert set(t.index) == {"eager", "cuda_graphs"}
    assert round(t.loc["eager", "x Radix e2e"], 6) == 1.5 and round(t.loc["cuda_graphs", "x Radix e2e"], 6) == 2.0
    assert round(t.loc["eager", "DeFT-Flatten e2e (s)"], 6) == 2.0
    assert round(t.loc["cuda_graphs", "DeFT-Flatten attention share"], 6) == 0.3
    assert t.loc["cuda_graphs", "paper x Radix e2e"] == 1.74  # the paper's few-shot w50 16k figure sits beside


def test_e2e_runs_cut_short_get_their_own_rows(tmp_path):
    rows = _e2e_rows()
    for m, t in (("deft_flatten", 3.0), ("radix", 1.0)):  # a 600-step run must not replace the whole-trace one
        rows.append({**rows[0], "method": m, "e2e_ms": 1000 * t, "bench.max_steps": 600, "run_key": f"{m}cut", "date": "2099-01-01T00:00:00Z"})
    _write(tmp_path, rows, "h100")
    t = tables.e2e_table(results.load_results(tmp_path, gpu="h100"))
    eager = t[t["engine"] == "eager"].set_index("label")
    whole = next(lbl for lbl in eager.index if "steps" not in lbl)
    assert eager.loc[f"{whole} (first 600 steps)", "DeFT-Flatten e2e (s)"] == 3.0
    assert round(eager.loc[whole, "x Radix e2e"], 6) == 1.5


def test_sweep_ledger_ratios_are_within_one_call(tmp_path):
    def call(gpu, name, rows):
        (tmp_path / gpu).mkdir(exist_ok=True)
        pd.DataFrame(rows, columns=["phase", "snapshot", "variant", "kwargs", "graph_us", "git_commit"]).to_csv(
            tmp_path / gpu / f"kernel_snapshots_{name}.csv", index=False
        )

    call("h100", "a", [
        ("sweep", "s1", "default", "{}", 10.0, "abc1234ffff"), ("sweep", "s1", "knob", "{'k': 1}", 20.0, "abc1234ffff"),
        ("sweep", "s2", "default", "{}", 40.0, "abc1234ffff"), ("sweep", "s2", "knob", "{'k': 1}", 10.0, "abc1234ffff"),
        ("table", "s1", "flatten", "{}", 1.0, "abc1234ffff"),
    ])  # fmt: skip
    call("h200", "b", [("sweep", "s1", "default", "{}", 5.0, "def"), ("sweep", "s1", "knob", "{}", 4.0, "def")])
    call("h200", "no_default", [("sweep", "s1", "other", "{}", 5.0, "def")])
    led = tables.sweep_ledger(tmp_path).set_index("call")
    assert sorted(led.index) == ["a", "b"]  # a call without a default is left out; defaults are no rows
    assert led.loc["a", "x default"] == pytest.approx(0.5**0.5)  # sqrt(2 x 0.25): each snapshot against its default
    assert (led.loc["a", "best"], led.loc["a", "worst"]) == (pytest.approx(0.25), pytest.approx(2.0))
    assert led.loc["b", "x default"] == pytest.approx(0.8)
    assert (led.loc["a", "gpu"], led.loc["a", "commit"], led.loc["a", "snapshots"]) == ("h100", "abc1234", 2)
    tables.build_all(tmp_path, tmp_path / "out")
    assert "| a | h100 | abc1234 | knob |" in (tmp_path / "out" / "kernel_sweeps.md").read_text()


def test_provenance_names_the_l2_flush_and_reads_rows_without_the_column_as_zeroed():
    old = pd.DataFrame([{**PROV, "bench": "attention"}])
    new = pd.DataFrame([{**PROV, "bench": "attention", "l2_flush": "read"}])
    assert "L2 flush write;" in tables.provenance_line(old)
    assert "L2 flush read;" in tables.provenance_line(new)
    assert "L2 flush read, write;" in tables.provenance_line(pd.concat([old, new]))
    assert "L2 flush" not in tables.provenance_line(pd.DataFrame([{**PROV, "bench": "io"}]))


def test_timing_reads_the_flush_buffer_unless_told_to_zero_it(monkeypatch):
    import os
    import subprocess
    import sys

    import torch

    from deft.bench import timing

    env = {k: v for k, v in os.environ.items() if k != "DEFT_L2_FLUSH"}
    code = "from deft.bench.timing import l2_flush_mode; print(l2_flush_mode())"
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert default.stdout.strip() == "read"  # the default (session 21 on), in a process without DEFT_L2_FLUSH
    seen = []
    monkeypatch.setattr(timing, "_L2_FLUSH", ["read"])
    buf = torch.ones(8, dtype=torch.int32)
    timing.flush_l2(buf)
    seen.append(int(buf.sum()))
    timing.set_l2_flush("write")
    timing.flush_l2(buf)
    seen.append(int(buf.sum()))
    assert seen == [8, 0]
    with pytest.raises(ValueError, match="l2 flush"):
        timing.set_l2_flush("zero")


def test_paired_table_gives_each_variant_its_verdict(tmp_path):
    """``kernel_snapshots``' paired rows -> snapshots x variants with the interval's verdict; the newest call (by
    name) wins; build_all writes it with its provenance."""
    prov = dict(gpu="NVIDIA H100 80GB HBM3", torch="2.11.0+cu130", triton="3.6.0", git_commit="abc1234", date="2026-12-06", l2_flush="read")
    def row(snap, var, med, lo, hi, same=False):
        return {**prov, "snapshot": snap, "variant": var, "vs_flatten": med, "vs_flatten_lo": lo, "vs_flatten_hi": hi, "same_launch": same}
    (tmp_path / "h100").mkdir()
    pd.DataFrame([row("s1", "node_chunk", 2.0, 1.9, 2.1)]).to_csv(tmp_path / "h100" / "kernel_paired_2026-12-05.csv", index=False)
    pd.DataFrame([
        row("s1", "flatten", 1.0, 1.0, 1.0), row("s1", "node_chunk", 1.05, 1.03, 1.07), row("s1", "node", 0.99, 0.98, 0.995),
        row("s2", "flatten", 1.0, 1.0, 1.0), row("s2", "node_chunk", 0.998, 0.99, 1.01, True), row("s2", "node", 1.001, 0.99, 1.01),
    ]).to_csv(tmp_path / "h100" / "kernel_paired_2026-12-06_s23b.csv", index=False)  # fmt: skip
    table, rows = tables.paired_table(tmp_path, "h100")
    got = table.set_index("snapshot")
    assert list(got.columns) == ["node_chunk", "node"] and list(got.index) == ["s1", "s2"]
    assert got.loc["s1", "node_chunk"].endswith("Flatten faster") and got.loc["s1", "node"].endswith("Flatten SLOWER")
    assert got.loc["s2", "node_chunk"].endswith("same launch") and got.loc["s2", "node"].endswith("tie (within the interval)")
    written = tables.build_all(tmp_path, tmp_path / "tables")
    text = (tmp_path / "tables" / "paired_h100.md").read_text()
    assert tmp_path / "tables" / "paired_h100.md" in written and "commits abc1234" in text and "1.050 [1.030, 1.070]" in text

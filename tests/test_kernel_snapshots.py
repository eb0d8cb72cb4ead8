"""``scripts/kernel_snapshots.py``'s sweep summary, on made-up rows (the script itself needs a GPU)."""

import numpy as np
import pandas as pd
import pytest

from scripts.kernel_snapshots import sweep_summary


def test_sweep_summary_geomeans_and_ratios_in_sweep_order():
    rows = [
        ("b_snap", "default", 10.0), ("b_snap", "knob", 20.0),
        ("a_snap", "default", 40.0), ("a_snap", "knob", 10.0),
    ]  # fmt: skip
    df = pd.DataFrame(rows, columns=["snapshot", "variant", "graph_us"])
    out = sweep_summary(df)
    assert list(out.columns) == ["default", "knob"]  # sweep order, not alphabetical
    assert list(out.index) == ["b_snap", "a_snap", "geomean", "x default"]
    assert out.loc["geomean", "default"] == pytest.approx(20.0)
    assert out.loc["geomean", "knob"] == pytest.approx(np.sqrt(200.0))
    assert out.loc["x default", "default"] == pytest.approx(1.0)
    assert out.loc["x default", "knob"] == pytest.approx(np.sqrt(2.0 * 0.25))

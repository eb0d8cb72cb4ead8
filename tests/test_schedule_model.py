"""The list-scheduling model of a DeFT launch (scripts/schedule_model.py), on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from deft.attention import AttentionShape
from deft.kernels.deft_flatten import DeftFlatten
from deft.tree import DecodingTree
from scripts.schedule_model import (
    US_RATES,
    fit_rates,
    launch_order,
    makespan,
    program_class,
    program_cost,
    program_us,
    share_table,
)


def test_makespan_is_greedy_list_scheduling():
    assert makespan(np.array([3.0, 3.0, 2.0, 2.0, 2.0]), 2) == 7.0  # in order: 3|3, 2|2, then 2 -> 7
    assert makespan(np.array([1.0, 1.0, 4.0]), 2) == 5.0  # the long one last: a tail
    assert makespan(np.array([4.0, 1.0, 1.0]), 2) == 4.0  # longest first: none
    assert makespan(np.array([5.0]), 4) == 5.0
    with pytest.raises(ValueError):
        makespan(np.array([1.0]), 0)


def test_launch_orders_put_heads_of_a_tile_together_or_apart():
    c = np.array([3.0, 1.0])
    assert launch_order(c, 2, head_fastest=True).tolist() == [3.0, 3.0, 1.0, 1.0]
    assert launch_order(c, 2, head_fastest=False).tolist() == [3.0, 1.0, 3.0, 1.0]


def test_program_cost_grows_with_tokens_and_masking():
    shape = AttentionShape(8, 2, 64, "float16")
    lens = [300, 40, 40, 40]  # a prompt and three branches, one query each
    tree = DecodingTree.from_arrays([-1, 0, 0, 0], lens, np.arange(sum(lens)), [1, 2, 3], [40, 40, 40])
    g = DeftFlatten(chunk_size=60, wide_waves=0, few_split=0).groups(tree, shape)  # masked chunks, as the paper cuts
    c = program_cost(g, shape.group_size)
    t = g.section("tiles").reshape(-1, 6)
    n_tok = t[:, 1] - t[:, 0]
    assert c.shape == (g.n_tiles,) and np.all(c > 0)
    masked = (t[:, 5] & 1) > 0
    assert masked.any() and (~masked).any()
    # per token, a masked tile costs more than an unmasked one of the same tile height
    per_tok = (c - 2.0) / n_tok
    assert per_tok[masked].max() > per_tok[~masked].min()


def test_calibrated_costs_price_each_class_and_fit_recovers_rates():
    """``program_us`` prices a tile by its class; ``fit_rates`` recovers the rates from timeline rows made with them."""
    import pandas as pd

    from deft.kernels.autotune import fan_tree

    shape = AttentionShape(32, 8, 128, "bfloat16")
    g = DeftFlatten(n_sms=132).groups(fan_tree(4000, 20, 100), shape)  # a shared prompt (big affine) and 20 branches
    cls = program_class(g, shape.group_size)
    assert set(cls) == {"big_affine", "small"}
    us = program_us(g, shape.group_size)
    t = g.section("tiles").reshape(-1, 6)
    n_tok = t[:, 1] - t[:, 0]
    fixed, rate, _ = US_RATES["small"]
    np.testing.assert_allclose(us[cls == "small"], fixed + rate * n_tok[cls == "small"])
    # synthetic timeline rows priced with known rates (plus a masked class), then fitted back
    rng = np.random.default_rng(0)
    known = {"big_affine": (7.0, 0.02, 0.02), "small": (3.0, 0.05, 0.05), "big_masked": (9.0, 0.01, 0.08)}
    rows = []
    for name, (f, a, b) in known.items():
        un = rng.integers(1, 2000, 50)
        ma = rng.integers(1, 200, 50) if name == "big_masked" else np.zeros(50, dtype=int)
        rows.append(pd.DataFrame(dict(start_us=0.0, end_us=f + a * un + b * ma, small=int(name == "small"),
                                      affine=int(name == "big_affine"), masked=int(name == "big_masked"),
                                      unmasked_tokens=un, masked_tokens=ma)))  # fmt: skip
    got = fit_rates(pd.concat(rows))
    assert set(got) == set(known)
    for name, want in known.items():
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-9)


def test_share_table_models_each_share_and_joins_measured_rows():
    """A shared prompt with one-token leaves (few-shot step 1's shape): the model gives the prompt the whole wave
    (its other tiles cost little past it); the measured column joins by snapshot and sweep variant."""
    import pandas as pd

    from deft.kernels.autotune import fan_tree

    snaps = [("fan16k_step1", fan_tree(16000, 50, 1))]
    meas = pd.DataFrame(dict(snapshot=["fan16k_step1"] * 2, variant=["default", "wide1"], graph_us=[63.0, 58.0]))
    tab = share_table(snaps, meas)
    assert len(tab) == 5 and tab["model_us"].gt(0).all()
    assert tab.loc[tab["model_us"].idxmin(), "share"] == 1.0
    assert tab.set_index("variant")["measured_us"].loc[["default", "wide1"]].tolist() == [63.0, 58.0]
    assert tab["measured_us"].isna().sum() == 3

"""The list-scheduling model of a DeFT launch (scripts/schedule_model.py), on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from deft.attention import AttentionShape
from deft.kernels.deft_flatten import DeftFlatten
from deft.tree import DecodingTree
from scripts.schedule_model import launch_order, makespan, program_cost


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

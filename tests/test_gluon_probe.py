"""The Gluon probe kernel (scripts/gluon_probe.py) compiles for sm_90 without a GPU: the variant measured fastest on
the H100 (a warp-specialised TMA producer, two consumer warpgroups, 128-token blocks, three stages) keeps its
registers (no spills, no serialised wgmma) and fits shared memory; four warpgroups at 128-token blocks do not fit
the registers, which ptxas reports (a variant that cannot be built is a result the probe records)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_best_gluon_variant_compiles_for_hopper_without_spills():
    gp = pytest.importorskip("scripts.gluon_probe", reason="needs triton.experimental.gluon (Triton 3.6)")
    r = gp.resource_usage(gp.compile_sm90(dict(mode=1, num_wg=2, block_n=128, stages=3)))
    assert r["spill_st"] == 0 and r["local_ops"] == 0 and not r["serialized"]
    assert 0 < r["smem"] <= gp.SMEM_LIMIT and {24, 240} <= set(r["setmaxnreg"])  # producer, consumers
    with pytest.raises(Exception, match="(?i)ptxas|regist"):
        gp.compile_sm90(dict(mode=1, num_wg=4, block_n=128, stages=2))

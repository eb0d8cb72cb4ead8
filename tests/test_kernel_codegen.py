"""Codegen of the DeFT kernel for Hopper, checked without a GPU: ``scripts/kernel_aot.py`` compiles it for sm_90
with the launch-time hints. The inner loop's K/V loads must stay software-pipelined (asynchronous copies
feeding wgmma) and the kernel must fit the registers without spilling to local memory. It runs in a child
process without ``TRITON_INTERPRET`` (under the interpreter, ``triton.jit`` gives functions it cannot compile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, re, sys
from pathlib import Path
from deft.kernels.tree_attention import deft_partial_kernel
from scripts.kernel_aot import DEFT_SIG, compile_for_hopper, report
k = compile_for_hopper(deft_partial_kernel, DEFT_SIG, dict(
    GROUP=4, BLOCK_M=64, SMALL_M=16, BLOCK_N=64, HEAD_DIM=128, PREFETCH=False, DOT_F32=False,
    IDX_INLOOP=True, CONTIG=True, HEAD_FASTEST=True, N_KV=8, TIMELINE=False, PDL_TRIGGER=True,
    UNIFIED=sys.argv[2] == "1", AFFINE_BIG=sys.argv[3] == "1", SMALL_STAGES=5, SMALL_BLOCK_N=32, SMALL_AFFINE=sys.argv[4] == "1",
    FUSED_REDUCE=sys.argv[5] == "1", L2_PREFETCH=sys.argv[6] == "1", BIG_GATHER_BLOCK_N=int(sys.argv[7]),
    BIG_GATHER_STAGES=int(sys.argv[8]) or None))
r = report("deft", k, Path(sys.argv[1]))
sass = (Path(sys.argv[1]) / "deft.sass").read_text()
r["spill_stores"] = sass.count("STL")
r["l2_prefetches"] = len(re.findall(r"CCTL[^;]*PF2", sass))
print(json.dumps(r))
"""


@pytest.mark.parametrize(
    "unified,affine_big,small_affine,fused,l2_prefetch,big_gather",
    [(False, False, False, False, False, (64, 0)), (True, False, False, False, False, (64, 0)),
     (True, True, False, False, False, (64, 0)), (True, False, True, True, True, (32, 5)),
     (False, False, True, True, False, (32, 5))],
)  # fmt: skip
def test_deft_kernel_compiles_for_hopper_with_pipelined_loads_and_no_spills(
    tmp_path, unified, affine_big, small_affine, fused, l2_prefetch, big_gather
):
    """Each variant a plan can pick (``DeftPlan.unified``, ``DeftPlan.affine_big``), and the ``small_affine``,
    ``fused_reduce``, ``l2_prefetch`` and ``big_gather_block`` / ``big_gather_stages`` knobs' (the fused merge's partials
    per step are sized to the tile so that it fits), for sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    flags = [str(int(x)) for x in (unified, affine_big, small_affine, fused, l2_prefetch, *big_gather)]
    args = [sys.executable, "-c", CHILD, str(tmp_path), *flags]
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0 < r["regs"] <= 255
    assert r["spill_stores"] == 0  # no spill stores to local memory
    assert (r["l2_prefetches"] > 0) == l2_prefetch  # l2_prefetch: prefetch.global.L2 in both tiles, none otherwise
    assert r["async_copies"] > 0 and r["wgmma"] > 0  # K/V staged asynchronously into shared memory for wgmma
    # two programs per SM (228 KB of shared memory on Hopper): the small tile's deeper pipeline (small_stages=5) must
    # reuse the big tile's K/V buffers, not add its own
    assert r["smem"] <= 116 * 1024


BRANCH_CHILD = """
import json, sys
from pathlib import Path
from scripts.kernel_aot import compile_branch_for_hopper, programs_per_sm, report
k = compile_branch_for_hopper()
r = report("branch", k, Path(sys.argv[1]))
r["spill_stores"] = (Path(sys.argv[1]) / "branch.sass").read_text().count("STL")
r["per_sm"] = programs_per_sm(r["regs"], 2, r["smem"])
print(json.dumps(r))
"""


def test_default_branch_kernel_fits_six_programs_an_sm(tmp_path):
    """The default branches' kernel (two KV heads, two warps, 16-token blocks, 3 stages; ``DeftAttention``'s defaults)
    for sm_90: no spills, and registers and shared memory for six programs per SM, so that the 200 programs of
    few-shot 16k step 200 fit the 36 SMs the prompt kernel's 96 CTAs leave (session 22: all 8 heads at 8 warps took an
    SM's registers alone, and the branches ran in two waves)."""
    from deft.kernels.deft_flatten import DeftFlatten

    m = DeftFlatten()
    assert (m.branch_block_h, m.branch_warps, m.branch_block_n, m.branch_stages, m.branch_maxnreg) == (2, 2, 16, 3, 0)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    res = subprocess.run([sys.executable, "-c", BRANCH_CHILD, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0 < r["regs"] <= 168 and r["spill_stores"] == 0
    assert r["per_sm"] >= 6, r

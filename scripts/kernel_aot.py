"""Compile the DeFT partial kernel (and the probe's kernel) for Hopper on a machine without a GPU, and report
what the compiler made of them: registers, shared memory, SASS size, and whether the K/V loads of the inner
loop became asynchronous copies (Triton's software pipeliner) feeding ``wgmma``.

Uses ``triton.compile`` with ``GPUTarget("cuda", 90, 32)`` and the bundled ``ptxas``/``cuobjdump``. Pointer and
stride arguments get the divisibility-16 hints the JIT gives them at launch; without those hints no load is
pipelined and the report would mislead. Registers match what the H100 reports for the same kernel (198-223 in
session 5). Writes the TTGIR and SASS of each variant under ``$OUT`` (default ``/tmp/deft_aot``).

Run anywhere: ``python -m scripts.kernel_aot``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from deft.kernels.tree_attention import deft_partial_kernel
from scripts.kernel_probe import probe_kernel

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

PROBE_SIG = {
    "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "slots": "*i32", "desc_k": "*bf16", "desc_v": "*bf16",
    "part_o": "*bf16", "part_lse": "*fp32", "n_tok": "i32", "chunk": "i32", "n_rows": "i32", "n_rt": "i32",
    "stride_qn": "i32", "stride_qh": "i32", "stride_ks": "i32", "stride_kh": "i32", "qk_scale": "fp32",
    "GROUP": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "HEAD_DIM": "constexpr",
    "LOAD": "constexpr", "WS": "constexpr",
}  # fmt: skip
DEFT_SIG = {
    "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "part_o": "*bf16", "part_lse": "*fp32", "meta": "*i32",
    "off_tok_slot": "i32", "off_tok_node": "i32", "off_nodes": "i32", "off_queries": "i32",
    "stride_qn": "i32", "stride_qh": "i32", "stride_ks": "i32", "stride_kh": "i32", "stride_vs": "i32",
    "stride_vh": "i32", "stride_pn": "i32", "stride_ph": "i32", "stride_ln": "i32", "qk_scale": "fp32",
    "timeline": "*i64", "out_ptr": "*bf16", "counters": "*i32", "off_red_ptr": "i32", "off_red_idx": "i32",
    "stride_on": "i32", "stride_oh": "i32", "GROUP": "constexpr", "BLOCK_M": "constexpr", "SMALL_M": "constexpr", "BLOCK_N": "constexpr",
    "HEAD_DIM": "constexpr", "PREFETCH": "constexpr", "DOT_F32": "constexpr", "IDX_INLOOP": "constexpr",
    "CONTIG": "constexpr", "HEAD_FASTEST": "constexpr", "N_KV": "constexpr", "TIMELINE": "constexpr",
    "PDL_TRIGGER": "constexpr", "UNIFIED": "constexpr", "AFFINE_BIG": "constexpr", "SMALL_STAGES": "constexpr",
    "SMALL_BLOCK_N": "constexpr", "SMALL_AFFINE": "constexpr",
    "FUSED_REDUCE": "constexpr", "L2_PREFETCH": "constexpr", "BIG_GATHER_BLOCK_N": "constexpr",
    "BIG_GATHER_STAGES": "constexpr",
}  # fmt: skip


def launch_hints(signature: dict) -> dict:
    """The divisibility-16 hints the JIT gives pointer and stride arguments at launch (without them no load is
    pipelined), as ``ASTSource`` attributes."""
    names = list(signature)
    hinted = [n for n in names if (signature[n].startswith("*") and n != "meta") or n.startswith("stride")]
    return {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}


def compile_for_hopper(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3):
    """The compiled kernel, with the launch-time divisibility hints on pointers and strides."""
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=launch_hints(signature))
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def branch_signature() -> dict:
    """:func:`~deft.kernels.branch_heads.branch_heads_kernel`'s signature for ``ASTSource`` (bf16 tensors, int32 plan
    words and offsets; the timeline slot typed as the launcher passes it without a timeline)."""
    import inspect

    from deft.kernels.branch_heads import branch_heads_kernel

    def kind(name: str) -> str:
        if name.isupper():
            return "constexpr"
        if name in ("q_ptr", "k_ptr", "v_ptr", "part_o", "out_ptr"):
            return "*bf16"
        if name in ("part_lse", "timeline"):
            return "*fp32"
        if name in ("meta", "sync"):
            return "*i32"
        return "fp32" if name == "qk_scale" else "i32"

    return {n: kind(n) for n in inspect.signature(branch_heads_kernel.fn).parameters}


def compile_branch_for_hopper(
    block_h: int = 2, num_warps: int = 2, stages: int = 3, block_n: int = 16, maxnreg: int = 0, n_kv: int = 8
):
    """The branches' kernel (:mod:`deft.kernels.branch_heads`) compiled for sm_90 as ``launch_branch_heads`` launches it
    for one-query branches at GQA 4 and head_dim 128 (16-row tiles): ``block_h`` KV heads per program, ``maxnreg``
    registers per thread (0: the compiler's choice). Defaults: ``DeftAttention``'s (session 22)."""
    from deft.kernels.branch_heads import branch_heads_kernel

    sig = branch_signature()
    const = dict(GROUP=4, ROWS=16, N_KV=n_kv, BLOCK_H=block_h, HEAD_DIM=128, BLOCK_N=block_n, STAGES=stages, DOT_F32=False,
                 SPREAD=False, TIMELINE=False, MERGE=False, MERGE_H=1, MERGE_P=1)  # fmt: skip
    src = ASTSource(fn=branch_heads_kernel, signature=sig, constexprs=const, attrs=launch_hints(sig))
    options = {"num_warps": num_warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=TARGET, options=options)


def programs_per_sm(regs: int, num_warps: int, smem: int) -> int:
    """How many programs of a kernel one H100 SM holds by its registers (64K, allocated per warp in units of 256) and
    shared memory (228 KB, 1 KB reserved per program)."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(65536 // (per_warp * num_warps), (233472 // (smem + 1024)) if smem else 32)


def compile_prompt_for_hopper(
    head_dim: int = 128, dtype: str = "bf16", group: int = 4, timeline: bool = False, pdl_trigger: bool = False,
    signal: bool = False,
):
    """The Gluon prompt kernel (:mod:`deft.kernels.prompt_gluon`) compiled for sm_90 as its launcher launches it: a
    host TMA descriptor specialises as ``tensordesc<dtype[box], layout>``; ptxas's reproducer dump is swallowed.
    ``pdl_trigger``: the variant ``prompt_order="chain"`` launches (its CTAs trigger their programmatic dependents).
    ``signal``: the variant ``branch_merge`` launches (each warpgroup counts itself done)."""
    import contextlib
    import io

    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from deft.kernels import prompt_gluon as pg

    layout = gl.NVMMASharedLayout.get_default_for([pg.BLOCK_N, head_dim], {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype])
    td = f"tensordesc<{dtype}[{pg.BLOCK_N}, {head_dim}],{layout!r}>"
    sig = {"q_ptr": f"*{dtype}", "k_desc": td, "v_desc": td, "part_o": f"*{dtype}", "part_lse": "*fp32", "meta": "*i32",
           "off_tok_slot": "i32", "off_queries": "i32", "n_pairs": "i32", "stride_qn": "i32", "stride_qh": "i32",
           "stride_pn": "i32", "stride_ph": "i32", "stride_ln": "i32", "qk_scale": "fp32", "timeline": "*i64" if timeline else "*fp32",
           "signal": "*i32", "GROUP": "constexpr", "BLOCK_N": "constexpr", "STAGES": "constexpr", "CONS_REGS": "constexpr",
           "PROD_REGS": "constexpr", "TIMELINE": "constexpr", "PDL_TRIGGER": "constexpr", "SIGNAL": "constexpr"}  # fmt: skip
    const = dict(GROUP=group, BLOCK_N=pg.BLOCK_N, STAGES=pg.STAGES, CONS_REGS=pg.CONS_REGS, PROD_REGS=pg.PRODUCER_REGS,
                 TIMELINE=timeline, PDL_TRIGGER=pdl_trigger, SIGNAL=signal)  # fmt: skip
    src = GluonASTSource(fn=pg.prompt_partial_kernel, signature=sig, constexprs=const, attrs=launch_hints(sig))
    with contextlib.redirect_stdout(io.StringIO()):
        return triton.compile(src, target=TARGET, options={"num_warps": 4, "maxnreg": pg.MAXNREG})


def report(name: str, kernel, out: Path) -> dict:
    """Registers (cuobjdump), shared memory, SASS instructions, async copies and wgmma ops in the TTGIR."""
    ttgir = kernel.asm["ttgir"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    usage = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    regs = re.search(r"REG:(\d+)", usage)
    (out / f"{name}.ttgir").write_text(ttgir)
    (out / f"{name}.sass").write_text(sass)
    return {
        "kernel": name,
        "regs": int(regs.group(1)) if regs else -1,
        "smem": kernel.metadata.shared,
        "sass_instr": sass.count(";"),
        "async_copies": ttgir.count("async_copy_global_to_local"),
        "wgmma": len(re.findall(r"ttng\.warp_group_dot ", ttgir)),
    }


def main() -> None:
    out = Path(os.environ.get("OUT", "/tmp/deft_aot"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for load in (0, 1):
        k = compile_for_hopper(probe_kernel, PROBE_SIG, dict(GROUP=4, BLOCK_M=64, BLOCK_N=64, HEAD_DIM=128,
                                                              LOAD=load, WS=False))  # fmt: skip
        rows.append(report(f"probe_{['gather', 'affine'][load]}", k, out))
    for small, contig, timeline in ((16, True, False), (64, True, False), (16, False, False), (64, False, False),
                                    (16, True, True)):  # fmt: skip
        k = compile_for_hopper(deft_partial_kernel, DEFT_SIG, dict(
            GROUP=4, BLOCK_M=64, SMALL_M=small, BLOCK_N=64, HEAD_DIM=128, PREFETCH=False, DOT_F32=False,
            IDX_INLOOP=True, CONTIG=contig, HEAD_FASTEST=True, N_KV=8, TIMELINE=timeline, PDL_TRIGGER=True,
            UNIFIED=False, AFFINE_BIG=False, SMALL_STAGES=5, SMALL_BLOCK_N=32, SMALL_AFFINE=False, FUSED_REDUCE=False, L2_PREFETCH=False,
            BIG_GATHER_BLOCK_N=64, BIG_GATHER_STAGES=None))  # fmt: skip
        rows.append(report(f"deft_small{small}_contig{int(contig)}" + ("_timeline" if timeline else ""), k, out))
    # the branches' kernel: KV heads x warps per program (session 22: 8 x 8 takes an SM's registers alone; the default
    # 2 x 2 fits six programs an SM beside nothing, so 200 of them fit the 36 SMs the prompt kernel's 96 CTAs leave)
    for block_h, warps, maxnreg in ((8, 8, 0), (8, 8, 128), (4, 4, 0), (2, 4, 0), (2, 2, 0)):
        k = compile_branch_for_hopper(block_h, warps, maxnreg=maxnreg)
        r = report(f"branch_h{block_h}_w{warps}" + (f"_r{maxnreg}" if maxnreg else ""), k, out)
        r["kernel"] += f" ({programs_per_sm(r['regs'], warps, r['smem'])}/SM)"
        rows.append(r)
    print(f"{'kernel':26s} {'regs':>5s} {'smem':>7s} {'sass':>6s} {'async':>6s} {'wgmma':>6s}")
    for r in rows:
        print(f"{r['kernel']:26s} {r['regs']:5d} {r['smem']:7d} {r['sass_instr']:6d} {r['async_copies']:6d} {r['wgmma']:6d}")
    print(f"TTGIR and SASS in {out}")


if __name__ == "__main__":
    main()

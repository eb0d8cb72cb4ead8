"""The Nsight Compute report parser of scripts/ncu_validate.py (the profiling itself runs on the GPU machine)."""

from __future__ import annotations

from scripts.ncu_validate import parse_ncu_csv

REPORT = """==PROF== Connected to process 123
"ID","Process ID","Kernel Name","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum"
"","","","byte","byte","nsecond"
"0","123","deft_partial_kernel","1,048,576","4096","20000"
"1","123","global_reduce_kernel","8192","2048","3000"
==PROF== Disconnected from process 123
"""


def test_parse_ncu_csv_sums_kernels_and_drops_the_units_row():
    df = parse_ncu_csv(REPORT)
    assert len(df) == 2
    assert df["dram__bytes_read.sum"].sum() == 1048576 + 8192
    assert df["gpu__time_duration.sum"].sum() == 23000


def test_parse_ncu_csv_without_a_report_is_empty():
    assert parse_ncu_csv("==PROF== nothing profiled\n").empty


def test_children_get_the_drivers_pair_list():
    from omegaconf import OmegaConf

    from scripts.ncu_validate import pairs_override

    pairs = OmegaConf.create([{"method": "radix", "case": "snap_spec64", "step": 120},
                              {"method": "deft_flatten", "case": "snap_few_shot_4000", "step": 200}])  # fmt: skip
    ov = pairs_override(pairs)
    assert ov == "pairs=[{method:radix,case:snap_spec64,step:120},{method:deft_flatten,case:snap_few_shot_4000,step:200}]"
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([ov])[0]
    assert [dict(p) for p in parsed.value()] == [dict(p) for p in OmegaConf.to_container(pairs)]

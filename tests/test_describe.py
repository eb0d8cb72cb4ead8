"""The describe command: the paper's counts, and one clear error line with a non-zero exit for bad input."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

GOOD_TREE = {
    "incompleted": False,
    "data": {
        "0": {"id": 0, "value": 10, "start": -9, "end": 0, "children": [1, 2]},
        "1": {"id": 1, "value": 3, "start": 1, "end": 3, "children": [3]},
        "2": {"id": 2, "value": 5, "start": 1, "end": 5, "children": []},
        "3": {"id": 3, "value": 2, "start": 4, "end": 5, "children": []},
    },
}


def describe(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workloads.describe", *overrides], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def parse(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.strip().splitlines())


def reasoning_file(tmp_path: Path, content) -> list[str]:
    path = tmp_path / "tree.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return ["workload=reasoning", f"workload.file={path}", "workload.tree_index=0",
            "workload.prompt_len=20", "workload.max_seq_len=100"]  # fmt: skip


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0, r.stdout
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("describe: error: "), err
    for n in needles:
        assert n in err, err


def test_few_shot_example_prints_the_paper_counts():
    r = describe("workload=few_shot", "workload.prompt_len=4000", "workload.width=20", "workload.max_seq_len=4400")
    assert r.returncode == 0, r.stderr
    out = parse(r.stdout)
    assert out["steps"] == "399"
    assert out["unique_kv_token_steps"] == "3192000"
    assert out["path_kv_token_steps"] == "33516000"
    assert (out["max_queries"], out["max_nodes"], out["peak_unique_kv_tokens"]) == ("20", "21", "11980")


def test_speculative_default_is_239_steps(traces_root):
    out = parse(describe("workload=speculative").stdout)
    assert out["steps"] == "239" and out["max_queries"] == "64" and out["tree_size"] == "64"


def test_valid_template_file_and_replay_mode_agree(tmp_path):
    fast = describe(*reasoning_file(tmp_path, [GOOD_TREE]))
    slow = describe(*reasoning_file(tmp_path, [GOOD_TREE]), "replay=true")
    assert fast.returncode == 0 and slow.returncode == 0, fast.stderr + slow.stderr
    f, s = parse(fast.stdout), parse(slow.stdout)
    assert f["steps"] == "5" and s.pop("replayed_steps") == "5" and f == s
    # steps 1..5: unique 20+1+1, 20+2+2, 20+3+3, then node 1 finished but kept for node 3: 20+3+4+1, 20+3+5+2
    assert f["unique_kv_token_steps"] == str(22 + 24 + 26 + 28 + 30)
    assert f["max_nodes"] == "4" and f["max_queries"] == "2"


def _mutate(fn) -> list:
    tree = copy.deepcopy(GOOD_TREE)
    fn(tree["data"])
    return [tree]


def _del(d: dict, k: str) -> None:
    del d[k]


BAD_TEMPLATES = {
    "malformed_json": ('[{"incompleted": false, "data": {', ["tree.json: not valid JSON (line 1"]),
    "not_a_list": ({"data": {}}, ["expected a JSON list of trees"]),
    "missing_data": ([{"incompleted": False}], ["tree 0: expected an object with a 'data' object"]),
    "missing_key": (_mutate(lambda d: _del(d["2"], "start")), ["node '2' lacks key 'start'"]),
    "non_integer": (_mutate(lambda d: d["2"].update(value="5")), ["node '2' has value='5', expected an integer"]),
    "cycle": (_mutate(lambda d: d["3"].update(children=[1])), ["node 1 is a child of both node 0 and node 3", "cycle"]),
    "self_cycle": (_mutate(lambda d: d["3"].update(children=[3])), ["node 3 lists itself as a child (cycle)"]),
    "starts_before_parent_ends": (
        _mutate(lambda d: d["3"].update(start=3, end=4)),
        ["node 3 starts at step 3, before its parent node 1 ends (step 3)"],
    ),
    "gap_after_parent": (_mutate(lambda d: d["3"].update(start=6, end=7)), ["node 3 starts at step 6, leaving a gap"]),
    "zero_length": (_mutate(lambda d: d["2"].update(value=0, start=1, end=0)), ["node 2 has value 0"]),
    "negative_length": (_mutate(lambda d: d["2"].update(value=-2, start=1, end=-2)), ["node 2 has value -2"]),
    "span_disagrees": (_mutate(lambda d: d["2"].update(value=4)), ["node 2 spans steps 1..5 (5 tokens) but its value is 4"]),
    "unknown_child": (_mutate(lambda d: d["1"].update(children=[3, 99])), ["node 1 lists child 99, which is not a node"]),
    "id_mismatch": (_mutate(lambda d: d["2"].update(id=7)), ["node '2' has id 7"]),
    "two_roots": (_mutate(lambda d: d["0"].update(children=[1])), ["2 roots (nodes [0, 2])"]),
    "root_not_prompt": (
        _mutate(lambda d: d["0"].update(start=-8, end=1)),
        ["root node 0 ends at step 1; the prompt must end at step 0"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TEMPLATES))
def test_bad_reasoning_template_is_one_error_line(case, tmp_path):
    content, needles = BAD_TEMPLATES[case]
    assert_one_line_error(describe(*reasoning_file(tmp_path, content)), *needles)


def test_prompt_shorter_than_template_and_bad_index(tmp_path):
    args = reasoning_file(tmp_path, [GOOD_TREE])
    r = describe(*args, "workload.prompt_len=5")
    assert_one_line_error(r, "prompt_len=5 is shorter than the template's prompt (10 tokens)")
    assert_one_line_error(describe(*args, "workload.tree_index=3"), "tree_index 3 out of range (the file has 1 trees)")


def test_full_kv_pool_is_one_error_line():
    r = describe("workload=few_shot", "workload.prompt_len=100", "workload.width=4", "workload.max_seq_len=200", "kv_capacity=150")
    assert_one_line_error(r, "step 13: KV pool full: 4 slots asked, 2 free of 150", "at least 152")


def test_bad_parameter_and_missing_traces_dir_are_one_error_line(tmp_path):
    assert_one_line_error(describe("workload=few_shot", "workload.width=0"), "width must be at least 1")
    r = describe("workload=speculative", f"workload.traces_dir={tmp_path / 'none'}")
    # the fallback <repo>/traces may exist on a machine that ran `make traces`
    if (REPO / "traces").is_dir():
        pytest.skip("<repo>/traces exists, so a missing traces_dir falls back to it")
    assert_one_line_error(r, "run `make traces`", "workload.traces_dir=")


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({"Records": []}, "lacks key 'Tree_Structure'"),
        ({"Tree_Structure": [[0]], "Records": [{"Accept_length": [1, 0]}]}, "Accept_length[1] = 0"),
        ({"Tree_Structure": [[0], [1, 0]], "Records": [{"Accept_length": [1]}]}, "path [1, 0] has no parent path [1]"),
        ({"Tree_Structure": [[0], [0]], "Records": [{"Accept_length": [1]}]}, "Tree_Structure[1] = [0] repeats"),
        ({"Tree_Structure": [[0]], "Records": [{}]}, "Records[0] lacks key 'Accept_length'"),
        ({"Tree_Structure": [[-1]], "Records": [{"Accept_length": [1]}]}, "not a non-empty list of child indices"),
    ],
)
def test_bad_speculative_record_is_one_error_line(obj, needle, tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(obj))
    assert_one_line_error(describe("workload=speculative", f"workload.file={path}"), needle)


@pytest.mark.slow
@pytest.mark.parametrize(("file", "index"), [("sorting128ToT.json", 1), ("docmergeToT.json", 0)])
def test_describe_largest_reasoning_trace_at_20k_under_10s(file, index, traces_root):
    t0 = time.perf_counter()
    r = describe("workload=reasoning", f"workload.file={file}", f"workload.tree_index={index}",
                 "workload.prompt_len=20000", "workload.max_seq_len=22000")  # fmt: skip
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert parse(r.stdout)["steps"] == "1999"
    assert wall < 10, f"describe took {wall:.1f} s"

"""``make reproduce`` runs each sweep as a process; one that dies is started again (finished runs are skipped)."""

from __future__ import annotations

from scripts import reproduce


class _Proc:
    def __init__(self, rc: int):
        self.returncode = rc

    def poll(self) -> int:
        return self.returncode


def _fake_bench(outcomes: dict[str, list[int]], calls: list[str]):
    def bench(args: list[str]) -> _Proc:
        key = args[0]
        calls.append(key)
        return _Proc(outcomes[key].pop(0))

    return bench


def test_a_failed_sweep_is_retried_and_reported_only_if_every_try_fails(monkeypatch):
    calls: list[str] = []
    outcomes = {"ok": [0], "flaky": [1, 0], "broken": [1, 1]}
    monkeypatch.setattr(reproduce, "_bench", _fake_bench(outcomes, calls))
    failed = reproduce._run_all([["ok"], ["flaky"], ["broken"]], parallel=1, retries=1, poll_s=0)
    assert failed == ["broken"]
    assert sorted(calls) == ["broken", "broken", "flaky", "flaky", "ok"]


def test_without_retries_a_failure_is_reported_at_once(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(reproduce, "_bench", _fake_bench({"flaky": [1, 0]}, calls))
    assert reproduce._run_all([["flaky"]], parallel=2, retries=0, poll_s=0) == ["flaky"]
    assert calls == ["flaky"]

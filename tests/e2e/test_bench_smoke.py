"""`scripts/bench.py --smoke` runs end to end and writes its report (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCENARIOS = {
    "chat-c1", "chat-c8", "stream", "cache-local", "cache-redis", "fallback", "soak", "streams",
}  # fmt: skip
STREAM_CHECKS = {
    "concurrent streams: per-chunk added delay p99 <= 2x bare's",
    "concurrent streams: none stalled (> 1 s without a chunk) or dropped",
}


def run_bench(out, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--out", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return json.loads((out / "latest.json").read_text())


def assert_streams_whole(report: dict, streams: int, chunks: int) -> None:
    """Every stream through every target came back whole: each chunk once, in order."""
    rows = report["scenarios"]["streams"]["targets"]
    assert set(rows) == {"direct", "bare", "mitmroute"}
    for target, row in rows.items():
        assert (row["n"], row["dropped"], row["first_error"]) == (streams, 0, ""), target
        assert row["chunks"] == streams * chunks, target
        assert row["delay_p50_ms"] >= 0, target  # arrival after the backend's send stamp
    for target in ("bare", "mitmroute"):
        assert rows[target]["cpu_ms_per_stream"] > 0, target
        assert rows[target]["plateau_rss_kb"] >= rows[target]["idle_rss_kb"] > 0, target


@pytest.mark.timeout(180)
def test_bench_smoke_writes_every_scenario(tmp_path):
    report = run_bench(tmp_path)
    assert set(report["scenarios"]) == SCENARIOS
    for name, scenario in report["scenarios"].items():
        assert scenario["targets"], name
        for target, row in scenario["targets"].items():
            assert row["n"] > 0, (name, target)
    assert_streams_whole(report, 50, 10)
    assert (tmp_path / "latest.md").read_text().startswith("| scenario |")
    assert "Concurrent streams: 50 concurrent streams" in (tmp_path / "latest.md").read_text()
    assert (tmp_path / "latest.png").stat().st_size > 0
    assert {c["status"] for c in report["checks"]} <= {"PASS", "FAIL", "SKIP"}
    judged = {c["check"] for c in report["checks"] if c["status"] != "SKIP"}
    assert STREAM_CHECKS.issubset(judged)
    assert "req/s in the soak >= 0.9x bare mitmdump's" in judged


@pytest.mark.timeout(180)
def test_bench_only_streams_runs_that_scenario_alone(tmp_path):
    report = run_bench(tmp_path, "--only", "streams", "--streams", "20", "--chunks", "5")
    assert set(report["scenarios"]) == {"streams"}
    assert_streams_whole(report, 20, 5)
    assert report["meta"]["streams"]["streams"] == 20
    statuses = {c["check"]: c["status"] for c in report["checks"]}
    assert {statuses[c] for c in STREAM_CHECKS} <= {"PASS", "FAIL"}
    skipped = {c for c, s in statuses.items() if s == "SKIP"}
    assert skipped == set(statuses) - STREAM_CHECKS  # the rest was not run, so not judged
    assert (tmp_path / "latest.png").stat().st_size > 0

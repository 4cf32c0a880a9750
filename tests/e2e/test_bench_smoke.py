"""`scripts/bench.py --smoke` runs end to end and writes its report (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCENARIOS = {"chat-c1", "chat-c8", "stream", "cache-local", "cache-redis", "fallback", "soak"}


@pytest.mark.timeout(180)
def test_bench_smoke_writes_every_scenario(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    report = json.loads((tmp_path / "latest.json").read_text())
    assert set(report["scenarios"]) == SCENARIOS
    for name, scenario in report["scenarios"].items():
        assert scenario["targets"], name
        for target, row in scenario["targets"].items():
            assert row["n"] > 0, (name, target)
    assert (tmp_path / "latest.md").read_text().startswith("| scenario |")
    assert (tmp_path / "latest.png").stat().st_size > 0
    assert {c["status"] for c in report["checks"]} <= {"PASS", "FAIL", "SKIP"}

"""`scripts/bench_scaleout.py --smoke` runs end to end and writes its report (no timing
assertions: the figures of a smoke run on a shared machine mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.timeout(150)
def test_scaleout_bench_smoke_writes_every_fleet_size_and_the_ledger_figure(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_scaleout.py"), "--smoke", "--out",
         str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=140,
    )  # fmt: skip
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    report = json.loads((tmp_path / "scaleout.json").read_text())
    assert set(report["fleet"]) == {"1", "2", "3"}
    for size, row in report["fleet"].items():
        assert row["requests"] == 60 and row["errors"] == 0, (size, row)
        assert row["rps"] > 0 and row["proxies_cpu_ms_per_req"] > 0
    check = report["ledger_check"]
    assert check["rows"] == check["distinct"] == check["requests"]  # each request once
    assert report["ledger"]["rows_per_s"] > 0 and report["ledger"]["lost"] == 0
    assert (tmp_path / "scaleout.md").read_text().startswith("Scale-out on")

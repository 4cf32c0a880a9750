"""scripts/bench_complexity.py runs on the labeled set and on a file of one's own."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location(
        "bench_complexity", ROOT / "scripts/bench_complexity.py"
    )
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_reports_accuracy_shares_cost_and_time(capsys, tmp_path):
    bench = load_script()
    bench.main(["--repeat", "1"])
    out = capsys.readouterr().out
    for heading in ("| test (held out) |", "| REASONING |", "| routed |", "| 288 KB ask |"):
        assert heading in out
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"label": "easy", "prompt": "hi"}\n{"label": "hard", "prompt": "Prove it."}\n')
    bench.main(["--prompts", str(mine), "--repeat", "1"])
    assert "2 prompts (1 easy, 1 hard)" in capsys.readouterr().out

"""scripts/spend.py: grouped table, --since window, Parquet export, argument errors."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from mitmroute.exchange import Exchange, Usage
from mitmroute.spend import SpendLog

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "spend.py"


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spend") / "spend.duckdb"
    log = SpendLog(path).start()
    now = datetime.now(UTC)
    rows = [("red", "gpt-4o", "0.25", 3), ("red", "claude", "0.5", 2), ("blue", "gpt-4o", "1", 1)]
    i = 0
    for team, model, cost, n in rows:
        for _ in range(n):
            log.record(Exchange(
                request_id=str(i), started_at=now - timedelta(minutes=5), endpoint="/v1/x",
                team=team, model_group=model, status_code=200, cost_usd=Decimal(cost),
                usage=Usage(prompt_tokens=100, completion_tokens=10),
            ))  # fmt: skip
            i += 1
    log.record(Exchange(request_id="old", started_at=now - timedelta(days=3), endpoint="/v1/x",
                        team="red", model_group="gpt-4o", cost_usd=Decimal(100)))  # fmt: skip
    log.record(Exchange(request_id="hit", started_at=now, endpoint="/v1/x", team="blue",
                        model_group="gpt-4o", cache_hit=True, cost_usd=Decimal(0),
                        saved_usd=Decimal("0.125")))  # fmt: skip
    assert log.close()
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_grouped_table(db: Path) -> None:
    out = run("--db", str(db), "--by", "team,model", "--since", "24h")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split()[:4] == ["team", "model", "requests", "errors"]
    body = {tuple(ln.split()[:2]): ln.split() for ln in lines[3:] if ln[:1].isalpha()}
    assert body[("red", "claude")][2] == "2" and body[("red", "claude")][-2] == "1.000000"
    assert body[("red", "gpt-4o")][-2] == "0.750000"  # the 3-day-old row is outside 24h
    assert body[("blue", "gpt-4o")][2] == "2" and body[("blue", "gpt-4o")][-1] == "0.125000"
    total = lines[-1].split()
    assert total[0] == "TOTAL" and total[1] == "7" and total[-2] == "2.750000"
    costs = [Decimal(ln.split()[-2]) for ln in lines[3:-2]]
    assert costs == sorted(costs, reverse=True) and len(costs) == 3  # most expensive first


def test_since_all_and_export(db: Path, tmp_path: Path) -> None:
    summary, rows = tmp_path / "s.parquet", tmp_path / "r.parquet"
    out = run("--db", str(db), "--by", "day,status", "--since", "all", "--export", str(summary),
              "--export-rows", str(rows))  # fmt: skip
    assert out.returncode == 0, out.stderr
    with duckdb.connect() as con:
        got = con.execute(f"SELECT sum(requests), sum(cost_usd) FROM '{summary}'").fetchone()
        assert got == (8, Decimal("102.75"))
        assert con.execute(f"SELECT count(*) FROM '{rows}'").fetchone() == (8,)


def test_bad_arguments(db: Path, tmp_path: Path) -> None:
    bad = run("--db", str(db), "--by", "colour")
    assert bad.returncode == 2 and "unknown column" in bad.stderr
    assert run("--db", str(db), "--since", "soon").returncode == 2
    missing = run("--db", str(tmp_path / "nope.duckdb"))
    assert missing.returncode != 0 and "no spend database" in missing.stderr


def test_sql_option_runs_any_read_only_query(tmp_path):
    import duckdb

    db = tmp_path / "s.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute("create table spend_log as select 'gpt-4o' as model_group, 1.5 as cost_usd")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--db", str(db), "--sql",
         "select model_group, sum(cost_usd) as usd from spend_log group by 1"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "gpt-4o" in out.stdout and "1.5" in out.stdout

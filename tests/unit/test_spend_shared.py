"""The shared ledger (database_url) with the real PostgreSQL: writer processes appending at
once, one SIGKILLed and restarted, PostgreSQL missing for a while, `spend --config`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from mitmroute.config import ConfigError, load_config
from mitmroute.exchange import Exchange, Usage
from mitmroute.spend import lake
from mitmroute.spend.lake import LakeSpendLog, SharedLedger
from tests import pg

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture
def pg_url():
    yield from pg.database()


WRITER = """
import sys, time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from mitmroute.exchange import Exchange, Usage
from mitmroute.spend.lake import LakeSpendLog, SharedLedger
url, data, spill, name, n, interval, maintenance = sys.argv[1:8]
log = LakeSpendLog(SharedLedger.parse(url, data), spill, flush_interval=float(interval),
                   maintenance_interval=float(maintenance)).start()
log.flush(60)  # connected
print("ready", flush=True)
i, n = 0, int(n)
while n < 0 or i < n:
    now = time.time()
    log.record(Exchange(request_id=f"{name}-{i}", started_at=datetime.now(UTC),
                        endpoint="/v1/chat/completions", team=name,
                        usage=Usage(prompt_tokens=10, completion_tokens=1),
                        cost_usd=Decimal("0.0000123")))
    print(i, now, flush=True)
    i += 1
    time.sleep(0.003)
print("closed", log.close(60), log.describe(), flush=True)
"""


def writer(url: str, tmp: Path, name: str, n: int, interval: float = 0.3, maintenance: float = 1.0):
    """A writer process (what each proxy's spend log is); its spill files in its own dir."""
    spill = tmp / name / "spend.duckdb"
    spill.parent.mkdir(exist_ok=True)
    args = [url, str(tmp / "data"), str(spill), name, str(n), str(interval), str(maintenance)]
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, *args], stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def read(url: str, tmp: Path, sql: str) -> list[tuple]:
    con = lake.connect_readonly(SharedLedger.parse(url, str(tmp / "data")))
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


T0 = datetime.now(UTC).replace(microsecond=0)


def make(i: int, name: str = "w") -> Exchange:
    return Exchange(
        request_id=f"{name}-{i}",
        started_at=T0 + timedelta(milliseconds=i),
        endpoint="/v1/chat/completions",
        team=f"team-{i % 3}",
        usage=Usage(prompt_tokens=100, completion_tokens=10),
        cost_usd=Decimal("0.0001"),
    )


def test_three_writer_processes_append_every_row_exactly_once(pg_url: str, tmp_path: Path):
    # maintenance every second: inlined rows moved to Parquet and files merged while the
    # others commit, which must neither lose nor double a row
    procs = [writer(pg_url, tmp_path, f"p{k}", 600) for k in range(3)]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        assert "closed True 600 rows this run: 600 in postgresql://" in out, out[-500:]
    got = read(
        pg_url,
        tmp_path,
        "SELECT team, count(*), count(DISTINCT request_id), sum(cost_usd), sum(total_tokens) "
        "FROM spend_log GROUP BY team ORDER BY team",
    )
    assert got == [(f"p{k}", 600, 600, Decimal("0.0073800000"), 6600) for k in range(3)]
    views = read(pg_url, tmp_path, "SELECT sum(requests) FROM spend_daily_team")
    assert views == [(1800,)]


def test_sigkilled_writer_loses_only_its_last_flush_and_doubles_nothing(
    pg_url: str, tmp_path: Path
):
    interval = 0.3
    steady = [writer(pg_url, tmp_path, f"s{k}", 500, interval) for k in range(2)]
    victim = writer(pg_url, tmp_path, "v", -1, interval)
    # mid-run: the victim has committed a few flushes (its first, which creates the schema,
    # can take seconds on a loaded machine)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if read(pg_url, tmp_path, "SELECT count(*) FROM spend_log WHERE team = 'v'")[0][0] > 50:
            break
    time.sleep(2 * interval)
    killed_at = time.time()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.stdout is not None
    recorded = {}
    for line in victim.stdout:
        i, t = line.split()
        recorded[f"v-{i}"] = float(t)
    again = writer(pg_url, tmp_path, "v2", 300, interval)  # the proxy restarted
    for proc in [*steady, again]:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "closed True" in out, out[-500:]

    counts = dict(read(pg_url, tmp_path, "SELECT team, count(*) FROM spend_log GROUP BY 1"))
    assert counts["s0"] == counts["s1"] == 500 and counts["v2"] == 300
    doubled = read(pg_url, tmp_path, "SELECT count(*) - count(DISTINCT request_id) FROM spend_log")
    assert doubled == [(0,)]
    stored = {r[0] for r in read(pg_url, tmp_path, "SELECT request_id FROM spend_log")}
    stored_v = {rid for rid in stored if rid.startswith("v-")}
    assert len(recorded) > 100 and len(stored_v) > 50
    assert stored_v <= set(recorded)
    # nothing older is missing: the lost rows were recorded in the last flush interval plus
    # the flush under way and the one before it (a commit to PostgreSQL: tens of ms when
    # quiet, up to ~1 s on a loaded 2-core machine)
    lost = set(recorded) - stored_v
    assert all(recorded[rid] >= killed_at - interval - 2 * 1.0 for rid in lost), sorted(lost)[:5]
    assert stored_v == {f"v-{i}" for i in range(len(stored_v))}


def test_ledger_unreachable_spills_then_replays_exactly_once(pg_url: str, tmp_path: Path):
    missing = pg_url + "_later"  # a database that does not exist yet
    ledger = SharedLedger.parse(missing, str(tmp_path / "data"))
    spill_base = tmp_path / "spend.duckdb"
    log = LakeSpendLog(ledger, spill_base, flush_interval=0.05).start()
    try:
        for i in range(50):
            log.record(make(i))
        assert not log.flush(3)
        deadline = time.monotonic() + 30  # the first attempt (DuckDB, its extensions) is slow
        while log.summary()["spill"] < 50 and time.monotonic() < deadline:  # on a loaded machine
            time.sleep(0.05)
        assert log.summary()["spill"] == 50
        assert log.spill.path.exists()  # its own spill file, locked while it lives
        # a second proxy of the host, sharing the spill file, starts meanwhile
        other = LakeSpendLog(ledger, spill_base, flush_interval=0.05).start()
        for i in range(50, 80):
            other.record(make(i))
        pg.psql(f"CREATE DATABASE {missing.rsplit('/', 1)[1]}")
        assert log.flush(30) and other.flush(30)
        assert other.close() and log.close()
        got = read(missing, tmp_path, "SELECT count(*), count(DISTINCT request_id) FROM spend_log")
        assert got == [(80, 80)]
        assert log.summary()["db"] == 50 and other.summary()["db"] == 30
        assert not list(tmp_path.glob("spend.duckdb.spill*.jsonl"))
        replays = read(missing, tmp_path, "SELECT sum(rows_replayed) FROM spend_spill_replays")
        assert replays == [(50,)]
    finally:
        log.close()
        pg.psql(f"DROP DATABASE IF EXISTS {missing.rsplit('/', 1)[1]} WITH (FORCE)")


def test_a_spill_file_replayed_twice_adds_nothing(pg_url: str, tmp_path: Path):
    ledger = SharedLedger.parse(pg_url, str(tmp_path / "data"))
    spill_base = tmp_path / "spend.duckdb"
    log = LakeSpendLog(ledger, spill_base, flush_interval=0.05).start()
    for i in range(20):
        log.record(make(i))
    assert log.close()
    lines = [json.dumps(log.rows.build(make(i))) + "\n" for i in range(10, 30)]  # 10 stored
    # left by a local-mode run, and by a proxy that died (nobody holds its lock)
    Path(f"{spill_base}.spill.jsonl").write_text("".join(lines[:12]))
    Path(f"{spill_base}.spill.live-99999-dead.jsonl").write_text("".join(lines[8:]))
    again = LakeSpendLog(ledger, spill_base, flush_interval=0.05).start()
    assert again.flush(30) and again.close()
    assert read(pg_url, tmp_path, "SELECT count(*), count(DISTINCT request_id) FROM spend_log") == [
        (30, 30)
    ]
    assert again.stats["duplicates"] == 14 and again.stats["replayed"] == 10
    assert not list(tmp_path.glob("spend.duckdb.spill*.jsonl"))


def spend_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mitmroute.cli", "spend", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )


def test_spend_config_reads_the_shared_ledger_views_export_and_retention(
    pg_url: str, tmp_path: Path
):
    config = tmp_path / "config.yaml"
    general = {"database_url": pg_url, "spend_data_path": str(tmp_path / "data")}
    config.write_text(yaml.safe_dump({"model_list": [], "general_settings": general}))
    empty = spend_cli(config, "--since", "all")
    assert empty.returncode == 1 and "no spend ledger in postgresql://" in empty.stderr
    compact = spend_cli(config, "--compact")  # retention never creates one
    assert compact.returncode == 1 and "no spend ledger" in compact.stderr
    ledger = lake.from_settings(load_config(config).general)
    assert ledger is not None
    log = LakeSpendLog(ledger, tmp_path / "spend.duckdb", flush_interval=0.05).start()
    for i in range(30):
        log.record(make(i))
    old = make(99)
    old.started_at = datetime(2020, 1, 1, tzinfo=UTC)
    log.record(old)
    assert log.close()

    table = spend_cli(config, "--since", "all", "--by", "team")
    assert table.returncode == 0, table.stderr
    assert "postgresql://postgres@127.0.0.1" in table.stdout and "team-0" in table.stdout
    assert "TOTAL" in table.stdout and "31" in table.stdout
    sql = spend_cli(config, "--sql", "select sum(requests) as n from spend_daily_team")
    assert sql.returncode == 0 and "31" in sql.stdout, sql.stderr
    sql = spend_cli(config, "--sql", "select sum(cache_hits) as hits from cache_savings")
    assert sql.returncode == 0 and "hits" in sql.stdout, sql.stderr
    out = tmp_path / "rows.parquet"
    export = spend_cli(config, "--since", "all", "--export-rows", str(out))
    assert export.returncode == 0 and out.is_file(), export.stderr
    import duckdb

    assert duckdb.sql(f"SELECT count(*) FROM '{out}'").fetchall() == [(31,)]

    expire = spend_cli(config, "--expire", "365d")
    assert expire.returncode == 0, expire.stderr
    assert "deleted 1 rows" in expire.stdout and "compacted" in expire.stdout
    assert read(pg_url, tmp_path, "SELECT count(*) FROM spend_log") == [(30,)]
    files = read(pg_url, tmp_path, "SELECT count(*) FROM ducklake_list_files('spend', 'spend_log')")
    assert files == [(1,)]  # the inlined rows, now one Parquet file


def test_database_url_must_be_postgresql_and_name_a_database(tmp_path: Path):
    def general(**g):
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({"general_settings": g}))
        return load_config(config).general

    with pytest.raises(ConfigError, match="database_url"):
        general(database_url="mysql://u:secret@db/x")
    with pytest.raises(ConfigError, match="names no database"):
        general(database_url="postgresql://u:secret@db")
    g = general(database_url="postgresql://u:secret@db:5433/x", spend_data_path="/mnt/ledger")
    ledger = lake.from_settings(g)
    assert ledger is not None and ledger.data_path == "/mnt/ledger"
    assert ledger.label == "postgresql://u:***@db:5433/x"
    default = lake.from_settings(general(database_url="postgresql://db/x", spend_db="/a/b.duckdb"))
    assert default is not None and default.data_path == "/a/spend-data"
    assert lake.from_settings(general()) is None
    assert lake.redact("password=hunter2 host=x") == "password=*** host=x"


def test_postgresql_connections_cut_mid_run_lose_and_double_nothing(pg_url: str, tmp_path: Path):
    ledger = SharedLedger.parse(pg_url, str(tmp_path / "data"))
    log = LakeSpendLog(ledger, tmp_path / "spend.duckdb", flush_interval=0.05).start()
    name = pg_url.rsplit("/", 1)[1]
    for i in range(300):
        log.record(make(i))
        if i % 100 == 50:  # what a PostgreSQL restart or failover does to the writer
            pg.psql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            )
        time.sleep(0.005)
    assert log.flush(60) and log.close()
    got = read(pg_url, tmp_path, "SELECT count(*), count(DISTINCT request_id) FROM spend_log")
    assert got == [(300, 300)]
    assert log.summary()["db"] == 300


def test_doctor_checks_the_shared_ledger(pg_url: str, tmp_path: Path):
    from mitmroute.cli.doctor import check_ledger

    config = tmp_path / "config.yaml"
    general = {
        "database_url": pg_url,
        "spend_data_path": str(tmp_path / "data"),
        "spend_db": str(tmp_path / "spend.duckdb"),
    }
    config.write_text(yaml.safe_dump({"general_settings": general}))
    loaded = load_config(config)
    before = check_ledger(loaded)
    assert before.status == "ok" and "no spend ledger" in before.detail
    ledger = lake.from_settings(loaded.general)
    assert ledger is not None
    log = LakeSpendLog(ledger, tmp_path / "spend.duckdb", flush_interval=0.05).start()
    log.record(make(1))
    assert log.close()
    after = check_ledger(loaded)
    assert after.status == "ok" and "(shared): 1 rows" in after.detail, after
    assert "postgresql://postgres@127.0.0.1" in after.detail

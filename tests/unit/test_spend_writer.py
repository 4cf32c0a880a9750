"""SpendLog against real DuckDB files: exact rows, readers in other processes, spill, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from mitmroute.exchange import Attempt, Exchange, Usage
from mitmroute.spend import SpendLog

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def make(i: int, **kw) -> Exchange:
    usage = Usage(prompt_tokens=100 + i, completion_tokens=7 + i % 5, cached_tokens=i % 3)
    defaults = dict(
        request_id=f"req-{i}",
        started_at=T0 + timedelta(milliseconds=i),
        ended_at=T0 + timedelta(milliseconds=i + 250),
        endpoint="/v1/chat/completions",
        stream=i % 2 == 0,
        latency_ms=250.0,
        ttft_ms=40.0,
        api_key_hash="hash-" + str(i % 4),
        key_alias="alias",
        team=f"team-{i % 3}",
        user="u",
        requested_model="gpt-4o",
        model_group="gpt-4o",
        deployment="openai/gpt-4o",
        provider="openai",
        api_base="https://api.openai.com/v1",
        status_code=200,
        usage=usage,
        cost_usd=Decimal("0.0000001234") * (i + 1),
        attempts=[
            Attempt(1, "openai/gpt-4o", "https://a", T0, 503, "ServiceUnavailableError", 5.0),
            Attempt(2, "openai/gpt-4o", "https://b", T0, 200, None, 245.0),
        ],
        fallback_used=i % 10 == 0,
        tags=["t1", f"n{i}"],
        metadata={"i": i, "when": T0},
    )
    defaults.update(kw)
    return Exchange(**defaults)


def ro(db: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(db), read_only=True)


def count(db: Path, table: str = "spend_log") -> int:
    with ro(db) as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def hold_reader(db: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding a read-only connection for `seconds` (returns once it holds it)."""
    code = textwrap.dedent(f"""
        import duckdb, sys, time
        con = duckdb.connect({str(db)!r}, read_only=True)
        print(con.execute("SELECT count(*) FROM spend_log").fetchone()[0], flush=True)
        time.sleep({seconds})
        con.close()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    p.stdout.readline()
    return p


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "spend.duckdb"


def test_n_records_give_n_rows_with_exact_sums(db: Path) -> None:
    n = 2500
    log = SpendLog(db, flush_interval=0.05).start()
    exchanges = [make(i) for i in range(n)]
    exchanges.append(make(n, started_at=T0.replace(tzinfo=None), usage=None, cost_usd=None))
    for ex in exchanges:
        log.record(ex)
    assert log.close()
    with ro(db) as con:
        got = con.execute(
            "SELECT count(*), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens),"
            " sum(total_tokens), sum(cost_usd), count(cost_usd), count(usage_source),"
            " count(DISTINCT request_id) FROM spend_log"
        ).fetchone()
        used = [e.usage for e in exchanges if e.usage]
        assert got[0] == n + 1 and got[8] == n + 1
        assert got[1] == sum(u.prompt_tokens for u in used)
        assert got[2] == sum(u.completion_tokens for u in used)
        assert got[3] == sum(u.cached_tokens for u in used)
        assert got[4] == sum(u.total_tokens for u in used)
        cost = sum(e.cost_usd for e in exchanges if e.cost_usd)
        assert got[5] == cost == Decimal("0.3857792500")
        assert isinstance(got[5], Decimal) and got[6] == n and got[7] == n
        assert con.execute("SELECT count(*) FROM spend_attempts").fetchone()[0] == 2 * (n + 1)
        row = con.execute(
            "SELECT started_at::VARCHAR, tags, metadata->>'i', usage_source, attempts,"
            " fallback_used, stream FROM spend_log WHERE request_id = 'req-10'"
        ).fetchone()
        assert row == ("2025-03-01 12:00:00.133456+00", ["t1", "n10"], "10", "upstream", 2,
                       True, True)  # fmt: skip
        naive = con.execute(
            "SELECT epoch_us(started_at), prompt_tokens FROM spend_log WHERE request_id = ?",
            [f"req-{n}"],
        ).fetchone()
        assert naive == (int(T0.timestamp() * 1e6), None)  # naive datetimes are UTC
        attempt = con.execute(
            "SELECT attempt, deployment, api_base, status_code, error_type, latency_ms,"
            " started_at::VARCHAR FROM spend_attempts WHERE request_id = 'req-1' ORDER BY 1"
        ).fetchall()
        assert attempt[0] == (1, "openai/gpt-4o", "https://a", 503, "ServiceUnavailableError",
                              5.0, "2025-03-01 12:00:00.123456+00")  # fmt: skip
        views = con.execute(
            "SELECT sum(requests), sum(cost_usd) FROM spend_daily WHERE day = DATE '2025-03-01'"
        ).fetchone()
        assert views == (n + 1, got[5])
        fb = con.execute("SELECT sum(fallbacks) FROM fallback_rate").fetchone()[0]
        assert fb == sum(1 for e in exchanges if e.fallback_used)
        lat = con.execute("SELECT requests, p50_ms, p99_ms FROM deployment_latency").fetchone()
        assert lat == (n + 1, 250.0, 250.0)
    assert log.stats["written"] == n + 1 and log.stats["spilled"] == 0


def test_flush_waits_until_written_and_file_is_released(db: Path) -> None:
    log = SpendLog(db, flush_interval=5.0).start()  # only flush() makes it write now
    for i in range(10):
        log.record(make(i))
    assert log.flush(5)
    assert count(db) == 10  # the writer closed the file: a reader can open it at once
    log.record(make(10))
    assert log.query("SELECT count(*) FROM spend_log") == [(11,)]
    timing = log.stats["last_flush"]
    assert {"open_ms", "insert_ms", "checkpoint_ms", "close_ms"} <= set(timing)
    assert log.close()


def test_reader_process_during_writes_loses_nothing(db: Path) -> None:
    log = SpendLog(db, flush_interval=0.05, retry_delay=0.02).start()
    log.record(make(0))
    assert log.flush(5)
    reader = hold_reader(db, 1.5)
    n = 1
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # keeps recording while the reader holds the file
        for _ in range(20):
            log.record(make(n))
            n += 1
        time.sleep(0.01)
    assert reader.wait(5) == 0
    assert log.flush(5)
    assert count(db) == n
    assert log.stats["spilled"] > 0 and log.stats["replayed"] == log.stats["spilled"]
    assert not list(db.parent.glob("*.spill*.jsonl"))
    assert log.close()


def test_locked_file_spills_to_jsonl_and_replays_once(db: Path) -> None:
    log = SpendLog(db, flush_interval=0.05, retry_delay=0.02).start()
    log.record(make(0))
    assert log.flush(5)
    reader = hold_reader(db, 30)
    try:
        for i in range(1, 51):
            log.record(make(i))
        assert not log.flush(0.5)  # cannot reach the db while the reader holds it
        spill = Path(f"{db}.spill.jsonl")
        assert len(spill.read_text().splitlines()) == 50
    finally:
        reader.kill()
        reader.wait()
    assert log.flush(5)
    assert count(db) == 51
    assert not list(db.parent.glob("*.spill*.jsonl"))
    with ro(db) as con:
        assert con.execute("SELECT rows_replayed FROM spend_spill_replays").fetchall() == [(50,)]
    assert log.close()


def test_unwritable_path_spills_then_replays(tmp_path: Path) -> None:
    db = tmp_path / "spend.duckdb"
    db.mkdir()  # a directory where the file should be: DuckDB cannot open it
    log = SpendLog(db, flush_interval=0.05, retry_delay=0.01).start()
    for i in range(5):
        log.record(make(i))
    assert not log.flush(0.3)
    assert len(Path(f"{db}.spill.jsonl").read_text().splitlines()) == 5
    db.rmdir()
    assert log.flush(5)
    assert count(db) == 5
    assert log.close()


def test_replay_is_exactly_once_and_skips_torn_lines(db: Path) -> None:
    log = SpendLog(db, flush_interval=0.05)
    log.record(make(0))
    log.start()
    assert log.flush(5)
    assert log.close()
    row, attempts = log.rows.build(make(1))
    done_id, todo_id = "a" * 32, "b" * 32
    # a replay that committed but crashed before deleting its file ...
    Path(f"{db}.spill.{done_id}.jsonl").write_text(json.dumps([row, attempts]) + "\n")
    with duckdb.connect(str(db)) as con:
        con.execute("INSERT INTO spend_spill_replays VALUES (?, now(), 1)", [done_id])
    # ... and one that never ran, whose last line was torn by a kill mid-write
    row2, att2 = log.rows.build(make(2))
    Path(f"{db}.spill.{todo_id}.jsonl").write_text(json.dumps([row2, att2]) + '\n[["req-3", "20')
    log2 = SpendLog(db, flush_interval=0.05).start()
    assert log2.flush(5)
    assert log2.close()
    with ro(db) as con:
        ids = [r[0] for r in con.execute("SELECT request_id FROM spend_log ORDER BY 1").fetchall()]
    assert ids == ["req-0", "req-2"]
    assert not list(db.parent.glob("*.spill*.jsonl"))


def test_close_flushes_everything_without_waiting_for_the_interval(db: Path) -> None:
    log = SpendLog(db, flush_interval=30.0).start()
    for i in range(300):
        log.record(make(i))
    t = time.monotonic()
    assert log.close(timeout=10)
    assert time.monotonic() - t < 5
    assert count(db) == 300
    log.record(make(300))  # after close: straight to the spill file, replayed next run
    assert len(Path(f"{db}.spill.jsonl").read_text().splitlines()) == 1
    again = SpendLog(db).start()
    assert again.flush(5) and again.close()
    assert count(db) == 301


def test_close_while_a_reader_holds_the_file_keeps_rows_in_spill(db: Path) -> None:
    log = SpendLog(db, flush_interval=0.05, retry_delay=0.02).start()
    log.record(make(0))
    assert log.flush(5)
    reader = hold_reader(db, 30)
    try:
        for i in range(1, 21):
            log.record(make(i))
        assert log.close(timeout=0.5) is False
    finally:
        reader.kill()
        reader.wait()
    assert len(Path(f"{db}.spill.jsonl").read_text().splitlines()) == 20
    nxt = SpendLog(db).start()
    assert nxt.flush(5) and nxt.close()
    assert count(db) == 21


def test_rows_duckdb_refuses_go_to_rejected_file(db: Path) -> None:
    log = SpendLog(db, flush_interval=0.05).start()
    log.record(make(0))
    log.record(make(1, cost_usd=Decimal("1e12")))  # does not fit DECIMAL(18,10)
    log.record(make(2))
    assert log.close()
    assert count(db) == 2
    rejected = [json.loads(x) for x in Path(f"{db}.rejected.jsonl").read_text().splitlines()]
    assert [r["row"][0] for r in rejected] == ["req-1"]


def test_the_ledger_prices_nothing_itself(db: Path) -> None:
    """Cost is the engine's (mitmroute.money); a row without one stays NULL, never re-priced."""
    log = SpendLog(db, flush_interval=0.05).start()
    usage = Usage(prompt_tokens=1234, completion_tokens=56, cached_tokens=1000)
    log.record(make(0, cost_usd=None, usage=usage))
    log.record(make(1, cost_usd=Decimal("0.002395"), usage=usage))
    assert log.close()
    with ro(db) as con:
        got = con.execute("SELECT cost_usd FROM spend_log ORDER BY request_id")
        assert got.fetchall() == [(None,), (Decimal("0.002395"),)]


CHILD = """
import sys, time
from datetime import UTC, datetime
from mitmroute.exchange import Exchange, Usage
from mitmroute.spend import SpendLog
log = SpendLog(sys.argv[1], flush_interval=float(sys.argv[2])).start()
i = 0
while True:
    now = time.time()
    log.record(Exchange(request_id=str(i), started_at=datetime.now(UTC), endpoint="/v1/x",
                        usage=Usage(prompt_tokens=1)))
    sys.stdout.write(f"{i} {now}\\n")
    sys.stdout.flush()
    i += 1
    time.sleep(0.002)
"""


def test_sigkill_loses_at_most_the_last_flush_interval(db: Path) -> None:
    interval = 0.2
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), str(interval)],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert child.stdout is not None
    first = child.stdout.readline()
    assert first.startswith("0 ")
    time.sleep(1.2)
    killed_at = time.time()
    child.send_signal(signal.SIGKILL)
    child.wait()
    recorded = {int(i): float(t) for i, t in (ln.split() for ln in [first, *child.stdout])}
    with duckdb.connect(str(db)) as con:  # read-write: replays any WAL the kill left behind
        stored = {int(r[0]) for r in con.execute("SELECT request_id FROM spend_log").fetchall()}
    spill = Path(f"{db}.spill.jsonl")
    if spill.exists():
        stored |= {int(json.loads(x)[0][0]) for x in spill.read_text().splitlines()}
    assert stored == set(range(len(stored)))  # a prefix: nothing older missing
    lost = set(recorded) - stored
    assert len(recorded) > 200 and len(stored) > 100
    # what was lost was recorded within the last flush interval (+ one flush's duration)
    assert all(recorded[i] >= killed_at - interval - 0.3 for i in lost), sorted(lost)[:5]


def test_a_bad_row_in_a_spill_file_does_not_block_its_replay(db: Path) -> None:
    log = SpendLog(db, flush_interval=0.05)
    good, bad = log.rows.build(make(0)), log.rows.build(make(1, cost_usd=Decimal("1e12")))
    Path(f"{db}.spill.jsonl").write_text("".join(json.dumps(x) + "\n" for x in (good, bad)))
    log.start()
    log.record(make(2))
    assert log.flush(5) and log.close()
    with ro(db) as con:
        got = con.execute("SELECT request_id FROM spend_log ORDER BY 1").fetchall()
    assert got == [("req-0",), ("req-2",)]
    assert "req-1" in Path(f"{db}.rejected.jsonl").read_text()
    assert not list(db.parent.glob("*.spill*.jsonl"))

"""The spend sidecar: the writer in a real child process, fed and acknowledged over pipes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from mitmroute.auth.ledger import SPEND_SINCE, Ledger
from mitmroute.auth.limits import usd_to_nanos
from mitmroute.spend.sidecar import SpendQueryError, SpendSidecar
from tests.conftest import running, wait_gone
from tests.unit.test_spend_writer import make

REPO = Path(__file__).resolve().parents[2]


def stored(db: Path) -> tuple[int, int]:
    """(rows, distinct request_ids) in spend_log."""
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT count(*), count(DISTINCT request_id) FROM spend_log").fetchone()


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def sidecars():
    """Sidecars of this test; closed (and their child killed if need be) afterwards."""
    made: list[SpendSidecar] = []

    def new(db: Path, **kwargs) -> SpendSidecar:
        s = SpendSidecar(db, **kwargs).start()
        made.append(s)
        return s

    yield new
    for s in made:
        child = s.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGCONT)
        s.close(10)
        if child is not None and child.poll() is None:
            child.kill()
            child.wait(5)


def test_rows_arrive_once_and_the_summary_adds_up(tmp_path, sidecars):
    db = tmp_path / "spend.duckdb"
    s = sidecars(db)
    for i in range(300):
        s.record(make(i))
    wait_for(lambda: s.summary()["db"] == 300)
    for i in range(300, 450):
        s.record(make(i))
    child = s.child
    assert s.close(10) is True
    assert child.poll() == 0  # waited for: no zombie
    assert stored(db) == (450, 450)
    assert s.summary() == {
        "recorded": 450,
        "db": 450,
        "spill": 0,
        "rejected": 0,
        "lost": 0,
        "held": 0,
    }
    assert s.describe() == (f"450 rows this run: 450 in {db}, 0 in spill files, 0 rejected, 0 lost")


def test_the_child_runs_this_mitmroute_whatever_the_working_directory_holds(
    tmp_path, sidecars, monkeypatch
):
    """A proxy started in a checkout of another version: `python -m` would put that directory
    first on the child's path (and run its writer); `-P` keeps it off."""
    other = tmp_path / "other-checkout" / "mitmroute"
    (other / "spend").mkdir(parents=True)
    (other / "__init__.py").write_text("raise ImportError('the other checkout was imported')\n")
    (other / "spend" / "__init__.py").write_text("")
    monkeypatch.chdir(other.parent)
    db = tmp_path / "spend.duckdb"
    s = sidecars(db)
    s.record(make(1))
    assert s.close(10) is True
    assert stored(db) == (1, 1) and s.restarts == 0


def test_the_proxy_side_never_imports_duckdb():
    code = "import sys, mitmroute.spend.sidecar, mitmroute.spend; print('duckdb' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == "False"


def test_queries_run_in_the_child_after_the_rows_it_received(tmp_path, sidecars):
    db = tmp_path / "spend.duckdb"
    s = sidecars(db)
    for i in range(40):
        s.record(make(i))
    wait_for(lambda: not s._queue)  # handed over, not necessarily written yet
    rows = s.query("SELECT count(*), sum(cost_usd) FROM spend_log WHERE request_id LIKE $p",
                   {"p": "req-%"})  # fmt: skip
    total = sum(make(i).cost_usd for i in range(40))
    assert rows == [(40, str(total))]  # DECIMAL comes back as its exact text
    with pytest.raises(SpendQueryError, match="CatalogException"):
        s.query("SELECT * FROM no_such_table")
    assert s.query("SELECT 1") == [(1,)]  # the child goes on after a failed query


async def test_the_budget_ledger_reads_through_the_sidecar(tmp_path, sidecars):
    db = tmp_path / "spend.duckdb"
    s = sidecars(db)
    for i in range(12):
        s.record(make(i))  # api_key_hash: hash-0 .. hash-3
    wait_for(lambda: not s._queue)
    ledger = Ledger(str(db), writer=lambda: s.query)
    try:
        found = await ledger.spend_since({"hash-1": 0.0, "hash-9": 0.0})
    finally:
        ledger.close()
    expected = sum(make(i).cost_usd for i in range(12) if i % 4 == 1)
    assert found == {"hash-1": usd_to_nanos(expected)}
    assert s.close(10) is True
    with duckdb.connect(str(db), read_only=True) as con:  # what the file itself says
        direct = con.execute(SPEND_SINCE, {"tokens": ["hash-1"], "since": [0.0]}).fetchall()
    assert {t: usd_to_nanos(v) for t, v in direct} == found


def test_a_query_whose_child_dies_fails_and_the_next_child_answers(tmp_path, sidecars):
    db = tmp_path / "spend.duckdb"
    s = sidecars(db, restart_delay=0.1)
    s.record(make(1))
    wait_for(lambda: s.summary()["db"] == 1)
    first = s.child
    os.kill(first.pid, signal.SIGSTOP)  # it cannot answer: the query waits, then it dies
    try:
        threading.Timer(0.3, lambda: os.kill(first.pid, signal.SIGKILL)).start()
        with pytest.raises(SpendQueryError, match="exited"):
            s.query("SELECT count(*) FROM spend_log", timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first.pid, signal.SIGKILL)
    wait_for(lambda: s.child is not None and s.child is not first)
    assert s.query("SELECT count(*) FROM spend_log") == [(1,)]
    with pytest.raises(SpendQueryError, match="no answer"):
        os.kill(s.child.pid, signal.SIGSTOP)
        s.query("SELECT 1", timeout=0.3)


def test_a_query_gives_up_within_its_timeout_when_the_pipe_is_held(tmp_path, sidecars):
    s = sidecars(tmp_path / "spend.duckdb")
    assert s.query("SELECT 1") == [(1,)]
    with s._write_lock:  # the sender blocked on a child that stopped reading
        started = time.monotonic()
        with pytest.raises(SpendQueryError, match="not running"):
            s.query("SELECT 1", timeout=0.3)
        assert time.monotonic() - started < 2
    assert s.query("SELECT 1") == [(1,)]


def test_a_killed_child_is_replaced_and_nothing_is_lost_or_doubled(tmp_path, sidecars):
    db = tmp_path / "spend.duckdb"
    s = sidecars(db, restart_delay=0.1)
    for i in range(200):
        s.record(make(i))
    wait_for(lambda: s.summary()["db"] == 200)
    first = s.child
    # rows it has (in the pipe, or in its memory before its next flush), then killed
    for i in range(200, 400):
        s.record(make(i))
    wait_for(lambda: s.summary()["held"] == 200 and not s._queue)
    assert s.summary()["held"] == 200  # sent, not yet settled
    os.kill(first.pid, signal.SIGKILL)
    wait_for(lambda: s.child is not None and s.child is not first)
    assert first.poll() == -signal.SIGKILL  # the dead one was waited for
    for i in range(400, 500):
        s.record(make(i))
    assert s.close(10) is True
    assert s.restarts == 1
    assert stored(db) == (500, 500)
    summary = s.summary()
    assert summary["recorded"] == 500 and summary["held"] == 0
    assert summary["db"] == 500  # rows the first child stored and the second one again: once


def test_buffer_full_refuses_while_the_child_cannot_write(tmp_path, sidecars):
    db = tmp_path / "spend.duckdb"
    s = sidecars(db, max_buffer=5, on_full="refuse")
    wait_for(lambda: s.child is not None)
    os.kill(s.child.pid, signal.SIGSTOP)  # acknowledges nothing while stopped
    try:
        for i in range(5):
            assert s.accepting()
            s.record(make(i))
        assert not s.accepting()
        s.refused()
        s.record(make(5))  # a request already in flight: kept, as today
        assert s.summary()["held"] == 6
    finally:
        os.kill(s.child.pid, signal.SIGCONT)
    wait_for(s.accepting)
    assert s.close(10) is True
    assert stored(db) == (6, 6)


def test_buffer_full_drops_and_counts(tmp_path, sidecars):
    db = tmp_path / "spend.duckdb"
    dropped: list[int] = []
    s = sidecars(db, max_buffer=3, on_full="drop", on_drop=dropped.append)
    wait_for(lambda: s.child is not None)
    os.kill(s.child.pid, signal.SIGSTOP)
    try:
        for i in range(5):
            s.record(make(i))
        assert dropped == [1, 1]
    finally:
        os.kill(s.child.pid, signal.SIGCONT)
    assert s.close(10) is False  # two rows lost
    assert stored(db) == (3, 3)
    summary = s.summary()
    assert (summary["recorded"], summary["db"], summary["lost"]) == (5, 3, 2)
    assert "2 lost (buffer full" in s.describe()


@contextlib.contextmanager
def proxy_process(db: Path, feed: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A process with a SpendSidecar on `db` that runs `feed` (Python, `s` is the sidecar,
    `make` builds an Exchange), prints its child's pid and waits: (it, the child's pid). Killed
    afterwards if the test did not."""
    script = (
        textwrap.dedent(
            f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from mitmroute.spend.sidecar import SpendSidecar
        from tests.unit.test_spend_writer import make
        s = SpendSidecar({str(db)!r}).start()
        s.ready.wait(30)  # a proxy serves once started: the child reads its pipe by then
        """
        )
        + textwrap.dedent(feed)
        + "print(s.child.pid, flush=True)\ntime.sleep(60)\n"
    )
    proxy = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert proxy.stdout is not None
        yield proxy, int(proxy.stdout.readline())
    finally:
        if proxy.poll() is None:
            proxy.kill()
            proxy.wait(5)
        assert proxy.stdout is not None
        proxy.stdout.close()


def test_a_sigkilled_proxy_leaves_the_child_to_write_everything(tmp_path):
    """EOF on its stdin: the child writes every row it got, then exits."""
    db = tmp_path / "spend.duckdb"
    feed = """
        for i in range(250):
            s.record(make(i))
        while s._queue:
            time.sleep(0.01)
        time.sleep(0.05)
        """
    with proxy_process(db, feed) as (proxy, child):
        assert running(child)
        proxy.send_signal(signal.SIGKILL)
        proxy.wait(10)
        assert wait_gone([child], 30) == []
    assert stored(db) == (250, 250)


def test_a_container_killed_whole_loses_nothing_the_child_had_received(tmp_path, sidecars):
    """Proxy and child SIGKILLed at once, between the child's flushes: the rows the child had
    received are in its journal, and the next child replays them into the db, once each."""
    db = tmp_path / "spend.duckdb"
    feed = """
        for i in range(100):
            s.record(make(i))
        while s.summary()["db"] < 100:  # a first flush: its segment is deleted one later
            time.sleep(0.01)
        for i in range(100, 350):
            s.record(make(i))
        while s._queue:
            time.sleep(0.01)
        time.sleep(0.2)  # read from the pipe by the child, far from its next flush
        """
    with proxy_process(db, feed) as (proxy, child):
        os.kill(child, signal.SIGKILL)
        proxy.kill()
        proxy.wait(10)
        assert wait_gone([child], 30) == []
    assert stored(db)[0] < 350  # the kill came before the flush of the last rows
    assert list(tmp_path.glob("spend.duckdb.journal.*"))
    s = sidecars(db)
    s.record(make(349))  # sent again by nobody, recorded again by a retry: stored once
    assert s.close(10) is True
    assert stored(db) == (350, 350)
    assert not list(tmp_path.glob("spend.duckdb.journal.*"))
    assert not list(tmp_path.glob("spend.duckdb.spill*"))


def test_close_after_close_goes_to_the_spill_file(tmp_path, sidecars):
    db = tmp_path / "spend.duckdb"
    s = sidecars(db)
    s.record(make(0))
    assert s.close(10) is True
    s.record(make(1))  # a stream that ended after `done`
    assert s.summary() == {
        "recorded": 2,
        "db": 1,
        "spill": 1,
        "rejected": 0,
        "lost": 0,
        "held": 0,
    }
    assert Path(f"{db}.spill.jsonl").read_text().count("\n") == 1

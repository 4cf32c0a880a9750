"""The ledger's threat list: a full disk, a read-only directory, a reader holding the file.

Each case here once lost, doubled or hid spend rows. Real DuckDB files; the disk is a real tmpfs
of a few MB, mounted for the test (root only) and unmounted after it; where what a user sees is
the proxy's answer or exit, a real mitmdump.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import openai
import pytest
import yaml
from mitmproxy import exceptions, http
from mitmproxy.test import tflow, tutils

from mitmroute.addons.gate import Gate
from mitmroute.addons.metrics import Metrics
from mitmroute.addons.shared import Shared
from mitmroute.addons.spend import SpendLog as SpendAddon
from mitmroute.config import ConfigError, parse_config
from mitmroute.spend import SpendLog
from mitmroute.spend.writer import RowBuilder
from tests.conftest import MITMDUMP, ROOT, deployment
from tests.unit.test_spend_writer import hold_reader, make


class Disk:
    """A tmpfs of its own: fill it up, give space back, make it read-only."""

    def __init__(self, path: Path, size: str) -> None:
        path.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True
        )
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        """Take every free byte."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        chunk = b"\0" * 65536
        try:
            while chunk:
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    chunk = chunk[: len(chunk) // 2]
        finally:
            os.close(fd)

    def free(self, nbytes: int | None = None) -> None:
        """Give `nbytes` back (all of it by default)."""
        if nbytes is None:
            self.filler.unlink(missing_ok=True)
        else:
            os.truncate(self.filler, max(0, self.filler.stat().st_size - nbytes))

    def read_only(self, on: bool = True) -> None:
        """Remount read-only (retried while the writer has a file open) or read-write again."""
        deadline = time.monotonic() + 10
        while True:
            opts = "remount,ro" if on else "remount,rw"
            done = subprocess.run(["mount", "-o", opts, str(self.path)], capture_output=True)
            if done.returncode == 0:
                return
            assert time.monotonic() < deadline, done.stderr
            time.sleep(0.01)

    def unmount(self) -> None:
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(self.path)], check=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = Disk(tmp_path / "disk", "8m")
    try:
        yield d
    finally:
        d.unmount()


def wait_for(condition: Callable[[], object], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.01)


def spill_files(db: Path) -> list[Path]:
    return sorted(db.parent.glob(db.name + ".spill*.jsonl"))


def _empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return False


def replay_files(db: Path) -> list[Path]:
    """Spill files claimed for replay (`<db>.spill.<id>.jsonl`)."""
    return [p for p in spill_files(db) if p.name != f"{db.name}.spill.jsonl"]


def stored_ids(db: Path) -> list[str]:
    with duckdb.connect(str(db), read_only=True) as con:
        return [r[0] for r in con.execute("SELECT request_id FROM spend_log").fetchall()]


def tried(log: SpendLog) -> Callable[[], bool]:
    """Poll condition: the writer failed 3 more times from now, or holds nothing any more."""
    start = log.stats["failures"]
    return lambda: log.stats["failures"] >= start + 3 or log.summary()["held"] == 0


def balanced(log: SpendLog) -> bool:
    s = log.summary()
    return s["recorded"] == s["db"] + s["spill"] + s["rejected"] + s["lost"] + s["held"]


# --- a full disk -------------------------------------------------------------------------------


def test_a_full_disk_with_space_back_part_way_loses_and_doubles_nothing(disk: Disk) -> None:
    db = disk.path / "spend.duckdb"
    log = SpendLog(db, flush_interval=0.02, retry_delay=0.01, batch_size=200).start()
    log.record(make(0))
    assert log.flush(10)
    empty_replay_files: set[str] = set()  # the old writer made one per flush

    def traffic(start: int, n: int) -> int:
        for i in range(start, start + n):
            log.record(make(i))
            if i % 50 == 0:
                time.sleep(0.005)
                empty_replay_files.update(p.name for p in replay_files(db) if _empty(p))
        return start + n

    disk.fill()
    n = traffic(1, 500)  # nothing can be written: rows wait in memory
    wait_for(tried(log), what="failed flushes on a full disk")
    # space comes back part-way, again and again: room for part of a WAL (a commit that lands,
    # then a checkpoint that fails), for some spill lines, rarely for the db to grow
    for room in (40_000, 150_000, 300_000, 90_000, 600_000, 20_000):
        disk.free(room)
        n = traffic(n, 300)
        wait_for(tried(log), what=f"flushes with {room} bytes of room")
        disk.fill()
    disk.free()
    assert log.flush(20), log.stats
    assert log.close()
    ids = stored_ids(db)
    lost, doubled = n - len(set(ids)), len(ids) - len(set(ids))
    assert (lost, doubled) == (0, 0), log.stats
    assert set(ids) == {f"req-{i}" for i in range(n)}
    assert not spill_files(db) and not empty_replay_files
    assert log.summary() == {
        "recorded": n,
        "db": n,
        "spill": 0,
        "rejected": 0,
        "lost": 0,
        "held": 0,
    }


def test_a_full_disk_leaves_no_spill_files_behind(disk: Disk) -> None:
    db = disk.path / "spend.duckdb"
    log = SpendLog(db, flush_interval=0.01, retry_delay=0.01).start()
    log.record(make(0))
    assert log.flush(10)
    disk.fill()
    for i in range(1, 101):
        log.record(make(i))
    for _ in range(7):  # 20 flushes: the old writer set an empty spill file aside at each
        wait_for(tried(log))
    assert replay_files(db) == []
    disk.free()
    assert log.flush(10) and log.close()
    assert len(stored_ids(db)) == 101


def test_a_disk_full_before_the_first_flush_leaves_no_broken_db_file(disk: Disk) -> None:
    db = disk.path / "spend.duckdb"
    disk.fill()  # DuckDB would leave a half-created file here that it can never open again
    log = SpendLog(db, flush_interval=0.01, retry_delay=0.01).start()
    for i in range(5):
        log.record(make(i))
    wait_for(tried(log))
    assert not db.exists()
    disk.free()
    assert log.flush(10) and log.close()
    assert len(stored_ids(db)) == 5


def test_trouble_is_logged_once_per_interval_with_the_true_backlog(
    disk: Disk, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mitmroute.spend.writer")
    db = disk.path / "spend.duckdb"
    disk.fill()  # before the first flush: it sees all 50 rows at once
    log = SpendLog(db, flush_interval=0.01, retry_delay=0.01, log_interval=0.5)
    for i in range(50):
        log.record(make(i))
    log.start()

    def held_logs() -> list[str]:
        return [r.getMessage() for r in caplog.records if "held in memory" in r.getMessage()]

    wait_for(lambda: held_logs(), what="the first error")
    failures = log.stats["failures"]
    for i in range(50, 80):
        log.record(make(i))
    wait_for(lambda: len(held_logs()) == 2, what="the next error, an interval later")
    messages = held_logs()
    assert log.stats["failures"] - failures >= 10  # many failed flushes, two messages
    assert [re.search(r"(\d+) rows held", m)[1] for m in messages] == ["50", "80"], messages
    assert all(r.levelno == logging.ERROR for r in caplog.records if "held in" in r.message)
    disk.free()
    assert log.flush(10) and log.close()
    assert len(stored_ids(db)) == 80
    assert "writable again" in caplog.text


# --- spill files: exactly once, torn lines ------------------------------------------------------


def spill_line(i: int) -> str:
    return json.dumps(list(RowBuilder().build(make(i)))) + "\n"


def test_replay_stores_each_request_id_once(tmp_path: Path) -> None:
    db = tmp_path / "spend.duckdb"
    log = SpendLog(db, flush_interval=0.02).start()
    for i in range(10):
        log.record(make(i))
    assert log.close()
    # rows that reached the db and a spill file both (a commit reported failed that landed, a
    # line appended twice), in a claimed replay file and in the live one
    claimed = "".join(spill_line(i) for i in [*range(5, 15), 12])
    Path(f"{db}.spill.{'c' * 32}.jsonl").write_text(claimed)
    Path(f"{db}.spill.jsonl").write_text(spill_line(14) + spill_line(15))
    again = SpendLog(db, flush_interval=0.02).start()
    assert again.flush(10) and again.close()
    ids = stored_ids(db)
    assert sorted(ids) == sorted(f"req-{i}" for i in range(16))
    assert again.stats["duplicates"] == 7 and again.stats["replayed"] == 6
    with duckdb.connect(str(db), read_only=True) as con:
        attempts = con.execute("SELECT count(*), count(DISTINCT request_id) FROM spend_attempts")
        assert attempts.fetchone() == (32, 16)  # a skipped row's attempts are skipped too
    assert not spill_files(db)


def test_a_torn_or_foreign_spill_line_is_set_aside_and_replay_goes_on(tmp_path: Path) -> None:
    db = tmp_path / "spend.duckdb"
    lines = [
        spill_line(1).encode(),
        b'[["req-2","2025-03-01T12:00:\xe2\x82\n',  # cut inside a UTF-8 character
        b"[1, 2]\n",  # JSON, but no row
        spill_line(3).encode(),
        b'[["req-4","20',  # the kill came mid-write
    ]
    Path(f"{db}.spill.jsonl").write_bytes(b"".join(lines))
    log = SpendLog(db, flush_interval=0.02).start()
    assert log.flush(10) and log.close()
    assert sorted(stored_ids(db)) == ["req-1", "req-3"]
    aside = [json.loads(x) for x in Path(f"{db}.rejected.jsonl").read_text().splitlines()]
    assert [a["error"].split(" (")[0] for a in aside] == ["unreadable spill line"] * 3
    assert aside[2]["line"] == '[["req-4","20'
    assert not spill_files(db)


def test_a_row_spilled_after_a_torn_line_is_kept(tmp_path: Path) -> None:
    db = tmp_path / "spend.duckdb"
    first = SpendLog(db).start()
    first.record(make(0))
    assert first.close()
    Path(f"{db}.spill.jsonl").write_text(spill_line(1) + '[["req-2","20')  # killed mid-write
    reader = hold_reader(db, 30)
    try:
        log = SpendLog(db, flush_interval=0.02, retry_delay=0.01).start()
        log.record(make(3))
        wait_for(lambda: log.stats["spilled"] == 1, what="the row in the spill file")
    finally:
        reader.kill()
        reader.wait()
    assert log.flush(10) and log.close()
    assert sorted(stored_ids(db)) == ["req-0", "req-1", "req-3"]
    assert "req-2" in Path(f"{db}.rejected.jsonl").read_text()


# --- a read-only directory, and the buffer's cap ------------------------------------------------


def test_a_read_only_directory_keeps_rows_in_memory_until_it_is_writable(disk: Disk) -> None:
    db = disk.path / "spend.duckdb"
    log = SpendLog(db, flush_interval=0.02, retry_delay=0.01).start()
    log.record(make(0))
    assert log.flush(10)
    disk.read_only()
    for i in range(1, 51):
        log.record(make(i))
    wait_for(tried(log))
    assert log.summary()["held"] == 50 and spill_files(db) == []
    disk.read_only(False)
    assert log.flush(10) and log.close()
    assert len(stored_ids(db)) == 51


def test_at_the_cap_drop_serves_on_and_counts_the_rows_dropped(disk: Disk) -> None:
    db = disk.path / "spend.duckdb"
    dropped: list[int] = []
    log = SpendLog(
        db,
        flush_interval=0.02,
        retry_delay=0.01,
        max_buffer=100,
        on_full="drop",
        on_drop=dropped.append,
    ).start()
    log.record(make(0))
    assert log.flush(10)
    disk.read_only()
    for i in range(1, 151):
        log.record(make(i))
    assert not log.accepting()
    assert log.stats["dropped"] == sum(dropped) == 50
    disk.read_only(False)
    assert log.close() is False  # not every row reached the db: 50 were dropped
    assert sorted(stored_ids(db)) == sorted(f"req-{i}" for i in range(101))
    assert log.summary() == {
        "recorded": 151,
        "db": 101,
        "spill": 0,
        "rejected": 0,
        "lost": 50,
        "held": 0,
    }


def test_at_the_cap_refuse_keeps_every_row_and_stops_admitting(disk: Disk) -> None:
    db = disk.path / "spend.duckdb"
    log = SpendLog(db, flush_interval=0.02, retry_delay=0.01, max_buffer=100).start()
    log.record(make(0))
    assert log.flush(10)
    disk.read_only()
    for i in range(1, 101):
        log.record(make(i))
    assert not log.accepting()  # the proxy now refuses new requests ...
    for i in range(101, 111):  # ... and the ones in flight still come in: kept
        log.record(make(i))
    wait_for(tried(log))
    assert log.summary()["held"] == 110 and log.stats["dropped"] == 0
    disk.read_only(False)
    assert log.flush(10)
    assert log.accepting()
    assert log.close()
    assert len(stored_ids(db)) == 111


def general(**settings: object) -> dict[str, object]:
    return {"general_settings": settings}


def test_a_full_ledger_answers_503_ledger_unavailable_on_intercepted_hosts(disk: Disk) -> None:
    shared = Shared()
    gate, addon, metrics = Gate(shared), SpendAddon(shared), Metrics(shared)
    db = disk.path / "spend.duckdb"
    shared.publish_config(parse_config(general(spend_db=str(db), spend_buffer_rows=2)))
    assert addon.writer is not None
    disk.read_only()
    try:
        for i in range(2):
            addon.record(make(i))

        def request(host: str) -> http.HTTPFlow:
            flow = tflow.tflow(req=tutils.treq(host=host, port=443, path=b"/v1/chat/completions"))
            gate.requestheaders(flow)  # the Gate says which hosts are intercepted
            addon.requestheaders(flow)
            return flow

        refused = request("API.openai.com").response
        assert refused is not None and refused.status_code == 503
        assert json.loads(refused.content)["error"]["code"] == "ledger_unavailable"
        assert request("example.com").response is None  # not intercepted: not ours to refuse
        shared.publish_config(
            parse_config(
                general(spend_db=str(db), spend_buffer_rows=2, spend_on_buffer_full="drop")
            )
        )
        assert request("api.openai.com").response is None  # served; its row is dropped
        addon.record(make(2))
        value = metrics.metrics.registry.get_sample_value("mitmroute_spend_rows_dropped_total")
        assert value == 1
    finally:
        disk.read_only(False)
        addon.close_timeout = 5
        addon.done()
    assert sorted(stored_ids(db)) == ["req-0", "req-1"]


# --- start-up and exit --------------------------------------------------------------------------


def test_the_exit_message_says_where_every_row_went(
    disk: Disk, caplog: pytest.LogCaptureFixture
) -> None:
    shared = Shared()
    addon = SpendAddon(shared)
    addon.close_timeout = 1.0
    db = disk.path / "spend.duckdb"
    shared.publish_config(parse_config(general(spend_db=str(db))))
    writer = addon.writer
    assert writer is not None
    for i in range(3):
        addon.record(make(i))
    assert writer.flush(10)
    reader = hold_reader(db, 30)  # a reader holds the file: rows go to the spill file
    try:
        for i in range(3, 5):
            addon.record(make(i))
        wait_for(lambda: writer.stats["spilled"] == 2)
        disk.fill()  # then the disk fills up: rows stay in memory
        for i in range(5, 9):  # (too big for the slack in the spill file's last page)
            addon.record(make(i, metadata={"pad": "x" * 5000}))
        wait_for(lambda: writer.stats["failures"] >= 3)
    finally:
        reader.kill()
        reader.wait()
    with caplog.at_level(logging.INFO, logger="mitmroute"):
        addon.done()  # SIGTERM with the disk still full
    (message,) = [r.getMessage() for r in caplog.records if "spend log closed" in r.getMessage()]
    assert f"9 rows this run: 3 in {db}, 2 in spill files" in message
    assert message.endswith(", 0 rejected, 4 lost (buffer full, or nothing could be written)")
    assert balanced(writer)
    disk.free()
    nxt = SpendLog(db).start()  # the next run replays what the message said was spilled
    assert nxt.flush(10) and nxt.close()
    assert len(stored_ids(db)) == 5


def test_an_unwritable_spend_db_stops_start_up_with_exit_2(
    disk: Disk, confdir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    db = disk.path / "ledger" / "spend.duckdb"
    config.write_text(yaml.safe_dump(general(spend_db=str(db))))
    disk.read_only()
    done = subprocess.run(
        [
            MITMDUMP,
            "--listen-host",
            "127.0.0.1",
            "-p",
            "0",
            "--set",
            f"confdir={confdir}",
            "-s",
            str(ROOT / "addons" / "router.py"),
            "--set",
            f"router_config={config}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"mitmroute: spend_db {db}: cannot write in {db.parent} (Read-only file system)" in (
        done.stderr.splitlines()
    )


def test_an_unwritable_spend_db_on_reload_is_refused_and_the_old_one_kept(
    disk: Disk, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = Shared()
    addon = SpendAddon(shared)
    good = tmp_path / "spend.duckdb"
    shared.publish_config(parse_config(general(spend_db=str(good))))
    writer = addon.writer
    disk.read_only()
    addon.running()
    with pytest.raises(exceptions.OptionsError, match="Read-only file system"):
        shared.publish_config(parse_config(general(spend_db=str(disk.path / "spend.duckdb"))))
    assert addon.writer is writer
    addon.is_running = False
    with pytest.raises(SystemExit) as exited:
        addon.config_changed(parse_config(general(spend_db=str(disk.path / "x" / "s.duckdb"))))
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("mitmroute: spend_db ")
    addon.done()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"spend_buffer_rows": 0}, r"general_settings\.spend_buffer_rows: must be >= 1"),
        ({"spend_buffer_rows": "lots"}, r"general_settings\.spend_buffer_rows: not a number"),
        ({"spend_buffer_rows": 1.5}, r"general_settings\.spend_buffer_rows: not an integer"),
        (
            {"spend_on_buffer_full": "panic"},
            r"general_settings\.spend_on_buffer_full: expected 'refuse' or 'drop', got 'panic'",
        ),
    ],
)
def test_buffer_settings_name_their_key_path(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(general(**settings))


def test_buffer_settings_default_to_100k_rows_and_refuse() -> None:
    g = parse_config({}).general
    assert (g.spend_buffer_rows, g.spend_on_buffer_full) == (100_000, "refuse")


# --- through the proxy --------------------------------------------------------------------------


def test_a_read_only_ledger_refuses_requests_until_it_is_writable_again(
    disk: Disk, start_proxy, backend
) -> None:  # (`disk` first: unmounted after the proxy has stopped)
    proxy = start_proxy(
        {
            "model_list": [deployment("gpt-4o", "openai/gpt-4o", f"{backend.url}/v1", api_key="k")],
            **general(spend_db=str(disk.path / "spend.duckdb"), spend_buffer_rows=2),
        }
    )
    answered = 0

    def ask(client: openai.OpenAI) -> None:
        nonlocal answered
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        answered += 1

    with proxy.client() as client:
        ask(client)
        wait_for(lambda: _readable_count(disk.path / "spend.duckdb") == 1, what="the first row")
        disk.read_only()
        ask(client)
        ask(client)  # two rows held: the cap
        with pytest.raises(openai.InternalServerError) as refused:
            ask(client)
        assert refused.value.status_code == 503
        assert refused.value.body["code"] == "ledger_unavailable"  # type: ignore[index]
        disk.read_only(False)
        deadline = time.monotonic() + 15
        while True:  # served again once the rows are written (within a flush interval)
            try:
                ask(client)
                break
            except openai.InternalServerError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    assert proxy.stop() == 0
    assert len(stored_ids(disk.path / "spend.duckdb")) == answered
    closing = [ln for ln in proxy.logs().splitlines() if "spend log closed" in ln]
    assert closing and f"{answered} rows this run: {answered} in " in closing[0]
    assert closing[0].endswith(" 0 lost")


def _readable_count(db: Path) -> int | None:
    try:
        with duckdb.connect(str(db), read_only=True) as con:
            return con.execute("SELECT count(*) FROM spend_log").fetchone()[0]
    except duckdb.Error:
        return None  # not there yet, or in the middle of a flush

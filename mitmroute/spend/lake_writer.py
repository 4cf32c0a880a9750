"""The writer of the shared ledger (:class:`LakeSpendLog`) and the spill files several
processes share; see mitmroute.spend.lake, which exports both (imported on first use: DuckDB)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb

from mitmroute.spend import extensions
from mitmroute.spend.lake import (
    MAINTENANCE,
    SharedLedger,
    ensure_lake_schema,
    redact,
)
from mitmroute.spend.writer import SpendLog, SpillFiles, _Busy, _first_line

log = logging.getLogger("mitmroute.spend.lake")

# --- spill files several processes share ---------------------------------------------------


class SharedSpillFiles(SpillFiles):
    """Spill files of a proxy that shares `spend_db`'s directory with other proxies of the host.

    Each process appends to its own live file (`<db>.spill.live-<pid>-<id>.jsonl`) and holds
    an flock on it for as long as it lives, handing the lock over to the replay when it claims
    the file. Any file whose lock nobody holds (its proxy died, or the file is a claimed one
    whose replay failed, or `<db>.spill.jsonl` of a local-mode run) is adopted by whichever
    proxy locks it first, and replayed by that one only."""

    def __init__(self, db_path: Path, *, fsync: bool = False):
        super().__init__(db_path, fsync=fsync)
        self.legacy = self.path
        self.path = Path(f"{db_path}.spill.live-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl")
        self._live_fd: int | None = None
        self._locks: dict[str, int] = {}
        """Claimed files this process holds the lock of, by path."""

    def append(self, lines: Any) -> int:
        lines = list(lines)
        if lines:
            with self.lock:
                self._hold_live()
        return super().append(lines)

    def _hold_live(self) -> None:
        """Create (or re-create) the live file and hold its lock."""
        if self._live_fd is not None:
            try:
                if os.stat(self.path).st_ino == os.fstat(self._live_fd).st_ino:
                    return
            except FileNotFoundError:
                pass
            os.close(self._live_fd)
            self._live_fd = None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new name: nobody else has it
        self._live_fd = fd

    def claim(self) -> Path | None:
        with self.lock:
            if self._live_fd is None or not self.path.exists():
                return None
            target = self._replay_name()
            os.replace(self.path, target)
            self._locks[str(target)], self._live_fd = self._live_fd, None
            return target

    def claimed(self) -> list[Path]:
        self._adopt()
        return super().claimed()

    def _adopt(self) -> None:
        """Claim the live files no process holds (their proxy is gone)."""
        base = Path(self._stem)
        for path in [self.legacy, *base.parent.glob(f"{base.name}.live-*.jsonl")]:
            if path == self.path:
                continue
            fd = _lock_nowait(path)
            if fd is None:
                continue
            target = self._replay_name()
            try:
                os.replace(path, target)
            except OSError:
                os.close(fd)
                continue
            self._locks[str(target)] = fd

    @contextlib.contextmanager
    def replaying(self, path: Path) -> Iterator[bool]:
        """Hold `path`'s lock while it is replayed: True if this process may replay it (no
        other holds it, and it is still there)."""
        fd = self._locks.pop(str(path), None)
        if fd is None:
            fd = _lock_nowait(path)
        if fd is None:
            yield False
            return
        try:
            yield True
        finally:
            os.close(fd)

    def release(self) -> None:
        """Let go of every lock (the writer is closed): what is left is adopted next time."""
        with self.lock:
            live = [] if self._live_fd is None else [self._live_fd]
            for fd in [*self._locks.values(), *live]:
                os.close(fd)
            self._locks.clear()
            self._live_fd = None


def _lock_nowait(path: Path) -> int | None:
    """An fd of `path` holding its exclusive flock, or None (someone holds it, or it's gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not renamed meanwhile
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


# --- the writer ---------------------------------------------------------------------------------


class LakeSpendLog(SpendLog):
    """:class:`SpendLog` writing to the shared ledger instead of a file.

    The connection stays open between flushes (loading the extensions and attaching take
    ~1 s); it is dropped after an error and opened again at the next flush. Spill files are
    those of `spill_base` (general_settings.spend_db: local to the host)."""

    def __init__(
        self,
        ledger: SharedLedger,
        spill_base: str | os.PathLike[str],
        *,
        inline_rows: int = 100,
        maintenance_interval: float = 300.0,
        batch_size: int = 5000,
        **kwargs: Any,
    ):
        super().__init__(spill_base, batch_size=batch_size, **kwargs)
        self.ledger = ledger
        self.spill = SharedSpillFiles(self.path, fsync=kwargs.get("fsync", False))
        self.inline_rows = inline_rows
        self.maintenance_interval = maintenance_interval
        self._con: Any = None
        """The connection with the ledger attached, between flushes."""
        self._duck: Any = None
        """The same connection, also while the ledger is not attached (extensions loaded)."""
        self._skipped = False
        """A spill file was left to the proxy replaying it (look again next flush)."""
        self._next_maintenance = time.monotonic() + maintenance_interval * random.uniform(0.5, 1)
        self.stats["maintenance"] = 0

    def _run(self) -> None:
        # connect at once, not at the first row: rows recorded while the extensions load and
        # the ledger is attached (~1 s) wait in memory, where a SIGKILL would lose them
        with contextlib.suppress(_Busy):
            self._connect()
        super()._run()

    # -- where rows go ------------------------------------------------------------------------

    def _connect(self) -> duckdb.DuckDBPyConnection:
        if self._con is not None:
            return self._con
        for attempt in range(2):
            try:
                if self._duck is None:
                    self._duck = self.ledger.prepare(int(self.config.get("threads", 1)))
                self.ledger.attach(self._duck, inline_rows=self.inline_rows)
                ensure_lake_schema(self._duck)
                break
            except (duckdb.Error, OSError, extensions.ExtensionError) as e:
                # a connection PostgreSQL cut, or half attached, is never reused: a new one
                self._disconnect(close=True)
                if attempt == 0 and not self._stop.is_set():  # proxies creating it together
                    time.sleep(random.uniform(0.05, 0.3))
                    continue
                self._note_busy(e)
                raise _Busy(redact(str(e))) from None
        self._con = self._duck
        self._schema_ready = True
        return self._con

    def _ensure_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        ensure_lake_schema(con)

    def _checkpoint(self, con: duckdb.DuckDBPyConnection) -> None:
        """Now and then, move the inlined rows into one Parquet file and merge small files (not
        every flush: that is what inlining saves). A conflict with another proxy doing the same
        is no error: it is done by one of them."""
        if time.monotonic() < self._next_maintenance:
            return
        self._next_maintenance = time.monotonic() + self.maintenance_interval * random.uniform(
            0.8, 1.2
        )
        for step in MAINTENANCE:
            try:
                con.execute(step).fetchall()
            except duckdb.Error as e:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                log.info("spend: ledger maintenance deferred (%s)", redact(_first_line(e)))
                return
        self.stats["maintenance"] += 1

    def _release(self, con: duckdb.DuckDBPyConnection, ok: bool) -> None:
        if not ok:  # PostgreSQL went away, perhaps: a fresh connection next time
            self._disconnect()

    def _disconnect(self, close: bool = False) -> None:
        """Detach the ledger (attached again at the next flush); `close`: the connection too."""
        self._con = None
        if self._duck is None:
            return
        with contextlib.suppress(duckdb.Error):  # a failed statement leaves its transaction
            self._duck.execute("ROLLBACK")
        try:
            self.ledger.detach(self._duck)
            if not close:
                return
        except duckdb.Error:
            pass
        with contextlib.suppress(duckdb.Error):
            self._duck.close()
        self._duck = None

    # -- spill files shared with the other proxies of the host ---------------------------------

    def _replay(self, con: duckdb.DuckDBPyConnection) -> None:
        mine = dict(self._spill_mine)
        self._skipped = False
        super()._replay(con)
        self._replay_due = self._skipped
        # this run's rows in a file another proxy replayed (it held the file's lock): the file
        # is gone, its rows in the ledger (or set aside by that proxy)
        for path, n in mine.items():
            if path in self._spill_mine and path != str(self.spill.path):
                if not Path(path).exists():
                    del self._spill_mine[path]
                    self._account(spill=-n, db=n)
                else:
                    self._replay_due = True

    def _replay_one(self, con: duckdb.DuckDBPyConnection, path: Path) -> None:
        assert isinstance(self.spill, SharedSpillFiles)
        with self.spill.replaying(path) as mine:
            if mine:
                super()._replay_one(con, path)
            else:
                self._skipped = True

    # -- words ---------------------------------------------------------------------------------

    def _note_busy(self, error: Exception | None) -> None:
        self.stats["busy"] += 1
        self._note(
            "db",
            logging.WARNING,
            "spend: cannot write the shared ledger %s (%s); rows go to %s meanwhile",
            self.ledger.label,
            redact(_first_line(error)),
            self.spill.path,
        )

    def describe(self) -> str:
        return super().describe().replace(f" in {self.path},", f" in {self.ledger.label},", 1)

    def close(self, timeout: float = 10.0) -> bool:
        result = super().close(timeout)
        if not self._alive():
            self._disconnect(close=True)
            assert isinstance(self.spill, SharedSpillFiles)
            self.spill.release()
        return result

"""The shared spend log: one ledger for many proxies (``general_settings.database_url``).

What it is
    A DuckLake: its catalog is the PostgreSQL database of ``database_url`` (DuckLake's own
    tables in the schema ``mitmroute_spend``, nothing in ``public``), its data files are
    Parquet under ``general_settings.spend_data_path`` (a directory every proxy can reach).
    Every proxy's writer thread (:class:`LakeSpendLog`, the file writer's flush, spill and
    exactly-once logic with another place to write) appends its batches in transactions; any
    DuckDB of the pinned version reads it, with the same tables and views as the local file::

        ATTACH 'ducklake:postgres:postgresql://.../db' AS spend
            (METADATA_SCHEMA 'mitmroute_spend', READ_ONLY);
        SELECT * FROM spend.spend_daily_team;

Small batches
    A batch of up to ``inline_rows`` rows (default 100: each flush of a proxy serving fewer than
    ~110 requests/s) is stored in the catalog itself (DuckLake's data inlining: PostgreSQL rows,
    no Parquet file); a larger one (up to ``batch_size``, 5000) is one Parquet file. Every
    ``maintenance_interval`` (5 min, jittered) each proxy moves the inlined rows into one Parquet
    file and merges small files (``MAINTENANCE``; concurrent runs conflict and one wins).
    ``mitmroute spend --compact`` also expires old snapshots and deletes the files nothing needs;
    ``--expire AGE`` deletes older rows first.

Exactly once, with many writers
    Each row is written by the one proxy that served it, in one transaction with its
    attempts; a batch's ``request_id``s are looked up first (as in the file), so a replayed
    spill file or a commit reported failed that landed after all adds nothing. Spill files
    (beside ``spend_db``, local to the host) are per process and locked while it lives; one
    left by a proxy that died is adopted and replayed by one proxy of the host, under its
    lock, its marker committed with its rows.

What a crash costs
    A commit is one PostgreSQL transaction (the Parquet file, if any, is written before it):
    a SIGKILL loses the rows recorded in the last ``flush_interval`` plus the flush under way,
    as with the file, and never half a batch; the writer connects at start, so only a proxy
    killed in its first second (loading the extensions, attaching) loses more: the rows of that
    second. PostgreSQL unreachable: rows go to the spill file and are replayed once it answers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import duckdb

from mitmroute.spend import extensions, schema
from mitmroute.spend.writer import SpendLog, SpillFiles, _Busy, _first_line

log = logging.getLogger(__name__)

ALIAS = "spend"
MAINTENANCE = (
    f"CALL ducklake_flush_inlined_data('{ALIAS}')",
    f"CALL ducklake_merge_adjacent_files('{ALIAS}')",
)
"""What a writer does every maintenance_interval: inlined rows into Parquet, small files
merged. Old files are deleted by `mitmroute spend --compact` (readers may still need them)."""
METADATA_SCHEMA = "mitmroute_spend"
URL_SCHEMES = ("postgresql", "postgres")
CONNECT_TIMEOUT = 10


COMMIT_RETRIES = (
    "SET ducklake_max_retry_count = 40",
    "SET ducklake_retry_wait_ms = 20",
    "SET ducklake_retry_backoff = 1.15",
)
"""Commits of several proxies at once conflict on DuckLake's snapshot id and are retried:
(DuckLake's default, 10 retries from 100 ms by x1.5, gave up under 3 writers committing
back to back): ~20-60 ms a retry, giving up after ~40 s (then the rows are spilled)."""


class LedgerConfigError(ValueError):
    """`database_url` or `spend_data_path` can never work."""


@dataclass(frozen=True, slots=True)
class SharedLedger:
    """Where the shared ledger is: a PostgreSQL URL (the catalog) and a data directory."""

    database_url: str
    data_path: str

    @classmethod
    def parse(cls, database_url: str, data_path: str) -> SharedLedger:
        url = urlsplit(database_url)
        if url.scheme not in URL_SCHEMES or not url.path.strip("/"):
            raise LedgerConfigError(
                f"database_url: expected postgresql://[user[:password]@]host[:port]/dbname, "
                f"got {redact(database_url)!r}"
            )
        if "'" in database_url or "'" in data_path:
            raise LedgerConfigError("database_url, spend_data_path: a quote (') is not allowed")
        if "://" not in data_path:  # a local (or mounted) directory: absolute, as DuckLake
            data_path = str(Path(data_path).expanduser().resolve())  # stores it for everyone
        return cls(database_url, data_path)

    @property
    def label(self) -> str:
        """The URL without its password, for messages."""
        return redact(self.database_url)

    def attach(self, con: Any, *, read_only: bool = False, inline_rows: int = 0) -> None:
        """ATTACH the ledger as `spend` on `con` and make it the default catalog.

        A writer creates the ledger if it does not exist; a reader never does."""
        options = [f"METADATA_SCHEMA '{METADATA_SCHEMA}'"]
        if read_only:
            options.append("READ_ONLY")
        else:
            options.append(f"DATA_PATH '{self.data_path}'")
            options.append(f"DATA_INLINING_ROW_LIMIT {int(inline_rows)}")
        try:
            con.execute(
                f"ATTACH 'ducklake:postgres:{self._target}' AS {ALIAS} ({', '.join(options)})"
            )
        except duckdb.Error as e:
            raise type(e)(redact(str(e))) from None
        con.execute(f"USE {ALIAS}")

    @staticmethod
    def prepare(threads: int = 1) -> Any:
        """A DuckDB connection with the extensions loaded (~0.5 s), to attach the ledger to."""
        con = extensions.connect(threads=threads)
        for setting in COMMIT_RETRIES:
            con.execute(setting)
        return con

    def connect(self, *, read_only: bool = False, threads: int = 1, inline_rows: int = 0) -> Any:
        """A new DuckDB connection with the ledger attached (~0.5-1 s: keep it)."""
        con = self.prepare(threads)
        try:
            self.attach(con, read_only=read_only, inline_rows=inline_rows)
        except BaseException:
            con.close()
            raise
        return con

    @staticmethod
    def detach(con: Any) -> None:
        con.execute("USE memory")
        con.execute(f"DETACH DATABASE IF EXISTS {ALIAS}")

    @property
    def _target(self) -> str:
        """The URL as libpq gets it: with a connect timeout unless it names one (a host that
        drops packets would otherwise hold the writer thread for minutes)."""
        if "connect_timeout" in self.database_url:
            return self.database_url
        sep = "&" if "?" in self.database_url else "?"
        return f"{self.database_url}{sep}connect_timeout={CONNECT_TIMEOUT}"


def from_settings(general: Any) -> SharedLedger | None:
    """The shared ledger `general_settings` names (database_url), or None for the local file.
    Raises LedgerConfigError."""
    if not general.database_url:
        return None
    data_path = general.spend_data_path or str(
        Path(general.spend_db).expanduser().parent / "spend-data"
    )
    return SharedLedger.parse(general.database_url, data_path)


_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@|(password=)\S+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with any password of a PostgreSQL URL or conninfo replaced by ***."""
    return _PASSWORD.sub(lambda m: f"{m.group(1)}***@" if m.group(1) else f"{m.group(2)}***", text)


# --- the schema -----------------------------------------------------------------------------

# DuckLake has no PRIMARY KEY or UNIQUE: the writer's lookup keeps request_id unique, and
# spill_id is looked up before a replay is committed with it.
_META = "CREATE TABLE IF NOT EXISTS spend_meta (key VARCHAR, value VARCHAR)"
_SPILL_REPLAYS = (
    "CREATE TABLE IF NOT EXISTS spend_spill_replays "
    "(spill_id VARCHAR, replayed_at TIMESTAMPTZ DEFAULT now(), rows_replayed BIGINT)"
)
_TABLES = {"spend_log": schema.SPEND_LOG, "spend_attempts": schema.SPEND_ATTEMPTS}


def lake_ddl() -> list[str]:
    """The ledger's tables and views, as in the local file (columns and views of schema.py)."""
    stmts = [schema._create(name, cols) for name, cols in _TABLES.items()]
    stmts += [_META, _SPILL_REPLAYS]
    stmts += [f"CREATE OR REPLACE VIEW {n} AS {sql.strip()}" for n, sql in schema.VIEWS.items()]
    return stmts


def fingerprint() -> str:
    return hashlib.sha256("\n".join(lake_ddl()).encode()).hexdigest()[:16]


def _columns(con: Any, table: str) -> set[str]:
    rows = con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE database_name = ? AND table_name = ?",
        [ALIAS, table],
    ).fetchall()
    return {r[0] for r in rows}


def _current(con: Any, want: str) -> bool:
    try:
        row = con.execute("SELECT value FROM spend_meta WHERE key = 'schema'").fetchone()
    except duckdb.CatalogException:
        return False
    return bool(row and row[0] == want and all(_columns(con, t) for t in _TABLES))


def ensure_lake_schema(con: Any, attempts: int = 8) -> None:
    """Create the tables (adding columns a newer schema.py has) and the views, in one
    transaction; skipped when the ledger has this exact schema already (each change is a
    snapshot every proxy's next read must look at). Proxies starting together retry."""
    want = fingerprint()
    for attempt in range(attempts):
        if _current(con, want):
            return
        try:
            con.execute("BEGIN")
            for stmt in lake_ddl()[: len(_TABLES) + 2]:
                con.execute(stmt)
            for table, cols in _TABLES.items():
                have = _columns(con, table)
                for name, sql_type in cols:
                    if name not in have:
                        con.execute(f'ALTER TABLE {table} ADD COLUMN "{name}" {sql_type}')
            for stmt in lake_ddl()[len(_TABLES) + 2 :]:
                con.execute(stmt)
            con.execute("DELETE FROM spend_meta WHERE key IN ('schema', 'schema_version')")
            con.execute(
                "INSERT INTO spend_meta VALUES ('schema', ?), ('schema_version', ?)",
                [want, str(schema.SCHEMA_VERSION)],
            )
            con.execute("COMMIT")
            return
        except duckdb.Error:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.05, 0.3))  # another proxy is creating it: look again


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
            target = Path(f"{self._stem}.{uuid.uuid4().hex}.jsonl")
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
            target = Path(f"{self._stem}.{uuid.uuid4().hex}.jsonl")
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
        try:
            if self._duck is None:
                self._duck = self.ledger.prepare(int(self.config.get("threads", 1)))
        except (duckdb.Error, OSError, extensions.ExtensionError) as e:
            self._note_busy(e)
            raise _Busy(redact(str(e))) from None
        for attempt in range(2):
            try:
                self.ledger.attach(self._duck, inline_rows=self.inline_rows)
                try:
                    ensure_lake_schema(self._duck)
                except BaseException:
                    self.ledger.detach(self._duck)
                    raise
                break
            except (duckdb.Error, OSError) as e:  # once more: proxies creating it together
                if attempt == 0 and not self._stop.is_set():
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


# --- reading and retention ------------------------------------------------------------------


def connect_readonly(ledger: SharedLedger, threads: int = 2) -> Any:
    """The ledger for reading (`mitmroute spend`); LedgerConfigError if there is none yet."""
    try:
        return ledger.connect(read_only=True, threads=threads)
    except duckdb.Error as e:
        text = str(e)
        if "does not exist" in text and "creating a new DuckLake" in text:
            raise LedgerConfigError(
                f"no spend ledger in {ledger.label} yet (a proxy creates it at its first flush)"
            ) from None
        raise


def compact(con: Any, keep_snapshots: str = "1 day") -> dict[str, Any]:
    """Inlined rows into Parquet, small files merged, snapshots older than `keep_snapshots`
    expired and the files no snapshot needs deleted. Safe while proxies write."""
    steps = {
        "flush_inlined": f"CALL ducklake_flush_inlined_data('{ALIAS}')",
        "rewrite_deleted": f"CALL ducklake_rewrite_data_files('{ALIAS}')",
        "merge_files": f"CALL ducklake_merge_adjacent_files('{ALIAS}')",
        "expire_snapshots": (
            f"CALL ducklake_expire_snapshots('{ALIAS}', "
            f"older_than => now() - INTERVAL '{keep_snapshots}')"
        ),
        "cleanup_files": f"CALL ducklake_cleanup_old_files('{ALIAS}', cleanup_all => true)",
    }
    done: dict[str, Any] = {}
    for name, sql in steps.items():
        done[name] = len(con.execute(sql).fetchall())
    return done

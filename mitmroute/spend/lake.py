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
    (Of the writer's process: the spend sidecar, mitmroute.spend.sidecar, which outlives a
    SIGKILLed proxy long enough to commit the rows it got.)
    A commit is one PostgreSQL transaction (the Parquet file, if any, is written before it):
    a SIGKILL loses the rows recorded in the last ``flush_interval`` plus the flush under way,
    as with the file, and never half a batch; the writer connects at start, so only a proxy
    killed in its first second (loading the extensions, attaching) loses more: the rows of that
    second. PostgreSQL unreachable: rows go to the spill file and are replayed once it answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mitmroute.spend import extensions, schema

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


def __getattr__(name: str) -> Any:
    """The writer (lake_writer.py) on first use: it imports DuckDB, which the proxy process
    never loads (only the spend sidecar does)."""
    if name in ("LakeSpendLog", "SharedSpillFiles"):
        from mitmroute.spend import lake_writer

        return getattr(lake_writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        import duckdb

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
    import duckdb

    try:
        row = con.execute("SELECT value FROM spend_meta WHERE key = 'schema'").fetchone()
    except duckdb.CatalogException:
        return False
    return bool(row and row[0] == want and all(_columns(con, t) for t in _TABLES))


def ensure_lake_schema(con: Any, attempts: int = 8) -> None:
    """Create the tables (adding columns a newer schema.py has) and the views, in one
    transaction; skipped when the ledger has this exact schema already (each change is a
    snapshot every proxy's next read must look at). Proxies starting together retry."""
    import duckdb

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


# --- reading and retention ------------------------------------------------------------------


def connect_readonly(ledger: SharedLedger, threads: int = 2) -> Any:
    """The ledger for reading (`mitmroute spend`); LedgerConfigError if there is none yet."""
    import duckdb

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

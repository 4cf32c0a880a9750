"""The spend log writer: one background thread batches Exchanges into a DuckDB file.

Why the file is not kept open
    DuckDB lets one process open a file read-write, or any number read-only, never both. So
    that ``duckdb -readonly spend.duckdb`` (or ``scripts/spend.py``, or
    ``duckdb.connect(path, read_only=True)``) works while the proxy runs, the writer opens the
    file only for a flush: open, insert the batch (one transaction per ``batch_size`` rows),
    CHECKPOINT (so no WAL is left for readers), close. A reader that holds the file only makes
    that open fail: the writer retries once after ``retry_delay`` and then appends the rows to
    ``<db>.spill.jsonl`` beside the file. The next successful open replays every spill file
    (exactly once: the file is renamed to ``<db>.spill.<id>.jsonl`` first and the id is
    committed with its rows in ``spend_spill_replays``) and deletes it. Spilling at once,
    rather than buffering until the reader lets go, keeps the crash window below the same
    whatever readers do. ``close()`` instead keeps retrying a busy file until its deadline
    (holding at most ``max_buffer`` rows in memory meanwhile) and then spills, so a clean
    shutdown never loses a row. Rows DuckDB refuses (a value that does not fit a column) go to
    ``<db>.rejected.jsonl`` with the error, never silently away.

    Cost per flush (2 cores, 200k-row file): open ~15 ms, insert ~3 ms + ~30 us/row,
    CHECKPOINT ~6-13 ms, close ~4 ms; sustained ~15-24k rows/s. ``record()`` ~1 us.

What a crash can lose
    ``record()`` only appends to an in-memory queue; the thread writes it out within
    ``flush_interval`` (+ the flush itself, + ``retry_delay`` when the file is busy). SIGINT and
    SIGTERM go through the addon's ``done`` hook, which calls ``close()``: nothing is lost.
    SIGKILL (or a hard crash) loses the rows recorded in the last ``flush_interval`` + one flush
    duration (default about 0.9-1.0 s) and nothing older: committed batches are durable in
    DuckDB's WAL, and spilled rows are on disk (not fsynced unless ``fsync=True``: a power cut,
    unlike a process kill, may lose the last spill writes).

Only one proxy process may write a given file; readers may be as many as you like, but each
reader that holds the file for long makes the writer spill until it lets go. A reader that
tries to open the file during the few ms of a flush gets "Could not set lock": retry
(``scripts/spend.py`` does), e.g. ``until duckdb -readonly spend.duckdb -c "..."; do sleep
0.1; done``. Inside the proxy process itself, do not ``duckdb.connect`` the file (DuckDB refuses
a second configuration of an open file): use :meth:`SpendLog.query`.

New files are created in DuckDB's v1.1 storage format (``storage_version``), so the DuckDB
CLI 1.x (``pip install duckdb-cli``) can read them as well as DuckDB 2.x; a file DuckDB 2.x
creates by default would only open in 2.x.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from mitmroute.spend import schema

if TYPE_CHECKING:
    from mitmroute.config import Deployment
    from mitmroute.exchange import Exchange
    from mitmroute.spend.pricing import PriceBook

log = logging.getLogger(__name__)

Row = tuple[Any, ...] | list[Any]
Line = tuple[Row, tuple[Row, ...] | list[Row]]
"""One Exchange as rows: its spend_log row and its spend_attempts rows. Tuples of atoms, which
the garbage collector stops tracking, so a burst of rows adds no GC pauses to the proxy."""

_TEN_PLACES = Decimal("1e-10")


# --- Exchange -> rows (JSON-safe lists) ---------------------------------------------------------


def _ts(value: datetime | None) -> str | None:
    """ISO 8601 in UTC; naive datetimes are taken as UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def _money(value: Decimal | None) -> str | None:
    """Decimal -> text with at most 10 places (banker's rounding), as DECIMAL(18,10) stores it."""
    if value is None:
        return None
    try:
        d = Decimal(value)
        if not d.is_finite():
            return None
        return format(d.quantize(_TEN_PLACES, rounding=ROUND_HALF_EVEN), "f")
    except (InvalidOperation, TypeError, ValueError):
        return None


def _float(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class RowBuilder:
    """Turns an Exchange into spend_log / spend_attempts rows (runs on the writer thread).

    With a PriceBook, a row whose `cost_usd` (or, for a cache hit, `saved_usd`) is None gets
    it computed here, off the event loop; deployments are matched by (litellm model, api_base).
    """

    def __init__(self, prices: PriceBook | None = None, deployments: Iterable[Deployment] = ()):
        self.prices = prices
        self.deployments = {(d.litellm_model, d.api_base): d for d in deployments}

    def _price(self, ex: Exchange) -> Decimal | None:
        if self.prices is None or ex.usage is None:
            return None
        dep = self.deployments.get((ex.deployment or "", ex.api_base or ""))
        model = (ex.deployment or ex.requested_model or "").split("/", 1)[-1]
        provider = ex.provider or (dep.provider if dep else "")
        return self.prices.cost(provider, dep.model if dep else model, ex.usage, dep)

    def build(self, ex: Exchange) -> Line:
        u = ex.usage
        cost, saved = ex.cost_usd, ex.saved_usd
        if ex.cache_hit and saved is None and self.prices is not None:
            saved = self._price(ex)
        elif not ex.cache_hit and cost is None and self.prices is not None:
            cost = self._price(ex)
        metadata = (
            json.dumps(ex.metadata, default=str, separators=(",", ":")) if ex.metadata else None
        )
        row: Row = (
            ex.request_id,
            _ts(ex.started_at),
            _ts(ex.ended_at),
            _float(ex.latency_ms),
            _float(ex.ttft_ms),
            ex.endpoint,
            bool(ex.stream),
            ex.api_key_hash,
            ex.key_alias,
            ex.team,
            ex.user,
            ex.requested_model,
            ex.model_group,
            ex.deployment,
            ex.provider,
            ex.api_base,
            ex.status_code,
            ex.error_type,
            bool(ex.cache_hit),
            len(ex.attempts),
            bool(ex.fallback_used),
            u.prompt_tokens if u else None,
            u.completion_tokens if u else None,
            u.cached_tokens if u else None,
            u.cache_creation_tokens if u else None,
            u.reasoning_tokens if u else None,
            u.total_tokens if u else None,
            u.source if u else None,
            _money(cost),
            _money(saved),
            tuple(str(t) for t in ex.tags),
            metadata,
        )
        attempts = tuple(
            (
                ex.request_id,
                a.attempt,
                a.deployment,
                a.api_base,
                a.status_code,
                a.error_type,
                _float(a.latency_ms),
                _ts(a.started_at),
            )
            for a in ex.attempts
        )
        return row, attempts


def columnar_json(rows: list[Row], columns: tuple[tuple[str, str], ...]) -> str:
    """`{"col": [..], ..}` for schema.insert_sql (one json.dumps per column: short GIL slices)."""
    parts = []
    for i, (name, _) in enumerate(columns):
        values = json.dumps([r[i] for r in rows], separators=(",", ":"))
        parts.append(f"{json.dumps(name)}:{values}")
    return "{" + ",".join(parts) + "}"


# --- spill files --------------------------------------------------------------------------------


class SpillFiles:
    """`<db>.spill.jsonl` (appended while the db is busy) and its claimed replay copies."""

    def __init__(self, db_path: Path, *, fsync: bool = False):
        self.path = Path(f"{db_path}.spill.jsonl")
        self.rejected = Path(f"{db_path}.rejected.jsonl")
        self._stem = f"{db_path}.spill"
        self.fsync = fsync
        self.lock = threading.Lock()

    def append(self, lines: Iterable[Line]) -> int:
        """Append rows (one JSON line per Exchange); returns how many."""
        text = "".join(json.dumps([row, att], separators=(",", ":")) + "\n" for row, att in lines)
        if not text:
            return 0
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        return text.count("\n")

    def reject(self, line: Line, error: str) -> None:
        """Set aside a row DuckDB refused, with the reason."""
        entry = {"error": error, "row": line[0], "attempts": line[1]}
        with self.lock, open(self.rejected, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")

    def claimed(self) -> list[Path]:
        """Replay files (`<db>.spill.<32 hex>.jsonl`), oldest first."""
        base = Path(self._stem)
        found = []
        for p in base.parent.glob(base.name + ".*.jsonl"):
            middle = p.name[len(base.name) + 1 : -len(".jsonl")]
            if len(middle) == 32 and all(c in "0123456789abcdef" for c in middle):
                found.append(p)
        return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))

    def pending(self) -> bool:
        """Anything to replay?"""
        return self.path.exists() or bool(self.claimed())

    def claim(self) -> list[Path]:
        """Rename the live spill file to a unique replay name; return all replay files."""
        with self.lock:
            if self.path.exists():
                os.replace(self.path, f"{self._stem}.{uuid.uuid4().hex}.jsonl")
        return self.claimed()

    @staticmethod
    def spill_id(path: Path) -> str:
        return path.name[: -len(".jsonl")].rsplit(".", 1)[-1]

    @staticmethod
    def read(path: Path) -> Iterator[Line]:
        """The lines of a spill file; a torn last line (killed mid-write) is skipped."""
        with open(path, encoding="utf-8") as f:
            for n, text in enumerate(f, 1):
                try:
                    row, attempts = json.loads(text)
                except (ValueError, TypeError):
                    log.warning("spend: %s:%d: unreadable spill line skipped", path, n)
                    continue
                yield row, attempts


# --- the writer ---------------------------------------------------------------------------------


class _Busy(Exception):
    """The db file could not be opened for writing (held by a reader, or unwritable)."""


class SpendLog:
    """Persists Exchanges to DuckDB from one background thread; `record()` never blocks."""

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        *,
        flush_interval: float = 0.9,
        batch_size: int = 1000,
        max_buffer: int = 100_000,
        retry_delay: float = 0.1,
        prices: PriceBook | None = None,
        deployments: Iterable[Deployment] = (),
        fsync: bool = False,
        threads: int = 1,
        storage_version: str | None = "v1.1.0",
    ):
        self.path = Path(db_path)
        self.flush_interval = flush_interval
        self.batch_size = max(1, batch_size)
        self.max_buffer = max_buffer
        self.retry_delay = retry_delay
        self.config: dict[str, Any] = {"threads": threads}
        if storage_version:
            self.config["storage_compatibility_version"] = storage_version
        self.rows = RowBuilder(prices, deployments)
        self.spill = SpillFiles(self.path, fsync=fsync)
        self._lock = threading.Lock()
        self._queue: deque[tuple[int, Exchange]] = deque()
        self._seq = 0
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._pending: list[tuple[int, Line]] = []
        self._handled = 0
        """Highest seq that is in the db, in a spill file, or rejected."""
        self._flushed = (0, 0)
        """(`_handled`, `_unreplayed`) as of the end of the last flush (the file closed again)."""
        self._unreplayed = 0
        """Rows this process spilled that are not yet back in the db."""
        self._queries: deque[tuple[str, Any, Future[list[tuple[Any, ...]]]]] = deque()
        self._waiters = 0
        self._schema_ready = False
        self._replay_due = False
        self._busy_since: float | None = None
        self._last_busy_log = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._deadline = math.inf
        self._closed = False
        self._close_result = True
        self.stats: dict[str, Any] = {
            "recorded": 0, "written": 0, "spilled": 0, "replayed": 0, "rejected": 0,
            "flushes": 0, "busy": 0, "last_flush": {},
        }  # fmt: skip

    # -- API called from the proxy ------------------------------------------------------------

    def start(self) -> SpendLog:
        """Start the writer thread (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return self
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                log.warning("spend: cannot create %s: %s", self.path.parent, e)
            self._thread = threading.Thread(target=self._run, name="spend-log", daemon=True)
            self._thread.start()
        # Safety net if the owner never calls close(): flush at interpreter exit.
        ref = weakref.ref(self)
        atexit.register(lambda: (lambda s: s is not None and s.close(5.0))(ref()))
        return self

    def record(self, exchange: Exchange) -> None:
        """Queue one finished Exchange (O(1), never blocks; do not mutate it afterwards)."""
        with self._lock:
            if not self._closed:
                self._seq += 1
                self._queue.append((self._seq, exchange))
                n = len(self._queue)
                closed = False
            else:
                closed = True
        if closed:
            self._record_after_close(exchange)
        elif n >= self.batch_size:
            self._wake.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until every Exchange recorded before this call is in the db; False on timeout."""
        self.start()
        with self._lock:
            target = self._seq
        deadline = time.monotonic() + timeout
        with self._progress:
            self._waiters += 1
            try:
                self._wake.set()
                while not self._done(target):
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._alive():
                        return self._done(target)
                    self._progress.wait(min(left, 0.05))
                return True
            finally:
                self._waiters -= 1

    def close(self, timeout: float = 10.0) -> bool:
        """Flush everything and stop the thread. True if all rows reached the db; rows that could
        not (file held by a reader until the deadline) are in the spill file for the next run."""
        if self._closed:
            return self._close_result
        self.start()
        margin = min(1.0, timeout * 0.2)
        self._deadline = time.monotonic() + max(0.0, timeout - margin)
        self._stop.set()
        self._wake.set()
        assert self._thread is not None
        self._thread.join(timeout)
        with self._lock:
            self._closed = True
            leftovers = list(self._queue)
            self._queue.clear()
        if self._thread.is_alive():
            log.error("spend: writer thread did not stop within %.1fs", timeout)
            if leftovers:  # the thread no longer looks at the queue: keep these on disk
                self.spill.append([self.rows.build(ex) for _, ex in leftovers])
            self._close_result = False
            return False
        if leftovers:  # recorded between the thread's last drain and _closed
            self._pending.extend((seq, self.rows.build(ex)) for seq, ex in leftovers)
            self._spill_pending()
        self._close_result = self._unreplayed == 0 and not self._pending
        self._notify()
        return self._close_result

    def query(self, sql: str, params: Any = None, timeout: float = 10.0) -> list[tuple[Any, ...]]:
        """Run a read query in the writer's own connection, after every row recorded before the
        call is written (for in-process readers, which cannot open the file themselves while
        this process writes). Blocking: call it off the event loop."""
        self.start()
        fut: Future[list[tuple[Any, ...]]] = Future()
        self._queries.append((sql, params, fut))
        self._wake.set()
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    # -- writer thread --------------------------------------------------------------------------

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _done(self, target: int) -> bool:
        handled, unreplayed = self._flushed
        return handled >= target and unreplayed == 0

    def _notify(self) -> None:
        """End of a flush (the file is closed): publish progress and wake flush() callers."""
        with self._progress:
            self._flushed = (self._handled, self._unreplayed)
            self._progress.notify_all()

    def _run(self) -> None:
        failed = False
        self._replay_due = self.spill.pending()
        while True:
            # flush()/close()/query() waiting: go now (or soon after a busy file); else batch.
            urgent = bool(self._waiters or self._queries or self._stop.is_set())
            ready = bool(self._queue or self._pending or self._queries)
            if urgent and ready and not failed:
                timeout = 0.0
            else:
                timeout = self.retry_delay if urgent else self.flush_interval
            if timeout:
                self._wake.wait(timeout)
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                failed = not self._cycle(stopping)
            except Exception:
                log.exception("spend: unexpected error in the writer thread")
                failed = True
            self._notify()
            if stopping:
                idle = not self._queue and not self._pending and self._unreplayed == 0
                if idle or time.monotonic() >= self._deadline:
                    self._drain()
                    if self._pending:
                        self._spill_pending()
                    self._notify()
                    return

    def _drain(self, limit: int | None = None) -> None:
        """Move up to `limit` queued Exchanges into the pending rows (converting them here)."""
        with self._lock:
            if not self._queue:
                return
            if limit is None or limit >= len(self._queue):
                items = list(self._queue)
                self._queue.clear()
            else:
                items = [self._queue.popleft() for _ in range(limit)]
        self.stats["recorded"] += len(items)
        for seq, ex in items:
            try:
                self._pending.append((seq, self.rows.build(ex)))
            except Exception as e:
                log.exception("spend: cannot convert exchange %s", getattr(ex, "request_id", "?"))
                self.spill.reject(([getattr(ex, "request_id", None)], []), repr(e))
                self._handled = max(self._handled, seq)

    def _cycle(self, stopping: bool) -> bool:
        """One flush: False if the file could not be opened."""
        if not self._queue and not self._pending and not self._queries and not self._replay_due:
            self._replay_due = self.spill.path.exists()
            if not self._replay_due:
                return True
        t0 = time.perf_counter()
        try:
            con = self._connect()
        except _Busy:
            self._drain()
            if stopping:
                self._fail_queries()
            # Closing: keep retrying until the deadline (then _run spills). Otherwise spill now,
            # so that a SIGKILL while a reader holds the file loses no more than usual.
            if self._pending and (not stopping or len(self._pending) > self.max_buffer):
                self._spill_pending()
            return False
        t1 = time.perf_counter()
        timing: dict[str, float] = {"open_ms": (t1 - t0) * 1000}
        try:
            self._replay(con)
            rows = self._insert_pending(con)
            t2 = time.perf_counter()
            self._run_queries(con)
            con.execute("CHECKPOINT")
            t3 = time.perf_counter()
            timing.update(insert_ms=(t2 - t1) * 1000, checkpoint_ms=(t3 - t2) * 1000, rows=rows)
        except duckdb.Error as e:
            log.warning("spend: flush to %s failed: %s", self.path, e)
            if self._pending:
                self._spill_pending()
        finally:
            t4 = time.perf_counter()
            con.close()
            timing["close_ms"] = (time.perf_counter() - t4) * 1000
            timing["total_ms"] = (time.perf_counter() - t0) * 1000
            self.stats["flushes"] += 1
            self.stats["last_flush"] = timing
        return True

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """Open the file read-write (one retry after retry_delay); raise _Busy if impossible."""
        error: Exception | None = None
        for attempt in range(2):
            try:
                con = duckdb.connect(str(self.path), config=self.config)
                break
            except (duckdb.Error, OSError) as e:
                error = e
                if attempt == 0:
                    time.sleep(self.retry_delay)
        else:
            self._note_busy(error)
            raise _Busy(str(error))
        if self._busy_since is not None:
            log.info("spend: %s is writable again", self.path)
            self._busy_since = None
        try:
            if not self._schema_ready:
                schema.ensure_schema(con)
                self._schema_ready = True
        except duckdb.Error as e:  # e.g. a read-only file system: treat like a busy file
            con.close()
            self._note_busy(e)
            raise _Busy(str(e)) from e
        return con

    def _note_busy(self, error: Exception | None) -> None:
        self.stats["busy"] += 1
        now = time.monotonic()
        if self._busy_since is None:
            self._busy_since = now
        if now - self._last_busy_log < 60:
            return
        self._last_busy_log = now
        text = str(error).splitlines()[0] if error else "?"
        held = "lock" in text.lower()
        log.log(
            logging.INFO if held else logging.WARNING,
            "spend: %s %s; rows go to %s until it can be written (%s)",
            self.path,
            "is held by another process" if held else "cannot be opened",
            self.spill.path,
            text,
        )

    def _exec_batch(self, con: duckdb.DuckDBPyConnection, lines: list[Line]) -> None:
        """Insert rows and their attempts (no transaction handling)."""
        con.execute(_LOG_SQL, [columnar_json([r for r, _ in lines], schema.SPEND_LOG)])
        attempts = [a for _, atts in lines for a in atts]
        if attempts:
            con.execute(_ATTEMPTS_SQL, [columnar_json(attempts, schema.SPEND_ATTEMPTS)])

    def _insert_lines(
        self, con: duckdb.DuckDBPyConnection, lines: list[Line], *, retried: bool = False
    ) -> int:
        """Insert in one transaction; on a data error, row by row with rejects set aside."""
        try:
            con.execute("BEGIN")
            self._exec_batch(con, lines)
            con.execute("COMMIT")
            return len(lines)
        except duckdb.CatalogException:
            _rollback(con)
            if retried:
                raise
            schema.ensure_schema(con)  # the file was replaced under us
            return self._insert_lines(con, lines, retried=True)
        except _DATA_ERRORS as e:
            con.execute("ROLLBACK")
            if len(lines) == 1:
                self._reject(lines[0], e)
                return 0
            return sum(self._insert_lines(con, [line]) for line in lines)
        except duckdb.Error:
            _rollback(con)
            raise

    def _reject(self, line: Line, error: Exception) -> None:
        log.error("spend: row %s rejected (kept in %s): %s", line[0][0], self.spill.rejected, error)
        self.spill.reject(line, str(error))
        self.stats["rejected"] += 1

    def _insert_pending(self, con: duckdb.DuckDBPyConnection) -> int:
        """Insert what is pending or queued now, batch by batch (later arrivals wait: the file
        must be closed again soon for readers)."""
        total = 0
        budget = len(self._pending) + len(self._queue)
        while total < budget:
            if len(self._pending) < self.batch_size:
                self._drain(self.batch_size - len(self._pending))
            if not self._pending:
                break
            chunk = self._pending[: self.batch_size]
            self.stats["written"] += self._insert_lines(con, [line for _, line in chunk])
            del self._pending[: len(chunk)]
            self._handled = max(self._handled, chunk[-1][0])
            total += len(chunk)
        return total

    def _replay(self, con: duckdb.DuckDBPyConnection) -> None:
        """Move every spill file into the db, each exactly once."""
        if not self._replay_due and not self.spill.path.exists():
            return
        for path in self.spill.claim():
            spill_id = self.spill.spill_id(path)
            seen = con.execute(
                "SELECT count(*) FROM spend_spill_replays WHERE spill_id = ?", [spill_id]
            ).fetchone()
            if not (seen and seen[0]):
                try:
                    self._replay_file(con, path, spill_id, self.spill.read(path))
                except _DATA_ERRORS:
                    _rollback(con)
                    self._replay_file(con, path, spill_id, iter(self._good_lines(con, path)))
            path.unlink(missing_ok=True)
        self._replay_due = False
        self._unreplayed = 0

    def _replay_file(
        self, con: duckdb.DuckDBPyConnection, path: Path, spill_id: str, lines: Iterator[Line]
    ) -> None:
        """All of one spill file and its replay marker in one transaction, read in batches."""
        total = 0
        con.execute("BEGIN")
        try:
            while chunk := list(itertools.islice(lines, self.batch_size)):
                self._exec_batch(con, chunk)
                total += len(chunk)
            con.execute(
                "INSERT INTO spend_spill_replays (spill_id, rows_replayed) VALUES (?, ?)",
                [spill_id, total],
            )
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
        self.stats["replayed"] += total
        log.info("spend: replayed %d spilled rows from %s", total, path.name)

    def _good_lines(self, con: duckdb.DuckDBPyConnection, path: Path) -> list[Line]:
        """The lines of a spill file DuckDB accepts (each tried and rolled back); rejects aside."""
        good = []
        for line in self.spill.read(path):
            con.execute("BEGIN")
            try:
                self._exec_batch(con, [line])
                good.append(line)
            except _DATA_ERRORS as e:
                self._reject(line, e)
            finally:
                _rollback(con)
        return good

    def _spill_pending(self) -> None:
        """Append every pending row to the spill file (kept in memory if that fails)."""
        if not self._pending:
            return
        try:
            n = self.spill.append(line for _, line in self._pending)
        except OSError as e:
            log.error("spend: cannot write %s (%s); %d rows kept in memory", self.spill.path, e,
                      len(self._pending))  # fmt: skip
            return
        self._handled = max(self._handled, self._pending[-1][0])
        self._pending = []
        self._unreplayed += n
        self._replay_due = True
        self.stats["spilled"] += n

    def _run_queries(self, con: duckdb.DuckDBPyConnection) -> None:
        while self._queries:
            sql, params, fut = self._queries.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(con.execute(sql, params).fetchall())
            except Exception as e:
                fut.set_exception(e)

    def _fail_queries(self) -> None:
        while self._queries:
            _, _, fut = self._queries.popleft()
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError(f"{self.path} is busy and the spend log is closing"))

    def _record_after_close(self, exchange: Exchange) -> None:
        log.warning("spend: record() after close(); row %s goes to %s", exchange.request_id,
                    self.spill.path)  # fmt: skip
        try:
            self.spill.append([self.rows.build(exchange)])
        except OSError as e:
            log.error("spend: row %s lost: %s", exchange.request_id, e)


_LOG_SQL = schema.insert_sql("spend_log", schema.SPEND_LOG)
_ATTEMPTS_SQL = schema.insert_sql("spend_attempts", schema.SPEND_ATTEMPTS)
_DATA_ERRORS = (
    duckdb.ConversionException,
    duckdb.InvalidInputException,
    duckdb.ConstraintException,
    duckdb.OutOfRangeException,
    duckdb.TypeMismatchException,
)


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(duckdb.Error):
        con.execute("ROLLBACK")

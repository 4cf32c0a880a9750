"""The spend log writer: one background thread batches Exchanges into a DuckDB file.

Why the file is not kept open
    DuckDB lets one process open a file read-write, or any number read-only, never both. So
    that ``duckdb -readonly spend.duckdb`` (or ``scripts/spend.py``, or
    ``duckdb.connect(path, read_only=True)``) works while the proxy runs, the writer opens the
    file only for a flush: open, insert the batch (one transaction per ``batch_size`` rows),
    CHECKPOINT (so no WAL is left for readers), close. A reader that holds the file only makes
    that open fail: the writer retries once after ``retry_delay`` and then appends the rows to
    ``<db>.spill.jsonl`` beside the file. The next successful open replays every spill file
    (the file is renamed to ``<db>.spill.<id>.jsonl`` first and the id is committed with its
    rows in ``spend_spill_replays``) and deletes it. Spilling at once, rather than buffering
    until the reader lets go, keeps the crash window below the same whatever readers do.
    ``close()`` instead keeps retrying a busy file until its deadline and then spills, so a
    clean shutdown never loses a row. Rows DuckDB refuses (a value that does not fit a column)
    go to ``<db>.rejected.jsonl`` with the error, never silently away.

    Cost per flush (2 cores, 200k-row file): open ~15 ms, insert ~3 ms + ~30 us/row (of which
    the duplicate check below ~2 ms + ~4 us/row), CHECKPOINT ~6-13 ms, close ~4 ms; sustained
    ~15-24k rows/s.
    ``record()`` ~1 us.

Exactly once
    A ``request_id`` is stored once in ``spend_log``: before a batch goes in, the ids of the
    batch already in the table are looked up and those rows (and their attempts) are skipped
    (``stats["duplicates"]``). The lookup is bounded by the batch's ``started_at`` range, so it
    reads only the row groups of that range, whatever the size of the table (4-12 ms per 1000
    rows from 200k to 3M rows). A spill file replayed twice, a commit reported failed that
    landed after all, a line written twice: each row ends up in the table once. A UNIQUE index
    would say the same in DuckDB itself, but DuckDB loads it on every open and rewrites it on
    every checkpoint: at 1M rows a flush took ~450 ms instead of ~30 ms, and the file was 4.5x
    larger. So files of any age need no migration; rows doubled by older versions stay as they
    were (``SELECT request_id FROM spend_log GROUP BY 1 HAVING count(*) > 1`` finds them).

When nothing can be written: a full disk, a read-only directory
    Rows the db cannot take go to the spill file; rows the spill file cannot take either stay in
    memory and are written by the first flush that succeeds once space comes back (one attempt
    every ``flush_interval``). A failed append is cut back to where it started: no empty spill
    file, no half line; a new db file is created under a temporary name and moved into place
    once complete (a disk that fills during DuckDB's creation of a file leaves one it can never
    open again). Rows held in memory (queued or pending) are capped by ``max_buffer``
    (``general_settings.spend_buffer_rows``, default 100,000 rows, ~1.3 KB each). At the cap,
    ``on_full`` decides (``general_settings.spend_on_buffer_full``): ``"refuse"`` keeps every
    row, and the proxy answers new requests 503 while ``accepting()`` is False, so only the
    requests already in flight still add rows (the cap is exceeded by at most their number);
    ``"drop"`` drops new rows and counts them (``stats["dropped"]``, ``on_drop``). The trouble
    is logged at most once per ``log_interval`` for each kind (file held, db unwritable, rows
    held in memory, buffer full), with the true count of rows held; recovery once.

What a crash can lose
    (Of the process the writer runs in. The proxy runs it in a child process of its own,
    mitmroute.spend.sidecar: a SIGKILLed proxy closes the child's pipe, and the child writes
    every row it got before it exits; what is lost then is what the proxy had not handed over,
    the rows of the last ~50 ms. Both killed at once lose no more: the child journals what it
    receives before holding it, mitmroute.spend.journal.)
    ``record()`` only appends to an in-memory queue; the thread writes it out within
    ``flush_interval`` (+ the flush itself, + ``retry_delay`` when the file is busy). SIGINT and
    SIGTERM go through the addon's ``done`` hook, which calls ``close()``: nothing is lost,
    except rows that neither the db nor the spill file could take until close's deadline; those
    are counted as lost, and ``summary()`` says where every row of the run went (db, spill
    file, rejected, lost). SIGKILL (or a hard crash) loses the rows recorded in the last
    ``flush_interval`` + one flush duration (default about 0.9-1.0 s) and the rows held in
    memory for want of space, nothing older: committed batches are durable in DuckDB's WAL, and
    spilled rows are on disk (not fsynced unless ``fsync=True``: a power cut, unlike a process
    kill, may lose the last spill writes). A kill in the middle of an append leaves a torn last
    line: the next append starts on a new line, and replay sets every line it cannot read aside
    in ``<db>.rejected.jsonl`` and goes on.

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
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from mitmroute.spend import schema
from mitmroute.spend.rows import (  # noqa: F401  re-exported
    _ATTEMPT_WIDTH,
    _LOG_WIDTH,
    _TEN_PLACES,
    ON_FULL,
    Line,
    Row,
    RowBuilder,
    SpendDbError,
    SpillFiles,
    Troubles,
    _append,
    _float,
    _money,
    _parse,
    _ts,
    check_writable,
    columnar_json,
)

if TYPE_CHECKING:
    from mitmroute.exchange import Exchange

log = logging.getLogger(__name__)


_COUNTERS = (
    "written",
    "spilled",
    "replayed",
    "duplicates",
    "rejected",
    "dropped",
    "lost",
    "refused",
    "flushes",
    "busy",
    "failures",
)


class _Built:
    """A row built already, queued like an Exchange (see `SpendLog.record_line`)."""

    __slots__ = ("line",)

    def __init__(self, line: Line):
        self.line = line

    @property
    def request_id(self) -> Any:
        return self.line[0][0]


class _Busy(Exception):
    """The db file could not be opened for writing (held by a reader, or unwritable)."""


class SpendLog(Troubles):
    """Persists Exchanges to DuckDB from one background thread; `record()` never blocks."""

    logger = log

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        *,
        flush_interval: float = 0.9,
        batch_size: int = 1000,
        max_buffer: int = 100_000,
        on_full: str = "refuse",
        on_drop: Callable[[int], None] | None = None,
        retry_delay: float = 0.1,
        log_interval: float = 60.0,
        fsync: bool = False,
        threads: int = 1,
        storage_version: str | None = "v1.1.0",
    ):
        if on_full not in ON_FULL:
            raise ValueError(f"on_full: expected one of {ON_FULL}, got {on_full!r}")
        self.path = Path(db_path)
        self.flush_interval = flush_interval
        self.batch_size = max(1, batch_size)
        self.max_buffer = max(1, max_buffer)
        """Cap of rows held in memory (queued, or waiting for the db or the spill file)."""
        self.on_full = on_full
        self.on_drop = on_drop
        """Called with a count of rows that are lost (dropped at the cap, or at close)."""
        self.on_settled: Callable[[int, dict[str, int]], None] | None = None
        """Called after each flush with (seq of the last row settled, `outcome`): every row up
        to that seq is in the db, a spill file, the rejected file or lost (the spend sidecar
        acknowledges rows with it)."""
        self.retry_delay = retry_delay
        self.log_interval = log_interval
        self.config: dict[str, Any] = {"threads": threads}
        if storage_version:
            self.config["storage_compatibility_version"] = storage_version
        self.rows = RowBuilder()
        self.spill = SpillFiles(self.path, fsync=fsync)
        self._lock = threading.Lock()
        self._queue: deque[tuple[int, Exchange]] = deque()
        self._seq = 0
        self._late = 0
        """Rows recorded after close() (straight to the spill file)."""
        self._held = 0
        """Rows in memory, queued or pending (under `_lock`): what `max_buffer` caps."""
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._pending: list[tuple[int, Line]] = []
        """Rows taken from the queue and not yet in the db or a spill file, oldest first."""
        self._flushed: tuple[int, float, int] = (0, math.inf, 0)
        """As of the end of the last flush (file closed again): (last seq recorded, oldest seq
        still in memory, rows of this run in spill files)."""
        self.outcome = {"db": 0, "spill": 0, "rejected": 0, "lost": 0}
        """Where this run's rows are; with the rows held in memory they add up to `recorded`."""
        self._spill_mine: dict[str, int] = {}
        """Rows of this run in each spill file, by path (to tell where they went on replay)."""
        self._queries: deque[tuple[str, Any, Future[list[tuple[Any, ...]]]]] = deque()
        self._waiters = 0
        self._schema_ready = False
        self._replay_due = False
        self._last_log: dict[str, float] = {}
        self._troubled = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._deadline = math.inf
        self._closed = False
        self._close_result = True
        self.stats: dict[str, Any] = dict.fromkeys(_COUNTERS, 0) | {"last_flush": {}}

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
        """Queue one finished Exchange (O(1), never blocks; do not mutate it afterwards).

        At the cap with `on_full="drop"` the row is dropped and counted instead.
        """
        with self._lock:
            if self._closed:
                closed = True
                self._late += 1
            elif self._held < self.max_buffer or self.on_full == "refuse":
                self._seq += 1
                self._held += 1
                self._queue.append((self._seq, exchange))
                if len(self._queue) >= self.batch_size or self._held >= self.max_buffer:
                    self._wake.set()
                return
            else:
                closed = False
                self.stats["dropped"] += 1
                self.outcome["lost"] += 1
        if closed:
            self._record_after_close(exchange)
            return
        self._note(
            "full",
            logging.ERROR,
            "spend: buffer full (%d rows held, cap %d): rows are dropped (%d so far)",
            self._held,
            self.max_buffer,
            self.stats["dropped"],
        )
        self._lost(1)

    def record_line(self, line: Line) -> None:
        """`record()` for a row built already (by :class:`RowBuilder`, in another process)."""
        self.record(_Built(line))  # type: ignore[arg-type]

    def accepting(self) -> bool:
        """False while `max_buffer` rows are held in memory (nothing could take them)."""
        return self._held < self.max_buffer

    def refused(self) -> None:
        """Count a request the proxy refused because the buffer is full (logged now and then)."""
        self.stats["refused"] += 1
        self._note(
            "full",
            logging.ERROR,
            "spend: buffer full (%d rows held, cap %d): new "
            "requests are refused with 503 until %s can be written (%d so far)",
            self._held,
            self.max_buffer,
            self.path,
            self.stats["refused"],
        )

    def summary(self) -> dict[str, int]:
        """Where this run's rows are: recorded = db + spill + rejected + lost + held."""
        with self._lock:
            recorded = self._seq + self.stats["dropped"] + self._late
            return {"recorded": recorded, **self.outcome, "held": self._held}

    def describe(self) -> str:
        """`summary()` in words, for the exit message: where every row of this run went."""
        s = self.summary()
        spill = f" ({self.spill.path}*, replayed at the next start)" if s["spill"] else ""
        rejected = f" ({self.spill.rejected})" if s["rejected"] else ""
        lost = " (buffer full, or nothing could be written)" if s["lost"] else ""
        held = f", {s['held']} still in memory" if s["held"] else ""
        return (
            f"{s['recorded']} rows this run: {s['db']} in {self.path}, {s['spill']} in spill "
            f"files{spill}, {s['rejected']} rejected{rejected}, {s['lost']} lost{lost}{held}"
        )

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
        """Flush everything and stop the thread. True if every row of this run reached the db
        (or the rejected file); `summary()` says where the others are: in the spill file for the
        next run (file held by a reader until the deadline), or lost (nothing could be written)."""
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
            for _, ex in leftovers:  # the thread no longer looks at the queue: keep them on disk
                self._account(held=1)
                self._record_after_close(ex)
            self._close_result = False
            return False
        if leftovers:  # recorded between the thread's last drain and _closed
            self._pending.extend((seq, self._build(ex)) for seq, ex in leftovers)
            self._spill_pending()
            self._give_up()
        self._close_result = self.outcome["spill"] == 0 and self.outcome["lost"] == 0
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
        recorded, oldest, spilled = self._flushed
        return recorded >= target and oldest > target and spilled == 0

    def _notify(self) -> None:
        """End of a flush (the file is closed): publish progress and wake flush() callers."""
        with self._lock:
            recorded = self._seq
            oldest = self._pending[0][0] if self._pending else math.inf
            if self._queue:
                oldest = min(oldest, self._queue[0][0])
        with self._progress:
            self._flushed = (recorded, oldest, self.outcome["spill"])
            self._progress.notify_all()
        if self.on_settled is not None:
            with self._lock:
                outcome = dict(self.outcome)
            try:
                self.on_settled(int(min(recorded, oldest - 1)), outcome)
            except Exception:
                log.exception("spend: on_settled failed")

    def _account(self, held: int = 0, **where: int) -> None:
        """Rows of this run moved: `held` of them left memory, `where` says where to (db, spill,
        rejected, lost; negative: moved from there). One step, so `summary()` always adds up."""
        with self._lock:
            self._held -= held
            for key, n in where.items():
                self.outcome[key] += n

    def _build(self, item: Exchange | _Built) -> Line:
        return item.line if isinstance(item, _Built) else self.rows.build(item)

    def _note(self, kind: str, level: int, msg: str, *args: Any) -> bool:
        """:meth:`Troubles._note`; a trouble other than a full buffer is remembered (the
        recovery is logged once)."""
        logged = super()._note(kind, level, msg, *args)
        if logged:
            self._troubled = self._troubled or kind != "full"
        return logged

    def _run(self) -> None:
        failed = False
        self._replay_due = self.spill.pending()
        while True:
            # flush()/close()/query() waiting: go now (or soon after a failure); else batch.
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
                idle = not self._queue and not self._pending and self.outcome["spill"] == 0
                if idle or time.monotonic() >= self._deadline:
                    self._drain()
                    self._spill_pending()
                    self._give_up()
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
        for seq, ex in items:
            try:
                self._pending.append((seq, self._build(ex)))
            except Exception as e:
                log.exception("spend: cannot convert exchange %s", getattr(ex, "request_id", "?"))
                self.spill.reject(([getattr(ex, "request_id", None)], []), repr(e))
                self.stats["rejected"] += 1
                self._account(held=1, rejected=1)

    def _cycle(self, stopping: bool) -> bool:
        """One flush: False if the file could not be opened or written."""
        if not self._queue and not self._pending and not self._queries and not self._replay_due:
            self._replay_due = self.spill.path.exists()
            if not self._replay_due:
                return True
        t0 = time.perf_counter()
        try:
            con = self._connect()
        except _Busy:
            self.stats["failures"] += 1
            self._drain()
            if stopping:
                self._fail_queries()
            else:  # closing keeps retrying until the deadline; otherwise spill now, so that a
                # SIGKILL while a reader holds the file loses no more than usual
                self._spill_pending()
            return False
        t1 = time.perf_counter()
        timing: dict[str, float] = {"open_ms": (t1 - t0) * 1000}
        ok = True
        try:
            self._replay(con)
            rows = self._insert_pending(con)
            t2 = time.perf_counter()
            self._run_queries(con)
            self._checkpoint(con)
            t3 = time.perf_counter()
            timing.update(insert_ms=(t2 - t1) * 1000, checkpoint_ms=(t3 - t2) * 1000, rows=rows)
        except (duckdb.Error, OSError) as e:  # a full disk, mostly: committed batches are kept
            ok = False
            self.stats["failures"] += 1
            self._note(
                "db",
                logging.WARNING,
                "spend: cannot write %s (%s); rows go to %s meanwhile",
                self.path,
                _first_line(e),
                self.spill.path,
            )
            self._drain()
            self._spill_pending()
        finally:
            t4 = time.perf_counter()
            self._release(con, ok)
            timing["close_ms"] = (time.perf_counter() - t4) * 1000
            timing["total_ms"] = (time.perf_counter() - t0) * 1000
            self.stats["flushes"] += 1
            self.stats["last_flush"] = timing
        if ok and self._troubled:
            self._troubled = False
            log.info("spend: %s is writable again", self.path)
        return ok

    # Where rows go: a sink other than the file (mitmroute.spend.lake) overrides these four.

    def _checkpoint(self, con: duckdb.DuckDBPyConnection) -> None:
        """End of a flush: no WAL left for readers."""
        con.execute("CHECKPOINT")

    def _release(self, con: duckdb.DuckDBPyConnection, ok: bool) -> None:
        """After a flush: close the file again, for readers."""
        with contextlib.suppress(duckdb.Error):
            con.close()

    def _ensure_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        schema.ensure_schema(con)

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """Open the file read-write (one retry after retry_delay); raise _Busy if impossible."""
        error: Exception | None = None
        for attempt in range(2):
            try:
                if not self.path.exists():
                    self._create()
                con = duckdb.connect(str(self.path), config=self.config)
                break
            except (duckdb.Error, OSError) as e:
                error = e
                if attempt == 0:
                    time.sleep(self.retry_delay)
        else:
            self._note_busy(error)
            raise _Busy(str(error))
        try:
            if not self._schema_ready:
                schema.ensure_schema(con)
                self._schema_ready = True
        except duckdb.Error as e:  # e.g. a read-only file system: treat like a busy file
            con.close()
            self._note_busy(e)
            raise _Busy(str(e)) from e
        return con

    def _create(self) -> None:
        """Create the file under a temporary name and move it into place once complete: on a
        full disk DuckDB leaves a half-written file that it can never open again."""
        tmp = Path(f"{self.path}.creating")
        leftovers = (tmp, Path(f"{tmp}.wal"))
        for p in leftovers:
            p.unlink(missing_ok=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = duckdb.connect(str(tmp), config=self.config)
            try:
                schema.ensure_schema(con)
                con.execute("CHECKPOINT")
            finally:
                con.close()
            os.replace(tmp, self.path)
        except BaseException:
            for p in leftovers:
                with contextlib.suppress(OSError):
                    p.unlink()
            raise

    def _note_busy(self, error: Exception | None) -> None:
        self.stats["busy"] += 1
        text = _first_line(error)
        if "lock" in text.lower():
            self._note(
                "busy",
                logging.INFO,
                "spend: %s is held by another process; rows go to %s until it lets go (%s)",
                self.path,
                self.spill.path,
                text,
            )
        else:
            self._note(
                "db",
                logging.WARNING,
                "spend: cannot open %s (%s); rows go to %s meanwhile",
                self.path,
                text,
                self.spill.path,
            )

    def _exec_batch(self, con: duckdb.DuckDBPyConnection, lines: list[Line]) -> int:
        """Insert the rows whose request_id is not stored yet, and their attempts (no
        transaction handling); returns how many went in."""
        fresh = _new_lines(con, lines)
        if fresh:
            con.execute(_LOG_SQL, [columnar_json([r for r, _ in fresh], schema.SPEND_LOG)])
            attempts = [a for _, atts in fresh for a in atts]
            if attempts:
                con.execute(_ATTEMPTS_SQL, [columnar_json(attempts, schema.SPEND_ATTEMPTS)])
        return len(fresh)

    def _insert_lines(
        self, con: duckdb.DuckDBPyConnection, lines: list[Line], *, retried: bool = False
    ) -> tuple[int, int]:
        """Insert in one transaction; on a data error, row by row with rejects set aside.
        Returns (rows inserted, rows skipped because they are stored already)."""
        try:
            con.execute("BEGIN")
            inserted = self._exec_batch(con, lines)
            con.execute("COMMIT")
            return inserted, len(lines) - inserted
        except duckdb.CatalogException:
            _rollback(con)
            if retried:
                raise
            self._ensure_schema(con)  # the file was replaced under us
            return self._insert_lines(con, lines, retried=True)
        except _DATA_ERRORS as e:
            con.execute("ROLLBACK")
            if len(lines) == 1:
                self._reject(lines[0], e)
                return 0, 0
            counts = [self._insert_lines(con, [line]) for line in lines]
            return sum(c[0] for c in counts), sum(c[1] for c in counts)
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
            inserted, duplicates = self._insert_lines(con, [line for _, line in chunk])
            del self._pending[: len(chunk)]
            stored = inserted + duplicates
            self._account(held=len(chunk), db=stored, rejected=len(chunk) - stored)
            self.stats["written"] += stored
            self.stats["duplicates"] += duplicates
            total += len(chunk)
        return total

    def _replay(self, con: duckdb.DuckDBPyConnection) -> None:
        """Move every spill file into the db, each exactly once: files claimed earlier first,
        then the live one (so a replay that keeps failing leaves one claimed file, not one per
        flush)."""
        if not self._replay_due and not self.spill.path.exists():
            return
        for path in self.spill.claimed():
            self._replay_one(con, path)
        path = self.spill.claim()
        if path is not None:
            if (mine := self._spill_mine.pop(str(self.spill.path), 0)) > 0:
                self._spill_mine[str(path)] = mine
            self._replay_one(con, path)
        self._replay_due = False

    def _replay_one(self, con: duckdb.DuckDBPyConnection, path: Path) -> None:
        spill_id = self.spill.spill_id(path)
        mine = self._spill_mine.get(str(path), 0)
        seen = con.execute(
            "SELECT count(*) FROM spend_spill_replays WHERE spill_id = ?", [spill_id]
        ).fetchone()
        read, refused, bad = mine, 0, []  # replayed already (then deleting it was cut short)
        if not (seen and seen[0]):
            try:
                read, inserted = self._replay_file(con, spill_id, self.spill.read(path, bad))
            except _DATA_ERRORS:
                _rollback(con)
                bad = []
                good, refused = self._good_lines(con, path, bad)
                read, inserted = self._replay_file(con, spill_id, iter(good))
            for n, raw in bad:
                self.spill.set_aside(raw, f"{path.name}:{n}")
            self.stats["replayed"] += inserted
            self.stats["duplicates"] += read - inserted
            log.info(
                "spend: replayed %d spilled rows from %s (%d stored already, %d set aside)",
                inserted,
                path.name,
                read - inserted,
                refused + len(bad),
            )
        path.unlink(missing_ok=True)
        self._spill_mine.pop(str(path), None)
        if mine:  # this run's rows of the file are in the db now, but for those set aside
            # (counted against rows of other runs first: exact when the file is all ours)
            others = read + refused + len(bad) - mine
            mine_aside = max(0, refused + len(bad) - max(0, others))
            self._account(spill=-mine, rejected=mine_aside, db=mine - mine_aside)

    def _replay_file(
        self, con: duckdb.DuckDBPyConnection, spill_id: str, lines: Iterator[Line]
    ) -> tuple[int, int]:
        """All of one spill file and its replay marker in one transaction, read in batches.
        Returns (rows read, rows inserted: the others were stored already)."""
        read = inserted = 0
        con.execute("BEGIN")
        try:
            while chunk := list(itertools.islice(lines, self.batch_size)):
                inserted += self._exec_batch(con, chunk)
                read += len(chunk)
            con.execute(
                "INSERT INTO spend_spill_replays (spill_id, rows_replayed) VALUES (?, ?)",
                [spill_id, inserted],
            )
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
        return read, inserted

    def _good_lines(
        self, con: duckdb.DuckDBPyConnection, path: Path, bad: list[tuple[int, bytes]]
    ) -> tuple[list[Line], int]:
        """The rows of a spill file DuckDB accepts (each tried and rolled back), and how many it
        refused (set aside)."""
        good, refused = [], 0
        for line in self.spill.read(path, bad):
            con.execute("BEGIN")
            try:
                self._exec_batch(con, [line])
                good.append(line)
            except _DATA_ERRORS as e:
                self._reject(line, e)
                refused += 1
            finally:
                _rollback(con)
        return good, refused

    def _spill_pending(self) -> None:
        """Append the pending rows to the spill file a batch at a time; what it cannot take
        stays in memory (up to `max_buffer`), for the next flush."""
        while self._pending:
            chunk = self._pending[: self.batch_size]
            try:
                n = self.spill.append(line for _, line in chunk)
            except OSError as e:
                self._note(
                    "memory",
                    logging.ERROR,
                    "spend: cannot write %s either (%s): %d rows "
                    "held in memory (cap %d), written as soon as there is room",
                    self.spill.path,
                    e,
                    self._held,
                    self.max_buffer,
                )
                return
            del self._pending[: len(chunk)]
            self._account(held=len(chunk), spill=n)
            live = str(self.spill.path)
            self._spill_mine[live] = self._spill_mine.get(live, 0) + n
            self.stats["spilled"] += n
            self._replay_due = True

    def _give_up(self) -> None:
        """Closing, and neither the db nor the spill file took these rows: they are lost."""
        if not self._pending:
            return
        n = len(self._pending)
        self._pending = []
        self._account(held=n, lost=n)
        self.stats["lost"] += n
        log.error(
            "spend: %d rows lost: neither %s nor %s could be written before the deadline",
            n,
            self.path,
            self.spill.path,
        )
        self._lost(n)

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
        log.warning(
            "spend: record() after close(); row %s goes to %s", exchange.request_id, self.spill.path
        )
        try:
            n = self.spill.append([self._build(exchange)])
        except Exception as e:
            log.error("spend: row %s lost: %s", exchange.request_id, e)
            self._account(lost=1)
            self.stats["lost"] += 1
            self._lost(1)
            return
        self._account(spill=n)
        self.stats["spilled"] += n


def _first_line(error: BaseException | None) -> str:
    return str(error).splitlines()[0] if error is not None and str(error) else "?"


def _window(starts: list[Any]) -> tuple[str, list[str]]:
    """A `started_at` range holding every row of a batch: a stored copy of one of its rows can
    only be there, so the lookup reads only those row groups. None when a start is unknown."""
    try:
        times = [datetime.fromisoformat(s) for s in starts]
        if any(t.tzinfo is None for t in times):
            return "", []
        lo, hi = min(times), max(times)
    except (TypeError, ValueError):
        return "", []
    return _WINDOW_SQL, [lo.isoformat(), hi.isoformat()]


def _new_lines(con: duckdb.DuckDBPyConnection, lines: list[Line]) -> list[Line]:
    """`lines` without those whose request_id is in spend_log already, or earlier in `lines`."""
    ids = [row[0] for row, _ in lines if row[0] is not None]
    if not ids:
        return lines
    window, params = _window([row[1] for row, _ in lines])
    sql = _STORED_SQL.format(window=window)
    # the ids travel as one JSON text: DuckDB 1.5 takes ~80 ms to bind a list of 1000 strings
    ids_json = json.dumps(ids, separators=(",", ":"))
    stored = {r[0] for r in con.execute(sql, [*params, ids_json]).fetchall()}
    fresh = []
    for line in lines:
        request_id = line[0][0]
        if request_id is not None:
            if request_id in stored:
                continue
            stored.add(request_id)
        fresh.append(line)
    return fresh


_LOG_SQL = schema.insert_sql("spend_log", schema.SPEND_LOG)
_ATTEMPTS_SQL = schema.insert_sql("spend_attempts", schema.SPEND_ATTEMPTS)
_WINDOW_SQL = "started_at BETWEEN CAST(? AS TIMESTAMPTZ) AND CAST(? AS TIMESTAMPTZ) AND "
_STORED_SQL = (
    "SELECT request_id FROM spend_log WHERE {window}request_id IN "
    "(SELECT unnest(from_json(?, '[\"VARCHAR\"]')))"
)
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

"""The spend writer in a child process of its own: DuckDB's memory, its flushes and their GIL
time stay out of the proxy process, and a proxy killed with SIGKILL loses only the rows it had
not yet handed over.

Proxy side (:class:`SpendSidecar`, the interface of :class:`~mitmroute.spend.writer.SpendLog`
that the addon uses): ``record()`` appends the Exchange to a deque (O(1)); every 50 ms a
sender thread turns the queued Exchanges into rows (:class:`~mitmroute.spend.rows.RowBuilder`)
and writes them in framed batches (4-byte length + marshal) to the child's stdin. The rows
stay in memory, unsettled, until the child says they are settled (in the db, a spill file,
the rejected file, or lost): they count against ``max_buffer`` (refuse/drop as before). If
the child dies, a new one is started and every unsettled row is sent again; the writer
stores a ``request_id`` once, so a row sent twice is stored once.

Child side (``python -m mitmroute.spend.sidecar``): reads the target from the first frame (a
``database_url`` never goes on a command line), runs the ordinary writer (SpendLog, or
LakeSpendLog for the shared ledger) and answers on stdout with one JSON line per flush: how many
of the rows it received are settled, and where they went. It ignores SIGINT and SIGTERM (a
terminal's Ctrl-C reaches the whole process group: the proxy closes it in order) and ends on a
close frame or on EOF: a proxy killed by SIGKILL closes the pipe, and the child writes
everything it got before it exits. It flushes every FLUSH_INTERVAL, and journals each batch as it
arrives (:mod:`mitmroute.spend.journal`): proxy and child killed at once lose only what the proxy
had not handed over. Its log lines go to the proxy's stderr.

Reads go the same way: ``query()`` sends the SQL to the child, whose writer runs it on its own
connection after the rows it has received (what a virtual key has spent, for budgets: see
mitmroute.auth.ledger), and answers on stdout. The proxy process never imports DuckDB (the module
imports it only in the child).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import marshal
import math
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mitmroute.children import child_argv, child_env
from mitmroute.spend.journal import FRAME, Journal, read_frame, recover
from mitmroute.spend.rows import ON_FULL, Line, RowBuilder, SpillFiles, Troubles

if TYPE_CHECKING:
    from mitmroute.exchange import Exchange
    from mitmroute.spend.lake import SharedLedger

log = logging.getLogger("mitmroute.spend.sidecar")

BATCH_ROWS = 200
"""At most this many rows in one frame (~120 kB): a frame cut short by a SIGKILL is lost whole."""
PIPE_SIZE = 1 << 20
"""The pipe to the child holds this much (Linux's default cap): ~1,600 rows written while the
child starts (DuckDB's import) are in the pipe, not in the proxy, when a SIGKILL comes."""
OUTCOMES = ("db", "spill", "rejected", "lost")
FLUSH_INTERVAL = 2.5
"""Seconds between the child's flushes to the local file. A flush costs ~55 ms of CPU however
few its rows (open, insert, checkpoint, close: measured), so at 0.9 s the writer took ~6% of a
core under any steady traffic; the journal keeps what a flush interval holds in memory."""


class SpendQueryError(RuntimeError):
    """A query the spend sidecar could not answer (not running, died, timed out, or the query
    failed in DuckDB: the message says which)."""


def _frame(message: Any) -> bytes:
    data = marshal.dumps(message)
    return FRAME.pack(len(data)) + data


class SpendSidecar(Troubles):
    """The spend log, written by a child process; `record()` never blocks."""

    logger = log

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        *,
        ledger: SharedLedger | None = None,
        max_buffer: int = 100_000,
        on_full: str = "refuse",
        on_drop: Callable[[int], None] | None = None,
        log_interval: float = 60.0,
        send_interval: float = 0.05,
        restart_delay: float = 0.5,
    ):
        if on_full not in ON_FULL:
            raise ValueError(f"on_full: expected one of {ON_FULL}, got {on_full!r}")
        self.path = Path(db_path)
        self.ledger = ledger
        self.max_buffer = max(1, max_buffer)
        """Cap of rows held in this process (queued, or sent and not yet settled)."""
        self.on_full = on_full
        self.on_drop = on_drop
        self.log_interval = log_interval
        self.send_interval = send_interval
        """The sender hands queued rows over every this many seconds: what a SIGKILL of the
        proxy can cost (a wake-up per row would cost the event loop GIL switches)."""
        self.restart_delay = restart_delay
        self.rows = RowBuilder()
        self.spill = SpillFiles(self.path)
        """Where rows recorded after close() go (the writer replays it at its next start)."""
        self.child: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._lock = threading.Lock()
        self._queue: deque[Exchange] = deque()
        self._unsettled: deque[Line] = deque()
        """Rows sent to the current child (or to be re-sent to a new one), in the order sent."""
        self._held = 0
        """Rows queued or unsettled (under `_lock`): what `max_buffer` caps."""
        self._recorded = 0
        self._acked = 0
        """Rows the current child has said are settled (its own count)."""
        self._outcome_past = dict.fromkeys(OUTCOMES, 0)
        """Where the rows settled by earlier children went."""
        self._outcome_child = dict.fromkeys(OUTCOMES, 0)
        self._outcome_own = dict.fromkeys(OUTCOMES, 0)
        """Rows this process settled itself: dropped, rejected by the row builder, late."""
        self._dropped = 0
        self._refused = 0
        self._child_stats: dict[str, int] = {}
        self._spill_label = str(self.spill.path)
        self._reader: threading.Thread | None = None
        self._write_lock = threading.Lock()
        """Frames go whole to the child: the sender thread and `query()` callers both write."""
        self._queries: dict[int, Future[list[tuple[Any, ...]]]] = {}
        """Queries sent to the current child, by id, until it answers (or dies)."""
        self._query_ids = 0
        self._child_closed: bool | None = None
        """What the child said when it closed (None: it has not)."""
        self._asked = False
        """The child was asked to close."""
        self._flush_asked: float | None = None
        """A `flush()` caller's timeout, for the sender to pass on after the queued rows."""
        self.ready = threading.Event()
        """Set once the first child has started its writer."""
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._deadline = math.inf
        self._closed = False
        self._close_result = True
        self._last_log: dict[str, float] = {}

    # -- API called from the proxy ------------------------------------------------------------

    def start(self) -> SpendSidecar:
        """Start the sender thread, which starts the child (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return self
            self._thread = threading.Thread(target=self._run, name="spend-sidecar", daemon=True)
            self._thread.start()
        # Safety net if the owner never calls close(): hand everything over at interpreter exit.
        ref = weakref.ref(self)
        atexit.register(lambda: (lambda s: s is not None and s.close(5.0))(ref()))
        return self

    def record(self, exchange: Exchange) -> None:
        """Queue one finished Exchange (O(1), never blocks; do not mutate it afterwards)."""
        with self._lock:
            if self._closed:
                late = True
            elif self._held < self.max_buffer or self.on_full == "refuse":
                self._recorded += 1
                self._held += 1
                self._queue.append(exchange)
                return
            else:
                late = False
                self._recorded += 1
                self._dropped += 1
                self._outcome_own["lost"] += 1
        if late:
            self._record_after_close(exchange)
            return
        self._note(
            "full",
            logging.ERROR,
            "spend: buffer full (%d rows held, cap %d): rows are dropped (%d so far)",
            self._held,
            self.max_buffer,
            self._dropped,
        )
        self._lost(1)

    def accepting(self) -> bool:
        """False while `max_buffer` rows are held (the child cannot write them)."""
        return self._held < self.max_buffer

    def refused(self) -> None:
        """Count a request the proxy refused because the buffer is full (logged now and then)."""
        self._refused += 1
        self._note(
            "full",
            logging.ERROR,
            "spend: buffer full (%d rows held, cap %d): new "
            "requests are refused with 503 until %s can be written (%d so far)",
            self._held,
            self.max_buffer,
            self.path,
            self._refused,
        )

    @property
    def stats(self) -> dict[str, int]:
        """The current child's writer counters (written, spilled, failures, ...: since it
        started), with this process's dropped and refused rows."""
        return {**self._child_stats, "dropped": self._dropped, "refused": self._refused}

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until every row recorded before this call is settled and none of this run is
        in a spill file (the child is asked to flush now); False on timeout. Not for the loop."""
        self.start()
        with self._lock:
            target = self._recorded
            self._flush_asked = timeout
        self._wake.set()
        deadline = time.monotonic() + timeout
        while True:
            s = self.summary()
            if s["recorded"] - s["held"] >= target and s["spill"] == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def query(self, sql: str, params: Any = None, timeout: float = 10.0) -> list[tuple[Any, ...]]:
        """Run a read query in the child's writer, after the rows the child has received by
        then are written (rows sent again to a child just restarted may still be on their way):
        how the proxy reads the spend log without loading DuckDB itself. Values come back as
        JSON gives them (DECIMAL and TIMESTAMP as text). Blocking, within `timeout` in all: not
        for the loop. Raises :class:`SpendQueryError`."""
        self.start()
        deadline = time.monotonic() + timeout
        if not self.ready.wait(timeout):
            raise SpendQueryError(f"the spend sidecar for {self.path} did not start")
        while self.child is None and not self._closed:  # a restart under way: wait for it
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        future: Future[list[tuple[Any, ...]]] = Future()
        with self._lock:
            self._query_ids += 1
            query_id = self._query_ids
            self._queries[query_id] = future
        try:
            frame = _frame(("query", (query_id, sql, params, timeout)))
            if not self._write_bytes(frame, max(0.0, deadline - time.monotonic())):
                raise SpendQueryError(f"the spend sidecar for {self.path} is not running")
            try:
                return future.result(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise SpendQueryError(f"no answer from the spend sidecar in {timeout:g}s") from None
        finally:
            with self._lock:
                self._queries.pop(query_id, None)

    def summary(self) -> dict[str, int]:
        """Where this run's rows are: recorded = db + spill + rejected + lost + held."""
        with self._lock:
            outcome = {
                k: self._outcome_past[k] + self._outcome_child[k] + self._outcome_own[k]
                for k in OUTCOMES
            }
            return {"recorded": self._recorded, **outcome, "held": self._held}

    def describe(self) -> str:
        """`summary()` in words, for the exit message: where every row of this run went."""
        s = self.summary()
        where = self.ledger.label if self.ledger is not None else str(self.path)
        spill = f" ({self._spill_label}*, replayed at the next start)" if s["spill"] else ""
        rejected = f" ({self.spill.rejected})" if s["rejected"] else ""
        lost = " (buffer full, or nothing could be written)" if s["lost"] else ""
        held = f", {s['held']} still in memory" if s["held"] else ""
        return (
            f"{s['recorded']} rows this run: {s['db']} in {where}, {s['spill']} in spill "
            f"files{spill}, {s['rejected']} rejected{rejected}, {s['lost']} lost{lost}{held}"
        )

    def close(self, timeout: float = 10.0) -> bool:
        """Hand every row to the child, close it and wait for it. True if every row of this
        run reached the db (or the rejected file); `summary()` says where the others are."""
        if self._closed:
            return self._close_result
        self.start()
        self._deadline = time.monotonic() + timeout
        self._closing = True
        self._wake.set()
        assert self._thread is not None
        self._thread.join(timeout + 2.0)
        if self._thread.is_alive():  # the child hangs: stop it, keep the rows on disk
            log.error("spend: the spend sidecar did not stop within %.1fs; killed", timeout)
            self._kill()
            self._thread.join(2.0)
        with self._lock:
            self._closed = True
            leftovers = [self.rows.build(ex) for ex in self._queue] + list(self._unsettled)
            self._queue.clear()
            self._unsettled.clear()
        if leftovers:
            self._keep(leftovers)
        s = self.summary()
        self._close_result = s["spill"] == 0 and s["lost"] == 0 and s["held"] == 0
        return self._close_result

    # -- the sender thread --------------------------------------------------------------------

    def _run(self) -> None:
        fails = 0
        while True:
            if self._reader is None or not self._reader.is_alive():
                if self.child is not None:
                    fails = fails + 1 if self._reap() else 0
                    with self._lock:
                        left = bool(self._unsettled or self._queue)
                    if self._closing and (self._child_closed or not left or self._overdue()):
                        return
                if fails:
                    time.sleep(min(5.0, self.restart_delay * 2 ** (fails - 1)))
                if not self._spawn():
                    fails += 1
                    if self._closing and self._overdue():
                        return
                    continue
            self._wake.wait(self.send_interval)
            self._wake.clear()
            self._send_queued()
            with self._lock:
                asked, self._flush_asked = self._flush_asked, None
            if asked is not None:  # after the rows: the child flushes them now
                self._write(("flush", asked))
            if self._closing and not self._asked:
                with self._lock:
                    queued = bool(self._queue)
                if not queued:
                    self._request_close()

    def _overdue(self) -> bool:
        return time.monotonic() >= self._deadline

    def _spawn(self) -> bool:
        """Start a child and send it every unsettled row."""
        target: dict[str, Any] = {"db": str(self.path)}
        if self.ledger is not None:
            target["database_url"] = self.ledger.database_url
            target["data_path"] = self.ledger.data_path
        try:
            child = subprocess.Popen(
                child_argv("mitmroute.spend.sidecar"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                close_fds=True,
                env=child_env(),
            )
        except OSError as e:
            log.error("spend: cannot start the spend sidecar: %s", e)
            return False
        assert child.stdin is not None and child.stdout is not None
        with contextlib.suppress(OSError, AttributeError):  # Linux only; the default else
            fcntl.fcntl(child.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        # the first frame, before other threads can see the child (query() writes too)
        with contextlib.suppress(OSError, ValueError):
            child.stdin.write(_frame(("open", target)))
            child.stdin.flush()
        with self._lock:
            self.child = child
            self._acked = 0
            self._child_closed = None
            self._asked = False
            resend = list(self._unsettled)
        self._reader = threading.Thread(
            target=self._read, args=(child.stdout,), name="spend-sidecar-acks", daemon=True
        )
        self._reader.start()
        if resend:
            log.warning("spend: %d unsettled rows sent again to the new spend sidecar", len(resend))
            self._send(resend)
        return True

    def _reap(self) -> bool:
        """The child is gone (its stdout ended): wait for it, keep what it settled. True if
        it died without being asked to."""
        child = self.child
        assert child is not None
        if self._reader is not None:
            self._reader.join()
        code = child.wait()
        with contextlib.suppress(OSError):
            assert child.stdin is not None
            child.stdin.close()
        with self._lock:
            for k in OUTCOMES:
                self._outcome_past[k] += self._outcome_child[k]
            self._outcome_child = dict.fromkeys(OUTCOMES, 0)
            unsettled = len(self._unsettled)
            self.child = None
        if self._asked and not unsettled:
            return False
        self.restarts += 1
        log.error(
            "spend: the spend sidecar (pid %d) exited with code %s; %d unsettled rows go to "
            "a new one",
            child.pid,
            code,
            unsettled,
        )
        return True

    def _kill(self) -> None:
        child = self.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(OSError):
                child.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5.0)

    def _send_queued(self) -> None:
        with self._lock:
            items = list(self._queue)
            self._queue.clear()
        if not items:
            return
        lines = []
        for ex in items:
            try:
                lines.append(self.rows.build(ex))
            except Exception as e:
                log.exception("spend: cannot convert exchange %s", getattr(ex, "request_id", "?"))
                self.spill.reject(([getattr(ex, "request_id", None)], []), repr(e))
                with self._lock:
                    self._held -= 1
                    self._outcome_own["rejected"] += 1
        with self._lock:
            self._unsettled.extend(lines)
        self._send(lines)

    def _send(self, lines: list[Line]) -> None:
        for i in range(0, len(lines), BATCH_ROWS):
            batch = lines[i : i + BATCH_ROWS]
            try:
                data = _frame(("rows", batch))
            except ValueError:  # a value marshal cannot carry: find it, send the others
                data = b"".join(self._frame_each(batch))
            if not self._write_bytes(data):
                return

    def _frame_each(self, batch: list[Line]) -> list[bytes]:
        frames = []
        for line in batch:
            try:
                frames.append(_frame(("rows", [line])))
            except ValueError as e:
                self.spill.reject(line, f"cannot send the row to the spend sidecar: {e}")
                with self._lock:
                    self._unsettled.remove(line)
                    self._held -= 1
                    self._outcome_own["rejected"] += 1
        return frames

    def _request_close(self) -> None:
        left = self._deadline - time.monotonic()
        self._write(("close", max(0.5, left - 1.5)))
        child = self.child
        if child is not None and child.stdin is not None:
            with contextlib.suppress(OSError):
                child.stdin.close()
        self._asked = True

    def _write(self, message: Any) -> bool:
        return self._write_bytes(_frame(message))

    def _write_bytes(self, data: bytes, timeout: float | None = None) -> bool:
        """Write one frame whole; False if the child is gone (or, with `timeout`, if another
        writer held the pipe that long: a child that stopped reading)."""
        child = self.child
        if child is None or child.stdin is None:
            return False
        if not self._write_lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            child.stdin.write(data)
            child.stdin.flush()
        except (OSError, ValueError):  # the child died: the reader sees it, rows are re-sent
            return False
        finally:
            self._write_lock.release()
        return True

    # -- the reader thread (one per child) ----------------------------------------------------

    def _read(self, stdout: IO[bytes]) -> None:
        for raw in stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                log.warning("spend: the spend sidecar said %r", raw[:200])
                continue
            if "settled" in message:
                self._settle(int(message["settled"]), message["outcome"])
                self._child_stats = message.get("stats", {})
            elif "hello" in message:
                self._spill_label = message["hello"]["spill"]
                self.ready.set()
            elif "answer" in message:
                self._answer(message)
            elif "closed" in message:
                self._child_closed = bool(message["closed"])
        stdout.close()
        with self._lock:
            asked = list(self._queries.values())
        for future in asked:  # this child will not answer them
            if not future.done():
                future.set_exception(SpendQueryError("the spend sidecar exited"))
        self._wake.set()

    def _answer(self, message: dict[str, Any]) -> None:
        with self._lock:
            future = self._queries.get(message["answer"])
        if future is None or future.done():
            return  # its caller gave up
        if "error" in message:
            future.set_exception(SpendQueryError(message["error"]))
        else:
            future.set_result([tuple(row) for row in message["rows"]])

    def _settle(self, settled: int, outcome: dict[str, int]) -> None:
        with self._lock:
            n = min(settled - self._acked, len(self._unsettled))
            for _ in range(n):
                self._unsettled.popleft()
            self._acked += n
            self._held -= n
            lost = int(outcome.get("lost", 0)) - self._outcome_child["lost"]
            self._outcome_child = {k: int(outcome.get(k, 0)) for k in OUTCOMES}
        if lost > 0:  # the child could write them nowhere (closing): counted as dropped
            self._lost(lost)

    # -- helpers --------------------------------------------------------------------------------

    def _keep(self, lines: list[Line]) -> None:
        """Rows no child took before the deadline: to the spill file, or lost."""
        try:
            n = self.spill.append(lines)
            where = "spill"
            self._spill_label = str(self.spill.path)
        except OSError as e:
            log.error("spend: %d rows lost: cannot write %s: %s", len(lines), self.spill.path, e)
            n, where = len(lines), "lost"
            self._lost(n)
        with self._lock:
            self._held -= len(lines)
            self._outcome_own[where] += n

    def _record_after_close(self, exchange: Exchange) -> None:
        log.warning(
            "spend: record() after close(); row %s goes to %s", exchange.request_id, self.spill.path
        )
        with self._lock:
            self._recorded += 1
            self._held += 1
        try:
            line = self.rows.build(exchange)
        except Exception as e:
            log.error("spend: row %s lost: %s", exchange.request_id, e)
            with self._lock:
                self._held -= 1
                self._outcome_own["lost"] += 1
            self._lost(1)
            return
        self._keep([line])


# --- the child ----------------------------------------------------------------------------------


def main() -> int:
    """The child: write the rows the proxy sends until it closes us (or dies)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")  # the answers; anything printed goes to stderr instead
    os.dup2(2, 1)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="[spend sidecar] %(levelname)s %(message)s"
    )
    stdin = sys.stdin.buffer
    first = read_frame(stdin)
    if first is None:
        return 0
    kind, target = marshal.loads(first)
    assert kind == "open", kind
    out_lock = threading.Lock()

    def say(message: dict[str, Any]) -> None:
        with out_lock, contextlib.suppress(OSError, ValueError):
            out.write(json.dumps(message, default=str).encode() + b"\n")
            out.flush()

    options: dict[str, Any] = {"max_buffer": 1 << 62, "on_full": "refuse"}
    if target.get("database_url"):
        from mitmroute.spend.lake import LakeSpendLog, SharedLedger

        ledger = SharedLedger(target["database_url"], target["data_path"])
        writer: Any = LakeSpendLog(ledger, target["db"], **options)
    else:
        from mitmroute.spend.writer import SpendLog

        writer = SpendLog(target["db"], flush_interval=FLUSH_INTERVAL, **options)
    recover(target["db"], writer.spill)  # rows a killed child had received: the writer replays
    journal = Journal(target["db"])
    last: list[Any] = [None]

    def settled(n: int, outcome: dict[str, int]) -> None:
        journal.settled(n)
        stats = {k: v for k, v in writer.stats.items() if isinstance(v, int)}
        if last[0] != (n, outcome, stats):
            last[0] = (n, outcome, stats)
            say({"settled": n, "outcome": outcome, "stats": stats})

    def answer(query_id: int, sql: str, params: Any, timeout: float) -> None:
        try:
            rows = writer.query(sql, params, timeout)
        except Exception as e:  # DuckDB's error, or the writer's timeout: the caller's to see
            say({"answer": query_id, "error": f"{type(e).__name__}: {e}"})
            return
        say({"answer": query_id, "rows": [list(row) for row in rows]})

    writer.on_settled = settled
    say({"hello": {"spill": str(writer.spill.path), "pid": os.getpid()}})
    writer.start()
    close_timeout = 10.0
    while (frame := read_frame(stdin)) is not None:
        kind, body = marshal.loads(frame)
        if kind == "rows":
            journal.append(frame, len(body))
            for line in body:
                writer.record_line(line)
        elif kind == "query":  # answered by a thread: rows keep coming in meanwhile
            threading.Thread(target=answer, args=body, name="spend-query", daemon=True).start()
        elif kind == "flush":  # now, not at the next interval: a flush() caller waits
            threading.Thread(target=writer.flush, args=(body,), name="spend-flush",
                             daemon=True).start()  # fmt: skip
        elif kind == "close":
            close_timeout = float(body)
            break
    ok = writer.close(close_timeout)
    journal.close(complete=ok)
    say({"closed": ok})
    with contextlib.suppress(OSError):  # the proxy is gone (SIGKILL): nobody to tell
        out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a spend row is, without DuckDB: an Exchange as rows (:class:`RowBuilder`), the spill
files, and the start-up check of `spend_db`. The proxy process imports this module only (the
writer, and DuckDB, run in the spend sidecar: mitmroute.spend.sidecar); mitmroute.spend.writer
re-exports every name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mitmroute.spend import schema

if TYPE_CHECKING:
    from mitmroute.exchange import Exchange

log = logging.getLogger("mitmroute.spend.writer")

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

    Costs are the engine's (`exchange.cost_usd`, `saved_usd`): the ledger prices nothing."""

    def build(self, ex: Exchange) -> Line:
        u = ex.usage
        cost, saved = ex.cost_usd, ex.saved_usd
        route = ex.tier_route
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
            route.tier if route else None,
            route.reason if route else None,
            _float(route.score) if route else None,
            _money(route.baseline_cost_usd) if route else None,
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

_LOG_WIDTH = len(schema.SPEND_LOG)
_ATTEMPT_WIDTH = len(schema.SPEND_ATTEMPTS)


def is_file_id(text: str) -> bool:
    """The unique part of a spill replay file's or a journal segment's name (32 hex digits)."""
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def _spill_text(lines: Iterable[Line]) -> str:
    """Rows as spill lines: one JSON `[row, attempts]` a line."""
    return "".join(json.dumps([row, att], separators=(",", ":")) + "\n" for row, att in lines)


def _append(path: Path, data: bytes, fsync: bool) -> None:
    """Append `data` to `path` whole or not at all.

    A failed write (disk full) is cut back to where it started, and an empty file it created is
    removed: no half line, no empty file. Data after a torn last line (a process killed in the
    middle of a write) starts on a new line, so the torn line never swallows a good one.
    """
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        if start and os.pread(fd, 1, start - 1) != b"\n":
            data = b"\n" + data
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
                if start == 0:
                    os.unlink(path)
            raise
    finally:
        os.close(fd)


def _parse(raw: bytes) -> Line | None:
    """One spill line, or None when it is torn or not a row of this schema."""
    try:
        row, attempts = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if not isinstance(row, list) or not isinstance(attempts, list):
        return None
    if schema.V1_WIDTH <= len(row) < _LOG_WIDTH:  # written by an older version: pad with NULL
        row = row + [None] * (_LOG_WIDTH - len(row))
    if len(row) != _LOG_WIDTH:
        return None
    if not all(isinstance(a, list) and len(a) == _ATTEMPT_WIDTH for a in attempts):
        return None
    return row, attempts


class SpillFiles:
    """`<db>.spill.jsonl` (appended while the db cannot be written), its claimed replay copies,
    and `<db>.rejected.jsonl` (what can never go in, kept aside with the reason)."""

    def __init__(self, db_path: Path, *, fsync: bool = False):
        self.path = Path(f"{db_path}.spill.jsonl")
        self.rejected = Path(f"{db_path}.rejected.jsonl")
        self._stem = f"{db_path}.spill"
        self.fsync = fsync
        self.lock = threading.Lock()

    def append(self, lines: Iterable[Line]) -> int:
        """Append rows (one JSON line per Exchange), all or none (OSError); returns how many."""
        text = _spill_text(lines)
        if not text:
            return 0
        with self.lock:
            _append(self.path, text.encode(), self.fsync)
        return text.count("\n")

    def reject(self, line: Line, error: str) -> None:
        """Set aside a row DuckDB refused, with the reason."""
        self._set_aside({"error": error, "row": line[0], "attempts": line[1]})

    def set_aside(self, raw: bytes, where: str) -> None:
        """Set aside a spill line that cannot be read (torn by a kill, or not a row)."""
        text = raw.decode("utf-8", "replace").rstrip("\n")
        self._set_aside({"error": f"unreadable spill line ({where})", "line": text})

    def _set_aside(self, entry: dict[str, Any]) -> None:
        text = json.dumps(entry, default=str) + "\n"
        try:
            with self.lock:
                _append(self.rejected, text.encode(), self.fsync)
        except OSError as e:  # the log is then the only place it is kept
            log.error("spend: cannot write %s (%s); the entry: %s", self.rejected, e, text.strip())

    def claimed(self) -> list[Path]:
        """Replay files (`<db>.spill.<32 hex>.jsonl`), oldest first."""
        base = Path(self._stem)
        found = []
        for p in base.parent.glob(base.name + ".*.jsonl"):
            if is_file_id(p.name[len(base.name) + 1 : -len(".jsonl")]):
                found.append(p)
        return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))

    def pending(self) -> bool:
        """Anything to replay?"""
        return self.path.exists() or bool(self.claimed())

    def claim(self) -> Path | None:
        """Rename the live spill file to a unique replay name and return it (None if there is
        none; an empty one is removed)."""
        with self.lock:
            try:
                if self.path.stat().st_size == 0:
                    self.path.unlink()
                    return None
            except FileNotFoundError:
                return None
            target = self._replay_name()
            os.replace(self.path, target)
            return target

    def add_replay(self, lines: Iterable[Line]) -> int:
        """The rows as a replay file of their own (rows another process left), whole or not
        at all (OSError); returns how many."""
        text = _spill_text(lines)
        if text:
            final = self._replay_name()
            partial = final.with_name(final.name + ".partial")
            partial.write_bytes(text.encode())
            os.replace(partial, final)
        return text.count("\n")

    def _replay_name(self) -> Path:
        return Path(f"{self._stem}.{uuid.uuid4().hex}.jsonl")

    @staticmethod
    def spill_id(path: Path) -> str:
        return path.name[: -len(".jsonl")].rsplit(".", 1)[-1]

    @staticmethod
    def read(path: Path, bad: list[tuple[int, bytes]]) -> Iterator[Line]:
        """The rows of a spill file; lines that are torn or not rows go to `bad` as (n, line)."""
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                line = _parse(raw)
                if line is None:
                    log.warning("spend: %s:%d: unreadable spill line set aside", path, n)
                    bad.append((n, raw))
                else:
                    yield line


ON_FULL = ("refuse", "drop")
"""What the buffer does at its cap: keep every row (the proxy refuses new requests), or drop."""


class SpendDbError(Exception):
    """The spend log can never be written at `spend_db` (read-only, no permission, a directory)."""


def check_writable(db_path: str | os.PathLike[str]) -> None:
    """Raise SpendDbError unless the spend log can be written at `db_path`.

    Creates the directory when missing, and a probe file in it. A full disk or a reader holding
    the file is no error: the writer waits those out (rows in the spill file, or in memory).
    """
    if str(db_path) == ":memory:":
        return
    path = Path(db_path)
    if path.is_dir():
        raise SpendDbError(f"spend_db {path} is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mitmroute-probe-", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return
        raise SpendDbError(
            f"spend_db {path}: cannot write in {path.parent} ({e.strerror or e})"
        ) from None
    if path.exists() and not os.access(path, os.W_OK):
        raise SpendDbError(f"spend_db {path}: the file is not writable")


class Troubles:
    """What both sides of the spend log report the same way: rows lost (`on_drop`), and each
    kind of trouble logged at most once per `log_interval` (to `logger`)."""

    logger: logging.Logger = log
    on_drop: Callable[[int], None] | None
    log_interval: float
    _last_log: dict[str, float]

    def _lost(self, n: int) -> None:
        if self.on_drop is not None:
            try:
                self.on_drop(n)
            except Exception:
                self.logger.exception("spend: on_drop failed")

    def _note(self, kind: str, level: int, msg: str, *args: Any) -> bool:
        """Log a trouble at most once per `log_interval` for each kind; True if logged."""
        now = time.monotonic()
        last = self._last_log.get(kind)
        if last is not None and now - last < self.log_interval:
            return False
        self._last_log[kind] = now
        self.logger.log(level, msg, *args)
        return True

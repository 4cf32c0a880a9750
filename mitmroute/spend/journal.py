"""The spend writer child's journal: every frame of rows it receives, on disk until settled.

The child flushes to the db every few seconds (a flush costs ~55 ms of CPU however few its
rows). Rows it holds in memory meanwhile are the proxy's too (unsettled, sent again to a new
child), so a SIGKILL of either process alone loses nothing; the journal covers both at once (a
container stopped hard): each frame goes to the page cache before its rows are recorded.

Frames are kept as received (length + marshal: no re-encoding), in segments
``<db>.journal.<32 hex>``, each held with ``flock`` while its child lives. At every settle the
open segment is sealed, and sealed segments whose rows are all settled are deleted: one flush
later, under any load. A child that starts finds the segments nobody holds (their child died),
turns their rows into a spill replay file and deletes them; the writer replays that file into
the db, storing each ``request_id`` once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import marshal
import os
import struct
import threading
import uuid
from pathlib import Path
from typing import IO, Any

from mitmroute.spend.rows import SpillFiles, is_file_id

log = logging.getLogger("mitmroute.spend.journal")

FRAME = struct.Struct(">I")
"""Every message to the spend child (and in its journal): its length, then the marshalled
tuple."""


class Journal:
    """Appends frames (main thread) and forgets them once settled (writer thread)."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.db_path = Path(db_path)
        self._lock = threading.Lock()
        self._open: tuple[IO[bytes], Path] | None = None
        self._sealed: list[tuple[IO[bytes], Path, int]] = []
        """Segments no longer appended to, with the number of the last row they hold."""
        self.rows = 0
        """Rows appended: the writer's count of rows recorded, in the same order."""
        self.broken = False
        """A write failed (disk full): the journal stops, the rows still go to the writer."""

    def append(self, frame: bytes, rows: int) -> None:
        """Keep `frame` (its `rows` rows are recorded right after). Never raises."""
        with self._lock:
            self.rows += rows
            if self.broken:
                return
            try:
                if self._open is None:
                    self._open = _new_segment(self.db_path)
                f = self._open[0]
                f.write(FRAME.pack(len(frame)) + frame)
                f.flush()
            except OSError as e:
                self.broken = True
                log.warning("spend: journal off (%s): rows are safe once flushed", e)

    def settled(self, n: int) -> None:
        """Rows up to `n` are in the db (or the spill or rejected file): drop what holds
        only those, and seal the open segment so it goes after the next flush."""
        with self._lock:
            if self._open is not None:
                self._sealed.append((*self._open, self.rows))
                self._open = None
            keep = []
            for f, path, last in self._sealed:
                if last <= n:
                    _drop(f, path)
                else:
                    keep.append((f, path, last))
            self._sealed = keep

    def close(self, complete: bool) -> None:
        """At the child's end: every segment goes when every row was settled, else they stay
        for the next child (their lock goes with this process)."""
        with self._lock:
            segments = [s[:2] for s in self._sealed]
            if self._open is not None:
                segments.append(self._open)
            self._open, self._sealed = None, []
            for f, path in segments:
                if complete:
                    _drop(f, path)
                else:
                    with contextlib.suppress(OSError):
                        f.close()


def recover(db_path: str | os.PathLike[str], spill: SpillFiles) -> int:
    """Turn the journal segments no child holds into `spill` replay files; returns their rows."""
    base = Path(f"{db_path}.journal")
    total = 0
    for path in sorted(base.parent.glob(base.name + ".*")):
        if not is_file_id(path.name[len(base.name) + 1 :]):
            continue
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError:
            continue
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live child's
            if n := spill.add_replay(_rows(f)):
                total += n
                log.info("spend: %d rows of a journal left by a killed writer: %s", n, path.name)
            path.unlink(missing_ok=True)
        except OSError as e:
            log.error("spend: cannot recover %s (%s); it stays for the next start", path, e)
        finally:
            f.close()
    return total


def _new_segment(db_path: Path) -> tuple[IO[bytes], Path]:
    path = Path(f"{db_path}.journal.{uuid.uuid4().hex}")
    f = open(path, "ab")  # noqa: SIM115 - held until dropped
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise
    return f, path


def _drop(f: IO[bytes], path: Path) -> None:
    """Delete a segment, then let go of its lock (unlocked, it would look like an orphan)."""
    with contextlib.suppress(OSError):
        path.unlink()
    with contextlib.suppress(OSError):
        f.close()


def read_frame(stream: IO[bytes]) -> bytes | None:
    """The next message, marshalled, or None at EOF (or a frame cut short by a kill)."""
    head = stream.read(FRAME.size)
    if len(head) < FRAME.size:
        return None
    (size,) = FRAME.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        return None
    return data


def _rows(f: IO[bytes]) -> Any:
    """The rows of a segment's frames; a frame cut short by the kill ends it."""
    while (data := read_frame(f)) is not None:
        try:
            kind, body = marshal.loads(data)
        except (EOFError, ValueError, TypeError):
            return
        if kind == "rows":
            yield from body

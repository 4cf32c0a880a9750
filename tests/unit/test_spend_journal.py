"""The spend child's journal: segments kept until their rows are settled, orphans recovered."""

from __future__ import annotations

import json
import marshal

from mitmroute.spend.journal import Journal, recover
from mitmroute.spend.rows import SpillFiles


def frame(first: int, n: int) -> bytes:
    rows = [([f"mr-{i}", "2026-12-02T00:00:00+00:00"], []) for i in range(first, first + n)]
    return marshal.dumps(("rows", rows))


def segments(tmp_path) -> list:
    return sorted(tmp_path.glob("spend.duckdb.journal.*"))


def test_a_segment_goes_once_every_row_in_it_is_settled(tmp_path):
    journal = Journal(tmp_path / "spend.duckdb")
    journal.append(frame(1, 3), 3)
    journal.append(frame(4, 2), 2)
    assert len(segments(tmp_path)) == 1
    journal.settled(3)  # a flush took rows 1-3; 4 and 5 came during it: sealed, kept
    assert len(segments(tmp_path)) == 1
    journal.append(frame(6, 1), 1)
    assert len(segments(tmp_path)) == 2
    journal.settled(5)
    assert len(segments(tmp_path)) == 1  # the first one; row 6's stays
    journal.settled(6)
    assert segments(tmp_path) == []
    journal.close(complete=True)


def test_segments_of_a_live_journal_are_not_recovered_and_an_orphans_are(tmp_path):
    db = tmp_path / "spend.duckdb"
    journal = Journal(db)
    journal.append(frame(1, 2), 2)
    journal.append(frame(3, 1), 1)
    assert recover(db, SpillFiles(db)) == 0  # held: its child is alive
    journal.close(complete=False)  # the child ended with rows unsettled: they stay
    (path,) = segments(tmp_path)
    with path.open("ab") as f:  # and the kill cut its last frame short
        f.write(b"\x00\x00\x01\x00torn")
    assert recover(db, SpillFiles(db)) == 3
    assert segments(tmp_path) == []
    (replay,) = tmp_path.glob("spend.duckdb.spill.*.jsonl")
    ids = [json.loads(line)[0][0] for line in replay.read_text().splitlines()]
    assert ids == ["mr-1", "mr-2", "mr-3"]


def test_a_journal_that_cannot_write_stops_and_still_counts(tmp_path):
    journal = Journal(tmp_path / "gone" / "spend.duckdb")  # no such directory
    journal.append(frame(1, 2), 2)
    journal.append(frame(3, 2), 2)
    assert journal.broken and journal.rows == 4
    journal.settled(4)
    journal.close(complete=True)

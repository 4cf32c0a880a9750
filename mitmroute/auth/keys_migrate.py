"""Copy a keys file of an older version (DuckDB, `<stem>.keys.duckdb`) into the SQLite keys file
that replaces it, once. Run by :class:`mitmroute.auth.keys.KeysDB` in a process of its own, so
that the proxy never loads DuckDB:

    python -m mitmroute.auth.keys_migrate OLD.keys.duckdb NEW.keys.sqlite

NEW holds no key yet (the caller holds its lock; a move cut short is simply done again). The
schema and every row go in one transaction; then OLD is renamed `OLD.migrated` (kept, not
deleted: a downgrade can rename it back). Prints what it copied; exits with the reason on
stderr, status 3 (BUSY) when another process holds OLD, 1 otherwise.
"""

from __future__ import annotations

import os
import sqlite3
import sys

BUSY = 3
"""Exit status when another process holds OLD (DuckDB's lock)."""

TABLES = {
    "keys": "token, key_alias, team_id, record",
    "key_spend": "token, window_index, spent_nanos",
    "meta": "name, value",
}


def migrate(legacy: str, path: str) -> dict[str, int]:
    """Rows copied, by table."""
    import duckdb

    from mitmroute.auth.keys import SCHEMA

    source = duckdb.connect(legacy, read_only=True)
    try:
        tables = source.execute("SELECT table_name FROM duckdb_tables()").fetchall()
        present = {row[0] for row in tables}
        rows = {
            table: source.execute(f"SELECT {columns} FROM {table}").fetchall()
            for table, columns in TABLES.items()
            if table in present
        }
    finally:
        source.close()
    target = sqlite3.connect(path, isolation_level=None)
    try:  # the schema and every row in one transaction: a move cut short leaves no half file
        target.executescript("BEGIN;" + SCHEMA)
        for table, found in rows.items():
            marks = ", ".join("?" * len(TABLES[table].split(",")))
            target.executemany(f"INSERT OR REPLACE INTO {table} VALUES ({marks})", found)
        target.execute("COMMIT")
    finally:
        target.close()
    os.replace(legacy, f"{legacy}.migrated")
    if os.path.exists(f"{legacy}.wal"):  # read above (read-only opens replay it): keep it with it
        os.replace(f"{legacy}.wal", f"{legacy}.migrated.wal")
    return {table: len(found) for table, found in rows.items()}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        copied = migrate(*argv)
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return BUSY if "lock" in str(e).lower() else 1
    print(", ".join(f"{n} {table}" for table, n in copied.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

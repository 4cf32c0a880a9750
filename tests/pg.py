"""A PostgreSQL database of the test's own on the machine's server (127.0.0.1:5432, trust
auth, user postgres; `MITMROUTE_TEST_PG` for another), dropped afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

SERVER = os.environ.get("MITMROUTE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def psql(sql: str, database: str = "postgres") -> str:
    done = subprocess.run(
        ["psql", f"{SERVER}/{database}", "-qAtXc", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode:
        raise RuntimeError(f"psql {sql!r}: {done.stderr.strip()}")
    return done.stdout


def database() -> Iterator[str]:
    """postgresql://.../mitmroute_test_<random>: created for the test, dropped after it (a
    fixture's body: `yield from pg.database()`)."""
    if shutil.which("psql") is None:
        pytest.skip("psql is not installed (apt-get install postgresql-client)")
    try:
        psql("SELECT 1")
    except RuntimeError as e:
        pytest.skip(f"PostgreSQL at {SERVER} is not reachable: {e}")
    name = f"mitmroute_test_{uuid.uuid4().hex[:12]}"
    psql(f"CREATE DATABASE {name}")
    try:
        yield f"{SERVER}/{name}"
    finally:
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

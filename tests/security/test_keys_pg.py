"""Virtual keys in PostgreSQL (database_url) under hostile input, through a real mitmdump:

* the database password must never reach a log line or an error message;
* a key alias is data, never SQL;
* a flood of distinct bad keys must not turn into one PostgreSQL query each.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from mitmroute.auth.pg import SCHEMA
from tests import pg
from tests.conftest import ROOT, free_port
from tests.e2e.test_keys import admin, config, generate
from tests.e2e.test_keys_pg import chat

pytestmark = pytest.mark.timeout(180)
PASSWORD = "pw-hunter2-never-logged"


@pytest.fixture
def pg_url():
    yield from pg.database()


def with_password(url: str) -> str:
    """The same database, with a password in the URL (trust auth ignores it)."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")


def key_lookups(database: str) -> int:
    """Index and sequential scans of mitmroute.keys so far (PostgreSQL's own counters; the
    proxy's connections are ended first so that their counts are flushed: it reconnects)."""
    pg.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE application_name = 'mitmroute-keys' AND datname = '{database}'"
    )
    time.sleep(0.5)
    row = pg.psql(
        "SELECT coalesce(idx_scan, 0) + coalesce(seq_scan, 0) FROM pg_stat_user_tables "
        f"WHERE schemaname = '{SCHEMA}' AND relname = 'keys'",
        database,
    )
    return int(row)


def test_password_never_logged_alias_is_data_and_bad_keys_are_bounded(
    pg_url, start_proxy, backend, tmp_path
):
    database = pg_url.rsplit("/", 1)[1]
    cfg = config(backend.url, database_url=with_password(pg_url),
                 spend_data_path=str(tmp_path / "data"))  # fmt: skip
    proxy = start_proxy(cfg)

    alias = "x'); DROP TABLE mitmroute.keys; --"
    key = generate(proxy, key_alias=alias)
    assert chat(proxy, key) == "ok"
    status, info = admin(proxy, "GET", "/key/info", params={"key": key})
    assert status == 200 and info["info"]["key_alias"] == alias
    assert pg.psql(f"SELECT count(*) FROM {SCHEMA}.keys", database).strip() == "1"

    # the same bad key 100 times and 20 others: one PostgreSQL lookup per distinct token, then
    # the negative cache answers (a flood of distinct ones is bounded by LOOKUPS_PER_SECOND)
    before = key_lookups(database)
    bad = [f"sk-bad-same-{'x' * 20}"] * 100 + [f"sk-bad-{i:04d}-{'x' * 20}" for i in range(20)]
    started = time.monotonic()
    codes = {chat(proxy, k) for k in bad}
    elapsed = time.monotonic() - started
    lookups = key_lookups(database) - before
    assert codes == {"invalid_api_key"}, codes
    print(f"120 bad-key requests ({elapsed:.1f} s): {lookups} PostgreSQL lookups")
    assert 21 <= lookups <= 21 + elapsed / 2 + 5, (lookups, elapsed)
    assert chat(proxy, key) == "ok"  # the real key still works

    assert proxy.stop() == 0
    assert PASSWORD not in proxy.logs()


def test_the_cli_never_prints_the_password(tmp_path):
    cfg = {"general_settings": {
        "master_key": "sk-master",
        "database_url": f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/nothing",
        "spend_db": str(tmp_path / "spend.duckdb"),
    }}  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg))
    done = subprocess.run(
        [sys.executable, "-m", "mitmroute.cli", "keys", "--config", str(path), "list"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "PostgreSQL at" in done.stderr, done.stderr
    assert PASSWORD not in done.stdout + done.stderr

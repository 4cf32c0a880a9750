"""Key stores: in-process with the DuckDB keys file, and Redis (a real one, db 12)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import duckdb
import pytest
import redis.asyncio as aioredis

from mitmroute.auth.keys import (
    SCHEMA,
    KeysDB,
    KeysFileBusy,
    MemoryKeyStore,
    RedisKeyStore,
    make_record,
    new_key,
)

REDIS_URL = "redis://127.0.0.1:6379/12"
NOW = datetime(2026, 11, 24, tzinfo=UTC)


@pytest.fixture
async def redis_store():
    client = aioredis.Redis.from_url(REDIS_URL)
    namespace = f"mrunit-{uuid.uuid4().hex[:8]}"
    yield RedisKeyStore(client, namespace)
    keys = [k async for k in client.scan_iter(match=f"{namespace}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def memory_store(tmp_path):
    db = KeysDB(str(tmp_path / "spend.keys.sqlite"))
    yield MemoryKeyStore(db)
    db.close()


@pytest.fixture(params=["memory", "redis"])
def store(request):
    return request.getfixturevalue(f"{request.param}_store")


async def test_put_get_delete(store):
    record = make_record(new_key(), {"key_alias": "a", "models": ["m"]}, NOW)
    assert await store.get(record.token) is None
    assert await store.put(record)
    assert await store.get(record.token) == record
    assert await store.by_alias("a") == record
    assert [r.token for r in await store.all()] == [record.token]
    await store.delete([record.token])
    assert await store.get(record.token) is None
    assert await store.by_alias("a") is None


async def test_aliases_are_unique_and_follow_renames(store):
    first = make_record(new_key(), {"key_alias": "a"}, NOW)
    second = make_record(new_key(), {"key_alias": "a"}, NOW)
    assert await store.put(first)
    assert not await store.put(second)
    renamed = make_record(new_key(), {"key_alias": "b"}, NOW)
    renamed.token = first.token
    assert await store.put(renamed, previous_alias="a")
    assert await store.by_alias("a") is None
    assert (await store.by_alias("b")).token == first.token
    assert await store.put(second)


async def test_the_keys_file_keeps_keys_and_spend_across_restarts(tmp_path):
    path = str(tmp_path / "spend.keys.sqlite")
    db = KeysDB(path)
    record = make_record(new_key(), {"key_alias": "kept"}, NOW)
    await MemoryKeyStore(db).put(record)
    await db.run(db.save_spend, [(record.token, 3, 1234)])
    db.close()

    db = KeysDB(path)
    try:
        assert await MemoryKeyStore(db).get(record.token) == record
        assert db.load_spend() == {record.token: (3, 1234)}
        # one process holds the file: another one gets a clear message
        probe = f"from mitmroute.auth.keys import KeysDB; KeysDB({path!r})"
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert out.returncode != 0 and "cannot open the keys file" in out.stderr
    finally:
        db.close()


async def test_a_duckdb_keys_file_of_an_earlier_version_is_moved_once(tmp_path):
    legacy = tmp_path / "spend.keys.duckdb"
    record = make_record(new_key(), {"key_alias": "old", "max_budget": 5}, NOW)
    con = duckdb.connect(str(legacy))
    con.execute(SCHEMA)
    con.execute("INSERT INTO keys VALUES (?, ?, ?, ?)",
                [record.token, record.key_alias, record.team_id, record.to_json()])  # fmt: skip
    con.execute("INSERT INTO key_spend VALUES (?, 7, 4321)", [record.token])
    con.execute("INSERT INTO meta VALUES ('ledger_id', 'ledger-of-old')")
    held = con  # an old proxy still running on it: the move waits for it, nothing is lost
    path = str(tmp_path / "spend.keys.sqlite")
    with pytest.raises(KeysFileBusy, match="cannot open the keys file"):
        KeysDB(path)
    held.close()
    cut_short = sqlite3.connect(path)  # a move cut short by an older build: schema, no rows
    cut_short.executescript(SCHEMA)
    cut_short.close()

    probe = (
        "import sys; from mitmroute.auth.keys import KeysDB; db = KeysDB(sys.argv[1]); "
        "print(len(db.load_keys()), db.load_spend(), db.ledger_id(), 'duckdb' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe, path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    token = record.token
    assert out.stdout.split("\n")[0] == f"1 {{'{token}': (7, 4321)}} ledger-of-old False"
    assert not legacy.exists() and (tmp_path / "spend.keys.duckdb.migrated").exists()

    db = KeysDB(path)  # again: nothing left to move, the keys are in the new file
    try:
        assert await MemoryKeyStore(db).get(record.token) == record
        assert db.ledger_id() == "ledger-of-old"
    finally:
        db.close()

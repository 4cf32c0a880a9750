"""Key stores: in-process with the DuckDB keys file, and Redis (a real one, db 12)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from mitmroute.auth.keys import KeysDB, MemoryKeyStore, RedisKeyStore, make_record, new_key

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
    db = KeysDB(str(tmp_path / "spend.keys.duckdb"))
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
    path = str(tmp_path / "spend.keys.duckdb")
    db = KeysDB(path)
    record = make_record(new_key(), {"key_alias": "kept"}, NOW)
    await MemoryKeyStore(db).put(record)
    await db.run(db.save_spend, [(record.token, 3, 1234)])
    db.close()

    db = KeysDB(path)
    try:
        assert await MemoryKeyStore(db).get(record.token) == record
        assert db.load_spend() == {record.token: (3, 1234)}
        # DuckDB lets one process hold the file: another one gets a clear message
        probe = f"from mitmroute.auth.keys import KeysDB; KeysDB({path!r})"
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert out.returncode != 0 and "cannot open the keys file" in out.stderr
    finally:
        db.close()

"""Stored responses: bounded by count and bytes, expiring after TTL, visible to their own key
only, shared through Redis when the config has a Redis cache, and kept locally while it is down."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from mitmroute.cache.local import LocalStore
from mitmroute.cache.redis_store import RedisStore
from mitmroute.config import CacheSettings
from mitmroute.inbound.responses import store as store_module
from mitmroute.inbound.responses.store import (
    LOCAL_MAX_BYTES,
    LOCAL_MAX_ENTRIES,
    TTL,
    ResponseStore,
    StoredResponse,
    local_store,
)
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(30)
SHARED_URL = "redis://127.0.0.1:6379/9"


def stored(rid: str, owner: str | None = "key-a", text: str = "Hello!") -> StoredResponse:
    output = [
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
    ]
    user = {"id": "msg_0", "type": "message", "role": "user", "content": []}
    return StoredResponse({"id": rid, "object": "response", "output": output}, [user], owner)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_response_is_found_by_its_own_key_only() -> None:
    store = ResponseStore(local_store())
    assert await store.put(stored("resp_1"))
    found = await store.get("resp_1", "key-a")
    assert found is not None and found.response["id"] == "resp_1"
    assert [i["id"] for i in found.context] == ["msg_0", "msg_1"]  # input, then output
    assert await store.get("resp_1", "key-b") is None
    assert await store.get("resp_1", None) is None
    assert not await store.delete("resp_1", "key-b")
    assert await store.delete("resp_1", "key-a")
    assert await store.get("resp_1", "key-a") is None


async def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    store = ResponseStore(local_store(clock))
    await store.put(stored("resp_1"))
    clock.now += TTL - 1
    assert await store.get("resp_1", "key-a") is not None
    clock.now += 2
    assert await store.get("resp_1", "key-a") is None
    assert TTL == 24 * 3600


async def test_the_local_store_is_bounded_by_count_and_bytes() -> None:
    assert (LOCAL_MAX_ENTRIES, LOCAL_MAX_BYTES) == (10_000, 64 * 1024 * 1024)
    store = ResponseStore(LocalStore(max_entries=2, max_bytes=1 << 20))
    for i in range(3):
        await store.put(stored(f"resp_{i}"))
    assert await store.get("resp_0", "key-a") is None  # least recently used, evicted
    assert await store.get("resp_2", "key-a") is not None
    small = ResponseStore(LocalStore(max_entries=100, max_bytes=1500))
    for i in range(5):
        await small.put(stored(f"resp_{i}", text="x" * 300))
    assert small.local.bytes_used <= 1500 and len(small.local) < 5


async def test_a_large_response_is_compressed_and_one_too_large_is_not_kept(monkeypatch) -> None:
    store = ResponseStore(local_store())
    big = stored("resp_big", text="all work and no play " * 2000)
    assert len(big.to_bytes()) < 10_000  # 42 KB of text, compressed
    assert await store.put(big)
    found = await store.get("resp_big", "key-a")
    assert found is not None and found.response == big.response
    monkeypatch.setattr(store_module, "MAX_ENTRY_BYTES", 100)
    assert not await store.put(stored("resp_huge", text="x" * 1000))
    assert await store.get("resp_huge", "key-a") is None


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStore]:
    redis = RedisStore.from_settings(CacheSettings(enabled=True, type="redis", url=SHARED_URL))
    await redis.start()
    assert redis.available
    yield redis
    await redis.close()


async def test_with_redis_every_proxy_sees_it_and_delete_reaches_all(
    redis_store: RedisStore,
) -> None:
    namespace = f"test-responses-{uuid.uuid4().hex[:8]}"
    here = ResponseStore(local_store(), redis_store, namespace=namespace)
    there = ResponseStore(local_store(), redis_store, namespace=namespace)
    try:
        assert await here.put(stored("resp_shared"))
        assert len(here.local) == 0  # Redis holds the one copy
        ttl = await redis_store.client.ttl(f"{namespace}:response:resp_shared")
        assert TTL - 10 < ttl <= TTL
        assert await there.get("resp_shared", "key-a") is not None
        assert await there.delete("resp_shared", "key-a")
        assert await here.get("resp_shared", "key-a") is None
    finally:
        await redis_store.client.delete(f"{namespace}:response:resp_shared")


async def test_redis_down_keeps_responses_in_the_local_store() -> None:
    down = RedisStore.from_settings(
        CacheSettings(enabled=True, type="redis", url=f"redis://127.0.0.1:{free_port()}/0")
    )
    store = ResponseStore(local_store(), down)
    try:
        assert await store.put(stored("resp_local"))
        assert await store.get("resp_local", "key-a") is not None
        assert await store.delete("resp_local", "key-a")
    finally:
        await down.close()

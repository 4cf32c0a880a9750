"""The local store and ResponseCache on top of it: hits, TTL, max age, LRU bounds, item limit."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from decimal import Decimal

from mitmroute.cache import CachedAnswer, ResponseCache
from mitmroute.cache.local import ENTRY_OVERHEAD, LocalStore
from mitmroute.config import CacheSettings

SETTINGS = CacheSettings(enabled=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(text: str = "Hello!", **kw: object) -> CachedAnswer:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}  # fmt: skip
    return CachedAnswer.now(body, "openai/gpt-4o", "gpt-4o", kw.get("cost", Decimal("0.0012")))


async def test_hit_and_miss_round_trip() -> None:
    cache = ResponseCache.from_settings(SETTINGS)
    assert isinstance(cache.store, LocalStore)
    await cache.start()
    assert await cache.get("ns:a", max_age=None) is None
    stored = answer()
    assert await cache.put("ns:a", stored, ttl=60)
    hit = await cache.get("ns:a", max_age=None)
    assert hit == stored and hit is not stored
    assert hit.cost == Decimal("0.0012") and hit.deployment == "openai/gpt-4o"
    hit.body["id"] = "mutated"  # readers get their own copy
    again = await cache.get("ns:a", max_age=None)
    assert again is not None and again.body["id"] == "chatcmpl-1"
    assert (cache.stats.hits, cache.stats.misses, cache.stats.stores) == (2, 1, 1)
    await cache.close()


async def test_ttl_expiry_with_a_clock() -> None:
    clock = Clock()
    store = LocalStore(max_entries=10, max_bytes=1 << 20, clock=clock)
    await store.put("k", b"v", ttl=1.0)
    await store.put("forever", b"v", ttl=None)
    clock.now += 0.9
    assert await store.get("k") == b"v"
    clock.now += 0.2
    assert await store.get("k") is None
    assert len(store) == 1 and await store.get("forever") == b"v"


async def test_settings_ttl_is_the_default_and_real_expiry() -> None:
    cache = ResponseCache.from_settings(replace(SETTINGS, ttl=0.05))
    await cache.put("k", answer(), ttl=None)
    assert await cache.get("k") is not None
    await asyncio.sleep(0.06)
    assert await cache.get("k") is None


async def test_max_age_rejects_older_entries() -> None:
    cache = ResponseCache.from_settings(SETTINGS)
    old = replace(answer(), stored_at=time.time() - 30)
    await cache.put("k", old)
    assert await cache.get("k", max_age=60) is not None
    assert await cache.get("k", max_age=10) is None
    assert await cache.get("k", max_age=None) is not None
    assert cache.stats.stale == 1


def test_lru_bounded_by_entries() -> None:
    store = LocalStore(max_entries=3, max_bytes=1 << 20)
    for k in "abc":
        store.put_now(k, b"x", None)
    assert store.get_now("a") == b"x"  # a is now most recently used
    store.put_now("d", b"x", None)
    assert store.get_now("b") is None
    assert [k for k in "acd" if store.get_now(k)] == ["a", "c", "d"]
    assert len(store) == 3 and store.evictions == 1


def test_lru_bounded_by_bytes() -> None:
    item = 100
    size = 1 + item + ENTRY_OVERHEAD
    store = LocalStore(max_entries=1000, max_bytes=3 * size)
    for k in "abcd":
        store.put_now(k, b"x" * item, None)
    assert len(store) == 3 and store.get_now("a") is None
    assert store.bytes_used == 3 * size
    store.put_now("e", b"x" * (2 * item), None)  # needs two slots' worth
    assert store.bytes_used <= 3 * size
    assert store.get_now("e") is not None and store.get_now("b") is None
    assert not store.put_now("huge", b"x" * (4 * size), None)  # never fits
    store.put_now("e", b"y", None)  # replacing frees the old size
    assert store.get_now("e") == b"y" and store.bytes_used <= 3 * size


async def test_item_limit_and_compression() -> None:
    cache = ResponseCache.from_settings(replace(SETTINGS, max_item_bytes=20_000))
    big_but_compressible = answer("word " * 20_000)  # ~100 kB of JSON, compresses well
    assert await cache.put("k1", big_but_compressible)
    raw = await cache.store.get("k1")
    assert raw is not None and raw[:1] != b"{" and len(raw) < 20_000
    hit = await cache.get("k1")
    assert hit is not None and hit.body == big_but_compressible.body
    incompressible = answer(" ".join(str(i * 7919 % 100_003) for i in range(20_000)))
    assert not await cache.put("k2", incompressible)
    assert await cache.get("k2") is None and cache.stats.too_big == 1


async def test_corrupt_entry_is_a_miss() -> None:
    cache = ResponseCache.from_settings(SETTINGS)
    await cache.store.put("k", b"{not json", None)
    await cache.store.put("z", b"\x78garbage", None)
    assert await cache.get("k") is None and await cache.get("z") is None
    await cache.put("a", answer())
    await cache.store.put("b", await cache.store.get("a"), None)  # another key's bytes
    assert await cache.get("b") is None and await cache.get("a") is not None
    assert cache.stats.corrupt == 3

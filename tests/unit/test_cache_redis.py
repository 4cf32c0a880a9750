"""The Redis store against real servers: the shared one (db 9, own namespace) and our own
`redis-server` that we kill and restart to check bypass, one warning and recovery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest

from mitmroute.cache import CachedAnswer, ResponseCache, cache_key, parse_controls
from mitmroute.cache.redis_store import DEFAULT_TTL, RedisStore
from mitmroute.config import CacheSettings

SHARED_URL = "redis://127.0.0.1:6379/9"
BUDGET = 0.1  # what a request may lose to a broken Redis, per call

pytestmark = pytest.mark.timeout(30)


def answer(text: str = "Hello!") -> CachedAnswer:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop", "logprobs": None}]}  # fmt: skip
    return CachedAnswer.now(body, "openai/gpt-4o", "gpt-4o", None)


@pytest.fixture
async def shared() -> AsyncIterator[ResponseCache]:
    """A cache on the shared Redis, db 9, with a namespace of its own (cleaned up after)."""
    ns = f"test-cache-{uuid.uuid4().hex[:12]}"
    cache = ResponseCache.from_settings(
        CacheSettings(enabled=True, type="redis", url=SHARED_URL, namespace=ns)
    )
    await cache.start()
    assert isinstance(cache.store, RedisStore) and cache.store.available
    yield cache
    client = cache.store.client
    keys = [k async for k in client.scan_iter(match=f"{ns}*")]
    if keys:
        await client.delete(*keys)
    await cache.close()


def ns_of(cache: ResponseCache) -> str:
    return cache.settings.namespace


async def test_hit_miss_and_ttl_in_redis(shared: ResponseCache) -> None:
    key = f"{ns_of(shared)}:abc"
    assert await shared.get(key) is None
    assert await shared.put(key, answer(), ttl=120)
    hit = await shared.get(key)
    assert hit is not None and hit.body["choices"][0]["message"]["content"] == "Hello!"
    assert 110_000 < await shared.store.client.pttl(key) <= 120_000
    assert await shared.put(f"{key}2", answer(), ttl=None)  # no ttl anywhere: the safe default
    assert await shared.store.client.ttl(f"{key}2") > DEFAULT_TTL - 10


async def test_short_ttl_expires(shared: ResponseCache) -> None:
    key = f"{ns_of(shared)}:short"
    await shared.put(key, answer(), ttl=0.25)
    assert await shared.get(key) is not None
    await asyncio.sleep(0.35)
    assert await shared.get(key) is None


async def test_max_age_and_flush(shared: ResponseCache) -> None:
    key = f"{ns_of(shared)}:old"
    await shared.put(key, replace(answer(), stored_at=time.time() - 20), ttl=60)
    assert await shared.get(key, max_age=30) is not None
    assert await shared.get(key, max_age=5) is None
    await shared.store.delete(key)  # flushed behind our back: just a miss
    assert await shared.get(key) is None


async def test_request_controls_end_to_end(shared: ResponseCache) -> None:
    settings = shared.settings

    async def request(cache_opts: dict | None = None, **params) -> tuple[str, bool, bool]:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **params}
        if cache_opts is not None:
            body["cache"] = cache_opts
        c = parse_controls(body, {}, settings, endpoint="chat/completions")
        key = cache_key("chat/completions", "gpt-4o", body, namespace=c.namespace, scope_id=None)
        hit = await shared.get(key, max_age=c.max_age) if c.read else None
        if hit is None and c.write:
            await shared.put(key, answer(), ttl=c.ttl)
        return key, hit is not None, c.write

    key, hit, _ = await request({"no-store": True})
    assert not hit and await shared.get(key) is None  # nothing was written
    _, hit, _ = await request(user="alice", stream=True)
    assert not hit
    _, hit, _ = await request(user="bob")  # same question, other user, not streamed
    assert hit
    _, hit, _ = await request({"no-cache": True})
    assert not hit  # present, but not read
    _, hit, _ = await request(temperature=0.9)
    assert not hit
    key, hit, _ = await request({"namespace": "team-a"})
    assert not hit and key.startswith(f"{ns_of(shared)}:team-a:")
    assert (await request({"namespace": "team-a"}))[1]


# --- our own redis-server, killed and restarted ----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            return proc
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError("redis-server did not start")


@pytest.fixture
def own_redis() -> Iterator[dict]:
    assert shutil.which("redis-server"), "redis-server is part of this machine kind"
    port = free_port()
    state = {"port": port, "proc": start_redis(port)}
    yield state
    state["proc"].kill()
    state["proc"].wait()


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def timed(coro) -> tuple[object, float]:
    start = time.perf_counter()
    result = await coro
    return result, time.perf_counter() - start


async def test_outage_bypass_one_warning_and_recovery(
    own_redis: dict, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mitmroute.cache")
    settings = CacheSettings(enabled=True, type="redis", host="127.0.0.1", port=own_redis["port"])
    cache = ResponseCache.from_settings(settings, probe_interval=0.3)
    await cache.start()
    try:
        assert await cache.put("k", answer(), ttl=60)
        assert await cache.get("k") is not None

        own_redis["proc"].kill()
        own_redis["proc"].wait()
        worst = 0.0
        for i in range(30):
            got, t_get = await timed(cache.get("k"))
            stored, t_put = await timed(cache.put(f"k{i}", answer(), ttl=60))
            assert got is None and stored is False
            worst = max(worst, t_get, t_put)
        assert worst < BUDGET
        assert not cache.store.available
        assert len(messages(caplog, "redis unavailable")) == 1

        own_redis["proc"] = start_redis(own_redis["port"])
        deadline = time.monotonic() + 3
        while not cache.store.available and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert cache.store.available
        assert await cache.get("k") is None  # the new server is empty
        assert await cache.put("k", answer(), ttl=60)
        assert await cache.get("k") is not None
        assert len(messages(caplog, "redis back")) == 1
        assert len(messages(caplog, "redis unavailable")) == 1
    finally:
        await cache.close()


async def test_unreachable_at_start_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mitmroute.cache")
    settings = CacheSettings(enabled=True, type="redis", url=f"redis://127.0.0.1:{free_port()}/0")
    cache = ResponseCache.from_settings(settings, probe_interval=0.2)
    await cache.start()
    try:
        for _ in range(5):
            got, took = await timed(cache.get("k"))
            assert got is None and took < BUDGET
        await asyncio.sleep(0.5)  # a few failed probes: still one warning
        assert len(messages(caplog, "redis unavailable")) == 1
        assert "127.0.0.1" in messages(caplog, "redis unavailable")[0]
    finally:
        await cache.close()


async def test_slow_redis_is_cut_at_the_time_budget(caplog: pytest.LogCaptureFixture) -> None:
    """A server that accepts connections and never answers (a hung or overloaded Redis)."""
    caplog.set_level(logging.WARNING, logger="mitmroute.cache")
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(4096):
                pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = CacheSettings(enabled=True, type="redis", port=port)
    cache = ResponseCache.from_settings(settings, probe_interval=10, probe_timeout=0.2)
    try:
        await cache.start()  # the warm-up PING times out: breaker open
        assert not cache.store.available
        cache.store.breaker.close()  # pretend it recovered, to time request-path calls
        durations = []
        for i in range(6):
            _, t_get = await timed(cache.get("k"))
            _, t_put = await timed(cache.put(f"k{i}", answer(), ttl=60))
            durations += [t_get, t_put]
        assert max(durations) < BUDGET
        assert sum(d > 0.04 for d in durations) == 3  # 3 paid the budget, then the breaker opened
        assert len(messages(caplog, "redis unavailable")) == 2  # at start, and after the reset
    finally:
        await cache.close()
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()

"""Single flight across proxies on one Redis cache (the shared Redis, db 10, a namespace per
test): identical concurrent misses on several proxies make one upstream call; a failing,
crashed or slow leader never holds the others past their bound; Redis down means no lock."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from mitmroute.cache import CachedAnswer, ResponseCache
from mitmroute.cache.redis_store import RedisStore
from mitmroute.config import CacheSettings
from tests.conftest import free_port

SHARED_URL = "redis://127.0.0.1:6379/10"

pytestmark = pytest.mark.timeout(30)


class Upstream:
    """Counts calls; each takes `delay` seconds and answers with its number, or fails."""

    def __init__(self, delay: float = 0.2, fail: bool = False) -> None:
        self.delay, self.fail, self.calls = delay, fail, 0
        self.stored_at = 0.0

    async def ask(self, cache: ResponseCache, key: str, deadline: float | None = None) -> Any:
        """One request as the engine makes it: lookup, flight, call, publish, store."""
        hit = await cache.get(key)
        if hit is not None:
            return hit.body
        f = await cache.join(key, deadline=deadline)
        try:
            if f.result is not None:
                return f.result.body
            self.calls += 1
            await asyncio.sleep(self.delay)
            if self.fail:
                return None
            answer = CachedAnswer.now({"call": self.calls}, "d", "g")
            f.publish(answer)
            f.release()
            await cache.put(key, answer, ttl=60)
            self.stored_at = time.perf_counter()
            return answer.body
        finally:
            f.release()


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[[int], Any]]:
    """`n` caches on one Redis namespace, as `n` proxies on one config hold them."""
    made: list[ResponseCache] = []
    namespace = f"test-flight-{uuid.uuid4().hex[:12]}"

    async def make(n: int = 2, url: str = SHARED_URL) -> list[ResponseCache]:
        settings = CacheSettings(enabled=True, type="redis", url=url, namespace=namespace)
        caches = [ResponseCache.from_settings(settings) for _ in range(n)]
        for cache in caches:
            await cache.start()
            assert cache.shared_flights is not None
            made.append(cache)
            if cache.store.available:  # type: ignore[attr-defined]
                await asyncio.wait_for(cache.shared_flights.subscription.connected.wait(), 5)
        return caches

    yield make
    for cache in made:
        if cache.store.available:  # type: ignore[attr-defined]
            assert isinstance(cache.store, RedisStore)
            keys = [k async for k in cache.store.client.scan_iter(match=f"{namespace}*")]
            if keys:
                await cache.store.client.delete(*keys)
        await cache.close()


def key_of(cache: ResponseCache) -> str:
    return f"{cache.settings.namespace}:{uuid.uuid4().hex}"


async def test_identical_misses_on_two_proxies_make_one_upstream_call(proxies) -> None:
    one, two = await proxies(2)
    upstream = Upstream(delay=0.3)
    key = key_of(one)
    first = asyncio.create_task(upstream.ask(one, key))
    await asyncio.sleep(0.05)  # `one` leads
    second = await upstream.ask(two, key)
    answered_at = time.perf_counter()
    assert await first == second == {"call": 1}
    assert upstream.calls == 1
    assert answered_at - upstream.stored_at < 0.05  # woken by the message, not the poll
    assert one.shared_flights and one.shared_flights.led == 1
    assert two.shared_flights and two.shared_flights.shared == 1
    await one.shared_flights.drain()
    assert isinstance(one.store, RedisStore)
    assert await one.store.client.exists(f"{key}:flight") == 0  # the lock went with the store


async def test_a_proxys_own_followers_share_the_other_proxys_answer(proxies) -> None:
    one, two = await proxies(2)
    upstream = Upstream(delay=0.3)
    key = key_of(one)
    leader = asyncio.create_task(upstream.ask(one, key))
    await asyncio.sleep(0.05)
    answers = await asyncio.gather(*(upstream.ask(two, key) for _ in range(4)), leader)
    assert upstream.calls == 1 and all(a == {"call": 1} for a in answers)


async def test_a_failing_leader_releases_the_others_at_once(proxies) -> None:
    one, two = await proxies(2)
    failing = Upstream(delay=0.2, fail=True)
    key = key_of(one)
    leader = asyncio.create_task(failing.ask(one, key))
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    healthy = Upstream(delay=0.0)
    assert await healthy.ask(two, key) == {"call": 1}  # called upstream itself
    assert await leader is None
    assert time.perf_counter() - t0 < 0.3  # the failure, not the 120 s bound
    assert healthy.calls == 1 and two.shared_flights and two.shared_flights.alone == 1


async def test_a_crashed_leaders_lock_holds_the_others_only_until_it_expires(proxies) -> None:
    one, two = await proxies(2)
    key = key_of(one)
    assert isinstance(one.store, RedisStore)
    await one.store.client.set(f"{key}:flight", "crashed", px=400)  # a leader that never ends
    t0 = time.perf_counter()
    upstream = Upstream(delay=0.0)
    assert await upstream.ask(two, key) == {"call": 1}
    assert 0.35 < time.perf_counter() - t0 < 1.0


async def test_nobody_waits_longer_than_the_bound(proxies) -> None:
    one, two = await proxies(2)
    slow = Upstream(delay=2.0)
    key = key_of(one)
    leader = asyncio.create_task(slow.ask(one, key))
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    assert await Upstream(delay=0.0).ask(two, key, deadline=0.3) == {"call": 1}
    assert 0.25 < time.perf_counter() - t0 < 0.6
    leader.cancel()


async def test_a_leaders_lock_is_refreshed_while_its_call_runs(proxies) -> None:
    one, two = await proxies(2)
    assert one.shared_flights is not None
    one.shared_flights.lock_ttl = 0.3  # refreshed every 0.1 s
    slow = Upstream(delay=0.8)
    key = key_of(one)
    leader = asyncio.create_task(slow.ask(one, key))
    await asyncio.sleep(0.05)
    counting = Upstream(delay=0.0)
    assert await counting.ask(two, key) == {"call": 1}  # slow's answer, not its own
    assert counting.calls == 0
    await leader


async def test_a_request_that_stores_nothing_takes_no_lock(proxies) -> None:
    [one] = await proxies(1)
    key = key_of(one)
    f = await one.join(key, shared=False)
    assert f.leader and one.shared_flights is not None and not one.shared_flights.holds(key)
    f.release()


async def test_redis_down_means_no_lock_and_no_delay(proxies) -> None:
    [cache] = await proxies(1, f"redis://127.0.0.1:{free_port()}/0")
    assert not cache.store.available  # type: ignore[attr-defined]
    upstream = Upstream(delay=0.0)
    t0 = time.perf_counter()
    for _ in range(5):
        assert await upstream.ask(cache, key_of(cache)) == {"call": upstream.calls}
    assert time.perf_counter() - t0 < 0.05
    assert upstream.calls == 5


def test_the_benchmark_reports_one_more_round_trip_before_the_upstream_call() -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_singleflight.py"
    out = subprocess.run(
        [sys.executable, str(script), "--misses", "20"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    rows = {line.split()[2]: line.split() for line in out.splitlines() if line.startswith("cross")}
    assert rows["without"][-1] == "2.0" and rows["with"][-1] == "4.0"  # round trips per miss
    assert "added to a miss before its upstream call" in out


async def test_a_leader_that_never_ends_holds_its_lock_no_longer_than_its_deadline(
    proxies,
) -> None:
    one, two = await proxies(2)
    assert one.shared_flights is not None
    one.shared_flights.lock_ttl, one.shared_flights.max_hold = 0.15, 0.3
    key = key_of(one)
    stuck = await one.join(key)  # leads, and is never released
    assert stuck.leader and one.shared_flights.holds(key)
    t0 = time.perf_counter()
    assert await Upstream(delay=0.0).ask(two, key) == {"call": 1}
    assert 0.3 < time.perf_counter() - t0 < 1.0  # refreshed up to 0.3 s, expired 0.15 s later


async def test_a_proxy_shutting_down_lets_the_others_go_at_once(proxies) -> None:
    one, two = await proxies(2)
    key = key_of(one)
    await one.join(key)  # leads; then the proxy stops before its call ends
    waiting = asyncio.create_task(Upstream(delay=0.0).ask(two, key))
    await asyncio.sleep(0.1)
    t0 = time.perf_counter()
    await one.close()
    assert await waiting == {"call": 1}
    assert time.perf_counter() - t0 < 0.3

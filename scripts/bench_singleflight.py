#!/usr/bin/env python3
"""What single flight across proxies costs a cache miss, on a real Redis.

    python scripts/bench_singleflight.py                          # loopback Redis, db 11
    python scripts/bench_singleflight.py --redis redis://host:6379/0 --misses 5000

Each miss runs the engine's cache path with no upstream call in between: lookup (GET), join
the flight (the cross-process lock: SET NX PX), publish, release, store (SET PX; with the lock,
then the unlock-and-PUBLISH script, in the background). Two set-ups, interleaved miss by miss
so both see the same machine: the Redis cache without cross-process flight (what main did) and
with it. Reported: the time from lookup to "call upstream now" (the request's path: what a miss
waits before its upstream call), the whole miss including the store and unlock, and Redis round
trips per miss (a pipeline or script call is one).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis.asyncio.connection import Connection

from mitmroute.cache import CachedAnswer, ResponseCache
from mitmroute.cache.redis_store import RedisStore
from mitmroute.config import CacheSettings


async def one_miss(cache: ResponseCache, key: str, answer: CachedAnswer) -> tuple[float, float]:
    """(seconds until the upstream call would start, seconds for the whole miss)."""
    t0 = time.perf_counter()
    assert await cache.get(key) is None
    f = await cache.join(key)
    t1 = time.perf_counter()
    assert f.leader
    f.publish(answer)
    f.release()
    await cache.put(key, answer, ttl=60)
    if cache.shared_flights is not None:
        await cache.shared_flights.drain()
    return t1 - t0, time.perf_counter() - t0


class RoundTrips:
    """Counts what the client sends: one per command, pipeline or script call."""

    def __init__(self) -> None:
        self.count = 0
        send = Connection.send_packed_command

        async def counted(conn: Connection, *args: object, **kwargs: object) -> None:
            self.count += 1
            await send(conn, *args, **kwargs)  # type: ignore[arg-type]

        Connection.send_packed_command = counted  # type: ignore[method-assign]


def us(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1e6


async def main(url: str, misses: int) -> None:
    namespace = f"bench-flight-{uuid.uuid4().hex[:8]}"
    settings = CacheSettings(enabled=True, type="redis", url=url, namespace=namespace)
    plain = ResponseCache.from_settings(settings, timeout=1.0)
    plain.shared_flights = None  # main's behaviour: the flight stays in this process
    shared = ResponseCache.from_settings(settings, timeout=1.0)
    for cache in (plain, shared):
        await cache.start()
        assert isinstance(cache.store, RedisStore) and cache.store.available, "no Redis at " + url
    assert shared.shared_flights is not None
    await asyncio.wait_for(shared.shared_flights.subscription.connected.wait(), 5)
    body = {"object": "chat.completion", "choices": [{"message": {"content": "x" * 400}}]}
    answer = CachedAnswer.now(body, "openai/gpt-4o", "gpt-4o")
    results: dict[str, tuple[list[float], list[float], int]] = {}
    for name in ("without", "with"):
        results[name] = ([], [], 0)
    client = shared.store.client  # type: ignore[attr-defined]
    for _ in range(200):  # warm both pools and the scripts
        for cache in (plain, shared):
            await one_miss(cache, f"{namespace}:{uuid.uuid4().hex}", answer)
    trips = RoundTrips()
    for name, cache in (("without", plain), ("with", shared)):
        before = trips.count
        for _ in range(200):
            await one_miss(cache, f"{namespace}:{uuid.uuid4().hex}", answer)
        results[name] = ([], [], (trips.count - before) / 200)  # type: ignore[assignment]
    for _ in range(misses):
        for name, cache in (("without", plain), ("with", shared)):
            path, whole = await one_miss(cache, f"{namespace}:{uuid.uuid4().hex}", answer)
            results[name][0].append(path)
            results[name][1].append(whole)
    print(f"{misses} misses each, Redis {url}")
    print(f"{'':28}{'path p50':>10}{'p99':>9}{'whole p50':>11}{'p99':>9}{'trips/miss':>11}")
    for name in ("without", "with"):
        path, whole, cmds = results[name]
        print(
            f"cross-process flight {name:8}{us(path, 0.5):8.0f}us{us(path, 0.99):7.0f}us"
            f"{us(whole, 0.5):9.0f}us{us(whole, 0.99):7.0f}us{cmds:11.1f}"
        )
    added = statistics.median(results["with"][0]) - statistics.median(results["without"][0])
    print(f"added to a miss before its upstream call: {added * 1e6:.0f} us (median)")
    keys = [k async for k in client.scan_iter(match=f"{namespace}*")]
    for i in range(0, len(keys), 500):
        await client.delete(*keys[i : i + 500])
    for cache in (plain, shared):
        await cache.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/11")
    parser.add_argument("--misses", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(main(args.redis, args.misses))

"""Single flight: one upstream call for identical concurrent requests, never stuck followers."""

from __future__ import annotations

import asyncio
import time

import pytest

from mitmroute.cache import CachedAnswer, ResponseCache
from mitmroute.cache.singleflight import SingleFlight
from mitmroute.config import CacheSettings


class Upstream:
    """A fake backend that counts calls and can fail or hang."""

    def __init__(self, delay: float = 0.05, fail_first: int = 0) -> None:
        self.delay = delay
        self.fail_first = fail_first
        self.calls = 0

    async def __call__(self) -> CachedAnswer:
        self.calls += 1
        n = self.calls
        await asyncio.sleep(self.delay)
        if n <= self.fail_first:
            raise RuntimeError("upstream 500")
        message = {"role": "assistant", "content": "hi"}
        body = {"object": "chat.completion", "id": f"chatcmpl-{n}",
                "choices": [{"index": 0, "message": message}]}  # fmt: skip
        return CachedAnswer.now(body, "openai/gpt-4o", "gpt-4o")


async def handle(cache: ResponseCache, key: str, upstream: Upstream) -> tuple[str, CachedAnswer]:
    """What the engine does: cache, then flight, then upstream (publish + put)."""
    hit = await cache.get(key)
    if hit is not None:
        return "hit", hit
    async with cache.flight(key) as f:
        if f.result is not None:
            return "shared", f.result
        answer = await upstream()
        f.publish(answer)
        await cache.put(key, answer)
        return "upstream", answer


@pytest.fixture
def cache() -> ResponseCache:
    return ResponseCache.from_settings(CacheSettings(enabled=True))


async def test_ten_identical_requests_make_one_upstream_call(cache: ResponseCache) -> None:
    upstream = Upstream()
    results = await asyncio.gather(*(handle(cache, "k", upstream) for _ in range(10)))
    assert upstream.calls == 1
    assert sorted(kind for kind, _ in results).count("shared") == 9
    assert {a.body["id"] for _, a in results} == {"chatcmpl-1"}
    assert len({id(a.body) for _, a in results}) == 10  # every follower got its own copy
    assert len(cache.flights) == 0
    assert (await handle(cache, "k", upstream))[0] == "hit"


async def test_different_keys_do_not_wait_for_each_other(cache: ResponseCache) -> None:
    upstream = Upstream(delay=0.05)
    start = time.perf_counter()
    await asyncio.gather(*(handle(cache, f"k{i}", upstream) for i in range(5)))
    assert upstream.calls == 5 and time.perf_counter() - start < 0.2


async def test_leader_failure_releases_followers_to_proceed_alone(cache: ResponseCache) -> None:
    upstream = Upstream(delay=0.05, fail_first=1)
    results = await asyncio.gather(
        *(handle(cache, "k", upstream) for _ in range(5)), return_exceptions=True
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1  # only the leader's own request failed
    assert upstream.calls == 5  # followers each went upstream on their own
    assert cache.flights.alone == 4 and len(cache.flights) == 0


async def test_leader_cancelled_releases_followers(cache: ResponseCache) -> None:
    upstream = Upstream(delay=0.05)
    leader = asyncio.create_task(handle(cache, "k", Upstream(delay=10)))
    await asyncio.sleep(0.01)
    followers = [asyncio.create_task(handle(cache, "k", upstream)) for _ in range(3)]
    await asyncio.sleep(0.01)
    leader.cancel()
    start = time.perf_counter()
    results = await asyncio.gather(*followers)
    assert time.perf_counter() - start < 0.5
    assert all(kind == "upstream" for kind, _ in results)
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_follower_cancellation_does_not_disturb_the_flight(cache: ResponseCache) -> None:
    upstream = Upstream(delay=0.1)
    tasks = [asyncio.create_task(handle(cache, "k", upstream)) for _ in range(4)]
    await asyncio.sleep(0.02)
    tasks[2].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[2], asyncio.CancelledError)
    assert [r[0] for i, r in enumerate(results) if i != 2] == ["upstream", "shared", "shared"]
    assert upstream.calls == 1


async def test_waiting_is_bounded_by_the_leader_deadline() -> None:
    flights: SingleFlight[str] = SingleFlight(deadline=0.1)
    leader = await flights.join("k")  # never publishes, never releases
    assert leader.leader
    start = time.perf_counter()
    follower = await flights.join("k")
    waited = time.perf_counter() - start
    assert not follower.leader and follower.result is None
    assert 0.08 < waited < 0.3
    fresh = await flights.join("k")  # the stale leader is replaced
    assert fresh.leader
    leader.release()  # a late release of the stale leader must not drop the new flight
    assert len(flights) == 1
    fresh.release()
    assert len(flights) == 0


async def test_published_result_is_served_before_release() -> None:
    flights: SingleFlight[str] = SingleFlight(share=str.upper)
    leader = await flights.join("k")
    leader.publish("answer")
    late = await flights.join("k")  # arrives while the leader is still storing
    assert late.result == "ANSWER" and not late.leader
    late.publish("ignored")  # a follower cannot publish
    leader.release()
    leader.release()  # idempotent
    assert len(flights) == 0 and (await flights.join("k")).leader

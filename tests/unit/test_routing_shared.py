"""Routing state shared by several proxies through Redis (a `redis-server` of this module's own):
usage counts and latencies cross proxies; Redis trouble only leaves each proxy its own counts."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from mitmroute.config import parse_config
from mitmroute.exchange import Exchange, Usage
from mitmroute.request import now_utc
from mitmroute.routing.plan import Stop, Try
from mitmroute.routing.state import RoutingState
from tests.conftest import free_port
from tests.redis_process import RedisProcess

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess]:
    server = RedisProcess()
    yield server
    server.stop()


def entry(model: str, **params: Any) -> dict[str, Any]:
    return {
        "model_name": "g",
        "litellm_params": {"model": f"openai/{model}", "api_base": "http://f/v1", "api_key": "k"}
        | params,
    }


def proxies(url: str, strategy: str, model_list: list[dict[str, Any]], n: int = 2):
    """`n` routing states as `n` proxies with one config would hold them."""
    raw = {
        "model_list": model_list,
        "router_settings": {"routing_strategy": strategy, "redis_url": url},
        "litellm_settings": {"cache_params": {"namespace": f"t-{uuid.uuid4().hex[:8]}"}},
    }
    config = parse_config(raw, environ={})
    return [RoutingState(config, rng=random.Random(i)) for i in range(n)]


async def answer(
    state: RoutingState, tokens: int = 0, speed: dict[str, float] | None = None
) -> str:
    """One request through `state` (taking `speed[model]` seconds); the model that answered."""
    await state.refresh("g")
    rid = uuid.uuid4().hex
    plan = state.plan("g", request_id=rid)
    step = plan.next()
    assert isinstance(step, Try)
    await asyncio.sleep((speed or {}).get(step.deployment.model, 0.0))
    plan.succeeded(step.deployment)
    exchange = Exchange(rid, now_utc(), "chat/completions")
    exchange.usage = Usage(prompt_tokens=tokens, completion_tokens=10)
    state.finished(step.deployment, exchange)
    assert state.shared is not None
    await state.shared.drain()
    return step.deployment.model


async def test_usage_based_routing_sees_the_tokens_other_proxies_used(redis):
    one, two = proxies(redis.url, "usage-based-routing-v2", [entry("a"), entry("b")])
    await one.start()
    await two.start()
    try:
        first = await answer(one, tokens=500)
        for _ in range(5):  # the other proxy sends everything to the deployment `one` spared
            assert await answer(two, tokens=10) != first
    finally:
        await one.close()
        await two.close()


async def test_a_deployments_rpm_holds_across_proxies(redis):
    one, two = proxies(redis.url, "simple-shuffle", [entry("solo", rpm=2)])
    await one.start()
    await two.start()
    try:
        await answer(one)
        await answer(one)
        await two.refresh("g")
        assert isinstance(two.plan("g").next(), Stop)  # two requests this minute: at its rpm
    finally:
        await one.close()
        await two.close()


async def test_latency_based_routing_uses_latencies_other_proxies_measured(redis):
    one, two = proxies(redis.url, "latency-based-routing", [entry("fast"), entry("slow")])
    await one.start()
    await two.start()
    try:
        speed = {"fast": 0.0, "slow": 0.2}
        for _ in range(4):  # `one` measures both (the unmeasured first), then keeps to `fast`
            await answer(one, speed=speed)
        assert all([await answer(two, speed=speed) == "fast" for _ in range(5)])
    finally:
        await one.close()
        await two.close()


async def test_redis_down_routes_on_this_proxys_own_counts_without_delay():
    dead = f"redis://127.0.0.1:{free_port()}/0"
    [state] = proxies(dead, "usage-based-routing-v2", [entry("a"), entry("b")], n=1)
    await state.start()
    try:
        assert state.shared is not None and not state.shared.available
        t0 = time.perf_counter()
        answered = [await answer(state, tokens=100) for _ in range(4)]
        assert time.perf_counter() - t0 < 0.5
        assert sorted(answered) == ["a", "a", "b", "b"]  # still by usage, counted here
    finally:
        await state.close()


async def test_a_hung_redis_costs_a_request_at_most_its_budget_then_nothing():
    server = RedisProcess()
    try:
        [state] = proxies(server.url, "usage-based-routing-v2", [entry("a"), entry("b")], n=1)
        await state.start()
        assert state.shared is not None and state.shared.available
        server.pause()
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            await state.refresh("g")
            times.append(time.perf_counter() - t0)
        assert max(times) < 0.3 and not state.shared.available
        assert sum(times[3:]) < 0.01  # the breaker is open: Redis is not even asked
        await state.close()
    finally:
        server.stop()


async def test_only_cooldowns_are_shared_where_nothing_reads_usage_or_latency(redis):
    [state] = proxies(redis.url, "simple-shuffle", [entry("a"), entry("b")], n=1)
    await state.start()
    try:
        assert state.shared_cooldowns is not None
        await answer(state, tokens=100)
        assert state.shared is not None and state.shared.guard.errors == 0
        client = aioredis.Redis.from_url(redis.url)
        written = [k async for k in client.scan_iter(f"{state.shared.prefix}:*")]
        await client.aclose()
        assert written == []  # shuffle, no rpm/tpm: no usage or latency written
    finally:
        await state.close()

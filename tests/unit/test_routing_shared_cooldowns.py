"""Cooldowns shared through Redis (a `redis-server` of this module's own): one proxy's cooldown
rests the deployment on every proxy until the same moment; Redis trouble leaves each proxy its
own cooldowns, at no cost to requests."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from mitmroute.config import parse_config
from mitmroute.routing.state import RoutingState
from tests.conftest import free_port
from tests.redis_process import RedisProcess

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisProcess]:
    process = RedisProcess()
    yield process
    process.stop()


def entry(model: str) -> dict[str, Any]:
    return {
        "model_name": "g",
        "litellm_params": {"model": f"openai/{model}", "api_base": "http://f/v1", "api_key": "k"},
    }


def states(url: str, n: int = 2, namespace: str | None = None) -> list[RoutingState]:
    """`n` routing states as `n` proxies with one config would hold them."""
    raw = {
        "model_list": [entry("a"), entry("b")],
        "router_settings": {"redis_url": url, "cooldown_time": 5, "allowed_fails": 0},
        "litellm_settings": {
            "cache_params": {"namespace": namespace or f"t-{uuid.uuid4().hex[:8]}"}
        },
    }
    config = parse_config(raw, environ={})
    return [RoutingState(config, rng=random.Random(i)) for i in range(n)]


async def started(*many: RoutingState) -> None:
    for state in many:
        await state.start()
        assert state.shared_cooldowns is not None
        await asyncio.wait_for(state.shared_cooldowns.subscription.connected.wait(), 5)


async def until(condition, timeout: float = 2.0) -> float:
    """Seconds until `condition()` held."""
    t0 = time.perf_counter()
    while not condition():
        assert time.perf_counter() - t0 < timeout, "timed out"
        await asyncio.sleep(0.002)
    return time.perf_counter() - t0


def first_id(state: RoutingState) -> str:
    return state.groups["g"][0].id


async def test_a_cooldown_on_one_proxy_rests_the_deployment_on_the_other_until_the_same_moment(
    server,
):
    one, two = states(server.url)
    await started(one, two)
    try:
        heard: list[str] = []
        two.cooldowns.listeners.append(lambda d, s, r: heard.append(d))
        deployment = first_id(one)
        one.cooldowns.failure(deployment, "rate_limit", retry_after=2.0)
        took = await until(lambda: two.cooldowns.cooling(deployment))
        assert took < 0.1
        assert abs(one.cooldowns.remaining(deployment) - two.cooldowns.remaining(deployment)) < 0.01
        assert not two.cooldowns.cooling(one.groups["g"][1].id)  # only that deployment
        assert heard == []  # the proxy that decided counts and alerts, not every proxy
        picked = {two.plan("g").next().deployment.id for _ in range(10)}  # type: ignore[union-attr]
        assert deployment not in picked
    finally:
        await one.close()
        await two.close()


async def test_a_proxy_that_starts_later_rests_what_the_others_cooled(server):
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    [one] = states(server.url, 1, namespace)
    await started(one)
    try:
        deployment = first_id(one)
        one.cooldowns.failure(deployment, "server_error")  # allowed_fails 0: cooled for 5 s
        assert one.shared is not None
        await one.shared.drain()
        [late] = states(server.url, 1, namespace)
        await started(late)
        assert late.cooldowns.cooling(deployment)
        assert (
            abs(late.cooldowns.remaining(deployment) - one.cooldowns.remaining(deployment)) < 0.05
        )
        await late.close()
    finally:
        await one.close()


async def test_a_shorter_cooldown_never_shortens_a_longer_one(server):
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    one, two = states(server.url, 2, namespace)
    await started(one, two)
    try:
        deployment = first_id(one)
        one.cooldowns.failure(deployment, "rate_limit", retry_after=8.0)
        await until(lambda: two.cooldowns.cooling(deployment))
        two.cooldowns.failure(deployment, "server_error", retry_after=1.0)
        assert two.shared is not None
        await two.shared.drain()
        await asyncio.sleep(0.05)
        assert one.cooldowns.remaining(deployment) > 7
        client = redis.Redis.from_url(server.url)
        key = f"{namespace}:routing:cooldown:{deployment}"
        stored = json.loads(client.get(key))
        assert stored["s"] == 8.0 and client.pttl(key) > 7000
        client.close()
    finally:
        await one.close()
        await two.close()


async def test_messages_for_deployments_of_another_config_are_ignored(server):
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    [one] = states(server.url, 1, namespace)
    await started(one)
    try:
        client = redis.Redis.from_url(server.url)
        end = round((time.time() + 5) * 1000)
        for doc in ({"d": "other@x#0", "u": end, "s": 5, "r": "x", "o": "elsewhere"}, "garbage"):
            client.publish(f"{namespace}:routing:cooldowns", json.dumps(doc))
        doc = {"d": first_id(one), "u": end, "s": 5, "r": "x", "o": "elsewhere"}
        client.publish(f"{namespace}:routing:cooldowns", json.dumps(doc))
        client.close()
        await until(lambda: one.cooldowns.cooling(first_id(one)))
        assert one.shared_cooldowns is not None and one.shared_cooldowns.adopted == 1
    finally:
        await one.close()


async def test_redis_down_cools_locally_without_delay():
    [state] = states(f"redis://127.0.0.1:{free_port()}/0", 1)
    await state.start()
    try:
        assert state.shared is not None and not state.shared.available
        deployment = first_id(state)
        t0 = time.perf_counter()
        state.cooldowns.failure(deployment, "server_error")
        assert time.perf_counter() - t0 < 0.005
        assert state.cooldowns.cooling(deployment)
    finally:
        await state.close()


async def test_cooldowns_travel_again_after_redis_comes_back_empty():
    process = RedisProcess()
    try:
        one, two = states(process.url)
        await started(one, two)
        process.restart_empty()
        assert one.shared_cooldowns is not None and two.shared_cooldowns is not None
        await until(lambda: two.shared_cooldowns.subscription.connects >= 2, timeout=5)
        await until(lambda: one.shared_cooldowns.subscription.connects >= 2, timeout=5)
        await until(lambda: one.shared is not None and one.shared.available, timeout=5)
        deployment = first_id(one)
        one.cooldowns.failure(deployment, "server_error")
        await until(lambda: two.cooldowns.cooling(deployment))
        await one.close()
        await two.close()
    finally:
        process.stop()

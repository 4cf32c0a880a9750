"""Two real proxies on one config and one Redis of the test's own: one proxy's cooldown rests
the deployment on both, until the same moment; identical concurrent requests on the two make
one upstream call; with Redis killed both still answer."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import deployment
from tests.redis_process import RedisProcess

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    server = RedisProcess()
    yield server
    server.stop()


def calls(backend, model: str) -> int:
    return sum(1 for r in backend.state.requests if r.get("model") == model)


def cooling_config(backend, redis_server: RedisProcess, flaky: str) -> dict[str, Any]:
    return {
        "model_list": [
            deployment("primary", f"openai/{flaky}", f"{backend.url}/v1", api_key="k"),
            deployment("backup", "openai/backup-answer", f"{backend.url}/v1", api_key="k"),
        ],
        "router_settings": {
            "redis_url": redis_server.url,
            "fallbacks": [{"primary": ["backup"]}],
            "allowed_fails": 0,
            "cooldown_time": 1,
        },
        "litellm_settings": {"cache_params": {"namespace": f"t-{uuid.uuid4().hex[:8]}"}},
    }


def cached_config(backend, redis_server: RedisProcess) -> dict[str, Any]:
    params = {"type": "redis", "host": "127.0.0.1", "port": redis_server.port}
    return {
        "model_list": [deployment("slow", "openai/slow-300", f"{backend.url}/v1", api_key="k")],
        "litellm_settings": {
            "cache": True,
            "cache_params": params | {"namespace": f"t-{uuid.uuid4().hex[:8]}"},
        },
    }


def ask(proxy, model: str, content: str = "are you there") -> tuple[str, int]:
    """(the deployment that answered, attempts) of one request."""
    with proxy.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": content}]
        )
    return raw.headers["x-mitmroute-deployment"], int(raw.headers["x-mitmroute-attempts"])


def test_a_deployment_failing_through_one_proxy_is_skipped_by_the_other(
    start_proxy, backend, redis_server
):
    flaky = f"flaky-1-{uuid.uuid4().hex[:8]}"  # fails once, then answers
    config = cooling_config(backend, redis_server, flaky)
    one, two = start_proxy(config), start_proxy(config)
    ask(one, "backup"), ask(two, "backup")  # both up and subscribed
    assert ask(one, "primary") == ("openai/backup-answer", 2)  # 503, cooled, fell back
    assert calls(backend, flaky) == 1
    assert ask(two, "primary") == ("openai/backup-answer", 1)  # not even tried
    assert calls(backend, flaky) == 1


def test_a_shared_cooldown_ends_at_the_same_moment_on_both_proxies(
    start_proxy, backend, redis_server
):
    flaky = f"flaky-1-{uuid.uuid4().hex[:8]}"
    config = cooling_config(backend, redis_server, flaky)
    one, two = start_proxy(config), start_proxy(config)
    ask(one, "backup"), ask(two, "backup")
    before = time.monotonic()
    assert ask(one, "primary")[0] == "openai/backup-answer"  # cooled for 1 s from here
    after = time.monotonic()
    back: dict[str, float] = {}

    def watch(name: str, proxy) -> None:
        """When this proxy first routes to the primary again."""
        with proxy.client() as client:
            while time.monotonic() < after + 3:
                raw = client.chat.completions.with_raw_response.create(
                    model="primary", messages=[{"role": "user", "content": "again"}]
                )
                if raw.headers["x-mitmroute-deployment"] == f"openai/{flaky}":
                    back[name] = time.monotonic()
                    return
                time.sleep(0.01)

    watchers = [threading.Thread(target=watch, args=item) for item in (("one", one), ("two", two))]
    for w in watchers:
        w.start()
    for w in watchers:
        w.join()
    assert set(back) == {"one", "two"}
    for seen in back.values():
        assert before + 1.0 <= seen < after + 1.0 + 0.3
    assert abs(back["one"] - back["two"]) < 0.1


def test_identical_concurrent_requests_on_two_proxies_make_one_upstream_call(
    start_proxy, backend, redis_server
):
    config = cached_config(backend, redis_server)
    one, two = start_proxy(config), start_proxy(config)
    ask(one, "slow", "warm up one"), ask(two, "slow", "warm up two")
    before = calls(backend, "slow-300")

    async def both(stream: bool) -> list[str]:
        messages = [{"role": "user", "content": f"together {uuid.uuid4().hex[:8]} a b c"}]

        async def one_request(proxy) -> str:
            async with proxy.async_client() as client:
                if not stream:
                    answer = await client.chat.completions.create(model="slow", messages=messages)
                    return answer.choices[0].message.content
                chunks = await client.chat.completions.create(
                    model="slow", messages=messages, stream=True
                )
                return "".join([c.choices[0].delta.content or "" async for c in chunks])

        return await asyncio.gather(one_request(one), one_request(two))

    answers = asyncio.run(both(stream=False))
    assert answers[0] == answers[1] and answers[0].startswith("echo: together")
    assert calls(backend, "slow-300") - before == 1
    streamed = asyncio.run(both(stream=True))  # as in one process: the follower replays
    assert streamed[0] == streamed[1] and streamed[0].startswith("echo: together")
    assert calls(backend, "slow-300") - before == 2


def test_with_redis_killed_both_proxies_still_answer_at_once(start_proxy, backend, redis_server):
    flaky = f"flaky-1-{uuid.uuid4().hex[:8]}"
    config = cooling_config(backend, redis_server, flaky)
    config["litellm_settings"]["cache"] = True
    config["litellm_settings"]["cache_params"] |= {
        "type": "redis",
        "host": "127.0.0.1",
        "port": redis_server.port,
    }
    one, two = start_proxy(config), start_proxy(config)
    ask(one, "backup"), ask(two, "backup")
    redis_server.kill()
    for proxy in (one, two):
        for i in range(4):
            t0 = time.perf_counter()
            answered, _ = ask(proxy, "backup", f"no redis {uuid.uuid4().hex[:8]}")
            assert answered == "openai/backup-answer"
            assert time.perf_counter() - t0 < 0.5, f"request {i} slowed by the outage"
    assert ask(one, "primary") == ("openai/backup-answer", 2)  # cooled here, on its own
    assert ask(one, "primary") == ("openai/backup-answer", 1)
    assert ask(two, "primary", "elsewhere") == (f"openai/{flaky}", 1)  # two never heard of it

"""`router_settings.routing_strategy` through a real mitmdump with the openai SDK: over many
requests, the deployment that answered (`x-mitmroute-deployment`) is the one the strategy
names. Models of the fake: any name answers, `slow-<ms>` takes <ms> per word, `fail-<status>`
fails."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from typing import Any

import pytest

from tests.conftest import deployment, free_port

pytestmark = pytest.mark.timeout(120)


def ok(group: str, backend, model: str, **params: Any) -> dict[str, Any]:
    return deployment(group, f"openai/{model}", f"{backend.url}/v1", api_key="sk-b", **params)


def priced(group: str, backend, model: str, usd_per_token: float) -> dict[str, Any]:
    return ok(
        group,
        backend,
        model,
        input_cost_per_token=usd_per_token,
        output_cost_per_token=usd_per_token,
    )


def ask(proxy, group: str, text: str = "hi") -> tuple[str, dict[str, Any]]:
    """One chat request: the deployment that answered (without `openai/`) and the usage."""
    with proxy.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model=group, messages=[{"role": "user", "content": text}]
        )
    completion = raw.parse()
    return raw.headers["x-mitmroute-deployment"].removeprefix("openai/"), {
        "total_tokens": completion.usage.total_tokens,
        "attempts": int(raw.headers["x-mitmroute-attempts"]),
    }


def clear_of_minute_boundary(margin: float = 12.0) -> None:
    """Usage counts restart each clock minute: start a usage test well inside one."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.5)


# --- simple-shuffle --------------------------------------------------------------------------


def test_simple_shuffle_spreads_by_weight_and_never_picks_a_drained_deployment(
    start_proxy, backend
):
    proxy = start_proxy(
        {
            "model_list": [
                ok("g", backend, "heavy", weight=3),
                ok("g", backend, "light", weight=1),
                ok("g", backend, "drained", weight=0),
            ],
            "router_settings": {"routing_strategy": "simple-shuffle"},
        }
    )
    answered = Counter(ask(proxy, "g")[0] for _ in range(60))
    assert answered["drained"] == 0
    assert answered["heavy"] > answered["light"] > 0


# --- cost-based-routing ----------------------------------------------------------------------


def test_cost_based_routing_always_picks_the_cheapest_until_it_fails(start_proxy, backend):
    proxy = start_proxy(
        {
            "model_list": [
                priced("g", backend, "pricey-answer", 1e-5),
                priced("g", backend, "cheap-answer", 1e-7),
                priced("g", backend, "mid-answer", 1e-6),
                priced("broken", backend, "pricey-answer", 1e-5),
                priced("broken", backend, "fail-500", 1e-8),
                priced("broken", backend, "mid-answer", 1e-6),
                ok("book", backend, "gpt-4o"),
                ok("book", backend, "gpt-4o-mini"),
            ],
            "router_settings": {
                "routing_strategy": "cost-based-routing",
                "allowed_fails": 0,
                "cooldown_time": 30,
            },
        }
    )
    assert {ask(proxy, "g")[0] for _ in range(20)} == {"cheap-answer"}
    first, usage = ask(proxy, "broken")
    assert first == "mid-answer" and usage["attempts"] == 2  # the cheapest failed first
    later = [ask(proxy, "broken") for _ in range(10)]
    assert all(d == "mid-answer" and u["attempts"] == 1 for d, u in later)  # cheapest resting
    assert {ask(proxy, "book")[0] for _ in range(10)} == {"gpt-4o-mini"}  # by the price book


# --- latency-based-routing -------------------------------------------------------------------


def test_latency_based_routing_prefers_the_fast_deployment(start_proxy, backend):
    proxy = start_proxy(
        {
            "model_list": [ok("g", backend, "slow-150"), ok("g", backend, "slow-1")],
            "router_settings": {"routing_strategy": "latency-based-routing"},
        }
    )
    answered = [ask(proxy, "g", "one two three")[0] for _ in range(12)]
    assert answered[:2].count("slow-150") == 1  # measured once, while unmeasured
    assert answered[2:] == ["slow-1"] * 10


def test_lowest_latency_buffer_shares_load_among_the_near_fastest(start_proxy, backend):
    proxy = start_proxy(
        {
            "model_list": [
                ok("g", backend, "slow-20"),
                ok("g", backend, "slow-25"),
                ok("g", backend, "slow-400"),
            ],
            "router_settings": {
                "routing_strategy": "latency-based-routing",
                "routing_strategy_args": {"lowest_latency_buffer": 1.0, "ttl": 300},
            },
        }
    )
    answered = Counter(ask(proxy, "g", "one two three four five six")[0] for _ in range(24))
    assert answered["slow-400"] == 1  # measured once: never within 100 % of the fastest
    assert answered["slow-20"] >= 3 and answered["slow-25"] >= 3


# --- least-busy ------------------------------------------------------------------------------


def test_least_busy_spreads_concurrent_slow_requests(start_proxy, backend):
    proxy = start_proxy(
        {
            "model_list": [
                ok("g", backend, "slow-1000"),
                ok("g", backend, "slow-1001"),
                ok("g", backend, "slow-1002"),
            ],
            "router_settings": {"routing_strategy": "least-busy"},
        }
    )

    async def run() -> list[str]:
        async with proxy.async_client() as client:

            async def one(i: int) -> str:
                raw = await client.chat.completions.with_raw_response.create(
                    model="g", messages=[{"role": "user", "content": f"n{i}"}]
                )
                return raw.headers["x-mitmroute-deployment"]

            return await asyncio.gather(*(one(i) for i in range(6)))

    answered = Counter(asyncio.run(run()))
    assert sorted(answered.values()) == [2, 2, 2]  # each answer takes 2 s: all six overlap


def test_least_busy_keeps_new_requests_off_a_deployment_busy_with_a_stream(start_proxy, backend):
    proxy = start_proxy(
        {
            "model_list": [ok("g", backend, "slow-300"), ok("g", backend, "slow-301")],
            "router_settings": {"routing_strategy": "least-busy"},
        }
    )
    words = " ".join(f"w{i}" for i in range(30))  # streamed over ~9 s
    with proxy.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="g", stream=True, messages=[{"role": "user", "content": words}]
        )
        busy = raw.headers["x-mitmroute-deployment"].removeprefix("openai/")
        stream = raw.parse()
        next(iter(stream))  # the stream is open and flowing
        others = [ask(proxy, "g")[0] for _ in range(4)]  # 0.6 s each
        stream.close()
    assert busy not in others and len(set(others)) == 1


# --- usage-based-routing-v2 ------------------------------------------------------------------


def sentence(words: int) -> str:
    return " ".join(["word"] * words)


def test_usage_based_routing_follows_tpm_use(start_proxy, backend):
    proxy = start_proxy(
        {
            "model_list": [ok("g", backend, "usage-a"), ok("g", backend, "usage-b")],
            "router_settings": {"routing_strategy": "usage-based-routing-v2"},
        }
    )
    clear_of_minute_boundary()
    used = {"usage-a": 0, "usage-b": 0}
    for words in (60, 5, 5, 5, 5, 80, 3, 3, 40, 3, 3, 3):
        lowest = min(used.values())
        answered, usage = ask(proxy, "g", sentence(words))
        assert used[answered] == lowest, (answered, used)
        used[answered] += usage["total_tokens"]


def test_proxies_on_one_redis_share_usage(start_proxy, backend):
    from tests.redis_process import RedisProcess

    redis = RedisProcess()
    try:
        config = {
            "model_list": [ok("g", backend, "usage-a"), ok("g", backend, "usage-b")],
            "router_settings": {
                "routing_strategy": "usage-based-routing-v2",
                "redis_url": redis.url,
            },
        }
        one, two = start_proxy(config), start_proxy(config)
        clear_of_minute_boundary()
        busy, _ = ask(one, "g", sentence(100))
        answered = [ask(two, "g")[0] for _ in range(4)]
        assert busy not in answered  # `two` saw the tokens `one` spent
    finally:
        redis.stop()


def test_redis_down_never_fails_a_request(start_proxy, backend):
    proxy = start_proxy(
        {
            "model_list": [ok("g", backend, "usage-a"), ok("g", backend, "usage-b")],
            "router_settings": {
                "routing_strategy": "usage-based-routing-v2",
                "redis_url": f"redis://127.0.0.1:{free_port()}/0",
            },
        }
    )
    clear_of_minute_boundary()
    t0 = time.perf_counter()
    answered = [ask(proxy, "g", sentence(10))[0] for _ in range(4)]
    assert time.perf_counter() - t0 < 5
    assert sorted(answered) == ["usage-a", "usage-a", "usage-b", "usage-b"]  # counted here


# --- config --------------------------------------------------------------------------------


def test_an_unknown_strategy_stops_start_up_naming_its_key(tmp_path, confdir):
    from tests.conftest import MITMDUMP, ROOT

    bad = tmp_path / "bad.yaml"
    bad.write_text("router_settings:\n  routing_strategy: fastest-wins\n")
    args = ["-p", str(free_port()), "--set", f"confdir={confdir}", "--set", f"router_config={bad}"]
    out = subprocess.run(
        [MITMDUMP, *args, "-s", str(ROOT / "addons" / "router.py")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "router_settings.routing_strategy: unknown routing strategy 'fastest-wins'" in (
        out.stderr + out.stdout
    )

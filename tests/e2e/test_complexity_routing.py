"""The seed's promise through a real mitmdump and the openai SDK: "Cost routing: cheap questions
hit Ollama, expensive questions hit Claude", from a LiteLLM `auto_router/complexity_router`
entry; a session stays on Claude once it got there; a key near its budget steps down; the tier
and reason are response headers and spend-log columns with the baseline's cost beside."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import anthropic
import duckdb
import httpx2 as httpx
import pytest
import redis as redis_lib

from tests.conftest import Proxy, deployment
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.openai_server import FakeBackend
from tests.redis_process import RedisProcess

CLAUDE_KEY = "sk-ant-backend-0123456789"
MASTER = "sk-master-complexity-1"
EASY = "What's the capital of France?"
HARD = (
    "Design a distributed rate limiter for an API served from three regions, with per-customer "
    "limits that must hold within 5% globally. Discuss consistency and failure modes."
)


@pytest.fixture(scope="module")
def claude():
    with FakeAnthropic(api_key=CLAUDE_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def ollama():
    fake = FakeBackend()
    fake.url = fake.start()  # type: ignore[attr-defined]
    yield fake
    fake.stop()


def seed_config(ollama: FakeBackend, claude: FakeAnthropic, **router: Any) -> dict[str, Any]:
    """The seed's groups (local-qwen on Ollama, claude-opus-4 on Anthropic) behind a router
    named like the model legacy apps ask for."""
    claude_params: dict[str, Any] = {"api_key": CLAUDE_KEY}
    claude_params.update(router.pop("claude_prices", {}))
    return {
        "model_list": [
            deployment("local-qwen", "ollama/qwen3:32b", ollama.url),  # type: ignore[attr-defined]
            deployment(
                "claude-opus-4",
                "anthropic/claude-opus-4-20250514",
                claude.base_url,
                **claude_params,
            ),
            {
                "model_name": "gpt-4o",
                "litellm_params": {
                    "model": "auto_router/complexity_router",
                    "complexity_router_default_model": "claude-opus-4",
                    "complexity_router_config": {
                        "classifier_type": "heuristic",
                        "tiers": {
                            "SIMPLE": "local-qwen",
                            "MEDIUM": "local-qwen",
                            "COMPLEX": "claude-opus-4",
                            "REASONING": "claude-opus-4",
                        },
                        **router,
                    },
                },
            },
        ],
        "router_settings": {"num_retries": 0},
        "general_settings": {"passthrough_unknown_models": False},
    }


def ask(proxy: Proxy, text: str | list[dict[str, Any]], api_key: str = "sk-app", **kwargs: Any):
    """(reply headers, completion text) of one chat completion through the proxy."""
    messages = [{"role": "user", "content": text}] if isinstance(text, str) else text
    with proxy.client(api_key=api_key) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=messages, **kwargs
        )
        completion = raw.parse()
    return raw.headers, completion.choices[0].message.content


def rows(proxy: Proxy, sql: str) -> list[tuple]:
    proxy.stop()  # the writer flushes everything on exit
    with duckdb.connect(str(proxy.spend_db), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_cheap_questions_hit_ollama_and_expensive_questions_hit_claude(start_proxy, ollama, claude):
    proxy = start_proxy(seed_config(ollama, claude))
    claude_before = len(claude.requests)
    headers, text = ask(proxy, EASY)
    assert headers["x-mitmroute-deployment"] == "ollama/qwen3:32b"
    assert headers["x-mitmroute-tier"] == "SIMPLE"
    assert headers["x-mitmroute-route-reason"] == "classifier"
    assert text.startswith("echo:") and len(claude.requests) == claude_before
    headers, _ = ask(proxy, HARD)
    assert headers["x-mitmroute-deployment"] == "anthropic/claude-opus-4-20250514"
    assert headers["x-mitmroute-tier"] == "COMPLEX"
    assert len(claude.requests) == claude_before + 1
    assert claude.requests[-1].body["model"] == "claude-opus-4-20250514"
    # streamed, and through the Responses API: the same decision
    with proxy.client() as client:
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": HARD}], stream=True
        ) as stream:
            assert stream.headers["x-mitmroute-tier"] == "COMPLEX"
            assert any(line for line in stream.iter_lines())
        response = client.responses.with_raw_response.create(model="gpt-4o", input=EASY)
        assert response.headers["x-mitmroute-deployment"] == "ollama/qwen3:32b"
        assert response.parse().output_text.startswith("echo:")
    spend = rows(
        proxy,
        "SELECT endpoint, model_group, route_tier, route_reason, cost_usd, baseline_cost_usd, "
        "prompt_tokens, completion_tokens FROM spend_log ORDER BY started_at",
    )
    assert [r[:4] for r in spend] == [
        ("chat/completions", "local-qwen", "SIMPLE", "classifier"),
        ("chat/completions", "claude-opus-4", "COMPLEX", "classifier"),
        ("chat/completions", "claude-opus-4", "COMPLEX", "classifier"),
        ("responses", "local-qwen", "SIMPLE", "classifier"),
    ]
    for _, group, _, _, cost, baseline, prompt, completion in spend:
        # what the same tokens cost on claude-opus-4 ($15 / $75 per million)
        assert baseline == Decimal(prompt * 15 + completion * 75) / 10**6
        assert cost == (baseline if group == "claude-opus-4" else 0)


def test_an_agent_session_never_drops_from_claude_within_its_ttl(start_proxy, ollama, claude):
    proxy = start_proxy(seed_config(ollama, claude))
    session = {"x-session-id": "agent-7"}
    assert ask(proxy, HARD, extra_headers=session)[0]["x-mitmroute-tier"] == "COMPLEX"
    headers, _ = ask(proxy, "thanks!", extra_headers=session)
    assert headers["x-mitmroute-deployment"] == "anthropic/claude-opus-4-20250514"
    assert headers["x-mitmroute-route-reason"] == "classifier+session"
    # Codex names its session `session-id`; another session is classified on its own
    assert (
        ask(proxy, "thanks!", extra_headers={"session-id": "other"})[0]["x-mitmroute-tier"]
        == "SIMPLE"
    )
    # no header at all: a conversation is known by its first messages
    first = [{"role": "user", "content": HARD}]
    ask(proxy, first)
    follow_up = [*first, {"role": "assistant", "content": "A token bucket..."}]
    follow_up.append({"role": "user", "content": "ok, thanks"})
    headers, _ = ask(proxy, follow_up)
    assert headers["x-mitmroute-tier"] == "COMPLEX"
    assert headers["x-mitmroute-route-reason"] == "classifier+session"
    # an explicit override still wins, by header or by metadata
    headers, _ = ask(proxy, HARD, extra_headers={**session, "x-mitmroute-tier": "SIMPLE"})
    assert headers["x-mitmroute-deployment"] == "ollama/qwen3:32b"
    assert ask(proxy, EASY, metadata={"tier": "REASONING"})[0]["x-mitmroute-tier"] == "REASONING"


def test_claude_code_style_messages_are_routed_and_stick_to_their_session(
    start_proxy, ollama, claude
):
    """The Messages dialect (anthropic SDK) asks the same router; Claude Code names its
    session `x-claude-code-session-id`."""
    proxy = start_proxy(seed_config(ollama, claude))
    http = httpx.Client(proxy=proxy.url, verify=proxy.ssl_context(), timeout=30)
    client = anthropic.Anthropic(api_key="sk-ant-app", max_retries=0, http_client=http)
    session = {"x-claude-code-session-id": "cc-1"}
    with client:
        hard = client.messages.with_raw_response.create(
            model="gpt-4o",
            max_tokens=100,
            messages=[{"role": "user", "content": HARD}],
            extra_headers=session,
        )
        assert hard.headers["x-mitmroute-deployment"] == "anthropic/claude-opus-4-20250514"
        easy = client.messages.with_raw_response.create(
            model="gpt-4o",
            max_tokens=100,
            messages=[{"role": "user", "content": "thanks"}],
            extra_headers=session,
        )
        assert easy.headers["x-mitmroute-route-reason"] == "classifier+session"
        forced = client.messages.with_raw_response.create(
            model="gpt-4o",
            max_tokens=100,
            messages=[{"role": "user", "content": HARD}],
            extra_headers={"x-mitmroute-tier": "simple"},
        )
        assert forced.headers["x-mitmroute-deployment"] == "ollama/qwen3:32b"
        assert forced.parse().content[0].text.startswith("echo:")


def test_sessions_are_shared_by_two_proxies_on_one_redis(start_proxy, ollama, claude):
    redis = RedisProcess()  # a server of its own: the shared one is never touched
    try:
        config = seed_config(ollama, claude)
        config["router_settings"]["redis_url"] = redis.url
        one, two = start_proxy(config), start_proxy(config)
        for proxy in (one, two):  # each proxy's Redis connection made (a first call connects)
            ask(proxy, EASY, extra_headers={"x-session-id": f"warm-{proxy.port}"})
        session = {"x-session-id": "shared"}
        assert ask(one, HARD, extra_headers=session)[0]["x-mitmroute-tier"] == "COMPLEX"
        # the session's tier is in Redis (each call has 50 ms: on a loaded machine a late one
        # leaves stickiness to the process, so ask again until it lands)
        shared = redis_lib.Redis(port=redis.port)
        for _ in range(20):
            if shared.keys("*:tier-session:*"):
                break
            ask(one, HARD, extra_headers=session)
        shared.close()
        headers, _ = ask(two, EASY, extra_headers=session)
        assert headers["x-mitmroute-route-reason"] == "classifier+session"
        redis.kill()  # Redis gone: requests are still answered, stickiness stays per process
        headers, _ = ask(two, EASY, extra_headers=session)
        assert headers["x-mitmroute-route-reason"] == "classifier+session"
        assert ask(one, EASY, extra_headers={"x-session-id": "new"})[0]["x-mitmroute-tier"] == (
            "SIMPLE"
        )
    finally:
        redis.kill()


def admin(proxy: Proxy, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    with proxy.http() as http:
        resp = http.request(
            method,
            f"https://api.openai.com{path}",
            headers={"authorization": f"Bearer {MASTER}"},
            **kwargs,
        )
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_key_past_its_budget_share_steps_down_to_the_cheaper_tier(start_proxy, ollama, claude):
    # claude priced so that one hard answer spends about half of a $1 budget
    prices = {"input_cost_per_token": 0.005, "output_cost_per_token": 0.005}
    config = seed_config(ollama, claude, budget_step_down=0.3, claude_prices=prices)
    config["general_settings"]["master_key"] = MASTER
    proxy = start_proxy(config)
    key = admin(proxy, "POST", "/key/generate", json={"max_budget": 1.0})["key"]
    headers, _ = ask(proxy, HARD, api_key=key)
    assert headers["x-mitmroute-tier"] == "COMPLEX"
    deadline = time.monotonic() + 5
    while (spent := admin(proxy, "GET", "/key/info", params={"key": key})["info"]["spend"]) == 0:
        assert time.monotonic() < deadline, "the first request's spend never settled"
        time.sleep(0.05)
    assert 0.3 <= spent < 1.0
    headers, _ = ask(proxy, HARD, api_key=key)
    assert headers["x-mitmroute-deployment"] == "ollama/qwen3:32b"
    assert headers["x-mitmroute-tier"] == "MEDIUM"
    assert headers["x-mitmroute-route-reason"] == "classifier+budget"
    # the master key has no budget: no step-down
    assert ask(proxy, HARD, api_key=MASTER)[0]["x-mitmroute-tier"] == "COMPLEX"
    savings = rows(
        proxy,
        "SELECT route_tier, sum(requests), sum(cost_usd), sum(baseline_cost_usd), "
        "sum(saved_by_routing_usd) FROM routing_savings GROUP BY 1 ORDER BY 1",
    )
    (complex_tier, n, cost, baseline, saved), (medium, m, cheap, would_be, kept) = savings
    assert (complex_tier, n, medium, m) == ("COMPLEX", 2, "MEDIUM", 1)
    assert cost == baseline and saved == 0
    assert cheap == 0 and kept == would_be > 0

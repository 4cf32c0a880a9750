"""Cooldowns, deployment picking and the retry policy, without a network."""

from __future__ import annotations

from mitmroute.config import parse_config
from mitmroute.errors import ProxyError
from mitmroute.routing.cooldown import Cooldowns
from mitmroute.routing.ladder import backoff, build_ladder, retries_for, special_fallbacks
from mitmroute.routing.picker import DeploymentPicker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_deployment_cools_after_allowed_fails_and_recovers():
    clock = Clock()
    cooldowns = Cooldowns(allowed_fails=2, cooldown_time=5, clock=clock)
    for _ in range(2):
        cooldowns.failure("d", "error")
    assert not cooldowns.cooling("d")
    cooldowns.failure("d", "error")
    assert cooldowns.cooling("d")
    clock.now = 5.1
    assert not cooldowns.cooling("d")


def test_retry_after_cools_immediately_for_that_long():
    clock = Clock()
    cooldowns = Cooldowns(allowed_fails=3, cooldown_time=5, clock=clock)
    seen = []
    cooldowns.listeners.append(lambda d, s, r: seen.append((d, s)))
    cooldowns.failure("d", "rate_limit", retry_after=12)
    clock.now = 11
    assert cooldowns.cooling("d")
    assert seen == [("d", 12)]


def test_picker_prefers_untried_healthy_deployments():
    config = parse_config(
        {
            "model_list": [
                {
                    "model_name": "g",
                    "litellm_params": {"model": "openai/a", "api_base": "http://a"},
                },
                {
                    "model_name": "g",
                    "litellm_params": {"model": "openai/b", "api_base": "http://b"},
                },
            ]
        },
        environ={},
    )
    a, b = config.deployments
    cooldowns = Cooldowns(clock=Clock())
    picker = DeploymentPicker(cooldowns)
    assert all(picker.pick([a, b], {a.id}) is b for _ in range(20))
    cooldowns.failure(b.id, "rate_limit", retry_after=10)
    assert picker.pick([a, b], {a.id}) is a
    cooldowns.failure(a.id, "rate_limit", retry_after=10)
    assert picker.pick([a, b]) is None


def test_ladder_and_retry_policy_from_seed_shapes():
    config = parse_config(
        {
            "model_list": [
                {"model_name": n, "litellm_params": {"model": f"openai/{n}"}}
                for n in ("gpt-4o", "claude", "local")
            ],
            "router_settings": {
                "fallbacks": [{"gpt-4o": ["claude", "local"]}],
                "retry_policy": {"RateLimitErrorRetries": 5},
            },
        },
        environ={},
    )
    ladder = build_ladder("gpt-4o", config.router)
    assert ladder.groups == ["gpt-4o", "claude", "local"]
    rate_limit = ProxyError(429, "slow down", kind="rate_limit", retryable=True)
    server = ProxyError(500, "boom", kind="error", retryable=True)
    assert retries_for(rate_limit, config.router) == 5
    assert retries_for(server, config.router) == 2


def test_backoff_grows_and_honours_retry_after():
    config = parse_config({"router_settings": {"retry_after": 0.1}}, environ={})
    assert 0.1 <= backoff(1, config.router, None) <= 0.25
    assert backoff(3, config.router, None) <= 1.0
    assert backoff(1, config.router, 3.0) == 3.0
    assert backoff(1, config.router, 999) == 30.0  # bounded


def test_fallbacks_may_name_aliases_and_wildcards():
    config = parse_config(
        {
            "model_list": [
                {"model_name": n, "litellm_params": {"model": f"openai/{n}"}} for n in ("a", "b")
            ],
            "router_settings": {
                "model_group_alias": {"bee": "b"},
                "fallbacks": [{"a": ["bee"]}],
                "context_window_fallbacks": [{"*": ["bee"]}],
            },
        },
        environ={},
    )
    assert build_ladder("a", config.router).groups == ["a", "b"]
    too_long = ProxyError(400, "maximum context length", kind="context_window")
    assert special_fallbacks(too_long, "a", config.router) == ["b"]


def test_entries_differing_only_in_key_are_distinct_deployments_and_urls_hide_secrets():
    config = parse_config(
        {
            "model_list": [
                {"model_name": "g", "litellm_params": {"model": "openai/x", "api_key": k,
                                                       "api_base": "https://u:pw@h.example/v1"}}
                for k in ("key-a", "key-b")
            ]
        },
        environ={},
    )  # fmt: skip
    a, b = config.deployments
    assert a.id != b.id
    assert "pw" not in a.id and a.public_base == "https://h.example/v1"

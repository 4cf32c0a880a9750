"""Alert rules, the webhook poster and the metric families, without a proxy."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mitmroute.alerts import (
    CooldownAlerts,
    SlowAlerts,
    SpendRule,
    WebhookPoster,
    budget_alerts,
    webhook_url,
)
from mitmroute.auth.limits import NANOS, BudgetUpdate
from mitmroute.config import GeneralSettings, parse_config
from mitmroute.exchange import Exchange, Usage
from mitmroute.metrics import RouterMetrics, metrics_port


def exchange(**kw) -> Exchange:
    return Exchange("mr-x", datetime.now(UTC), "chat/completions", **kw)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_webhook_url_needs_slack_alerting():
    assert webhook_url(GeneralSettings(alerting_webhook_url="http://h"), {}) is None
    on = GeneralSettings(alerting=("slack",))
    assert webhook_url(on, {"SLACK_WEBHOOK_URL": "http://env"}) == "http://env"
    both = GeneralSettings(alerting=("slack",), alerting_webhook_url="http://cfg")
    assert webhook_url(both, {"SLACK_WEBHOOK_URL": "http://env"}) == "http://cfg"
    assert webhook_url(on, {}) is None


def test_budget_alerts_at_85_and_100_percent():
    def update(before: float, after: float) -> BudgetUpdate:
        return BudgetUpdate("ab" * 32, "app", "team-a", int(before * NANOS), int(after * NANOS),
                            10 * NANOS, 0, None)  # fmt: skip

    assert budget_alerts(update(8, 8.4)) == []
    assert len(budget_alerts(update(8, 8.5))) == 1 and "85%" in budget_alerts(update(8, 8.5))[0]
    both = budget_alerts(update(8, 12))
    assert len(both) == 2 and "100%" in both[1] and "team-a" in both[1]
    assert budget_alerts(update(10, 12)) == []  # already past both
    assert budget_alerts(BudgetUpdate("t", None, None, 0, 99, None, 0, None)) == []


def test_spend_rule_alerts_once_per_crossing_and_rearms():
    rule = SpendRule.parse({"model": "opus", "usd": 1, "window": "1m"}, "r")
    assert rule.matches(exchange(model_group="opus")) and not rule.matches(exchange())
    assert rule.add(Decimal("0.6"), 0) is None
    assert "opus spend over 1m" in rule.add(Decimal("0.6"), 10)
    assert rule.add(Decimal("5"), 20) is None  # still above: no repeat
    assert rule.add(Decimal(0), 75) is None  # the first two left the window; 5 remains
    assert rule.add(Decimal(0), 81) is None  # all gone: re-armed
    assert rule.add(Decimal("1"), 82) is not None


def test_spend_rule_filters():
    rule = SpendRule.parse({"usd": 1, "team": "a", "key_alias": "k"}, "r")
    assert rule.window == 3600 and rule.model is None
    assert rule.matches(exchange(team="a", key_alias="k"))
    assert not rule.matches(exchange(team="b", key_alias="k"))


def test_cooldown_alerts_once_per_cooldown():
    clock = Clock()
    alerts = CooldownAlerts(clock)
    assert "d1" in alerts.cooled("d1", 30, "error")
    clock.now += 10
    assert alerts.cooled("d1", 30, "error") is None
    assert alerts.cooled("d2", 30, "error") is not None
    clock.now += 31
    assert alerts.cooled("d1", 30, "timeout") is not None


def test_slow_alerts_fold_repeats_per_minute():
    clock = Clock()
    slow = SlowAlerts(1.0, clock)
    assert slow.exchange(exchange(latency_ms=900, deployment="d")) is None
    assert "1.50s" in slow.exchange(exchange(latency_ms=1500, deployment="d"))
    assert slow.exchange(exchange(latency_ms=1500, deployment="d")) is None
    clock.now += 61
    assert "+1 more" in slow.exchange(exchange(latency_ms=1500, deployment="d"))


async def test_poster_delivers_and_survives_a_dead_webhook():
    got: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        got.append((await request.json())["text"])
        return web.Response()

    app = web.Application()
    app.router.add_post("/", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    poster = WebhookPoster(f"http://127.0.0.1:{port}/")
    poster.post("one")
    poster.post("two")
    for _ in range(100):
        if len(got) == 2:
            break
        await asyncio.sleep(0.01)
    await poster.close()
    await runner.cleanup()
    assert got == ["one", "two"]

    dead = WebhookPoster(f"http://127.0.0.1:{port}/", timeout=0.5, queue_size=2)
    for text in "abcd":
        dead.post(text)  # never blocks; beyond the queue size alerts are dropped
    await asyncio.sleep(0.3)
    await dead.close(drain=0)
    assert dead.failed >= 1 and dead.sent == 0


def test_metrics_port():
    assert metrics_port(parse_config({})) is None
    assert metrics_port(parse_config({"general_settings": {"metrics_port": 9000}})) == 9000
    assert metrics_port(parse_config({"litellm_settings": {"callbacks": ["prometheus"]}})) == 9464


def test_metric_families_parse_with_labels():
    m = RouterMetrics()
    m.exchange(exchange(team="t", key_alias="k", model_group="g", deployment="openai/d",
                        status_code=200, usage=Usage(10, 5, cached_tokens=4),
                        cost_usd=Decimal("0.5"), latency_ms=1200, ttft_ms=80,
                        fallback_used=True), cache_enabled=True)  # fmt: skip
    m.exchange(exchange(model_group="g", status_code=200, cache_hit=True))
    m.cooldown("openai/d@http://x", 5, "error")
    m.budget(BudgetUpdate("ab" * 32, "k", "t", 0, NANOS, 4 * NANOS, 0, None))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(m.registry).decode())
               for s in f.samples}  # fmt: skip
    labels = (("deployment", "openai/d"), ("key_alias", "k"), ("model_group", "g"), ("team", "t"))
    assert samples[("mitmroute_requests_total", (*labels[:3], ("status", "200"), labels[3]))] == 1
    assert samples[("mitmroute_tokens_total", (*labels[:3], labels[3], ("type", "cached")))] == 4
    assert samples[("mitmroute_spend_usd_total", labels)] == 0.5
    assert samples[("mitmroute_cache_misses_total", labels)] == 1
    assert samples[("mitmroute_fallbacks_total", labels)] == 1
    assert samples[("mitmroute_request_latency_seconds_sum", labels)] == 1.2
    assert samples[("mitmroute_time_to_first_token_seconds_count", labels)] == 1
    hit = (("deployment", ""), ("key_alias", ""), ("model_group", "g"), ("team", ""))
    assert samples[("mitmroute_cache_hits_total", hit)] == 1
    key = (("key", "ab" * 6), ("key_alias", "k"), ("team", "t"))
    assert samples[("mitmroute_key_budget_remaining_usd", key)] == 3
    assert samples[("mitmroute_deployment_cooldowns_total",
                    (("deployment", "openai/d@http://x"), ("reason", "error")))] == 1  # fmt: skip

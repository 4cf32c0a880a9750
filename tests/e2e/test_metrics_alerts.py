"""Prometheus metrics and webhook alerts of a real mitmdump, driven with the openai SDK.

A local aiohttp webhook receiver (in a thread) records every alert; each crossing must arrive
exactly once. `/metrics` is parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import httpx2 as httpx
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Proxy, deployment, free_port
from tests.e2e.test_keys import HELLO, HELLO_COST, IN_PRICE, MASTER, OUT_PRICE, generate


class Receiver:
    """A Slack-compatible webhook: POST / records, POST /hang never answers."""

    def __init__(self) -> None:
        self.alerts: list[str] = []
        self.hung = 0
        self._closing = asyncio.Event()
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _record(self, request: web.Request) -> web.Response:
        self.alerts.append((await request.json())["text"])
        return web.Response(text="ok")

    async def _hang(self, request: web.Request) -> web.Response:
        self.hung += 1
        await self._closing.wait()
        return web.Response(text="late")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/", self._record)
        app.router.add_post("/hang", self._hang)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def start(self) -> Receiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._closing.set)
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def matching(self, text: str) -> list[str]:
        return [a for a in self.alerts if text in a]

    def wait_for(self, text: str, count: int = 1, timeout: float = 5.0) -> list[str]:
        """The alerts containing `text`, once `count` arrived (and a moment for extras)."""
        deadline = time.monotonic() + timeout
        while len(self.matching(text)) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        return self.matching(text)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def priced(name: str, model: str, base: str, in_price=IN_PRICE, out_price=OUT_PRICE, **kw):
    return deployment(name, model, f"{base}/v1", api_key="sk-backend",
                      input_cost_per_token=float(in_price),
                      output_cost_per_token=float(out_price), **kw)  # fmt: skip


@pytest.fixture(scope="module")
def watched(backend, receiver, confdir, tmp_path_factory):
    base = backend.url
    config = {
        "model_list": [
            priced("gpt-4o", "openai/ok-model", base),
            priced("pricey", "openai/pricey", base, in_price="0.005", out_price="0.005"),
            priced("slow", "openai/slow-300", base),
            priced("flaky", "openai/fail-500", base),
        ],
        "router_settings": {"fallbacks": [{"flaky": ["gpt-4o"]}], "allowed_fails": 0,
                            "cooldown_time": 60, "num_retries": 0},
        "general_settings": {
            "master_key": MASTER, "metrics_port": free_port(), "alerting": ["slack"],
            "alerting_webhook_url": receiver.url, "alerting_threshold": 0.5,
            "spend_alerts": [{"model": "pricey", "usd": 0.04, "window": "1h"}],
        },
    }  # fmt: skip
    proxy = Proxy(config, confdir, tmp_path_factory.mktemp("watched"))
    proxy.metrics_url = f"http://127.0.0.1:{config['general_settings']['metrics_port']}/metrics"  # type: ignore[attr-defined]
    yield proxy
    proxy.stop()


def scrape(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by (name, sorted labels)."""
    text = httpx.get(proxy.metrics_url, timeout=5).text  # type: ignore[attr-defined]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def sample(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name` samples whose labels include `labels`."""
    return sum(
        v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()
    )


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_per_team_key_model_and_deployment(watched):
    key = generate(watched, key_alias="metered", metadata={"team": "team-m"}, max_budget=1)
    with watched.client(api_key=key) as client:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
        list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    time.sleep(0.1)  # the streamed exchange is booked as its stream ends
    s = scrape(watched)
    who = {"team": "team-m", "key_alias": "metered", "model_group": "gpt-4o",
           "deployment": "openai/ok-model"}  # fmt: skip
    assert sample(s, "mitmroute_requests_total", status="200", **who) == 2
    assert sample(s, "mitmroute_tokens_total", type="input", **who) == 4
    assert sample(s, "mitmroute_tokens_total", type="output", **who) == 6
    assert sample(s, "mitmroute_tokens_total", type="cached", **who) == 0
    assert sample(s, "mitmroute_spend_usd_total", **who) == pytest.approx(2 * HELLO_COST)
    assert sample(s, "mitmroute_request_latency_seconds_count", **who) == 2
    assert sample(s, "mitmroute_time_to_first_token_seconds_count", **who) == 1
    remaining = sample(s, "mitmroute_key_budget_remaining_usd", key_alias="metered")
    assert remaining == pytest.approx(1 - 2 * HELLO_COST)
    assert sample(s, "mitmroute_key_spend_usd", key_alias="metered", team="team-m") == (
        pytest.approx(2 * HELLO_COST))  # fmt: skip


# --- alerts ----------------------------------------------------------------------------------


def test_cooldown_and_fallback_alert_once_and_count(watched, receiver):
    with watched.client(api_key=MASTER) as client:
        for _ in range(3):  # the first one cools `flaky` down; the others skip it
            done = client.chat.completions.create(model="flaky", messages=HELLO)
            assert done.choices[0].message.content == "echo: hello world"
    alerts = receiver.wait_for("openai/fail-500")
    assert len(alerts) == 1 and "cooldown" in alerts[0]
    s = scrape(watched)
    assert sample(s, "mitmroute_deployment_cooldowns_total") == 1
    assert sample(s, "mitmroute_fallbacks_total", model_group="flaky") == 3


def test_budget_crossings_alert_once_each(watched, receiver):
    key = generate(watched, key_alias="crosser", metadata={"team": "team-x"},
                   max_budget=HELLO_COST * 1.1)  # fmt: skip
    with watched.client(api_key=key) as client:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)  # 91%: crosses 85%
        client.chat.completions.create(model="gpt-4o", messages=HELLO)  # 182%: crosses 100%
        for _ in range(2):
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="gpt-4o", messages=HELLO)
    alerts = receiver.wait_for("crosser", count=2)
    assert len(alerts) == 2
    assert "85% crossed" in alerts[0] and "team-x" in alerts[0]
    assert "100% crossed" in alerts[1]


def test_spend_rate_rule_alerts_once_per_crossing(watched, receiver):
    with watched.client(api_key=MASTER) as client:  # 0.025 each: the 2nd crosses $0.04
        for _ in range(4):
            client.chat.completions.create(model="pricey", messages=HELLO)
    alerts = receiver.wait_for("pricey spend over 1h")
    assert len(alerts) == 1 and "$0.04" in alerts[0]


def test_slow_request_alerts(watched, receiver):
    with watched.client(api_key=MASTER) as client:
        for _ in range(2):  # 3 words, 300 ms each: 0.9 s > 0.5 s
            client.chat.completions.create(model="slow", messages=[{"role": "user",
                                                                    "content": "x y"}])  # fmt: skip
    alerts = receiver.wait_for("slow request")
    assert len(alerts) == 1 and "openai/slow-300" in alerts[0]


def test_a_dead_webhook_costs_requests_nothing(start_proxy, backend, receiver):
    proxy = start_proxy({
        "model_list": [priced("gpt-4o", "openai/ok-model", backend.url)],
        "general_settings": {"master_key": MASTER, "alerting": ["slack"],
                             "alerting_webhook_url": f"{receiver.url}/hang",
                             "alerting_threshold": 0.000001,
                             "spend_alerts": [{"usd": 0.000001, "window": "1m"}]},
    })  # fmt: skip
    key = generate(proxy, max_budget=HELLO_COST / 2)
    timings = []
    with proxy.client(api_key=key) as client:
        for _ in range(3):
            t0 = time.perf_counter()
            with contextlib.suppress(openai.RateLimitError):
                client.chat.completions.create(model="gpt-4o", messages=HELLO)
            timings.append(time.perf_counter() - t0)
    # alerts fired into a webhook that never answers (5 s post timeout)
    deadline = time.monotonic() + 5
    while not receiver.hung and time.monotonic() < deadline:
        time.sleep(0.02)
    assert receiver.hung == 1
    assert max(timings) < 1.0, timings

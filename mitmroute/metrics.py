"""Prometheus metrics of the routed traffic, served in the text format on one port.

The port is ``general_settings.metrics_port``, or 9464 when ``litellm_settings.callbacks``
lists ``prometheus``; the page is served by prometheus_client's HTTP server on a thread.

Per finished exchange, labelled ``team``, ``key_alias``, ``model_group``, ``deployment``
(empty when unknown):

``mitmroute_requests_total``            requests, plus a ``status`` label (HTTP status code)
``mitmroute_tokens_total``              tokens, plus ``type``: input, output, cached
``mitmroute_spend_usd_total``           cost in USD
``mitmroute_cache_hits_total``          answered from the response cache
``mitmroute_cache_misses_total``        not answered from the cache (only while caching is on)
``mitmroute_fallbacks_total``           answered by a fallback model group
``mitmroute_request_latency_seconds``   histogram: arrival to last byte
``mitmroute_time_to_first_token_seconds`` histogram: arrival to first streamed chunk

Others:

``mitmroute_deployment_cooldowns_total{deployment, reason}``  deployments put to rest
``mitmroute_key_budget_remaining_usd{key_alias, team, key}``   budget left in the window
    (``key``: the first 12 hex digits of the key's sha256; updated after each request)
``mitmroute_key_spend_usd{key_alias, team, key}``              spend in the current window
``mitmroute_spend_rows_dropped_total``   spend log rows lost: buffer full with
    ``spend_on_buffer_full: drop``, or nothing writable at exit
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from mitmroute.auth.limits import BudgetUpdate, nanos_to_usd
from mitmroute.config import RouterConfig
from mitmroute.exchange import Exchange

log = logging.getLogger("mitmroute.metrics")

DEFAULT_PORT = 9464
LABELS = ("team", "key_alias", "model_group", "deployment")
KEY_LABELS = ("key_alias", "team", "key")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


def metrics_port(config: RouterConfig) -> int | None:
    """Where to serve /metrics; None when metrics are off."""
    if config.general.metrics_port:
        return config.general.metrics_port
    if "prometheus" in config.callbacks:
        return DEFAULT_PORT
    return None


class RouterMetrics:
    """The metric families, in their own registry (so tests and reloads never collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("mitmroute_requests", "Requests routed",
                                [*LABELS, "status"], registry=r)  # fmt: skip
        self.tokens = Counter("mitmroute_tokens", "Tokens", [*LABELS, "type"], registry=r)
        self.spend = Counter("mitmroute_spend_usd", "Spend in USD", LABELS, registry=r)
        self.cache_hits = Counter("mitmroute_cache_hits", "Response cache hits", LABELS,
                                  registry=r)  # fmt: skip
        self.cache_misses = Counter("mitmroute_cache_misses", "Response cache misses", LABELS,
                                    registry=r)  # fmt: skip
        self.fallbacks = Counter("mitmroute_fallbacks", "Requests answered by a fallback group",
                                 LABELS, registry=r)  # fmt: skip
        self.latency = Histogram("mitmroute_request_latency_seconds", "Arrival to last byte",
                                 LABELS, buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.ttft = Histogram("mitmroute_time_to_first_token_seconds",
                              "Arrival to first streamed chunk", LABELS, buckets=TTFT_BUCKETS,
                              registry=r)  # fmt: skip
        self.cooldowns = Counter("mitmroute_deployment_cooldowns", "Deployments put to rest",
                                 ["deployment", "reason"], registry=r)  # fmt: skip
        self.budget_remaining = Gauge("mitmroute_key_budget_remaining_usd",
                                      "Budget left in the key's current window", KEY_LABELS,
                                      registry=r)  # fmt: skip
        self.key_spend = Gauge("mitmroute_key_spend_usd", "Key spend in its current window",
                               KEY_LABELS, registry=r)  # fmt: skip
        self.spend_rows_dropped = Counter(
            "mitmroute_spend_rows_dropped",
            "Spend log rows lost (buffer full, or at exit)",
            registry=r,
        )

    def exchange(self, exchange: Exchange, cost: Decimal | None = None,
                 cache_enabled: bool = False) -> None:  # fmt: skip
        """Count one finished exchange; `cost` defaults to its `cost_usd`."""
        cost = exchange.cost_usd if cost is None else cost
        deployment = exchange.deployment or ""
        if deployment.startswith("passthrough/"):  # client-chosen names: bounded label values
            deployment = "passthrough"
        labels = (exchange.team or "", exchange.key_alias or "", exchange.model_group or "",
                  deployment)  # fmt: skip
        self.requests.labels(*labels, str(exchange.status_code or "")).inc()
        if (usage := exchange.usage) is not None:
            self.tokens.labels(*labels, "input").inc(usage.prompt_tokens)
            self.tokens.labels(*labels, "output").inc(usage.completion_tokens)
            self.tokens.labels(*labels, "cached").inc(usage.cached_tokens)
        if cost is not None:
            self.spend.labels(*labels).inc(float(cost))
        if exchange.cache_hit:
            self.cache_hits.labels(*labels).inc()
        elif cache_enabled:
            self.cache_misses.labels(*labels).inc()
        if exchange.fallback_used:
            self.fallbacks.labels(*labels).inc()
        if exchange.latency_ms is not None:
            self.latency.labels(*labels).observe(exchange.latency_ms / 1000)
        if exchange.ttft_ms is not None:
            self.ttft.labels(*labels).observe(exchange.ttft_ms / 1000)

    def cooldown(self, deployment_id: str, seconds: float, reason: str) -> None:
        self.cooldowns.labels(deployment_id, reason).inc()

    def spend_dropped(self, rows: int) -> None:
        self.spend_rows_dropped.inc(rows)

    def budget(self, update: BudgetUpdate) -> None:
        labels = (update.key_alias or "", update.team or "", update.token[:12])
        self.key_spend.labels(*labels).set(nanos_to_usd(update.after))
        if update.remaining_usd is not None:
            self.budget_remaining.labels(*labels).set(update.remaining_usd)


class MetricsServer:
    """prometheus_client's HTTP server on its own thread; restartable on another port."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.port: int | None = None
        self.host: str | None = None
        self._server: Any = None
        self._thread: Any = None

    def serve(self, port: int | None, host: str = "") -> None:
        """Serve on `port` (None stops serving); a no-op when already there."""
        if port == self.port and host == self.host and self._server is not None:
            return
        self.stop()
        if port is None:
            return
        try:
            self._server, self._thread = start_http_server(port, host or "0.0.0.0",
                                                           registry=self.registry)  # fmt: skip
        except OSError as e:
            log.error("metrics: cannot listen on %s:%d: %s", host or "*", port, e)
            return
        self.port, self.host = port, host
        log.info("metrics: Prometheus page on http://%s:%d/metrics", host or "0.0.0.0", port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
        self._server = self._thread = self.port = self.host = None

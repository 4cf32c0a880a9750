"""Serves Prometheus metrics of the routed traffic (see `mitmroute.metrics` for the names)."""

from __future__ import annotations

import logging

from mitmproxy import ctx

from mitmroute.addons.guard import fail_closed
from mitmroute.addons.shared import Shared
from mitmroute.auth.limits import CostEstimator
from mitmroute.config import RouterConfig
from mitmroute.exchange import Exchange
from mitmroute.metrics import MetricsServer, RouterMetrics, metrics_port

log = logging.getLogger("mitmroute.metrics")


@fail_closed
class Metrics:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.metrics = RouterMetrics()
        self.server = MetricsServer(self.metrics.registry)
        self.port: int | None = None
        self.cache_enabled = False
        shared.config_listeners.append(self.configured)
        shared.listeners.append(self.exchange_done)
        shared.cooldown_listeners.append(self.metrics.cooldown)
        shared.budget_listeners.append(self.metrics.budget)
        shared.spend_drop_listeners.append(self.metrics.spend_dropped)

    def load(self, loader) -> None:
        loader.add_option(
            "metrics_host",
            str,
            "",
            "Address of the Prometheus /metrics page (port: general_settings.metrics_port). "
            "Default: all interfaces.",
        )

    def configured(self, config: RouterConfig) -> None:
        self.port = metrics_port(config)
        self.cache_enabled = config.cache.enabled

    def configure(self, updated: set[str]) -> None:
        self.server.serve(self.port, ctx.options.metrics_host)

    def done(self) -> None:
        self.server.stop()

    def exchange_done(self, exchange: Exchange) -> None:
        if self.port is None:
            return
        self.metrics.exchange(exchange, CostEstimator.cost(exchange), self.cache_enabled)

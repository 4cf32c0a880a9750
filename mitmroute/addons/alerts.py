"""Posts budget, spend-rate, cooldown and slow-request alerts (see `mitmroute.alerts`)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mitmroute.addons.guard import fail_closed
from mitmroute.addons.shared import Shared
from mitmroute.alerts import (
    CooldownAlerts,
    SlowAlerts,
    SpendRule,
    WebhookPoster,
    budget_alerts,
    webhook_url,
)
from mitmroute.auth.limits import BudgetUpdate, CostEstimator
from mitmroute.config import ConfigError, RouterConfig
from mitmroute.exchange import Exchange

log = logging.getLogger("mitmroute.alerts")


@fail_closed
class Alerts:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.poster: WebhookPoster | None = None
        self.rules: list[SpendRule] = []
        self.slow: SlowAlerts | None = None
        self.cooldowns = CooldownAlerts()
        self._tasks: set[asyncio.Task[Any]] = set()
        shared.config_listeners.append(self.configured)
        shared.listeners.append(self.exchange_done)
        shared.cooldown_listeners.append(self.cooled_down)
        shared.budget_listeners.append(self.budget_changed)

    def configured(self, config: RouterConfig) -> None:
        url = webhook_url(config.general)
        if self.poster is not None and self.poster.url != url:
            self._close(self.poster)
            self.poster = None
        if url is None:
            self.rules, self.slow = [], None
            return
        if self.poster is None:
            self.poster = WebhookPoster(url)
        rules = []
        for i, raw in enumerate(config.general.spend_alerts):
            try:
                rules.append(SpendRule.parse(raw, f"general_settings.spend_alerts[{i}]"))
            except ConfigError as e:
                log.error("alerts: %s (rule ignored)", e)
        self.rules = rules
        threshold = config.general.alerting_threshold
        self.slow = SlowAlerts(threshold) if threshold else None

    async def done(self) -> None:
        if self.poster is not None:
            await self.poster.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- events ---------------------------------------------------------------------------

    def exchange_done(self, exchange: Exchange) -> None:
        if self.poster is None:
            return
        if self.slow is not None and (text := self.slow.exchange(exchange)):
            self.poster.post(text)
        if not self.rules:
            return
        cost, now = CostEstimator.cost(exchange), time.monotonic()
        for rule in self.rules:
            if rule.matches(exchange) and (text := rule.add(cost, now)):
                self.poster.post(text)

    def budget_changed(self, update: BudgetUpdate) -> None:
        if self.poster is None:
            return
        for text in budget_alerts(update):
            self.poster.post(text)

    def cooled_down(self, deployment_id: str, seconds: float, reason: str) -> None:
        if self.poster is None:
            return
        if text := self.cooldowns.cooled(deployment_id, seconds, reason):
            self.poster.post(text)

    def _close(self, poster: WebhookPoster) -> None:
        try:
            task = asyncio.get_running_loop().create_task(poster.close())
        except RuntimeError:
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

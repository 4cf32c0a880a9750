"""Alerts to a Slack-compatible webhook (`{"text": ...}` POSTed as JSON).

Enabled by ``general_settings.alerting: ["slack"]``; the URL is
``general_settings.alerting_webhook_url``, else the ``SLACK_WEBHOOK_URL`` environment variable.

Each crossing alerts once:

* **budget**: a virtual key's spend crossing 85% and 100% of its budget. The limiter reports
  spend before and after each request atomically, so exactly one request sees each crossing,
  even across proxies sharing Redis; a new budget window crosses anew.
* **spend rate**: ``general_settings.spend_alerts: [{model: claude-opus, usd: 50, window: 1h}]``
  (``model`` matches the model group, the requested model or the deployment; optional ``team``
  and ``key_alias`` narrow it; no ``model`` means all traffic). The spend of the last ``window``
  crossing ``usd`` alerts; the rule re-arms once the window's spend falls below ``usd`` again.
  Counted per proxy.
* **cooldown**: a deployment put to rest (once per cooldown, not per skipped request).
* **slow request**: an exchange slower than ``alerting_threshold`` seconds; at most one alert
  per deployment per minute, the next one saying how many were folded in.

Rules are plain classes returning the message text (or None); :class:`WebhookPoster` sends
messages from one background task through a bounded queue, so a slow or dead webhook costs a
request nothing (a full queue drops alerts, with a warning).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp

from mitmroute.auth.limits import BudgetUpdate, nanos_to_usd
from mitmroute.config import ConfigError, GeneralSettings, parse_duration
from mitmroute.exchange import Exchange

log = logging.getLogger("mitmroute.alerts")

BUDGET_THRESHOLDS = (0.85, 1.0)
SLOW_COALESCE = 60.0
POST_TIMEOUT = 5.0
QUEUE_SIZE = 1000


def webhook_url(general: GeneralSettings, environ: dict[str, str] | None = None) -> str | None:
    """Where alerts go, or None when alerting is off."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    if not {"slack", "webhook"}.intersection(a.lower() for a in general.alerting):
        return None
    return general.alerting_webhook_url or environ.get("SLACK_WEBHOOK_URL") or None


def _who(key_alias: str | None, team: str | None, token: str | None = None) -> str:
    name = key_alias or (f"key {token[:12]}" if token else "key")
    return f"{name} (team {team})" if team else name


def budget_alerts(update: BudgetUpdate) -> list[str]:
    """One message per budget threshold this update crossed."""
    out = []
    for fraction in BUDGET_THRESHOLDS:
        if update.max_budget and update.crossed(fraction):
            spent, budget = nanos_to_usd(update.after), nanos_to_usd(update.max_budget)
            refused = " - further requests are refused until it resets" if fraction >= 1 else ""
            out.append(f":warning: mitmroute budget {fraction:.0%} crossed: "
                       f"{_who(update.key_alias, update.team, update.token)} has spent "
                       f"${spent:.4f} of ${budget:.4f}{refused}")  # fmt: skip
    return out


@dataclass(slots=True)
class SpendRule:
    """Alert when the spend of the last `window` seconds crosses `usd`."""

    usd: Decimal
    window: float
    model: str | None = None
    team: str | None = None
    key_alias: str | None = None
    label: str = ""
    _events: deque[tuple[float, Decimal]] = field(default_factory=deque)
    _total: Decimal = Decimal(0)
    _armed: bool = True

    @classmethod
    def parse(cls, raw: dict[str, Any], where: str) -> SpendRule:
        try:
            usd = Decimal(str(raw["usd"]))
        except (KeyError, ArithmeticError, ValueError):
            raise ConfigError(f"{where}.usd: required, a number of dollars") from None
        if not usd.is_finite() or usd <= 0:
            raise ConfigError(f"{where}.usd: must be > 0")
        window = parse_duration(raw.get("window", "1h"), f"{where}.window")
        model = raw.get("model")
        label = f"{model or 'all models'} spend over {raw.get('window', '1h')}"
        return cls(usd, window, model, raw.get("team"), raw.get("key_alias"), label)

    def matches(self, exchange: Exchange) -> bool:
        if self.model and self.model not in (exchange.model_group, exchange.requested_model,
                                             exchange.deployment):  # fmt: skip
            return False
        if self.team and exchange.team != self.team:
            return False
        return not (self.key_alias and exchange.key_alias != self.key_alias)

    def add(self, cost: Decimal, now: float) -> str | None:
        while self._events and self._events[0][0] <= now - self.window:
            self._total -= self._events.popleft()[1]
        if cost > 0:
            self._events.append((now, cost))
            self._total += cost
        if self._total < self.usd:
            self._armed = True
            return None
        if not self._armed:
            return None
        self._armed = False
        return (
            f":chart_with_upwards_trend: mitmroute spend rate: {self.label} reached "
            f"${self._total:.4f} (alert at ${self.usd})"
        )


class CooldownAlerts:
    """One alert per cooldown of a deployment."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._until: dict[str, float] = {}
        self._clock = clock

    def cooled(self, deployment_id: str, seconds: float, reason: str) -> str | None:
        now = self._clock()
        if self._until.get(deployment_id, 0.0) > now:
            self._until[deployment_id] = max(self._until[deployment_id], now + seconds)
            return None
        self._until[deployment_id] = now + seconds
        return (
            f":ice_cube: mitmroute cooldown: deployment {deployment_id} is resting for "
            f"{seconds:g}s ({reason})"
        )


class SlowAlerts:
    """Requests slower than `threshold` seconds; one alert per deployment per minute."""

    def __init__(self, threshold: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self._last: dict[str, float] = {}
        self._folded: dict[str, int] = {}
        self._clock = clock

    def exchange(self, exchange: Exchange) -> str | None:
        seconds = (exchange.latency_ms or 0.0) / 1000
        if seconds <= self.threshold:
            return None
        where = exchange.deployment or exchange.model_group or "unknown deployment"
        now = self._clock()
        if now - self._last.get(where, -SLOW_COALESCE) < SLOW_COALESCE:
            self._folded[where] = self._folded.get(where, 0) + 1
            return None
        self._last[where] = now
        folded = self._folded.pop(where, 0)
        more = f" (+{folded} more slow requests since the last alert)" if folded else ""
        return (
            f":snail: mitmroute slow request: {exchange.request_id} to {where} "
            f"({exchange.model_group}) by {_who(exchange.key_alias, exchange.team)} took "
            f"{seconds:.2f}s (threshold {self.threshold:g}s){more}"
        )


class WebhookPoster:
    """Posts messages one by one from a background task; never blocks its caller."""

    def __init__(self, url: str, timeout: float = POST_TIMEOUT, queue_size: int = QUEUE_SIZE):
        self.url = url
        self.timeout = timeout
        self.sent = 0
        self.failed = 0
        self._queue: asyncio.Queue[str] = asyncio.Queue(queue_size)
        self._worker: asyncio.Task[None] | None = None
        self._warned_full = False

    def post(self, text: str) -> None:
        """Queue `text` (call on the event loop)."""
        try:
            self._queue.put_nowait(text)
        except asyncio.QueueFull:
            if not self._warned_full:
                self._warned_full = True
                log.warning("alerts: webhook queue full, dropping alerts")
            return
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                text = await self._queue.get()
                try:
                    async with session.post(self.url, json={"text": text}) as resp:
                        await resp.read()
                        if resp.status >= 400:
                            raise aiohttp.ClientError(f"HTTP {resp.status}")
                    self.sent += 1
                    self._warned_full = False
                except (aiohttp.ClientError, TimeoutError) as e:
                    self.failed += 1
                    if self.failed in (1, 10, 100) or self.failed % 1000 == 0:
                        log.warning("alerts: webhook post failed (%d so far): %s",
                                    self.failed, e or type(e).__name__)  # fmt: skip

    async def close(self, drain: float = 1.0) -> None:
        """Give queued alerts `drain` seconds to go out, then stop."""
        if self._worker is None:
            return
        deadline = time.monotonic() + drain
        while not self._queue.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None

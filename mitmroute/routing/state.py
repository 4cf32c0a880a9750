"""What routing remembers between requests, for one config: which deployments rest (cooldowns),
each one's requests and tokens this minute (limits), attempts in flight, recent latencies, the
strategy that reads them, and the plans that use them all.

With Redis in the config (`router_settings.redis_*`, or a Redis response cache), cooldowns are
shared by every proxy on it (`routing.shared_cooldowns`), and so are usage counts and latencies
where the strategy or a deployment's rpm/tpm reads them (`routing.shared`); in-flight counts
stay in this process.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mitmroute.config import Deployment, RouterConfig
from mitmroute.errors import ProxyError
from mitmroute.redis_client import redis_target
from mitmroute.routing.cooldown import Cooldowns
from mitmroute.routing.inflight import InFlight
from mitmroute.routing.latency import KINDS, LATENCY, PENALTY, TTFT, LatencyBook
from mitmroute.routing.limits import DeploymentLimits
from mitmroute.routing.picker import DeploymentPicker
from mitmroute.routing.plan import RoutePlan
from mitmroute.routing.shared import SharedState
from mitmroute.routing.shared_cooldowns import SharedCooldowns
from mitmroute.routing.strategy import (
    USAGE_BASED,
    LeastBusy,
    LowestCost,
    LowestLatency,
    LowestUsage,
    SimpleShuffle,
    Strategy,
)

if TYPE_CHECKING:
    from mitmroute.exchange import Exchange
    from mitmroute.money import Pricing

IN_FLIGHT_GRACE = 300.0
"""Seconds past the overall deadline after which an unfinished attempt stops counting."""


class RoutingState:
    def __init__(
        self,
        config: RouterConfig,
        pricing: Pricing | None = None,
        *,
        share: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        settings = config.router
        self.config = config
        self.groups = config.groups()
        self.clock = clock
        self.rng = rng or random.Random()
        self.cooldowns = Cooldowns(settings.allowed_fails, settings.cooldown_time, clock=clock)
        self.limits = DeploymentLimits(clock=wall)
        self.in_flight = InFlight(settings.timeout + IN_FLIGHT_GRACE, clock=clock)
        self.latency = LatencyBook(settings.routing_strategy_args, clock=wall)
        self.strategy = self._strategy(settings.routing_strategy, pricing)
        self.picker = DeploymentPicker(self.cooldowns, self.limits.at_limit, self.strategy)
        self.shared: SharedState | None = None
        self.shared_cooldowns: SharedCooldowns | None = None
        target = redis_target(config)
        if share and target is not None:
            self.shared = SharedState.connect(target, config.cache.namespace)
            ids = (d.id for d in config.deployments)
            self.shared_cooldowns = SharedCooldowns(self.shared, self.cooldowns, ids, wall=wall)

    def _strategy(self, name: str, pricing: Pricing | None) -> Strategy:
        if name == "least-busy":
            return LeastBusy(self.in_flight, self.rng)
        if name == "latency-based-routing":
            return LowestLatency(self.latency, self.config.router.routing_strategy_args, self.rng)
        if name in USAGE_BASED:
            return LowestUsage(self.limits, self.rng)
        if name == "cost-based-routing":
            if pricing is None:
                from mitmroute.money import Pricing

                pricing = Pricing.for_config(self.config)
            return LowestCost(pricing)
        return SimpleShuffle(self.rng)

    async def start(self) -> None:
        if self.shared_cooldowns is not None:
            self.shared_cooldowns.start()  # first: the warm connection below stays for requests
        if self.shared is not None:
            await self.shared.start()

    async def close(self) -> None:
        if self.shared_cooldowns is not None:
            await self.shared_cooldowns.close()
        if self.shared is not None:
            await self.shared.close()

    def plan(self, group: str, *, request_id: str = "", stream: bool = False) -> RoutePlan:
        """The plan of one request to `group`."""
        return RoutePlan(
            group,
            self.groups,
            self.config.router,
            self.picker,
            self.cooldowns,
            attempts=self,
            request_id=request_id,
            stream=stream,
            clock=self.clock,
            rng=self.rng,
        )

    async def refresh(self, group: str) -> None:
        """Bring in what the other proxies counted for `group`'s deployments (one bounded
        Redis round trip; nothing when it fails or there is nothing shared)."""
        if self.shared is None or not self.shared.available:
            return
        deployments = self.groups.get(group, ())
        usage_ids = [d.id for d in deployments if self._shares_usage(d)]
        latency_ids = [d.id for d in deployments] if self._shares_latency else []
        if not usage_ids and not latency_ids:
            return
        minute = self.limits.minute()
        size = self.config.router.routing_strategy_args.max_latency_list_size
        read = await self.shared.read(minute, usage_ids, latency_ids, KINDS, size)
        if read is None:
            return
        usage, latencies = read
        self.limits.merge(minute, usage)
        for (deployment_id, kind), samples in latencies.items():
            self.latency.replace(deployment_id, kind, samples)

    # --- what happens to attempts (RoutePlan's Attempts) --------------------------------------

    def started(self, deployment: Deployment, request_id: str) -> None:
        self.limits.started(deployment)
        self.in_flight.start(deployment.id, request_id)
        if self.shared is not None and self._shares_usage(deployment):
            self.shared.add_usage(self.limits.minute(), deployment.id, requests=1)

    def failed(
        self, deployment: Deployment, request_id: str, error: ProxyError | None, seconds: float
    ) -> None:
        self.in_flight.end(deployment.id, request_id)
        if error is not None and error.kind == "timeout":
            self._record(deployment, LATENCY, PENALTY)

    def answered(
        self, deployment: Deployment, request_id: str, seconds: float, stream: bool
    ) -> None:
        if stream:
            self._record(deployment, TTFT, seconds)

    def finished(self, deployment: Deployment, exchange: Exchange) -> None:
        """`deployment`'s answer to `exchange` has been read to its end (or given up on)."""
        usage = exchange.usage
        tokens = usage.total_tokens if usage is not None else 0
        self.limits.used(deployment, tokens)
        if self.shared is not None and tokens and self._shares_usage(deployment):
            self.shared.add_usage(self.limits.minute(), deployment.id, tokens=tokens)
        seconds = self.in_flight.end(deployment.id, exchange.request_id)
        if seconds is not None and exchange.error_type is None:
            out = usage.completion_tokens if usage is not None else 0
            self._record(deployment, LATENCY, seconds / out if out > 0 else seconds)

    # --- helpers ------------------------------------------------------------------------------

    @property
    def _shares_latency(self) -> bool:
        return self.strategy.name == "latency-based-routing"

    def _shares_usage(self, deployment: Deployment) -> bool:
        return (
            self.strategy.name in USAGE_BASED
            or deployment.rpm is not None
            or deployment.tpm is not None
        )

    def _record(self, deployment: Deployment, kind: str, seconds: float) -> None:
        self.latency.record(deployment.id, kind, seconds)
        if self.shared is not None and self._shares_latency:
            args = self.config.router.routing_strategy_args
            self.shared.add_latency(
                deployment.id, kind, seconds, args.ttl, args.max_latency_list_size
            )

"""The complexity router's decision for one request, and what the baseline would have cost.

`Engine.handle` asks `ComplexityRouters.route` for the model group when a request names an
`auto_router/complexity_router` (before the cache and the fallback ladder, which then work on
that group as on any other). The decision, in order:

1. **Explicit override**: the `x-mitmroute-tier` request header, else `metadata.tier` in the
   body (removed before the body goes upstream): `SIMPLE`, `MEDIUM`, `COMPLEX`, `REASONING`
   (any case), or `auto` to classify. Anything else is a 400. An override wins over the
   session's tier (and does not lower it); the budget step-down still applies to it.
2. **Classifier** (`routing/complexity.py`) on chat and legacy completions; embeddings go to the
   baseline group (reason `default`).
3. **Session**: a conversation never drops below the highest tier it reached within
   `session_affinity_ttl_seconds` (`routing/complexity_sessions.py`).
4. **Budget step-down**: a virtual key whose spend has reached a share in `budget_step_down`
   goes one tier down per share reached, to the next tier served by another model group. This
   is the one thing that lowers a session's tier: a budget rule outranks stickiness. The share
   is what the auth layer learned when it admitted the request:
   `ClientRequest.identity["budget_share"]` (the key's settled spend in its current budget
   window / its `max_budget`; `mitmroute/addons/auth.py`). mitmroute budgets are per key, so a
   team steps down through its keys.

The result is `exchange.tier_route` (response headers `x-mitmroute-tier`,
`x-mitmroute-route-reason`; spend columns `route_tier`, `route_reason`, `route_score`,
`baseline_cost_usd`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from mitmroute import errors
from mitmroute.exchange import Exchange, TierRoute
from mitmroute.providers import EMBEDDINGS
from mitmroute.routing.complexity import TIERS, ComplexityClassifier
from mitmroute.routing.complexity_sessions import SessionTiers, session_key

if TYPE_CHECKING:
    from mitmroute.config import Deployment, RouterConfig
    from mitmroute.money import Pricing
    from mitmroute.request import ClientRequest

log = logging.getLogger("mitmroute")

TIER_HEADER = "x-mitmroute-tier"
REASON_HEADER = "x-mitmroute-route-reason"
_CHOICES = (*TIERS, "AUTO")


def tier_override(headers: Any, body: dict[str, Any]) -> tuple[int, str] | None:
    """(tier, 'header' | 'metadata') the client asked for, or None; a bad value is a 400."""
    value, source, param = headers.get(TIER_HEADER), "header", TIER_HEADER
    metadata = body.get("metadata")
    if value is None and isinstance(metadata, dict) and metadata.get("tier") is not None:
        value, source, param = metadata["tier"], "metadata", "metadata.tier"
    if value is None:
        return None
    name = value.strip().upper() if isinstance(value, str) else None
    if name not in _CHOICES:
        raise errors.bad_request(
            f"`{param}` must be one of SIMPLE, MEDIUM, COMPLEX, REASONING or auto, got {value!r}",
            param=param,
        )
    return None if name == "AUTO" else (TIERS.index(name), source)


class ComplexityRouters:
    """The complexity routers of one config: classifiers, the session record, baselines."""

    def __init__(self, config: RouterConfig, pricing: Pricing) -> None:
        self.routers = config.complexity_routers
        self.pricing = pricing
        self.classifiers = {n: ComplexityClassifier(r.classifier) for n, r in self.routers.items()}
        groups = config.groups()
        self.baselines: dict[str, Deployment] = {
            n: groups[r.baseline][0] for n, r in self.routers.items()
        }
        target = None
        if any(r.sticky_sessions for r in self.routers.values()):
            from mitmroute.auth import redis_target  # where shared state lives, if anywhere

            target = redis_target(config)
        self.sessions = SessionTiers.connect(target, config.cache.namespace)
        for name in self.routers:
            self._check_prices(name, groups)

    def __contains__(self, name: object) -> bool:
        return name in self.routers

    async def start(self) -> None:
        if self.routers:
            await self.sessions.start()

    async def close(self) -> None:
        await self.sessions.close()

    async def route(
        self,
        name: str,
        request: ClientRequest,
        body: dict[str, Any],
        endpoint: str,
        exchange: Exchange,
    ) -> str:
        """The model group router `name` sends this request to (sets `exchange.tier_route`)."""
        router = self.routers[name]
        override = tier_override(request.headers, body)
        metadata = body.get("metadata")
        if isinstance(metadata, dict) and "tier" in metadata:  # ours: never sent upstream
            rest = {k: v for k, v in metadata.items() if k != "tier"}
            if rest:
                body["metadata"] = rest
            else:
                del body["metadata"]
        score = None
        if override is not None:
            tier, steps = override[0], [override[1]]
        elif endpoint == EMBEDDINGS:
            exchange.tier_route = TierRoute(name, None, "default", None, router.baseline)
            return router.baseline
        else:
            verdict = self.classifiers[name].classify(body)
            tier, score, steps = (
                verdict.tier,
                verdict.score,
                ["rule" if verdict.rule else "classifier"],
            )
        if router.sticky_sessions:
            key = session_key(
                name, exchange.api_key_hash, request.headers, body, router.session_headers
            )
            if key is not None:
                held = await self.sessions.hold(key, tier, router.session_ttl)
                if held > tier and override is None:
                    tier = held
                    steps.append("session")
        share = request.identity.get("budget_share")
        if router.budget_step_down and isinstance(share, int | float):
            reached = sum(1 for s in router.budget_step_down if share >= s)
            lower = router.step_down(tier, reached)
            if lower != tier:
                tier = lower
                steps.append("budget")
        exchange.tier_route = TierRoute(name, TIERS[tier], "+".join(steps), score, router.baseline)
        return router.groups[tier]

    def price_baseline(self, exchange: Exchange) -> None:
        """Price the exchange's tokens on its router's baseline group (`baseline_cost_usd`):
        the same token counts, the baseline's first deployment's rates. Not for cache hits
        (their cost is 0 and `saved_usd` says what the cache saved)."""
        route = exchange.tier_route
        if route is None or exchange.usage is None or exchange.cache_hit:
            return
        deployment = self.baselines.get(route.router)
        if deployment is not None:
            route.baseline_cost_usd = self.pricing.cost(
                deployment.provider, deployment.model, exchange.usage, deployment
            )

    def _check_prices(self, name: str, groups: dict[str, list[Deployment]]) -> None:
        """Warn when a lower tier's group is priced above a higher tier's: the step-down and
        the savings figures assume tiers get dearer upwards."""
        router = self.routers[name]
        rates = [self.pricing.rates(groups[g][0]) for g in router.groups]
        for low in range(len(TIERS)):
            for high in range(low + 1, len(TIERS)):
                if all(rates[low]) and all(rates[high]) and rates[low] > rates[high]:
                    log.warning(
                        "complexity router %s: tier %s (%s) is priced above tier %s (%s)",
                        name,
                        TIERS[low],
                        router.groups[low],
                        TIERS[high],
                        router.groups[high],
                    )
                    return

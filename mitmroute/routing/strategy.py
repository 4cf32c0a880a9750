"""`router_settings.routing_strategy`: which healthy deployment of a group takes an attempt.

LiteLLM's names and meaning:

- `simple-shuffle` (default): at random, weighted by `weight`, else by `rpm`;
- `least-busy`: the fewest attempts in flight from this proxy;
- `latency-based-routing`: the lowest recent latency (`routing.latency`); any deployment within
  `routing_strategy_args.lowest_latency_buffer` of it at random; unmeasured ones first;
- `usage-based-routing-v2` (and `usage-based-routing`): the fewest tokens used this minute;
- `cost-based-routing`: the cheapest by the price book (input + output USD per token), an
  unpriced deployment last, config order between equals.

The picker (`routing.picker`) has already left out resting deployments, those at their rpm/tpm
limit and, while others remain, those this request tried; a strategy chooses among the rest.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

from mitmroute.config import Deployment, StrategyArgs
from mitmroute.routing.inflight import InFlight
from mitmroute.routing.latency import LatencyBook
from mitmroute.routing.limits import DeploymentLimits

if TYPE_CHECKING:
    from mitmroute.money import Pricing


class Strategy(Protocol):
    name: str

    def choose(self, candidates: Sequence[Deployment], stream: bool = False) -> Deployment:
        """One of `candidates` (never empty)."""
        ...


def _lowest(
    candidates: Sequence[Deployment], scores: list[float], rng: random.Random
) -> Deployment:
    low = min(scores)
    return rng.choice([d for d, s in zip(candidates, scores, strict=True) if s == low])


class SimpleShuffle:
    name = "simple-shuffle"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def choose(self, candidates: Sequence[Deployment], stream: bool = False) -> Deployment:
        if len(candidates) == 1:
            return candidates[0]
        weights = [d.weight if d.weight != 1.0 or not d.rpm else float(d.rpm) for d in candidates]
        if not any(weights):  # all drained (weight 0): still better than no answer
            return candidates[0]
        return self.rng.choices(candidates, weights=weights)[0]


class LeastBusy:
    name = "least-busy"

    def __init__(self, in_flight: InFlight, rng: random.Random | None = None) -> None:
        self.in_flight = in_flight
        self.rng = rng or random.Random()

    def choose(self, candidates: Sequence[Deployment], stream: bool = False) -> Deployment:
        return _lowest(candidates, [self.in_flight.count(d.id) for d in candidates], self.rng)


class LowestLatency:
    name = "latency-based-routing"

    def __init__(
        self, latency: LatencyBook, args: StrategyArgs, rng: random.Random | None = None
    ) -> None:
        self.latency = latency
        self.buffer = args.lowest_latency_buffer
        self.rng = rng or random.Random()

    def choose(self, candidates: Sequence[Deployment], stream: bool = False) -> Deployment:
        scores = [self.latency.average(d.id, stream) or 0.0 for d in candidates]
        ceiling = min(scores) * (1 + self.buffer)
        return self.rng.choice([d for d, s in zip(candidates, scores, strict=True) if s <= ceiling])


class LowestUsage:
    name = "usage-based-routing-v2"

    def __init__(self, limits: DeploymentLimits, rng: random.Random | None = None) -> None:
        self.limits = limits
        self.rng = rng or random.Random()

    def choose(self, candidates: Sequence[Deployment], stream: bool = False) -> Deployment:
        return _lowest(candidates, [self.limits.tokens(d) for d in candidates], self.rng)


class LowestCost:
    name = "cost-based-routing"

    def __init__(self, pricing: Pricing) -> None:
        self.pricing = pricing
        self._prices: dict[str, tuple[bool, Decimal]] = {}

    def price(self, deployment: Deployment) -> tuple[bool, Decimal]:
        """(unpriced, input + output USD per token): the sort key, cheapest first."""
        known = self._prices.get(deployment.id)
        if known is None:
            rates = self.pricing.book.rates(deployment.provider, deployment.model, deployment)
            if rates is None or rates.input is None or rates.output is None:
                known = (True, Decimal(0))
            else:
                known = (False, rates.input + rates.output)
            self._prices[deployment.id] = known
        return known

    def choose(self, candidates: Sequence[Deployment], stream: bool = False) -> Deployment:
        return min(candidates, key=self.price)


USAGE_BASED = ("usage-based-routing-v2", "usage-based-routing")

"""What past traffic would have cost under another config: re-pricing the ledger, offline.

Every spend-log row keeps its token counts; under the other config each row is priced where
that config would have sent it, without calling any backend:
- a request that went through a complexity router goes to the other config's group for the
  same tier (`route_tier`), when the other config has that router;
- otherwise to the other config's group of the same name (`model_group`, through its aliases);
- that group's first deployment prices the tokens (mitmroute.money: the deployment's own
  prices, the price file, the built-in table).
Rows the other config can't place or price are counted apart, never as 0. Cache hits cost 0
either way; refused and failed requests (no tokens) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from mitmroute.config import Deployment, RouterConfig
from mitmroute.exchange import Usage
from mitmroute.money.pricing import Pricing

TIERS = ("SIMPLE", "MEDIUM", "COMPLEX", "REASONING")
DIMENSIONS = {
    "model_group": "coalesce(model_group, requested_model)",
    "team": "team",
    "day": "CAST(timezone('UTC', started_at) AS DATE)",
}
ROWS_SQL = """
SELECT {dims}, requested_model, model_group, route_tier, cache_hit,
       prompt_tokens, completion_tokens, cached_tokens, cache_creation_tokens, cost_usd
FROM spend_log
WHERE prompt_tokens IS NOT NULL AND status_code < 400 {window}
"""


@dataclass(slots=True)
class Line:
    """One group of the report: rows, their cost then, and under the other config."""

    rows: int = 0
    cost_now: Decimal = Decimal(0)
    cost_then: Decimal = Decimal(0)
    unplaced: int = 0
    """Rows the other config has no group or no price for (left out of both sums)."""

    @property
    def difference(self) -> Decimal:
        return self.cost_then - self.cost_now


@dataclass(slots=True)
class Report:
    by: list[str]
    lines: dict[tuple[Any, ...], Line] = field(default_factory=dict)

    @property
    def total(self) -> Line:
        total = Line()
        for line in self.lines.values():
            total.rows += line.rows
            total.cost_now += line.cost_now
            total.cost_then += line.cost_then
            total.unplaced += line.unplaced
        return total


class Repricer:
    """Prices a ledger row's tokens where `config` would have sent the request."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.pricing = Pricing.for_config(config)
        self.groups = config.groups()

    def deployment(
        self, requested: str | None, group: str | None, tier: str | None
    ) -> Deployment | None:
        routers = self.config.complexity_routers
        for name in (requested, group):
            if name and name in routers and tier in TIERS:
                return self._first(routers[name].groups[TIERS.index(tier)])
        for name in (group, requested):
            if name and (found := self._first(name)) is not None:
                return found
        return None

    def _first(self, name: str) -> Deployment | None:
        name = self.config.router.model_group_alias.get(name, name)
        if name in self.config.complexity_routers:
            name = self.config.complexity_routers[name].baseline
        deployments = self.groups.get(name)
        return deployments[0] if deployments else None

    def cost(self, deployment: Deployment, usage: Usage) -> Decimal | None:
        return self.pricing.cost(deployment.provider, deployment.model, usage, deployment)


def reprice(con: Any, config: RouterConfig, by: list[str], window: str = "") -> Report:
    """Re-price every row of the ledger `con` (a DuckDB connection) under `config`."""
    dims = ", ".join(DIMENSIONS[d] for d in by) or "NULL"
    repricer = Repricer(config)
    report = Report(by)
    for row in con.execute(ROWS_SQL.format(dims=dims, window=window)).fetchall():
        key = tuple(row[: len(by)]) if by else ("all",)
        requested, group, tier, cache_hit, prompt, completion, cached, written, cost = row[
            max(len(by), 1) :
        ]
        line = report.lines.setdefault(key, Line())
        line.rows += 1
        if cache_hit:
            continue  # free then, free under any config
        usage = Usage(prompt or 0, completion or 0, cached or 0, written or 0)
        deployment = repricer.deployment(requested, group, tier)
        then = repricer.cost(deployment, usage) if deployment is not None else None
        if then is None or cost is None:
            line.unplaced += 1
            continue
        line.cost_now += Decimal(cost)
        line.cost_then += then
    return report


def by_dimensions(names: list[str]) -> list[str]:
    bad = [n for n in names if n not in DIMENSIONS]
    if bad:
        raise ValueError(f"unknown column(s) {', '.join(bad)} (allowed: {', '.join(DIMENSIONS)})")
    return names

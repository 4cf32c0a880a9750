"""Picks the deployment of a model group that takes the next attempt."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mitmroute.config import Deployment
from mitmroute.routing.cooldown import Cooldowns
from mitmroute.routing.strategy import SimpleShuffle, Strategy


class DeploymentPicker:
    """A healthy deployment (not resting, not at its rpm/tpm limit), untried ones first, as
    the routing strategy chooses (weighted random by default)."""

    def __init__(
        self,
        cooldowns: Cooldowns,
        at_limit: Callable[[Deployment], bool] | None = None,
        strategy: Strategy | None = None,
    ) -> None:
        self.cooldowns = cooldowns
        self.at_limit = at_limit or (lambda d: False)
        self.strategy = strategy or SimpleShuffle()

    def healthy(self, deployments: Sequence[Deployment]) -> list[Deployment]:
        return [d for d in deployments if not self.cooldowns.cooling(d.id) and not self.at_limit(d)]

    def pick(
        self,
        deployments: Sequence[Deployment],
        tried: set[str] = frozenset(),  # type: ignore[assignment]
        *,
        stream: bool = False,
    ) -> Deployment | None:
        """A healthy deployment, preferring ones this request has not tried; None if none."""
        candidates = self.healthy(deployments)
        if not candidates:
            return None
        fresh = [d for d in candidates if d.id not in tried] or candidates
        return self.strategy.choose(fresh, stream)

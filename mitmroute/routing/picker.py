"""Picks the deployment of a model group that takes the next attempt."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from mitmroute.config import Deployment
from mitmroute.routing.cooldown import Cooldowns


class DeploymentPicker:
    """Weighted random choice among healthy deployments (weight, else rpm), untried ones first."""

    def __init__(
        self, cooldowns: Cooldowns, at_limit: Callable[[Deployment], bool] | None = None
    ) -> None:
        self.cooldowns = cooldowns
        self.at_limit = at_limit or (lambda d: False)
        self._random = random.Random()

    def healthy(self, deployments: Sequence[Deployment]) -> list[Deployment]:
        return [d for d in deployments if not self.cooldowns.cooling(d.id) and not self.at_limit(d)]

    def pick(
        self, deployments: Sequence[Deployment], tried: set[str] = frozenset()
    ) -> Deployment | None:  # type: ignore[assignment]
        """A healthy deployment, preferring ones this request has not tried; None if none."""
        candidates = self.healthy(deployments)
        if not candidates:
            return None
        fresh = [d for d in candidates if d.id not in tried] or candidates
        if len(fresh) == 1:
            return fresh[0]
        weights = [d.weight if d.weight != 1.0 or not d.rpm else float(d.rpm) for d in fresh]
        if not any(weights):  # all drained (weight 0): still better than no answer
            return fresh[0]
        return self._random.choices(fresh, weights=weights)[0]

"""Cooldowns: a deployment that keeps failing is skipped until it has rested.

The decision is this process's own (its failures, its clock); `routing.shared_cooldowns` hands
each one to the other proxies on the same Redis, which `adopt` it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

FAIL_WINDOW = 60.0


class Cooldowns:
    """Counts recent failures per deployment; `allowed_fails` in a minute cools it down."""

    def __init__(
        self,
        allowed_fails: int = 3,
        cooldown_time: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allowed_fails = allowed_fails
        self.cooldown_time = cooldown_time
        self._clock = clock
        self._fails: dict[str, deque[float]] = {}
        self._until: dict[str, float] = {}
        self.listeners: list[Callable[[str, float, str], None]] = []

    def cooling(self, deployment_id: str) -> bool:
        until = self._until.get(deployment_id)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[deployment_id]
            self._fails.pop(deployment_id, None)
            return False
        return True

    def remaining(self, deployment_id: str) -> float:
        return max(0.0, self._until.get(deployment_id, 0.0) - self._clock())

    def failure(self, deployment_id: str, reason: str, retry_after: float | None = None) -> None:
        """Record a failure; cool the deployment when it has failed too often or said so."""
        now = self._clock()
        fails = self._fails.setdefault(deployment_id, deque())
        fails.append(now)
        while fails and fails[0] < now - FAIL_WINDOW:
            fails.popleft()
        if retry_after:
            self._cool(deployment_id, max(retry_after, 0.0), reason)
        elif len(fails) > self.allowed_fails or (self.allowed_fails == 0):
            self._cool(deployment_id, self.cooldown_time, reason)

    def success(self, deployment_id: str) -> None:
        self._fails.pop(deployment_id, None)

    def adopt(self, deployment_id: str, seconds: float) -> bool:
        """Rest `deployment_id` for `seconds` because another proxy cooled it (no listeners: the
        proxy that decided counts and alerts). True when this extended its rest."""
        if seconds <= 0:
            return False
        until = self._clock() + seconds
        if until <= self._until.get(deployment_id, 0.0):
            return False
        self._until[deployment_id] = until
        return True

    def _cool(self, deployment_id: str, seconds: float, reason: str) -> None:
        if seconds <= 0:
            return
        self._until[deployment_id] = max(
            self._until.get(deployment_id, 0.0), self._clock() + seconds
        )
        log.warning("deployment %s cooling down for %.1fs (%s)", deployment_id, seconds, reason)
        for listener in self.listeners:
            listener(deployment_id, seconds, reason)

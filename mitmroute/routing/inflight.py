"""Attempts in flight per deployment, for least-busy routing (this process only)."""

from __future__ import annotations

import time
from collections.abc import Callable


class InFlight:
    """An attempt is in flight from the moment it is sent until its answer has been read
    (a stream: until it ended). An entry older than `max_age` seconds is forgotten: an answer
    nobody read to the end must not keep its deployment looking busy."""

    def __init__(self, max_age: float = 900.0, clock: Callable[[], float] = time.monotonic):
        self.max_age = max_age
        self._clock = clock
        self._started: dict[str, dict[str, float]] = {}

    def start(self, deployment_id: str, key: str) -> None:
        self._started.setdefault(deployment_id, {})[key] = self._clock()

    def end(self, deployment_id: str, key: str) -> float | None:
        """Seconds since `key` started on this deployment; None if it was not in flight."""
        started = self._started.get(deployment_id, {}).pop(key, None)
        return None if started is None else self._clock() - started

    def count(self, deployment_id: str) -> int:
        entries = self._started.get(deployment_id)
        if not entries:
            return 0
        oldest = self._clock() - self.max_age
        for key in [k for k, at in entries.items() if at < oldest]:
            del entries[key]
        return len(entries)

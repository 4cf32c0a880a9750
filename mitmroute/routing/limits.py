"""Requests and tokens per deployment in the current clock minute.

A deployment at its `rpm` / `tpm` (from `model_list`) is skipped; usage-based routing picks the
deployment that used the fewest tokens. Counts live in this process; with Redis,
`routing.shared` merges in what the other proxies counted (counts only grow within a minute, so
the larger of two counts is the better one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from mitmroute.config import Deployment


class DeploymentLimits:
    """Requests and tokens per deployment in the current clock minute."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._minute = -1
        self._requests: dict[str, int] = {}
        self._tokens: dict[str, int] = {}

    def minute(self) -> int:
        """The current clock minute (since the epoch), the counts' window."""
        minute = int(self._clock() // 60)
        if minute != self._minute:
            self._minute = minute
            self._requests.clear()
            self._tokens.clear()
        return minute

    def requests(self, deployment: Deployment) -> int:
        self.minute()
        return self._requests.get(deployment.id, 0)

    def tokens(self, deployment: Deployment) -> int:
        self.minute()
        return self._tokens.get(deployment.id, 0)

    def at_limit(self, deployment: Deployment) -> bool:
        if deployment.rpm is None and deployment.tpm is None:
            return False
        if deployment.rpm is not None and self.requests(deployment) >= deployment.rpm:
            return True
        return deployment.tpm is not None and self.tokens(deployment) >= deployment.tpm

    def started(self, deployment: Deployment) -> None:
        self.minute()
        self._requests[deployment.id] = self._requests.get(deployment.id, 0) + 1

    def used(self, deployment: Deployment, tokens: int) -> None:
        self.minute()
        self._tokens[deployment.id] = self._tokens.get(deployment.id, 0) + tokens

    def merge(self, minute: int, counts: Mapping[str, tuple[int, int]]) -> None:
        """Take (requests, tokens) per deployment id counted elsewhere in `minute`."""
        if minute != self.minute():
            return
        for deployment_id, (requests, tokens) in counts.items():
            self._requests[deployment_id] = max(self._requests.get(deployment_id, 0), requests)
            self._tokens[deployment_id] = max(self._tokens.get(deployment_id, 0), tokens)

"""Per-deployment `rpm` / `tpm` from `model_list`: a deployment at its limit is skipped.

Counts live in this process, in one-minute windows (several proxies each count their own).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mitmroute.config import Deployment


class DeploymentLimits:
    """Requests and tokens per deployment in the current clock minute."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._minute = -1
        self._requests: dict[str, int] = {}
        self._tokens: dict[str, int] = {}

    def _roll(self) -> None:
        minute = int(self._clock() // 60)
        if minute != self._minute:
            self._minute = minute
            self._requests.clear()
            self._tokens.clear()

    def at_limit(self, deployment: Deployment) -> bool:
        if deployment.rpm is None and deployment.tpm is None:
            return False
        self._roll()
        if deployment.rpm is not None and self._requests.get(deployment.id, 0) >= deployment.rpm:
            return True
        return deployment.tpm is not None and self._tokens.get(deployment.id, 0) >= deployment.tpm

    def started(self, deployment: Deployment) -> None:
        if deployment.rpm is None and deployment.tpm is None:
            return
        self._roll()
        self._requests[deployment.id] = self._requests.get(deployment.id, 0) + 1

    def used(self, deployment: Deployment, tokens: int) -> None:
        if deployment.tpm is None:
            return
        self._roll()
        self._tokens[deployment.id] = self._tokens.get(deployment.id, 0) + tokens

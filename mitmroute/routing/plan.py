"""The plan one request follows through its model groups (README: "Fallbacks, retries,
cooldowns"): which deployment takes the next attempt, how long to wait first, when to give up.

The engine drives it and does the calling::

    plan = routing.plan(group, request_id=..., stream=...)
    while True:
        step = plan.next()
        if isinstance(step, Stop): raise step.error
        if isinstance(step, Wait): await sleep(step.seconds); continue
        try: answer = await call(step.deployment, plan.time_left())
        except ProxyError as e: plan.failed(step.deployment, e); continue
        plan.succeeded(step.deployment); return answer

The rules: a request climbs its ladder (its group, then `fallbacks[group]`); within a group each
healthy deployment is tried once before the next group; only the last group left is retried,
`num_retries` / `retry_policy` times, after a backoff that honours Retry-After, or after its
deployments' rest when all of them are resting; a context-window or content-policy 400 switches
to its own fallbacks, other 4xx stop the plan; a deployment that can't take the request
("unsupported") hands it to its siblings uncooled; a deployment whose own key is refused rests
for `cooldown_time`; nothing starts after the overall deadline (`timeout`).

The plan holds no sockets and reads time only through its clock (backoff jitter through its
rng), so every rule is unit-tested (tests/unit/test_routing_plan.py).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from mitmroute.config import Deployment, RouterSettings
from mitmroute.errors import ProxyError
from mitmroute.routing.cooldown import Cooldowns
from mitmroute.routing.ladder import (
    MAX_RETRY_AFTER,
    backoff,
    build_ladder,
    parse_retry_after,
    retries_for,
    special_fallbacks,
)
from mitmroute.routing.picker import DeploymentPicker


@dataclass(frozen=True, slots=True)
class Try:
    """Call this deployment now."""

    deployment: Deployment


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep this long, then ask for the next step."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Stop:
    """Nothing more to try: answer the client with this error."""

    error: ProxyError


Step = Try | Wait | Stop


class Attempts(Protocol):
    """Who hears about each attempt (`RoutingState`: in-flight counts, usage, latency)."""

    def started(self, deployment: Deployment, request_id: str) -> None: ...

    def failed(
        self, deployment: Deployment, request_id: str, error: ProxyError | None, seconds: float
    ) -> None: ...

    def answered(
        self, deployment: Deployment, request_id: str, seconds: float, stream: bool
    ) -> None: ...


class RoutePlan:
    def __init__(
        self,
        group: str,
        groups: Mapping[str, Sequence[Deployment]],
        settings: RouterSettings,
        picker: DeploymentPicker,
        cooldowns: Cooldowns,
        *,
        attempts: Attempts | None = None,
        request_id: str = "",
        stream: bool = False,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.group = group
        self.groups = groups
        self.settings = settings
        self.picker = picker
        self.cooldowns = cooldowns
        self.attempts = attempts
        self.request_id = request_id
        self.stream = stream
        self.clock = clock
        self.rng = rng
        self.ladder = build_ladder(group, settings)
        self.deadline = clock() + settings.timeout
        self.failures: list[str] = []
        """What went wrong, attempt by attempt: the message of a 429/503 at the end."""
        self.last: ProxyError | None = None
        self._unreachable: list[bool] = []
        """Per failed attempt: was the deployment unreachable (nothing listening)?"""
        self._tried: set[str] = set()
        self._retries = 0
        self._pending: Deployment | None = None
        """Picked before a backoff Wait: tried once the wait is over."""
        self._started_at = 0.0
        self._stop: ProxyError | None = None

    @property
    def fallback_used(self) -> bool:
        """Whether the answer came from a group other than the requested one."""
        return self.ladder.position > 0

    def time_left(self) -> float:
        """Seconds until the overall deadline (an attempt's own timeout is capped by it)."""
        return self.deadline - self.clock()

    # --- the steps ----------------------------------------------------------------------------

    def next(self) -> Step:
        if self._stop is not None:
            return Stop(self._stop)
        if self._pending is not None:
            deployment, self._pending = self._pending, None
            return self._try(deployment)
        settings = self.settings
        while True:
            deployments = self.groups[self.ladder.group]
            deployment = self.picker.pick(deployments, self._tried, stream=self.stream)
            if deployment is None or (deployment.id in self._tried and self.ladder.has_next):
                if deployment is None:
                    self.failures.append(
                        f"{self.ladder.group}: every deployment is cooling down or at its "
                        "rpm/tpm limit"
                    )
                if self.ladder.advance():
                    self._tried, self._retries = set(), 0
                    continue
                if deployment is None:
                    # The last group is resting: wait for it if a retry is due and time allows.
                    wait = self._rest_left(deployments)
                    last = self.last
                    if (
                        last is None
                        or not last.retryable
                        or wait is None
                        or self._retries >= retries_for(last, settings)
                        or self.clock() + wait >= self.deadline
                    ):
                        return self._give_up()
                    self.failures.pop()
                    self._retries += 1
                    self._tried = set()
                    return Wait(wait)
            if deployment.id not in self._tried:
                return self._try(deployment)
            # The last group, every healthy deployment tried: a retry, if one is due.
            last = self.last
            if last is None or not last.retryable or self._retries >= retries_for(last, settings):
                return self._give_up()
            self._retries += 1
            retry_after = parse_retry_after(last.headers.get("retry-after"))
            wait = backoff(self._retries, settings, retry_after, self.rng)
            if self.clock() + wait >= self.deadline:
                self.failures.append(f"deadline of {settings.timeout:g}s reached")
                return self._give_up()
            self._pending = deployment
            return Wait(wait)

    def failed(self, deployment: Deployment, error: ProxyError) -> None:
        """The attempt at `deployment` ended with `error`."""
        self.last = error
        self._unreachable.append(error.kind == "connect")
        self.failures.append(f"{deployment.litellm_model} ({deployment.public_base}): {error}")
        if self.attempts is not None:
            self.attempts.failed(deployment, self.request_id, error, self._elapsed())
        if error.kind == "unsupported":
            return  # no attempt was made: nothing to cool down
        if error.retryable or (error.kind == "auth" and deployment.api_key):
            # a deployment's own key rejected: that deployment is broken, not the request
            retry_after = parse_retry_after(error.headers.get("retry-after"))
            if error.kind == "auth":
                retry_after = self.settings.cooldown_time
            elif error.status != 429:
                retry_after = None
            self.cooldowns.failure(deployment.id, error.kind, retry_after)
            if self.clock() >= self.deadline:
                self.failures.append(f"deadline of {self.settings.timeout:g}s reached")
                self._stop = self._exhausted()
            return
        targets = special_fallbacks(error, self.ladder.group, self.settings)
        if targets and self.ladder.switch(targets):
            self._tried, self._retries = set(), 0
            return
        self._stop = error  # other 4xx: the client's own problem, as the backend said it

    def succeeded(self, deployment: Deployment) -> None:
        """`deployment` answered (a stream: its first chunk arrived)."""
        self.cooldowns.success(deployment.id)
        if self.attempts is not None:
            self.attempts.answered(deployment, self.request_id, self._elapsed(), self.stream)

    def abandoned(self, deployment: Deployment) -> None:
        """The attempt ended with neither an answer nor an error of the backend's (the request
        was cancelled): only its bookkeeping ends."""
        if self.attempts is not None:
            self.attempts.failed(deployment, self.request_id, None, self._elapsed())

    # --- helpers ------------------------------------------------------------------------------

    def _try(self, deployment: Deployment) -> Try:
        self._tried.add(deployment.id)
        self._started_at = self.clock()
        if self.attempts is not None:
            self.attempts.started(deployment, self.request_id)
        return Try(deployment)

    def _elapsed(self) -> float:
        return self.clock() - self._started_at

    def _give_up(self) -> Stop:
        self._stop = self._exhausted()
        return Stop(self._stop)

    def _rest_left(self, deployments: Sequence[Deployment]) -> float | None:
        """Seconds until the first resting deployment of a group may be tried again; None when
        none will within MAX_RETRY_AFTER (or they are at their rpm/tpm limit instead)."""
        waits = [self.cooldowns.remaining(d.id) for d in deployments]
        waits = [w for w in waits if w > 0]
        if not waits or min(waits) > MAX_RETRY_AFTER:
            return None
        return min(waits)

    def _exhausted(self) -> ProxyError:
        last = self.last
        if last is not None and not last.retryable:
            return last  # e.g. the backend refused its key: its own status says it best
        # nothing tried at all: everything was resting or at its limit, so "try later"
        rate_limited = last is None or last.kind == "rate_limit"
        tried = "; ".join(self.failures) or "nothing was tried"
        message = f"No deployment of `{self.group}` could answer. Tried: {tried}"
        if rate_limited:
            return ProxyError(
                429,
                message,
                "rate_limit_exceeded",
                code="all_deployments_failed",
                kind="rate_limit",
            )
        if self._unreachable and all(self._unreachable):
            # Nothing is listening: a client's own retries in a second would only wait longer
            # to hear the same (the openai and anthropic SDKs honour x-should-retry).
            return ProxyError(
                503,
                f"No deployment of `{self.group}` can be reached. Tried: {tried}",
                "server_error",
                code="all_deployments_unreachable",
                kind="error",
                headers={"x-should-retry": "false"},
            )
        return ProxyError(503, message, "server_error", code="all_deployments_failed", kind="error")

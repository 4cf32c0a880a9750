"""The retry and fallback policy: which group comes next, how long to wait, when to stop."""

from __future__ import annotations

import random
from dataclasses import dataclass

from mitmroute.config import RouterSettings
from mitmroute.errors import ProxyError

MAX_RETRY_AFTER = 30.0
"""A provider's Retry-After is honoured up to this many seconds."""

POLICY_KEY = {
    "rate_limit": "RateLimitErrorRetries",
    "timeout": "TimeoutErrorRetries",
    "connect": "APIConnectionErrorRetries",
    "error": "InternalServerErrorRetries",
    "content_policy": "ContentPolicyViolationErrorRetries",
    "auth": "AuthenticationErrorRetries",
    "bad_request": "BadRequestErrorRetries",
}


@dataclass(slots=True)
class Ladder:
    """The groups a request may climb, in order, starting with its own."""

    groups: list[str]
    position: int = 0

    @property
    def group(self) -> str:
        return self.groups[self.position]

    @property
    def has_next(self) -> bool:
        return self.position + 1 < len(self.groups)

    def advance(self) -> bool:
        if not self.has_next:
            return False
        self.position += 1
        return True

    def switch(self, targets: list[str]) -> bool:
        """Replace what is left of the ladder (context-window and content-policy fallbacks)."""
        remaining = [g for g in targets if g not in self.groups[: self.position + 1]]
        if not remaining:
            return False
        self.groups = self.groups[: self.position + 1] + remaining
        self.position += 1
        return True


def build_ladder(group: str, settings: RouterSettings) -> Ladder:
    chain = [group]
    for target in settings.fallbacks.get(group, settings.fallbacks.get("*", [])):
        target = settings.model_group_alias.get(target, target)
        if target not in chain:
            chain.append(target)
    return Ladder(chain)


def special_fallbacks(error: ProxyError, group: str, settings: RouterSettings) -> list[str]:
    """Fallback groups for a non-retryable error that has its own ladder."""
    if error.kind == "context_window":
        ladder = settings.context_window_fallbacks
    elif error.kind == "content_policy":
        ladder = settings.content_policy_fallbacks
    else:
        return []
    targets = ladder.get(group, ladder.get("*", []))
    return [settings.model_group_alias.get(t, t) for t in targets]


def retries_for(error: ProxyError, settings: RouterSettings) -> int:
    """How many retries (beyond the first attempt) a group gets for this kind of error."""
    policy = settings.retry.per_error.get(POLICY_KEY.get(error.kind, ""), None)
    return settings.retry.num_retries if policy is None else policy


def backoff(
    retry: int,
    settings: RouterSettings,
    retry_after: float | None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number `retry` (1-based): exponential with jitter, at least
    `retry_after` (config) and the provider's Retry-After (bounded)."""
    base = min(8.0, 0.25 * 2 ** (retry - 1))
    wait = (rng or random).uniform(base / 2, base)
    floor = max(settings.retry.retry_after, min(retry_after or 0.0, MAX_RETRY_AFTER))
    return max(wait, floor)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After (or retry-after-ms) header value; None if absent or a date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None

"""What one client request became: the record the spend log, metrics and alerts consume."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any


@dataclass(slots=True)
class Usage:
    """Token counts in OpenAI's terms (prompt_tokens includes cached and cache-write tokens)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens read from the provider's prompt cache (priced at the cached rate)."""
    cache_creation_tokens: int = 0
    """Prompt tokens written to the provider's prompt cache (Anthropic prices them higher)."""
    reasoning_tokens: int = 0
    source: str = "upstream"
    """'upstream' when the backend reported it, 'estimated' when counted locally."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, usage: dict[str, Any] | None) -> Usage | None:
        """Read an OpenAI `usage` object; None when absent."""
        if not isinstance(usage, dict):
            return None
        prompt_details = usage.get("prompt_tokens_details") or {}
        completion_details = usage.get("completion_tokens_details") or {}
        return cls(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=int(prompt_details.get("cached_tokens") or 0),
            cache_creation_tokens=int(
                prompt_details.get("cache_creation_tokens")
                or usage.get("cache_creation_input_tokens")
                or 0
            ),
            reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
        )

    @classmethod
    def from_anthropic(cls, usage: dict[str, Any] | None) -> Usage | None:
        """Read an Anthropic Messages `usage` object (whose `input_tokens` leave out cache reads
        and writes); None when absent."""
        if not isinstance(usage, dict) or "output_tokens" not in usage:
            return None
        created = int(usage.get("cache_creation_input_tokens") or 0)
        read = int(usage.get("cache_read_input_tokens") or 0)
        return cls(
            prompt_tokens=int(usage.get("input_tokens") or 0) + created + read,
            completion_tokens=int(usage.get("output_tokens") or 0),
            cached_tokens=read,
            cache_creation_tokens=created,
        )

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens or self.cache_creation_tokens:
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
            if self.cache_creation_tokens:
                out["prompt_tokens_details"]["cache_creation_tokens"] = self.cache_creation_tokens
        if self.reasoning_tokens:
            out["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return out


@dataclass(slots=True)
class Attempt:
    """One upstream attempt of a request (a row of `spend_attempts`)."""

    attempt: int
    deployment: str
    api_base: str
    started_at: datetime
    status_code: int | None = None
    error_type: str | None = None
    latency_ms: float = 0.0


@dataclass(slots=True)
class TierRoute:
    """How a complexity router (`auto_router/complexity_router`) chose the model group."""

    router: str
    """The router's model name, as the request named it (aliases resolved)."""
    tier: str | None
    """SIMPLE, MEDIUM, COMPLEX or REASONING; None when the request was not classified (an
    embeddings call goes to the default model)."""
    reason: str
    """What decided, in order, joined by `+`: `classifier` or `rule` (a keyword_tier_rules
    entry), `header` or `metadata` (an explicit override), `default`; then `session` (the
    session held a higher tier) and `budget` (stepped down for the key's budget)."""
    score: float | None = None
    baseline_group: str | None = None
    baseline_cost_usd: Decimal | None = None
    """What the same tokens would have cost on the baseline (default) model group."""


@dataclass(slots=True)
class Exchange:
    """One client request, from arrival to last byte (a row of `spend_log`)."""

    request_id: str
    started_at: datetime
    endpoint: str
    stream: bool = False
    ended_at: datetime | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    api_key_hash: str | None = None
    key_alias: str | None = None
    team: str | None = None
    user: str | None = None
    requested_model: str | None = None
    model_group: str | None = None
    deployment: str | None = None
    """The `litellm_params.model` that answered, e.g. `openai/gpt-4o`."""
    provider: str | None = None
    api_base: str | None = None
    status_code: int | None = None
    error_type: str | None = None
    cache_hit: bool = False
    attempts: list[Attempt] = field(default_factory=list)
    fallback_used: bool = False
    usage: Usage | None = None
    cost_usd: Decimal | None = None
    saved_usd: Decimal | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    tier_route: TierRoute | None = None
    """Set when a complexity router chose the model group (spend columns route_*)."""
    clock_start: float = 0.0
    """`time.perf_counter()` at arrival, for latencies (not persisted)."""

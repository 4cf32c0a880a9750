"""State the addons of one chain share: the loaded config and who hears about exchanges."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mitmroute.config import RouterConfig
from mitmroute.exchange import Exchange

if TYPE_CHECKING:
    from mitmroute.auth.limits import BudgetUpdate


@dataclass(slots=True)
class Shared:
    config: RouterConfig | None = None
    listeners: list[Callable[[Exchange], None]] = field(default_factory=list)
    """Called once per finished exchange, on the event loop: must not block."""
    config_listeners: list[Callable[[RouterConfig], None]] = field(default_factory=list)
    cooldown_listeners: list[Callable[[str, float, str], None]] = field(default_factory=list)
    """Called as `fn(deployment_id, seconds, reason)` when a deployment starts cooling down."""
    budget_listeners: list[Callable[[BudgetUpdate], None]] = field(default_factory=list)
    """Called when a virtual key's spend changes (after each settled request)."""
    spend_drop_listeners: list[Callable[[int], None]] = field(default_factory=list)
    """Called with a count of spend rows lost (buffer full, or unwritable at exit); any thread."""
    spend_query: Callable[[str, Any], list[tuple[Any, ...]]] | None = None
    """Runs a read query on the spend log file's writer (blocking, off the loop): set by the
    spend log addon while its writer runs on a local file."""

    def publish_config(self, config: RouterConfig) -> None:
        self.config = config
        for listener in self.config_listeners:
            listener(config)

    def publish_exchange(self, exchange: Exchange) -> None:
        for listener in self.listeners:
            listener(exchange)

    def publish_cooldown(self, deployment_id: str, seconds: float, reason: str) -> None:
        for listener in self.cooldown_listeners:
            listener(deployment_id, seconds, reason)

    def publish_budget(self, update: BudgetUpdate) -> None:
        for listener in self.budget_listeners:
            listener(update)

    def publish_spend_dropped(self, rows: int) -> None:
        for listener in self.spend_drop_listeners:
            listener(rows)

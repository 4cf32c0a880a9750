"""State the addons of one chain share: the loaded config and who hears about exchanges."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mitmroute.config import RouterConfig
from mitmroute.exchange import Exchange


@dataclass(slots=True)
class Shared:
    config: RouterConfig | None = None
    listeners: list[Callable[[Exchange], None]] = field(default_factory=list)
    """Called once per finished exchange, on the event loop: must not block."""
    config_listeners: list[Callable[[RouterConfig], None]] = field(default_factory=list)

    def publish_config(self, config: RouterConfig) -> None:
        self.config = config
        for listener in self.config_listeners:
            listener(config)

    def publish_exchange(self, exchange: Exchange) -> None:
        for listener in self.listeners:
            listener(exchange)

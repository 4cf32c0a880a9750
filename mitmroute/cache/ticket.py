"""A request's dealings with the cache, from lookup to store."""

from __future__ import annotations

from dataclasses import dataclass

from mitmroute.cache import CacheControls, CachedAnswer, Flight


@dataclass(slots=True)
class CacheTicket:
    """A request's dealings with the cache: its key, controls, hit, and single flight."""

    key: str
    controls: CacheControls
    hit: CachedAnswer | None = None
    flight: Flight[CachedAnswer] | None = None

    def release(self) -> None:
        if self.flight is not None:
            self.flight.release()
            self.flight = None

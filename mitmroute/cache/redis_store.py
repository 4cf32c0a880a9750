"""Redis byte store that can never fail or stall a request.

Every command runs under a small time budget (`timeout`, 50 ms by default). A failure (down,
refused, slow, OOM, anything) makes that call a miss (`get` -> None) or a dropped write (`put`
-> False). After `threshold` consecutive failures a circuit breaker opens: one warning is logged,
every call bypasses Redis without touching the network, and a background task PINGs Redis every
`probe_interval` seconds with a more generous budget. The first successful PING closes the
breaker and logs "redis back" once. A flushed Redis is simply a cold cache.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from mitmroute.config import CacheSettings
from mitmroute.redis_client import Breaker, GuardedCalls, connect, label

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["DEFAULT_TIMEOUT", "DEFAULT_TTL", "Breaker", "RedisStore"]

log = logging.getLogger("mitmroute.cache")

DEFAULT_TIMEOUT = 0.05
DEFAULT_TTL = 24 * 3600.0
"""TTL for entries written without one: a shared Redis should never grow without bound."""


class RedisStore:
    """`get`/`put` of bytes in Redis with a time budget per call and a circuit breaker."""

    name = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        label: str = "redis",
        timeout: float = DEFAULT_TIMEOUT,
        probe_interval: float = 1.0,
        probe_timeout: float = 1.0,
        threshold: int = 3,
        default_ttl: float = DEFAULT_TTL,
    ) -> None:
        self.client = client
        self.label = label
        self.default_ttl = default_ttl
        self.guard = GuardedCalls(
            client,
            label=label,
            timeout=timeout,
            probe_interval=probe_interval,
            probe_timeout=probe_timeout,
            threshold=threshold,
            log=log,
            what="cache",
            while_down="bypassing the cache",
            when_back="caching again",
        )
        self.breaker = self.guard.breaker

    @classmethod
    def from_settings(cls, settings: CacheSettings, **kwargs: Any) -> RedisStore:
        """A pooled client from `url`, or `host`/`port`/`password`; no redis-py retries."""
        client = connect(
            url=settings.url,
            host=settings.host,
            port=settings.port,
            password=settings.password,
            timeout=kwargs.get("probe_timeout", 1.0),
        )
        where = label(settings.url, settings.host, settings.port)
        return cls(client, label=where, **kwargs)

    @property
    def available(self) -> bool:
        return not self.breaker.is_open

    async def start(self) -> None:
        """Warm one connection (generous budget); an unreachable Redis only opens the breaker."""
        await self.guard.warm()

    async def close(self) -> None:
        await self.guard.close()
        with contextlib.suppress(Exception):
            await self.client.aclose()

    async def get(self, key: str) -> bytes | None:
        return await self.guard.call(lambda: self.client.get(key), None)

    async def put(self, key: str, value: bytes, ttl: float | None) -> bool:
        px = max(1, int((ttl if ttl is not None else self.default_ttl) * 1000))
        return bool(await self.guard.call(lambda: self.client.set(key, value, px=px), False))

    async def delete(self, *keys: str) -> int:
        """Remove keys (tests and admin); 0 when Redis is unavailable."""
        return int(await self.guard.call(lambda: self.client.delete(*keys), 0) or 0)

"""Redis byte store that can never fail or stall a request.

Every command runs under a small time budget (`timeout`, 50 ms by default). A failure (down,
refused, slow, OOM, anything) makes that call a miss (`get` -> None) or a dropped write (`put`
-> False). After `threshold` consecutive failures a circuit breaker opens: one warning is logged,
every call bypasses Redis without touching the network, and a background task PINGs Redis every
`probe_interval` seconds with a more generous budget. The first successful PING closes the
breaker and logs "redis back" once. A flushed Redis is simply a cold cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis

from mitmroute.config import CacheSettings
from mitmroute.redis_client import Breaker, connect, label

__all__ = ["DEFAULT_TIMEOUT", "DEFAULT_TTL", "Breaker", "RedisStore"]

log = logging.getLogger("mitmroute.cache")

T = TypeVar("T")

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
        self.timeout = timeout
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.default_ttl = default_ttl
        self.breaker = Breaker(threshold)
        self.errors = 0
        self.bypassed = 0
        self._probe: asyncio.Task[None] | None = None

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
        try:
            await asyncio.wait_for(self.client.ping(), self.probe_timeout)
        except Exception as exc:
            self.breaker.failures = self.breaker.threshold - 1
            self._failed(exc)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._probe
            self._probe = None
        with contextlib.suppress(Exception):
            await self.client.aclose()

    async def get(self, key: str) -> bytes | None:
        return await self._call(lambda: self.client.get(key), None)

    async def put(self, key: str, value: bytes, ttl: float | None) -> bool:
        px = max(1, int((ttl if ttl is not None else self.default_ttl) * 1000))
        return bool(await self._call(lambda: self.client.set(key, value, px=px), False))

    async def delete(self, *keys: str) -> int:
        """Remove keys (tests and admin); 0 when Redis is unavailable."""
        return int(await self._call(lambda: self.client.delete(*keys), 0) or 0)

    async def _call(self, op: Callable[[], Awaitable[T]], fallback: T) -> T:
        if self.breaker.is_open:
            self.bypassed += 1
            return fallback
        try:
            result = await asyncio.wait_for(op(), self.timeout)
        except Exception as exc:
            self._failed(exc)
            return fallback
        self.breaker.success()
        return result

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if not self.breaker.failure():
            log.debug("cache: redis call failed (%s)", reason)
            return
        log.warning(
            "cache: redis unavailable at %s (%s); bypassing the cache, probing every %g s",
            self.label, reason, self.probe_interval,
        )  # fmt: skip
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                await asyncio.wait_for(self.client.ping(), self.probe_timeout)
            except Exception as exc:
                log.debug("cache: redis probe failed (%s)", type(exc).__name__)
                continue
            down_for = time.monotonic() - self.breaker.opened_at
            self.breaker.close()
            log.warning("cache: redis back at %s after %.1f s; caching again", self.label, down_for)
            return

"""Redis client set-up shared by the response cache, the key store and routing, and their breaker.

Both callers bound every command with ``asyncio.wait_for`` themselves; the client only gets
socket timeouts as a backstop, a pool, and no redis-py retry loop with backoff.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

if TYPE_CHECKING:
    from mitmroute.config import RouterConfig


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where the state several proxies share lives."""

    url: str | None = None
    host: str = "127.0.0.1"
    port: int = 6379
    password: str | None = None

    @property
    def label(self) -> str:
        return label(self.url, self.host, self.port)


def redis_target(config: RouterConfig) -> RedisTarget | None:
    """`router_settings.redis_url` / `redis_host`, else a Redis response cache's; None for
    in-process state."""
    router = config.router
    if router.redis_url or router.redis_host:
        return RedisTarget(
            url=router.redis_url,
            host=router.redis_host or "127.0.0.1",
            port=router.redis_port or 6379,
            password=router.redis_password,
        )
    cache = config.cache
    if cache.type == "redis":
        return RedisTarget(url=cache.url, host=cache.host, port=cache.port, password=cache.password)
    return None


def connect(
    *,
    url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 6379,
    password: str | None = None,
    timeout: float = 1.0,
    retries: int = 0,
    max_connections: int = 256,
) -> aioredis.Redis:
    """A pooled client from `url`, or `host`/`port`/`password`.

    `retries` immediate retries (no backoff) on a connection error: 1 lets a pooled connection
    that a Redis restart broke reconnect within the same call.
    """
    common: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), retries),
        "max_connections": max_connections,
        # Plain Redis has no maintenance push notifications; asking costs a round trip on
        # every (re)connect.
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }
    if url:
        pool = aioredis.ConnectionPool.from_url(url, **common)
    else:
        pool = aioredis.ConnectionPool(host=host, port=port, password=password, **common)
    return aioredis.Redis.from_pool(pool)


def label(url: str | None, host: str, port: int) -> str:
    """Where Redis is, without the password."""
    if url:
        parts = urlsplit(url)
        at = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname or ''}{at}{parts.path}"
    return f"redis://{host}:{port}"


class Breaker:
    """Counts consecutive failures; open after `threshold` of them until `close()`."""

    __slots__ = ("failures", "is_open", "opened_at", "threshold")

    def __init__(self, threshold: int = 3) -> None:
        self.threshold = threshold
        self.failures = 0
        self.is_open = False
        self.opened_at = 0.0

    def success(self) -> None:
        self.failures = 0

    def failure(self) -> bool:
        """Record a failure; True when this one opened the breaker."""
        self.failures += 1
        if self.is_open or self.failures < self.threshold:
            return False
        self.is_open, self.opened_at = True, time.monotonic()
        return True

    def close(self) -> None:
        self.is_open, self.failures = False, 0

"""Virtual keys, budgets and rate limits.

:func:`open_backend` decides where keys and limits live: in Redis when
``litellm_settings.cache_params.type`` is ``redis`` or ``router_settings.redis_host`` /
``redis_url`` is set (every proxy on that Redis then enforces one limit), else in this process,
persisted to the DuckDB keys file beside the spend log.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from mitmroute.auth.keys import KeysDB, KeyStore, MemoryKeyStore, RedisKeyStore, keys_db_path
from mitmroute.auth.limits import Limiter, MemoryLimiter, RedisLimiter
from mitmroute.config import RouterConfig

REDIS_TIMEOUT = 1.0


@dataclass(frozen=True, slots=True)
class RedisTarget:
    url: str | None = None
    host: str = "127.0.0.1"
    port: int = 6379
    password: str | None = None

    @property
    def label(self) -> str:
        if self.url:
            parts = urlsplit(self.url)
            port = f":{parts.port}" if parts.port else ""
            return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"
        return f"redis://{self.host}:{self.port}"


def redis_target(config: RouterConfig) -> RedisTarget | None:
    """Where the shared state lives, or None for in-process."""
    router = config.router
    url, host = getattr(router, "redis_url", None), getattr(router, "redis_host", None)
    if url or host:
        return RedisTarget(url=url, host=host or "127.0.0.1",
                           port=int(getattr(router, "redis_port", None) or 6379),
                           password=getattr(router, "redis_password", None))  # fmt: skip
    cache = config.cache
    if cache.type == "redis":
        return RedisTarget(url=cache.url, host=cache.host, port=cache.port,
                           password=cache.password)  # fmt: skip
    return None


def location(config: RouterConfig) -> tuple[Any, ...]:
    """Two configs with the same location share one backend (a reload keeps it)."""
    target = redis_target(config)
    if target is not None:
        return ("redis", target, config.cache.namespace)
    return ("memory", keys_db_path(config.general.spend_db))


def redis_client(target: RedisTarget) -> Any:
    import redis.asyncio as aioredis

    options: dict[str, Any] = {"socket_timeout": REDIS_TIMEOUT,
                               "socket_connect_timeout": REDIS_TIMEOUT}  # fmt: skip
    try:  # redis-py >= 6 asks servers for maintenance notifications: a wasted round trip
        from redis.maint_notifications import MaintNotificationsConfig

        options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    except ImportError:
        pass
    if target.url:
        return aioredis.Redis.from_url(target.url, **options)
    return aioredis.Redis(host=target.host, port=target.port, password=target.password,
                          **options)  # fmt: skip


@dataclass(slots=True)
class AuthBackend:
    """A key store and a limiter that live in the same place."""

    store: KeyStore
    limiter: Limiter
    where: str
    closers: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)

    async def close(self) -> None:
        await self.store.close()
        await self.limiter.close()
        for close in self.closers:
            result = close()
            if result is not None:
                await result


def open_backend(config: RouterConfig) -> AuthBackend:
    """Open the store and limiter `config` asks for (blocking: reads the keys file)."""
    ttl = config.router.timeout + 60.0
    target = redis_target(config)
    if target is not None:
        client = redis_client(target)
        namespace = config.cache.namespace
        return AuthBackend(RedisKeyStore(client, namespace),
                           RedisLimiter(client, namespace, reservation_ttl=ttl),
                           target.label, [client.aclose])  # fmt: skip
    path = keys_db_path(config.general.spend_db)
    db = KeysDB(path) if path else None
    return AuthBackend(MemoryKeyStore(db), MemoryLimiter(db, reservation_ttl=ttl),
                       path or ":memory:", [db.close] if db else [])  # fmt: skip

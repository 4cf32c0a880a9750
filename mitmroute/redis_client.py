"""Redis client set-up shared by the response cache, the key store and routing, and their breaker.

Both callers bound every command with ``asyncio.wait_for`` themselves; the client only gets
socket timeouts as a backstop, a pool, and no redis-py retry loop with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:  # redis-py (~6 MB) is imported by connect(): only a config naming Redis
    import redis.asyncio as aioredis

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
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.maint_notifications import MaintNotificationsConfig

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


T = TypeVar("T")


class GuardedCalls:
    """Calls to a Redis that must never fail a request (the response cache, the shared routing
    state): each bounded by `timeout`; after `threshold` failures in a row the breaker opens,
    one warning is logged, calls return their fallback at once, and a probe PINGs every
    `probe_interval` s (within `probe_timeout`) until Redis answers and the breaker closes."""

    def __init__(
        self,
        client: Any,
        *,
        label: str,
        timeout: float,
        probe_interval: float,
        probe_timeout: float,
        threshold: int,
        log: logging.Logger,
        what: str,
        while_down: str,
        when_back: str,
    ) -> None:
        self.client = client
        self.label = label
        self.timeout = timeout
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.breaker = Breaker(threshold)
        self.errors = 0
        """Calls that failed."""
        self.bypassed = 0
        """Calls not made because the breaker was open."""
        self._log, self._what = log, what
        self._while_down, self._when_back = while_down, when_back
        self._probe: asyncio.Task[None] | None = None

    async def call(self, op: Callable[[], Awaitable[T]], fallback: T) -> T:
        if self.breaker.is_open:
            self.bypassed += 1
            return fallback
        try:
            result = await asyncio.wait_for(op(), self.timeout)
        except Exception as exc:
            self.failed(exc)
            return fallback
        self.breaker.success()
        return result

    async def warm(self) -> None:
        """Open one connection (within `probe_timeout`); an unreachable Redis opens the
        breaker at once."""
        try:
            await asyncio.wait_for(self.client.ping(), self.probe_timeout)
        except Exception as exc:
            self.breaker.failures = self.breaker.threshold - 1
            self.failed(exc)

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if not self.breaker.failure():
            self._log.debug("%s: redis call failed (%s)", self._what, reason)
            return
        self._log.warning(
            "%s: redis unavailable at %s (%s); %s, probing every %g s",
            self._what,
            self.label,
            reason,
            self._while_down,
            self.probe_interval,
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                await asyncio.wait_for(self.client.ping(), self.probe_timeout)
            except Exception as exc:
                self._log.debug("%s: redis probe failed (%s)", self._what, type(exc).__name__)
                continue
            down_for = time.monotonic() - self.breaker.opened_at
            self.breaker.close()
            self._log.warning(
                "%s: redis back at %s after %.1f s; %s",
                self._what,
                self.label,
                down_for,
                self._when_back,
            )
            return

    async def close(self) -> None:
        """Stop the probe (the client is its owner's to close)."""
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._probe
            self._probe = None


class Subscription:
    """One pub/sub connection to `channels` that outlives Redis outages.

    `on_message(channel, data)` gets every message (bytes); `on_connect()` runs after each
    (re)subscription, so the owner can read what it missed while disconnected. A lost
    connection is retried every `retry_interval` seconds, quietly: the owners' own guarded calls
    report Redis outages. Nothing here is on a request's path.
    """

    def __init__(
        self,
        client: Any,
        channels: list[str],
        on_message: Callable[[str, bytes], None],
        *,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        retry_interval: float = 1.0,
        log: logging.Logger,
    ) -> None:
        self.client = client
        self.channels = channels
        self.on_message = on_message
        self.on_connect = on_connect
        self.retry_interval = retry_interval
        self.connected = asyncio.Event()
        """Set while subscribed, once `on_connect` has run (tests wait on it)."""
        self.connects = 0
        self._log = log
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self.connected.clear()

    async def _run(self) -> None:
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(*self.channels)
                await self._confirmed(pubsub)
                if self.on_connect is not None:
                    await self.on_connect()
                self.connected.set()
                self.connects += 1
                while True:
                    message = await pubsub.get_message(timeout=self.retry_interval)
                    if message is not None and message.get("type") == "message":
                        self._deliver(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log.debug("subscription to %s lost (%s)", self.channels, type(exc).__name__)
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())
            await asyncio.sleep(self.retry_interval)

    async def _confirmed(self, pubsub: Any) -> None:
        """Wait for Redis to confirm every subscription: only then is nothing published missed
        (what `on_connect` reads on another connection may otherwise race the SUBSCRIBE)."""
        waiting = len(self.channels)
        deadline = asyncio.get_running_loop().time() + self.retry_interval
        while waiting:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError("subscription not confirmed")
            message = await pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message.get("type") == "subscribe":
                waiting -= 1
            elif message.get("type") == "message":
                self._deliver(message)

    def _deliver(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        data = message.get("data")
        try:
            self.on_message(channel, data if isinstance(data, bytes) else str(data).encode())
        except Exception:
            self._log.exception("subscription handler failed")

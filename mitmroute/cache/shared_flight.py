"""Single flight across proxies: identical requests in flight on several proxies that share a
Redis cache make one upstream call.

The proxy whose request misses first (and leads its own process's flight) takes a short lock
beside the cache entry, `<cache key>:flight` (SET NX PX `lock_ttl`, refreshed every third of it
while the call runs), and calls upstream. When its answer is stored it drops the lock and
PUBLISHes the cache key on `<ns>:cache:flights`. A request on another proxy that finds the lock
taken waits for that message (or polls every `poll` s, in case a message is lost), then answers
from the stored entry. Whatever goes wrong, the waiter calls upstream itself: the leader failed
(lock dropped, nothing stored), crashed (its lock expires within `lock_ttl`), or the bound
passed. Redis trouble means no lock at all: every proxy proceeds as if alone.

What it costs a miss: one SET NX on the request's path before the upstream call (one loopback
round trip, measured by scripts/bench_singleflight.py), and one unlock-and-publish script call
after the answer is stored, in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

from mitmroute.cache.redis_store import RedisStore
from mitmroute.redis_client import Subscription

log = logging.getLogger("mitmroute.cache")

LOCK_TTL = 10.0
"""Seconds a lock outlives its last refresh: how long a crashed leader can hold others up."""
POLL = 0.25
"""Seconds between a waiter's checks when no message arrives."""

UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return redis.call('PUBLISH', ARGV[2], ARGV[3])
"""
"""KEYS[1] the lock; ARGV: this leader's token, channel, cache key."""
REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
"""KEYS[1] the lock; ARGV: this leader's token, ttl in ms."""

_FAILED = object()


class SharedFlights:
    """The Redis locks and waits of cross-process single flight, for one RedisStore."""

    def __init__(
        self,
        store: RedisStore,
        channel: str,
        *,
        lock_ttl: float = LOCK_TTL,
        poll: float = POLL,
        max_hold: float = 120.0,
        retry_interval: float = 1.0,
    ) -> None:
        self.store = store
        self.client = store.client
        self.channel = channel
        self.lock_ttl = lock_ttl
        self.poll = poll
        self.max_hold = max_hold
        """Seconds after which a leader stops refreshing its lock, released or not."""
        self.led = 0
        """Locks taken: this proxy called upstream for the others."""
        self.shared = 0
        """Waits that ended with another proxy's stored answer."""
        self.alone = 0
        """Waits that ended without one (leader failed or slow): this proxy called upstream."""
        self._tokens: dict[str, str] = {}
        self._refreshers: dict[str, asyncio.Task[None]] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unlock = self.client.register_script(UNLOCK)
        self._refresh = self.client.register_script(REFRESH)
        self.subscription = Subscription(
            self.client, [channel], self._stored, retry_interval=retry_interval, log=log
        )

    def start(self) -> None:
        self.subscription.start()

    async def drain(self) -> None:
        """Wait for the unlocks under way."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        for key in list(self._tokens):  # leaders cut short by shutdown: let the others go now
            self.unlock(key)
        await self.drain()
        for task in self._refreshers.values():
            task.cancel()
        self._refreshers.clear()
        await self.subscription.close()

    # --- the leader ---------------------------------------------------------------------------

    async def lead(self, key: str) -> bool | None:
        """Take `key`'s lock: True (this proxy calls upstream and must `unlock`), False (another
        proxy holds it: `wait`), None (Redis can't say: proceed, no lock)."""
        token = uuid.uuid4().hex
        ttl_ms = round(self.lock_ttl * 1000)
        taken = await self.store.guard.call(
            lambda: self.client.set(_lock(key), token, nx=True, px=ttl_ms), _FAILED
        )
        if taken is _FAILED:
            return None
        if not taken:
            return False
        self.led += 1
        self._tokens[key] = token
        self._refreshers[key] = asyncio.get_running_loop().create_task(self._keep(key, token))
        return True

    def holds(self, key: str) -> bool:
        return key in self._tokens

    def unlock(self, key: str) -> None:
        """Drop `key`'s lock and wake the waiters (in the background; once the answer is stored,
        or at once when there is none)."""
        token = self._tokens.pop(key, None)
        refresher = self._refreshers.pop(key, None)
        if refresher is not None:
            refresher.cancel()
        if token is None:
            return

        async def op() -> Any:
            return await self._unlock(keys=[_lock(key)], args=[token, self.channel, key])

        task = asyncio.get_running_loop().create_task(self.store.guard.call(op, None))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep(self, key: str, token: str) -> None:
        """Refresh the lock while the call runs, up to `max_hold`; stop when it is someone
        else's."""
        ttl_ms = round(self.lock_ttl * 1000)
        for _ in range(max(0, int(self.max_hold / (self.lock_ttl / 3)))):
            await asyncio.sleep(self.lock_ttl / 3)
            kept = await self.store.guard.call(
                lambda: self._refresh(keys=[_lock(key)], args=[token, ttl_ms]), 1
            )
            if not kept:
                return

    # --- the others ---------------------------------------------------------------------------

    async def wait(self, key: str, timeout: float) -> bytes | None:
        """The entry another proxy's leader stores for `key`; None when it stored none (failed,
        crashed) or not within `timeout`, or Redis can't say."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            woken = self._listen(key)  # before looking: a message from now on is not missed
            try:
                state = await self.store.guard.call(lambda: self._look(key), None)
                if state is None:
                    break
                value, locked = state
                if value is not None:
                    self.shared += 1
                    return value
                left = end - loop.time()
                if not locked or left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken, min(self.poll, left))
            finally:
                self._unlisten(key, woken)
        self.alone += 1
        return None

    def _listen(self, key: str) -> asyncio.Future[None]:
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, set()).add(woken)
        return woken

    def _unlisten(self, key: str, woken: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.discard(woken)
            if not waiters:
                del self._waiters[key]

    async def _look(self, key: str) -> tuple[bytes | None, bool]:
        pipe = self.client.pipeline(transaction=False)
        pipe.get(key)
        pipe.exists(_lock(key))
        value, locked = await pipe.execute()
        return value, bool(locked)

    def _stored(self, channel: str, data: bytes) -> None:
        for woken in self._waiters.get(data.decode(errors="replace"), ()):
            if not woken.done():
                woken.set_result(None)


def _lock(key: str) -> str:
    return f"{key}:flight"

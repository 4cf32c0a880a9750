"""The response cache: exact-match answers for chat/completions, completions and embeddings.

How the engine uses it (all on the event loop; nothing here blocks or raises on store trouble)::

    controls = parse_controls(body, headers, settings.cache, endpoint=endpoint)  # strips `cache`
    if controls.active:
        scope = scope_id(settings.cache.scope, key_hash=key_hash, team=team)
        key = cache_key(endpoint, group, body, namespace=controls.namespace, scope_id=scope)
    if controls.read:
        hit = await cache.get(key, max_age=controls.max_age)
        # hit -> answer hit.body (stream: replay_stream(hit.body, include_usage=...)),
        #        log cache_hit, saved_usd = hit.cost_usd
        async with cache.flight(key) as f:
            if f.result is not None: ...answer from f.result like a hit...
            else:
                ...call upstream...; answer = CachedAnswer.now(body, deployment, group, cost)
                f.publish(answer)
                if controls.write: await cache.put(key, answer, ttl=controls.ttl)
    elif controls.write: ...call upstream, then put...

A streamed leader whose answer completes in a callback uses `f = await cache.join(key)` and
later `f.publish(answer)` and `f.release()` (always, also on failure). Followers of a streamed
leader get the assembled answer when the leader's stream ends, and replay it.

With a Redis store the flight spans every proxy on that Redis (`shared_flight`): `join(key,
shared=controls.write)` may then return another proxy's stored answer as `f.result`; the
leader's lock is dropped by `put` (after the store) or by `release` without `publish`.

Stored values are compact JSON (zlib-compressed over `COMPRESS_OVER` bytes, recognized by their
first byte), so the local and the Redis store hold the same bytes and readers never share
mutable dicts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from mitmroute.cache.controls import CacheControls, parse_controls
from mitmroute.cache.keys import cache_key, scope_id
from mitmroute.cache.local import LocalStore
from mitmroute.cache.redis_store import RedisStore
from mitmroute.cache.replay import replay_stream
from mitmroute.cache.shared_flight import SharedFlights
from mitmroute.cache.singleflight import Flight, SingleFlight
from mitmroute.config import CacheSettings

__all__ = [
    "CacheControls",
    "CachedAnswer",
    "Flight",
    "LocalStore",
    "RedisStore",
    "ResponseCache",
    "cache_key",
    "parse_controls",
    "replay_stream",
    "scope_id",
]

log = logging.getLogger("mitmroute.cache")

COMPRESS_OVER = 4096
"""Serialized answers longer than this are zlib-compressed."""
THREAD_OVER = 256 * 1024
"""Compression of answers longer than this runs in a worker thread, off the event loop."""


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A complete answer as stored: the OpenAI-shaped body and where it came from."""

    body: dict[str, Any]
    """`chat.completion` (a streamed answer is stored assembled), `text_completion` or the
    embeddings `list`."""
    deployment: str
    model_group: str
    cost_usd: str | None = None
    """What the original answer cost (a Decimal as str), so a hit can log `saved_usd`."""
    stored_at: float = field(default_factory=time.time)

    @classmethod
    def now(
        cls, body: dict[str, Any], deployment: str, model_group: str, cost: Decimal | None = None
    ) -> CachedAnswer:
        return cls(body, deployment, model_group, None if cost is None else str(cost))

    @property
    def cost(self) -> Decimal | None:
        return None if self.cost_usd is None else Decimal(self.cost_usd)

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.stored_at

    def to_json(self, key: str | None = None) -> bytes:
        """Compact JSON; `key` is recorded so a reader can check it got the entry it asked for."""
        doc = {"v": 1, "k": key, "b": self.body, "d": self.deployment, "g": self.model_group,
               "c": self.cost_usd, "t": self.stored_at}  # fmt: skip
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, key: str | None = None) -> CachedAnswer:
        """Decode `to_json()` output, compressed or not; ValueError if stored for another key."""
        if data[:1] != b"{":
            data = zlib.decompress(data)
        doc = json.loads(data)
        if key is not None and doc.get("k") not in (None, key):
            raise ValueError(f"entry belongs to {doc.get('k')!r}")
        return cls(doc["b"], doc["d"], doc["g"], doc.get("c"), float(doc["t"]))

    def copy(self) -> CachedAnswer:
        """An independent copy (followers of a flight each get one)."""
        return CachedAnswer.from_bytes(self.to_json())


class Store(Protocol):
    name: str

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def get(self, key: str) -> bytes | None: ...
    async def put(self, key: str, value: bytes, ttl: float | None) -> bool: ...


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    stale: int = 0
    """Entries found but older than the request's max age."""
    stores: int = 0
    too_big: int = 0
    corrupt: int = 0


class ResponseCache:
    """Answers by cache key, in a local LRU or in Redis, plus the in-process flight table."""

    def __init__(self, settings: CacheSettings, store: Store, *, deadline: float = 120.0) -> None:
        self.settings = settings
        self.store = store
        self.stats = CacheStats()
        self.flights: SingleFlight[CachedAnswer] = SingleFlight(
            deadline=deadline, share=CachedAnswer.copy, on_release=self._released
        )
        self.shared_flights: SharedFlights | None = None
        """Single flight across the proxies on a Redis store."""
        if isinstance(store, RedisStore):
            channel = f"{settings.namespace}:cache:flights"
            self.shared_flights = SharedFlights(store, channel, max_hold=deadline)

    @classmethod
    def from_settings(cls, settings: CacheSettings, **redis_options: Any) -> ResponseCache:
        """`type: local` -> LocalStore; `type: redis` -> RedisStore (options: timeout,
        probe_interval, probe_timeout, threshold, default_ttl)."""
        store: Store
        if settings.type == "redis":
            store = RedisStore.from_settings(settings, **redis_options)
        else:
            store = LocalStore(max_entries=settings.max_entries, max_bytes=settings.max_bytes)
        return cls(settings, store)

    async def start(self) -> None:
        if self.shared_flights is not None:
            self.shared_flights.start()  # first: the warm connection below stays for requests
        await self.store.start()

    async def close(self) -> None:
        if self.shared_flights is not None:
            await self.shared_flights.close()
        await self.store.close()

    async def get(self, key: str, *, max_age: float | None = None) -> CachedAnswer | None:
        """The stored answer, or None (absent, expired, older than `max_age`, store down)."""
        data = await self.store.get(key)
        if data is None:
            self.stats.misses += 1
            return None
        answer = self._decode(key, data)
        if answer is None:
            return None
        if max_age is not None and answer.age() > max_age:
            self.stats.stale += 1
            return None
        self.stats.hits += 1
        return answer

    def _decode(self, key: str, data: bytes) -> CachedAnswer | None:
        try:
            return CachedAnswer.from_bytes(data, key=key)
        except (ValueError, KeyError, TypeError, zlib.error) as exc:
            self.stats.corrupt += 1
            log.debug("cache: unreadable entry %s (%s)", key, exc)
            return None

    async def put(self, key: str, answer: CachedAnswer, *, ttl: float | None = None) -> bool:
        """Store `answer` for `ttl` seconds (None: `settings.ttl`); False when not stored. A
        cross-process flight's lock on `key` goes once this is done, stored or not."""
        try:
            return await self._put(key, answer, ttl)
        finally:
            if self.shared_flights is not None:
                self.shared_flights.unlock(key)

    async def _put(self, key: str, answer: CachedAnswer, ttl: float | None) -> bool:
        data = answer.to_json(key)
        if len(data) > 32 * self.settings.max_item_bytes:  # hopeless even compressed
            self.stats.too_big += 1
            return False
        if len(data) > COMPRESS_OVER:
            if len(data) > THREAD_OVER:
                data = await asyncio.to_thread(zlib.compress, data, 3)
            else:
                data = zlib.compress(data, 3)
        if len(data) > self.settings.max_item_bytes:
            self.stats.too_big += 1
            return False
        ok = await self.store.put(key, data, ttl if ttl is not None else self.settings.ttl)
        self.stats.stores += ok
        return ok

    async def join(
        self, key: str, *, deadline: float | None = None, shared: bool = True
    ) -> Flight[CachedAnswer]:
        """Enter the flight for `key` without a context manager (call `release()` yourself).

        `shared` (the answer will be `put`): with a Redis store, this process's leader also
        leads or waits for the flight across proxies."""
        f = await self.flights.join(key, deadline=deadline)
        if not f.leader or not shared or self.shared_flights is None:
            return f
        if await self.shared_flights.lead(key) is not False:
            return f  # this proxy calls upstream (locked, or Redis can't say)
        data = await self.shared_flights.wait(key, deadline or self.flights.deadline)
        answer = self._decode(key, data) if data is not None else None
        if answer is None:
            return f  # the other proxy stored nothing in time: call upstream after all
        f.publish(answer)  # this process's followers have it too
        f.release()
        return Flight(self.flights, key, result=answer)

    @asynccontextmanager
    async def flight(
        self, key: str, *, deadline: float | None = None, shared: bool = True
    ) -> AsyncIterator[Flight[CachedAnswer]]:
        """See `singleflight`: `f.result` is a shared answer, or publish yours as the leader."""
        f = await self.join(key, deadline=deadline, shared=shared)
        try:
            yield f
        finally:
            f.release()

    def _released(self, key: str, published: bool) -> None:
        """A leader left its flight: without an answer, drop its cross-process lock now (with
        one, `put` drops it once the answer is stored)."""
        if not published and self.shared_flights is not None:
            self.shared_flights.unlock(key)

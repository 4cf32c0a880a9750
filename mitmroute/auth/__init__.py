"""Virtual keys, budgets and rate limits.

:func:`open_backend` decides where keys and limits live. The store of record for keys is the
keys file beside the spend log (SQLite, :class:`~mitmroute.auth.keys.KeysDB`), and spend is in
the spend log; with
``general_settings.database_url`` both are in that PostgreSQL database instead (keys and
per-process budget shares, :mod:`mitmroute.auth.pg`), shared by every proxy on it. With
``litellm_settings.cache_params.type: redis`` or ``router_settings.redis_host`` / ``redis_url``,
Redis holds the counters every proxy on it shares and a cache of the keys, rebuilt from the
stores when it loses data (:mod:`mitmroute.auth.link`); else limits live in this process.

**Redis down.** A key decision then takes at most about 100 ms (a 40 ms command budget and a
40 ms PING, no redis-py retry loop), and nothing once the breaker is open. What follows is
``general_settings.allow_requests_on_db_unavailable`` (LiteLLM's name): ``false`` (default)
answers virtual-key requests 503 ``auth_unavailable``; ``true`` serves them with keys from the
keys file and limits counted in this process (rpm/tpm of this proxy only; spend = this proxy's
share + the others' as last seen). The key API (``/key/*``) needs Redis either way; the master
key always works. Settlements are queued and applied when Redis is back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mitmroute.auth.keys import (
    KeysDB,
    KeyStore,
    KeyStoreUnavailable,
    MemoryKeyStore,
    RedisKeyStore,
    keys_db_path,
)
from mitmroute.auth.ledger import Ledger, SpendQuery
from mitmroute.auth.limits import Limiter, MemoryLimiter, Policy, RedisLimiter
from mitmroute.auth.link import RedisDown, RedisLink
from mitmroute.auth.pg import PgKeysDB, PgKeyStore, PgRedisKeyStore
from mitmroute.config import GeneralSettings, RouterConfig
from mitmroute.redis_client import RedisTarget, connect, redis_target

__all__ = [
    "AuthBackend",
    "KeyStoreUnavailable",
    "RedisDown",
    "location",
    "open_backend",
    "redis_target",
]


def location(config: RouterConfig) -> tuple[Any, ...]:
    """Two configs with the same location share one backend (a reload keeps it)."""
    target = redis_target(config)
    if config.general.database_url:
        return ("postgresql", config.general.database_url, target, config.cache.namespace)
    if target is not None:
        return ("redis", target, config.cache.namespace)
    return ("memory", keys_db_path(config.general.spend_db))


def redis_client(target: RedisTarget) -> Any:
    """A pooled client with one immediate reconnect (a restarted Redis breaks pooled
    connections) and no retry loop; the auth path bounds each command itself."""
    return connect(
        url=target.url, host=target.host, port=target.port, password=target.password, retries=1
    )


@dataclass(slots=True)
class AuthBackend:
    """A key store and a limiter that live in the same place."""

    store: KeyStore
    limiter: Limiter
    where: str
    closers: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)
    general: GeneralSettings = field(default_factory=GeneralSettings)
    link: RedisLink | None = None
    db: KeysDB | PgKeysDB | None = None
    """The keys file (one process may hold it: a reload hands it on with `release_db`), or
    the PostgreSQL store."""

    def start(self) -> None:
        """Start watching Redis and push this proxy's state into it (needs a running loop;
        the first request does it otherwise)."""
        if self.link is not None:
            self.link.start()

    def set_policy(self, general: GeneralSettings) -> None:
        """Apply `allow_requests_on_db_unavailable` and the default budget (a reload may
        change them)."""
        self.general = general
        for part in (self.store, self.limiter):
            if hasattr(part, "serve_local_when_down"):
                part.serve_local_when_down = general.allow_requests_on_db_unavailable

    def release_db(self, path: str | None) -> KeysDB | None:
        """Hand the keys file at `path` to the next backend (this one stops owning it)."""
        db = self.db if isinstance(self.db, KeysDB) and self.db.path == path else None
        if db is not None:
            self.db = None
        return db

    async def close(self) -> None:
        await self.store.close()
        await self.limiter.close()
        for close in self.closers:
            result = close()
            if result is not None:
                await result
        if self.db is not None:
            self.db.close()


def open_backend(
    config: RouterConfig,
    db: KeysDB | None = None,
    spend_query: Callable[[], SpendQuery | None] | None = None,
) -> AuthBackend:
    """Open the store and limiter `config` asks for (blocking: reads the keys file), on `db`
    when given (a reload's, from `release_db`). `spend_query` finds the running spend writer,
    which answers the budget ledger's reads. Raises :class:`KeyStoreUnavailable` when
    `database_url` names a PostgreSQL that does not answer."""
    ttl = config.router.timeout + 60.0
    if config.general.database_url:
        return open_shared_backend(config)
    path = keys_db_path(config.general.spend_db)
    if db is None and path:
        db = KeysDB(path)
    target = redis_target(config)
    if target is None:
        limiter = MemoryLimiter(db, reservation_ttl=ttl)
        return AuthBackend(MemoryKeyStore(db), limiter, path or ":memory:", db=db)
    client = redis_client(target)
    namespace = config.cache.namespace
    link = RedisLink(client, namespace, label=target.label)
    ledger = Ledger(config.general.spend_db, writer=spend_query) if path else None
    store = RedisKeyStore(client, namespace, MemoryKeyStore(db), link)
    limiter = RedisLimiter(
        client,
        namespace,
        reservation_ttl=ttl,
        link=link,
        ledger=ledger,
        ledger_id=db.ledger_id() if db else None,
    )
    closers = [link.close, client.aclose, *([ledger.close] if ledger else [])]
    backend = AuthBackend(store, limiter, target.label, closers, link=link, db=db)
    backend.set_policy(config.general)

    async def resync() -> None:
        await store.push_all()
        records = await store.local.all()
        await limiter.sync([Policy.of(r, backend.general) for r in records])

    link.resync_hooks.append(resync)
    link.tick_hooks.append(limiter.drain)
    return backend


def open_shared_backend(config: RouterConfig) -> AuthBackend:
    """Keys and budget shares in PostgreSQL (`database_url`), Redis (if any) in front."""
    ttl = config.router.timeout + 60.0
    db = PgKeysDB(str(config.general.database_url))
    try:
        pg = PgKeyStore(db)
    except BaseException:
        db.close()
        raise
    target = redis_target(config)
    if target is None:
        limiter = MemoryLimiter(db, reservation_ttl=ttl)  # type: ignore[arg-type]
        backend = AuthBackend(pg, limiter, db.path, db=db)
        backend.set_policy(config.general)
        return backend
    client = redis_client(target)
    namespace = config.cache.namespace
    link = RedisLink(client, namespace, label=target.label)
    store = PgRedisKeyStore(client, namespace, pg, link)
    limiter = RedisLimiter(
        client, namespace, reservation_ttl=ttl, link=link, ledger_id=db.instance, shares=db
    )
    where = f"{db.path} (cached in {target.label})"
    backend = AuthBackend(store, limiter, where, [link.close, client.aclose], link=link, db=db)
    backend.set_policy(config.general)

    async def resync() -> None:
        try:
            records = await store.push_all()  # from PostgreSQL, never from this proxy's memory
            await limiter.sync([Policy.of(r, backend.general) for r in records])
        except KeyStoreUnavailable as e:  # the link retries it on its next check
            raise RedisDown(f"resync waits for the key store: {e}") from None

    link.resync_hooks.append(resync)
    link.tick_hooks += [limiter.drain, store.repair]
    return backend

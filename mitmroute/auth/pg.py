"""Virtual keys and budget spend in PostgreSQL, the store of record with ``database_url``.

With ``general_settings.database_url`` several proxies share one PostgreSQL database (the
spend ledger's DuckLake catalog lives there in ``mitmroute_spend``); keys and the budget
counters live beside it in the schema ``mitmroute``:

``mitmroute.keys``
    One row per key (token, key_alias, team_id, the record as jsonb). A unique index on
    ``key_alias`` decides alias clashes between proxies. ``/key/generate``, ``/key/update``
    and ``/key/delete`` (and ``mitmroute keys --config``, also while proxies run) commit here
    before they answer.
``mitmroute.key_spend``
    ``(token, budget_window, instance, nanos)``: what each proxy process (``instance``, a
    random id per process) has settled for a key in one budget window, in integer
    nano-dollars. Written in batches off the event loop every ``SHARE_FLUSH_DELAY`` (1 s) as
    absolute values that only ever rise (``GREATEST`` on conflict), so a batch written twice
    changes nothing. A key's spend in a window is the sum over instances. Rows of windows
    older than a key's newest one, and of deleted keys, are pruned (at start, then hourly).

Tables are created idempotently at start (under an advisory lock: proxies starting together
don't race). :class:`PgKeysDB` has the :class:`~mitmroute.auth.keys.KeysDB` interface plus
reads by token and alias; one psycopg connection on one worker thread, bounded by
``CONNECT_TIMEOUT`` and ``STATEMENT_TIMEOUT``, reconnected once when PostgreSQL dropped it (a
restart, ``pg_terminate_backend``). PostgreSQL unreachable at start: the proxy does not start
(exit 2), as with an unwritable ``spend_db``.

**What a crash costs.** The ledger (the DuckLake spend log) stays the exact record of money;
``key_spend`` is the budget counter of record. A proxy killed with SIGKILL loses from it the
spend it settled in the last ``SHARE_FLUSH_DELAY`` plus the batch being written (a few ms);
with Redis, that spend is still counted in Redis' shared hash until Redis itself loses its
data. PostgreSQL down while running: shares are kept and written when it answers.

Stores (the :class:`~mitmroute.auth.keys.KeyStore` interface):

* :class:`PgKeyStore` (no Redis): keys cached in the proxy, refreshed from PostgreSQL in the
  background once a cached record is older than ``KEY_CACHE_TTL`` (so a key deleted through
  another proxy stops working here within ~2 s); a token this proxy does not know is read
  through from PostgreSQL, behind a bounded negative cache and a lookup rate bound, so a flood
  of bad keys can't hammer PostgreSQL (past the bound: 503 ``auth_unavailable``).
* :class:`PgRedisKeyStore`: the Redis hash of :class:`~mitmroute.auth.keys.RedisKeyStore`
  as a cache in front of PostgreSQL. A Redis miss is read through from PostgreSQL and put
  back; after Redis loses its data the keys pushed back come from PostgreSQL (never from this
  proxy's memory), and the ``deleted`` set keeps a resync racing a delete from resurrecting
  the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from mitmroute.auth.keys import PUSH_BATCH, KeyRecord, KeyStoreUnavailable
from mitmroute.auth.link import RedisDown, RedisLink
from mitmroute.spend.lake import redact

T = TypeVar("T")
log = logging.getLogger("mitmroute.auth")

SCHEMA = "mitmroute"
CONNECT_TIMEOUT = 3
"""Seconds to connect (libpq's connect_timeout)."""
STATEMENT_TIMEOUT_MS = 3000
"""Longest one statement may run (and wait for a lock)."""
KEY_CACHE_TTL = 2.0
"""Seconds a cached key is served before it is re-read (in the background)."""
NEGATIVE_TTL = 5.0
"""Seconds a token PostgreSQL does not know is answered 'unknown' without asking again."""
NEGATIVE_SIZE = 10_000
LOOKUPS_PER_SECOND = 100.0
"""Read-throughs of tokens this proxy does not know, per second (burst as large)."""
PRUNE_INTERVAL = 3600.0
WARN_INTERVAL = 30.0
RECONNECT_DELAY = 1.0
_DDL_LOCK = 0x6D69746D726B  # advisory lock id: "mitmrk"

DDL = (
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.keys (
        token text PRIMARY KEY,
        key_alias text,
        team_id text,
        record jsonb NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
    f"CREATE UNIQUE INDEX IF NOT EXISTS keys_alias ON {SCHEMA}.keys (key_alias) "
    "WHERE key_alias IS NOT NULL",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.key_spend (
        token text NOT NULL,
        budget_window bigint NOT NULL,
        instance text NOT NULL,
        nanos bigint NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (token, budget_window, instance)
    )""",
)

_SAVE = f"""
INSERT INTO {SCHEMA}.keys (token, key_alias, team_id, record, updated_at)
VALUES (%s, %s, %s, %s::jsonb, now())
ON CONFLICT (token) DO UPDATE SET key_alias = EXCLUDED.key_alias, team_id = EXCLUDED.team_id,
    record = EXCLUDED.record, updated_at = now()
"""

_SAVE_SHARES = f"""
INSERT INTO {SCHEMA}.key_spend AS s (token, budget_window, instance, nanos)
SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::bigint[])
ON CONFLICT (token, budget_window, instance)
DO UPDATE SET nanos = GREATEST(s.nanos, EXCLUDED.nanos), updated_at = now()
WHERE s.nanos < EXCLUDED.nanos
"""

_SHARES = f"""
SELECT s.token, s.instance, s.nanos
FROM {SCHEMA}.key_spend AS s
JOIN unnest(%s::text[], %s::bigint[]) AS w(token, budget_window) USING (token, budget_window)
"""

_TOTALS = f"""
SELECT DISTINCT ON (token) token, budget_window, total
FROM (SELECT token, budget_window, sum(nanos)::bigint AS total
      FROM {SCHEMA}.key_spend GROUP BY token, budget_window) AS t
ORDER BY token, budget_window DESC
"""

_PRUNE = (
    f"""DELETE FROM {SCHEMA}.key_spend AS s
    USING (SELECT token, max(budget_window) AS newest FROM {SCHEMA}.key_spend GROUP BY token) m
    WHERE s.token = m.token AND s.budget_window < m.newest""",
    f"""DELETE FROM {SCHEMA}.key_spend AS s
    WHERE NOT EXISTS (SELECT 1 FROM {SCHEMA}.keys AS k WHERE k.token = s.token)""",
)


class PgKeysDB:
    """Keys and budget shares in PostgreSQL. Methods are blocking; `run` executes one on the
    worker thread (one connection, reconnected once when PostgreSQL dropped it)."""

    def __init__(self, url: str, *, instance: str | None = None) -> None:
        self.url = url
        self.path = redact(url)
        """Where the keys are, for messages (no password)."""
        self.instance = instance or uuid.uuid4().hex
        """This process's id in `key_spend`."""
        self._lock = threading.Lock()
        self._conn: Any = None
        self._base: dict[tuple[str, int], int] = {}
        """(token, window) -> the spend of other instances when `load_spend` read it."""
        self._pruned_at = 0.0
        self._warned_at = -WARN_INTERVAL
        self._down_until = 0.0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="mitmroute-pgkeys")
        self._do(self._create)

    # --- connection ---------------------------------------------------------------------

    def _connect(self) -> Any:
        """A new connection; after a failed attempt, the next `RECONNECT_DELAY` seconds fail at
        once (a host that drops packets would hold every queued call for CONNECT_TIMEOUT)."""
        import psycopg

        if time.monotonic() < self._down_until:
            raise KeyStoreUnavailable(f"PostgreSQL at {self.path}: not answering (retried soon)")
        try:
            return psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT,
                application_name="mitmroute-keys",
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS} "
                f"-c lock_timeout={STATEMENT_TIMEOUT_MS}",
            )
        except psycopg.Error as e:
            self._down_until = time.monotonic() + RECONNECT_DELAY
            raise self._unavailable(e) from None

    def _do(self, op: Callable[[Any], T]) -> T:
        """`op(connection)`, once more on a new connection if PostgreSQL dropped this one."""
        import psycopg

        with self._lock:
            for attempt in range(2):
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                conn = self._conn
                try:
                    return op(conn)
                except psycopg.OperationalError as e:
                    if conn.broken or conn.closed:
                        self._conn = None
                        with contextlib.suppress(Exception):
                            conn.close()
                        if attempt == 0:
                            log.info("auth: PostgreSQL connection lost; reconnecting")
                            continue
                    raise self._unavailable(e) from None
        raise AssertionError("unreachable")

    def _unavailable(self, error: BaseException) -> KeyStoreUnavailable:
        """The error to raise, logged at most once per `WARN_INTERVAL`."""
        failure = KeyStoreUnavailable(f"PostgreSQL at {self.path}: {_one_line(error)}")
        if time.monotonic() - self._warned_at > WARN_INTERVAL:
            self._warned_at = time.monotonic()
            log.warning("auth: %s", failure)
        return failure

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    def _create(self, conn: Any) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_DDL_LOCK])
            for statement in DDL:
                conn.execute(statement)
        self._prune(conn)

    # --- keys -----------------------------------------------------------------------------

    def load_keys(self) -> list[KeyRecord]:
        rows = self._do(lambda c: c.execute(f"SELECT record::text FROM {SCHEMA}.keys").fetchall())
        return [KeyRecord.from_json(r[0]) for r in rows]

    def get_key(self, token: str) -> KeyRecord | None:
        row = self._do(
            lambda c: c.execute(
                f"SELECT record::text FROM {SCHEMA}.keys WHERE token = %s", [token]
            ).fetchone()
        )
        return KeyRecord.from_json(row[0]) if row else None

    def key_by_alias(self, alias: str) -> KeyRecord | None:
        row = self._do(
            lambda c: c.execute(
                f"SELECT record::text FROM {SCHEMA}.keys WHERE key_alias = %s", [alias]
            ).fetchone()
        )
        return KeyRecord.from_json(row[0]) if row else None

    def put_key(self, record: KeyRecord) -> bool:
        """Insert or replace `record`; False (nothing written) when its alias is another's."""
        import psycopg

        args = [record.token, record.key_alias, record.team_id, record.to_json()]
        try:
            self._do(lambda c: c.execute(_SAVE, args))
        except psycopg.errors.UniqueViolation:
            return False
        return True

    def save_key(self, record: KeyRecord) -> None:
        if not self.put_key(record):
            raise ValueError(f"key_alias {record.key_alias!r} is already used by another key")

    def delete_keys(self, tokens: list[str]) -> None:
        def delete(conn: Any) -> None:
            with conn.transaction():
                conn.execute(f"DELETE FROM {SCHEMA}.keys WHERE token = ANY(%s)", [tokens])
                conn.execute(f"DELETE FROM {SCHEMA}.key_spend WHERE token = ANY(%s)", [tokens])

        self._do(delete)

    # --- budget shares --------------------------------------------------------------------

    def save_shares(self, rows: Iterable[tuple[str, int, int]]) -> None:
        """Raise this instance's share to `nanos` for each (token, window, nanos)."""
        rows = list(rows)
        if rows:
            columns = [[r[0] for r in rows], [r[1] for r in rows],
                       [self.instance] * len(rows), [r[2] for r in rows]]  # fmt: skip
            self._do(lambda c: c.execute(_SAVE_SHARES, columns))
        if time.monotonic() - self._pruned_at > PRUNE_INTERVAL:
            self._do(self._prune)

    def shares(self, windows: dict[str, int]) -> dict[str, dict[str, int]]:
        """token -> {instance: nanos} in the window `windows[token]`."""
        if not windows:
            return {}
        tokens = list(windows)
        rows = self._do(
            lambda c: c.execute(_SHARES, [tokens, [windows[t] for t in tokens]]).fetchall()
        )
        out: dict[str, dict[str, int]] = {}
        for token, instance, nanos in rows:
            out.setdefault(token, {})[instance] = int(nanos)
        return out

    def load_spend(self) -> dict[str, tuple[int, int]]:
        """token -> (newest window, spend of every instance in it): what the in-process
        limiter starts from (the other instances' part is remembered, see `save_spend`)."""
        rows = self._do(lambda c: c.execute(_TOTALS).fetchall())
        self._base = {(token, int(window)): int(total) for token, window, total in rows}
        return {token: (window, total) for (token, window), total in self._base.items()}

    def save_spend(self, rows: list[tuple[str, int, int]]) -> None:
        """The in-process limiter's totals (token, window, nanos) -> this instance's share."""
        self.save_shares(
            (token, window, max(0, nanos - self._base.get((token, window), 0)))
            for token, window, nanos in rows
        )

    def ledger_id(self) -> str:
        return self.instance

    def _prune(self, conn: Any) -> None:
        for statement in _PRUNE:
            conn.execute(statement)
        self._pruned_at = time.monotonic()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None


def _one_line(error: BaseException) -> str:
    return redact(" ".join(str(error).split())) or type(error).__name__


# --- the store without Redis -----------------------------------------------------------------


class PgKeyStore:
    """Keys cached in this proxy in front of PostgreSQL (see the module docstring)."""

    def __init__(
        self,
        db: PgKeysDB,
        *,
        ttl: float = KEY_CACHE_TTL,
        negative_ttl: float = NEGATIVE_TTL,
        negative_size: int = NEGATIVE_SIZE,
        lookups_per_second: float = LOOKUPS_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
        preload: bool = True,
    ) -> None:
        self.db = db
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.negative_size = negative_size
        self.lookups_per_second = lookups_per_second
        self._clock = clock
        self._keys: dict[str, tuple[KeyRecord, float]] = {}
        """token -> (record, read at)."""
        self._unknown: OrderedDict[str, float] = OrderedDict()
        """token -> when PostgreSQL said it has no such key (oldest first)."""
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._allowance = lookups_per_second
        self._allowance_at = clock()
        self._tasks: set[asyncio.Task[Any]] = set()
        if preload:
            now = clock()
            for record in db.load_keys():
                self._keys[record.token] = (record, now)

    # --- cache ----------------------------------------------------------------------------

    def remember(self, record: KeyRecord) -> None:
        self._keys[record.token] = (record, self._clock())
        self._unknown.pop(record.token, None)

    def forget(self, token: str) -> None:
        self._keys.pop(token, None)

    def peek(self, token: str) -> KeyRecord | None:
        held = self._keys.get(token)
        return held[0] if held else None

    def _known_unknown(self, token: str) -> bool:
        at = self._unknown.get(token)
        if at is None:
            return False
        if self._clock() - at < self.negative_ttl:
            return True
        del self._unknown[token]
        return False

    def _take_lookup(self) -> bool:
        now = self._clock()
        self._allowance = min(
            self.lookups_per_second,
            self._allowance + (now - self._allowance_at) * self.lookups_per_second,
        )
        self._allowance_at = now
        if self._allowance < 1:
            return False
        self._allowance -= 1
        return True

    # --- reads ----------------------------------------------------------------------------

    async def lookup(self, token: str, bounded: bool = True) -> KeyRecord | None:
        """Read `token` from PostgreSQL (one read per token at a time), unless it was unknown
        a moment ago; past the lookup rate bound (`bounded`: a token this proxy does not
        know) raise :class:`KeyStoreUnavailable`."""
        if self._known_unknown(token):
            return None
        flight = self._inflight.get(token)
        if flight is None:
            if bounded and not self._take_lookup():
                raise KeyStoreUnavailable("too many lookups of unknown keys")
            flight = asyncio.ensure_future(self.db.run(self.db.get_key, token))
            self._inflight[token] = flight
            flight.add_done_callback(lambda _: self._inflight.pop(token, None))
        record = await asyncio.shield(flight)
        if record is None:
            self._keys.pop(token, None)
            self._unknown[token] = self._clock()
            self._unknown.move_to_end(token)
            while len(self._unknown) > self.negative_size:
                self._unknown.popitem(last=False)
        else:
            self.remember(record)
        return record

    async def get(self, token: str) -> KeyRecord | None:
        held = self._keys.get(token)
        if held is None:
            return await self.lookup(token)
        record, read_at = held
        if self._clock() - read_at >= self.ttl and token not in self._inflight:
            self._spawn(self._refresh(token))
        return record

    async def _refresh(self, token: str) -> None:
        try:
            await self.lookup(token, bounded=False)
        except KeyStoreUnavailable as e:  # PostgreSQL down: keep serving what we know
            log.debug("auth: cannot refresh a key: %s", e)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def by_alias(self, alias: str) -> KeyRecord | None:
        record = await self.db.run(self.db.key_by_alias, alias)
        if record is not None:
            self.remember(record)
        return record

    async def all(self) -> list[KeyRecord]:
        records = await self.db.run(self.db.load_keys)
        now = self._clock()
        self._keys = {r.token: (r, now) for r in records}
        return records

    # --- writes (committed in PostgreSQL before they return) -----------------------------

    async def put(self, record: KeyRecord, previous_alias: str | None = None) -> bool:
        ok = await self.db.run(self.db.put_key, record)
        if ok:
            self.remember(record)
        return ok

    async def save(self, record: KeyRecord) -> None:
        await self.db.run(self.db.save_key, record)
        self.remember(record)

    async def delete(self, tokens: list[str]) -> None:
        await self.db.run(self.db.delete_keys, tokens)
        for token in tokens:
            self._keys.pop(token, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


# --- Redis in front of PostgreSQL ------------------------------------------------------------

_SAVE_REDIS = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local alias = cjson.decode(old)['key_alias']
  if type(alias) == 'string' and alias ~= ARGV[2]
     and redis.call('HGET', KEYS[2], alias) == ARGV[1] then
    redis.call('HDEL', KEYS[2], alias)
  end
end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[2], ARGV[2], ARGV[1]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""
"""Write a record PostgreSQL has just committed over whatever Redis holds (its old alias
dropped). KEYS: keys, aliases, deleted; ARGV: token, alias, record."""

_FILL = """
for i = 1, #ARGV, 3 do
  local token, alias = ARGV[i], ARGV[i + 2]
  if redis.call('SISMEMBER', KEYS[3], token) == 0
     and redis.call('HSETNX', KEYS[1], token, ARGV[i + 1]) == 1 and alias ~= '' then
    redis.call('HSETNX', KEYS[2], alias, token)
  end
end
return 1
"""
"""Put back records Redis lacks (read from PostgreSQL), never over one it has, never one
deleted since they were read."""

_DROP = """
for i = 1, #ARGV do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if old then
    local alias = cjson.decode(old)['key_alias']
    if type(alias) == 'string' and redis.call('HGET', KEYS[2], alias) == ARGV[i] then
      redis.call('HDEL', KEYS[2], alias)
    end
  end
  redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('SADD', KEYS[3], ARGV[i])
end
return 1
"""

_DOWN = object()


class PgRedisKeyStore:
    """Keys in PostgreSQL (`pg`, the store of record) with the Redis hash
    `<namespace>:auth:keys` (aliases in `...:auth:aliases`, deleted tokens in
    `...:auth:deleted`) as the cache every proxy reads on each request.

    Writes need Redis up (checked first), commit in PostgreSQL, then overwrite Redis; a Redis
    write that fails after the commit is retried on the link's next tick (`repair`). Reads ask
    Redis; a miss is read through from PostgreSQL (`PgKeyStore.lookup`) and put back. With
    Redis down, reads come from `pg` when `serve_local_when_down`, else raise `RedisDown`.
    """

    def __init__(
        self,
        client: Any,
        namespace: str,
        pg: PgKeyStore,
        link: RedisLink,
        serve_local_when_down: bool = False,
    ) -> None:
        self.client = client
        self.pg = pg
        self.link = link
        self.serve_local_when_down = serve_local_when_down
        self.keys_key = f"{namespace}:auth:keys"
        self.aliases_key = f"{namespace}:auth:aliases"
        self.deleted_key = f"{namespace}:auth:deleted"
        self._keys = [self.keys_key, self.aliases_key, self.deleted_key]
        self._save = client.register_script(_SAVE_REDIS)
        self._fill = client.register_script(_FILL)
        self._drop = client.register_script(_DROP)
        self._unsynced: set[str] = set()
        """Tokens committed in PostgreSQL whose Redis write failed."""

    async def _read(self, op: Callable[[], Any]) -> Any:
        try:
            return await self.link.call(op)
        except RedisDown:
            if self.serve_local_when_down:
                return _DOWN
            raise

    async def get(self, token: str) -> KeyRecord | None:
        raw = await self._read(lambda: self.client.hget(self.keys_key, token))
        if raw is _DOWN:
            return await self.pg.get(token)
        if raw is not None:
            record = KeyRecord.from_json(raw)
            self.pg.remember(record)
            return record
        record = await self.pg.lookup(token)  # Redis lost it, or it was made elsewhere
        if record is not None:
            try:
                await self.fill([record])
            except RedisDown as e:
                log.debug("auth: cannot put a key back into redis: %s", e)
        return record

    async def by_alias(self, alias: str) -> KeyRecord | None:
        token = await self._read(lambda: self.client.hget(self.aliases_key, alias))
        if token is None or token is _DOWN:
            return await self.pg.by_alias(alias)
        record = await self.get(token.decode() if isinstance(token, bytes) else token)
        if record is None or record.key_alias != alias:  # a stale alias in Redis
            return await self.pg.by_alias(alias)
        return record

    async def all(self) -> list[KeyRecord]:
        return await self.pg.all()

    async def put(self, record: KeyRecord, previous_alias: str | None = None) -> bool:
        await self.link.call(self.client.ping)  # refuse before committing if Redis is down
        if not await self.pg.put(record):
            return False
        await self._write([record.token], self._save_one(record))
        return True

    async def save(self, record: KeyRecord) -> None:
        await self.link.call(self.client.ping)
        await self.pg.save(record)
        await self._write([record.token], self._save_one(record))

    async def delete(self, tokens: list[str]) -> None:
        await self.link.call(self.client.ping)
        await self.pg.delete(tokens)
        await self._write(tokens, lambda: self._drop(keys=self._keys, args=tokens))

    def _save_one(self, record: KeyRecord) -> Callable[[], Any]:
        args = [record.token, record.key_alias or "", record.to_json()]
        return lambda: self._save(keys=self._keys, args=args)

    def _drop_one(self, token: str) -> Callable[[], Any]:
        return lambda: self._drop(keys=self._keys, args=[token])

    async def _write(self, tokens: list[str], op: Callable[[], Any]) -> None:
        try:
            await self.link.call(op, self.link.probe_timeout)
        except RedisDown:
            self._unsynced.update(tokens)
            raise

    async def repair(self) -> None:
        """Write to Redis what PostgreSQL committed while the Redis write failed (a tick
        hook: runs while Redis is up)."""
        while self._unsynced:
            token = self._unsynced.pop()
            try:
                record = await self.pg.db.run(self.pg.db.get_key, token)
                op = self._drop_one(token) if record is None else self._save_one(record)
                await self.link.call(op, self.link.probe_timeout)
            except KeyStoreUnavailable:  # logged by the store; next tick
                self._unsynced.add(token)
                return
            except Exception:
                self._unsynced.add(token)
                raise

    async def fill(self, records: list[KeyRecord]) -> None:
        """Put `records` (read from PostgreSQL) back where Redis lacks them."""
        for i in range(0, len(records), PUSH_BATCH):
            args: list[str] = []
            for r in records[i : i + PUSH_BATCH]:
                args += [r.token, r.to_json(), r.key_alias or ""]
            await self.link.call(
                lambda args=args: self._fill(keys=self._keys, args=args), self.link.probe_timeout
            )

    async def push_all(self) -> list[KeyRecord]:
        """After Redis lost data (or came back): every key of PostgreSQL back into Redis.
        Returns the records."""
        records = await self.pg.all()
        await self.fill(records)
        return records

    async def close(self) -> None:
        await self.pg.close()

"""Virtual keys: records, generation, hashing, and the stores that keep them.

A key is shown once, when it is generated (``sk-`` + 32 random url-safe bytes); only its sha256
hex digest, the *token*, is ever stored. Two stores share one async interface:

* :class:`MemoryKeyStore`: a dict in the proxy, persisted to a SQLite file beside the spend log
  (``<spend_db stem>.keys.sqlite``; :class:`KeysDB`). Every write goes through one writer
  thread, off the event loop. One process holds the file (``flock``): ``scripts/keys.py`` edits
  it while the proxy is stopped.
* :class:`RedisKeyStore`: the same keys file as the store of record, with one Redis hash shared
  by every proxy on that Redis in front of it, read on every request (one round trip), so a key
  deleted through any proxy stops working everywhere at once. Redis is a cache of the stores:
  a key Redis lost is read from the keys file and pushed back, and every key a proxy reads from
  Redis is kept in its own keys file too, so a Redis restarted empty loses no key.

With ``general_settings.database_url`` PostgreSQL replaces the keys file as the store of
record, shared by every proxy (:mod:`mitmroute.auth.pg`: ``PgKeysDB``, ``PgKeyStore``,
``PgRedisKeyStore``).
"""

from __future__ import annotations

import asyncio
import fcntl
import fnmatch
import json
import logging
import secrets
import sqlite3
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from mitmroute.auth.keys_migrate import BUSY as MOVE_BUSY
from mitmroute.auth.link import RedisDown, RedisLink
from mitmroute.children import child_argv, child_env
from mitmroute.config import ConfigError, parse_duration
from mitmroute.errors import ProxyError
from mitmroute.request import hash_key

log = logging.getLogger("mitmroute.auth")
T = TypeVar("T")
__all__ = ["KeyRecord", "KeyStore", "KeyStoreUnavailable", "KeysDB", "MemoryKeyStore",
           "RedisKeyStore", "hash_key"]  # fmt: skip


class KeyStoreUnavailable(Exception):
    """The store of record (PostgreSQL) cannot answer now: keyed requests get 503."""


KEY_PREFIX = "sk-"
ALL_MODELS = frozenset({"*", "all-proxy-models"})
"""`models` entries that allow every model group (LiteLLM's spelling included)."""


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def abbreviate(key: str) -> str:
    """`sk-...wxyz`: enough to recognise a key in a list, never enough to use it."""
    return f"{key[:3]}...{key[-4:]}"


def is_token(value: str) -> bool:
    """True for a stored token (64 hex digits) rather than a key."""
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def token_of(key_or_token: str) -> str:
    """Accept a key (hashed here) or its token, like LiteLLM's key API does."""
    return key_or_token if is_token(key_or_token) else hash_key(key_or_token)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _dt(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


@dataclass(slots=True)
class KeyRecord:
    """One virtual key, as stored (LiteLLM's field names)."""

    token: str
    key_name: str
    key_alias: str | None = None
    team_id: str | None = None
    user_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    max_budget: float | None = None
    budget_duration: str | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    expires: datetime | None = None
    blocked: bool = False
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def team(self) -> str | None:
        """`team_id`, else `metadata.team`."""
        team = self.team_id or self.metadata.get("team")
        return str(team) if team else None

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and self.expires <= now

    def allows(self, *models: str) -> bool:
        """May this key call any of `models` (requested name, model group)?"""
        if not self.models or ALL_MODELS.intersection(self.models):
            return True
        return any(fnmatch.fnmatchcase(m, pattern) for m in models for pattern in self.models)

    def to_json(self) -> str:
        data = asdict(self)
        for name in ("expires", "created_at", "updated_at"):
            data[name] = _iso(getattr(self, name))
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> KeyRecord:
        data = json.loads(text)
        for name in ("expires", "created_at", "updated_at"):
            data[name] = _dt(data.get(name))
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        data["created_at"] = data["created_at"] or datetime.now(UTC)
        data["updated_at"] = data["updated_at"] or data["created_at"]
        return cls(**data)

    def public(self) -> dict[str, Any]:
        """The record as the key API shows it (never the key itself)."""
        data = asdict(self)
        for name in ("expires", "created_at", "updated_at"):
            data[name] = _iso(getattr(self, name))
        return data


# --- validation of key API bodies ------------------------------------------------------------

EDITABLE = ("key_alias", "team_id", "user_id", "metadata", "models", "max_budget",
            "budget_duration", "rpm_limit", "tpm_limit", "duration", "blocked")  # fmt: skip


def _invalid(param: str, message: str) -> ProxyError:
    return ProxyError(400, f"{param}: {message}", "invalid_request_error", code="invalid_field",
                      param=param, kind="bad_request")  # fmt: skip


def _opt_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _invalid(name, "expected a non-empty string")
    return value


def _opt_number(body: dict[str, Any], name: str, *, integer: bool) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _invalid(name, "expected a number >= 0")
    if integer:
        if value != int(value):
            raise _invalid(name, "expected an integer")
        return int(value)
    return float(value)


def _opt_duration(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    try:
        seconds = parse_duration(value, name)
    except ConfigError as e:
        raise _invalid(name, str(e).split(": ", 1)[-1]) from None
    if seconds <= 0:
        raise _invalid(name, "must be longer than 0s")
    return str(value)


def parse_fields(body: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Validated record fields from a /key/generate or /key/update body (only those present).

    `duration` becomes `expires` (from `now`); an explicit null clears a field.
    """
    out: dict[str, Any] = {}
    for name in ("key_alias", "team_id", "user_id"):
        if name in body:
            out[name] = _opt_str(body, name)
    if "metadata" in body:
        metadata = body["metadata"] if body["metadata"] is not None else {}
        if not isinstance(metadata, dict):
            raise _invalid("metadata", "expected an object")
        out["metadata"] = metadata
    if "models" in body:
        models = body["models"] if body["models"] is not None else []
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise _invalid("models", "expected a list of model group names")
        out["models"] = list(models)
    if "max_budget" in body:
        out["max_budget"] = _opt_number(body, "max_budget", integer=False)
    for name in ("rpm_limit", "tpm_limit"):
        if name in body:
            out[name] = _opt_number(body, name, integer=True)
    if "budget_duration" in body:
        out["budget_duration"] = _opt_duration(body, "budget_duration")
    if "duration" in body:
        duration = _opt_duration(body, "duration")
        out["expires"] = (now + timedelta(seconds=parse_duration(duration, "duration"))
                          if duration else None)  # fmt: skip
    if "blocked" in body:
        if not isinstance(body["blocked"], bool):
            raise _invalid("blocked", "expected a boolean")
        out["blocked"] = body["blocked"]
    return out


def make_record(key: str, fields: dict[str, Any], now: datetime) -> KeyRecord:
    return KeyRecord(token=hash_key(key), key_name=abbreviate(key), created_at=now,
                     updated_at=now, **fields)  # fmt: skip


def updated(record: KeyRecord, fields: dict[str, Any], now: datetime) -> KeyRecord:
    return replace(record, **fields, updated_at=now)


# --- the keys file ----------------------------------------------------------------------------


def keys_db_path(spend_db: str) -> str | None:
    """`./spend.duckdb` -> `./spend.keys.sqlite`; None when the spend log is in memory."""
    if not spend_db or spend_db == ":memory:":
        return None
    path = Path(spend_db).expanduser()
    return str(path.with_name(f"{path.stem}.keys.sqlite"))


def legacy_keys_path(path: str) -> Path:
    """Where earlier versions kept the keys: a DuckDB file, `<stem>.keys.duckdb`."""
    p = Path(path)
    return p.with_name(p.name.removesuffix(".sqlite") + ".duckdb")


SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    token VARCHAR PRIMARY KEY,
    key_alias VARCHAR,
    team_id VARCHAR,
    record VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS key_spend (
    token VARCHAR PRIMARY KEY,
    window_index BIGINT NOT NULL,
    spent_nanos BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);
"""


class KeysFileBusy(RuntimeError):
    """Another process holds the keys file (a running proxy, or an older version's on the DuckDB
    keys file that is to be moved)."""

    @classmethod
    def of(cls, path: str, detail: object) -> KeysFileBusy:
        return cls(f"{path}: cannot open the keys file (is another mitmroute process using it?): "
                   f"{detail}")  # fmt: skip


class KeysDB:
    """The keys file: SQLite (a few rows written now and then: an OLTP job, and the proxy
    process loads no DuckDB for it), held by one process at a time. Methods are blocking;
    `run` executes one on the writer thread.

    A keys file of an older version (`<stem>.keys.duckdb`) is copied into the new one once, by a
    process of its own (it needs DuckDB), and renamed `<stem>.keys.duckdb.migrated`."""

    def __init__(self, path: str) -> None:
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._held = _Hold(path)
        try:
            if legacy_keys_path(path).exists() and not _has_keys(path):
                migrate_apart(str(legacy_keys_path(path)), path)
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")  # the store of record
            self._conn.executescript(SCHEMA)
        except BaseException:
            self._held.close()
            raise
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="mitmroute-keys")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    def load_keys(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT record FROM keys").fetchall()
        return [KeyRecord.from_json(r[0]) for r in rows]

    def save_key(self, record: KeyRecord) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO keys VALUES (?, ?, ?, ?)",
                               [record.token, record.key_alias, record.team_id,
                                record.to_json()])  # fmt: skip

    def delete_keys(self, tokens: list[str]) -> None:
        with self._lock, self._conn:
            self._conn.execute("BEGIN")
            for token in tokens:
                self._conn.execute("DELETE FROM keys WHERE token = ?", [token])
                self._conn.execute("DELETE FROM key_spend WHERE token = ?", [token])

    def load_spend(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            rows = self._conn.execute("SELECT token, window_index, spent_nanos FROM key_spend")
            return {token: (window, nanos) for token, window, nanos in rows.fetchall()}

    def save_spend(self, rows: list[tuple[str, int, int]]) -> None:
        if not rows:
            return
        with self._lock, self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR REPLACE INTO key_spend VALUES (?, ?, ?)", rows)

    def ledger_id(self) -> str:
        """A random id made once per file: names this spend log's share of a key's spend in
        Redis, so a restarted proxy replaces its share instead of adding it again."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE name = 'ledger_id'").fetchone()
            if row is not None:
                return str(row[0])
            value = uuid.uuid4().hex
            self._conn.execute("INSERT INTO meta VALUES ('ledger_id', ?)", [value])
            return value

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        with self._lock:
            self._conn.close()
            self._held.close()


class _Hold:
    """This process's lock on a keys file, through `<path>.lock` (closing any descriptor of
    the database file itself would drop SQLite's own locks). Exclusive between processes: a
    second proxy on the same file would keep keys of its own in memory, so it is refused, as
    DuckDB's lock did. Shared within one: a reload that drops the master key and one that
    restores it may open the file again before the old backend has closed it."""

    _held: ClassVar[dict[str, list[Any]]] = {}
    """Held lock files by real path: [the open file, how many KeysDB hold it]."""
    _guard = threading.Lock()

    def __init__(self, path: str) -> None:
        self.key = str(Path(f"{path}.lock").resolve())
        with self._guard:
            entry = self._held.get(self.key)
            if entry is None:
                held = open(self.key, "ab")  # noqa: SIM115 - held until the last close()
                try:
                    fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    held.close()
                    raise KeysFileBusy.of(path, e) from None
                entry = self._held[self.key] = [held, 0]
            entry[1] += 1
        self._open = True

    def close(self) -> None:
        with self._guard:
            if not self._open:
                return
            self._open = False
            entry = self._held[self.key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._held[self.key]
                entry[0].close()


def _has_keys(path: str) -> bool:
    """The SQLite keys file at `path` holds a key (False for a new, empty file, or one whose
    move from the DuckDB file was cut short: that one is moved again, in one transaction)."""
    if not Path(path).exists() or not Path(path).stat().st_size:
        return False
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is not None
    except sqlite3.OperationalError:  # no keys table yet
        return False
    finally:
        con.close()


def migrate_apart(legacy: str, path: str) -> None:
    """Copy a DuckDB keys file into the SQLite one at `path`, in a child process: the proxy
    never loads DuckDB. Raises KeysFileBusy if another process holds the old file, else
    RuntimeError with the child's message."""
    out = subprocess.run(
        child_argv("mitmroute.auth.keys_migrate", legacy, path),
        capture_output=True,
        text=True,
        env=child_env(),
    )
    detail = (out.stderr.strip().splitlines() or ["?"])[-1]
    if out.returncode == MOVE_BUSY:
        raise KeysFileBusy.of(legacy, detail)
    if out.returncode != 0:
        raise RuntimeError(f"{legacy}: cannot move the keys to {path}: {detail}")
    log.info("auth: keys moved from %s to %s (%s)", legacy, path, out.stdout.strip())


# --- stores ----------------------------------------------------------------------------------


class KeyStore(Protocol):
    async def get(self, token: str) -> KeyRecord | None: ...
    async def by_alias(self, alias: str) -> KeyRecord | None: ...
    async def put(self, record: KeyRecord, previous_alias: str | None = None) -> bool:
        """Store `record`; False when its alias belongs to another key."""
        ...

    async def delete(self, tokens: list[str]) -> None: ...
    async def all(self) -> list[KeyRecord]: ...
    async def close(self) -> None: ...


class MemoryKeyStore:
    """Keys in a dict, persisted to a :class:`KeysDB` when given."""

    def __init__(self, db: KeysDB | None = None) -> None:
        self.db = db
        self._keys: dict[str, KeyRecord] = {}
        self._aliases: dict[str, str] = {}
        for record in db.load_keys() if db else []:
            self._index(record)

    def _index(self, record: KeyRecord) -> None:
        self._keys[record.token] = record
        if record.key_alias:
            self._aliases[record.key_alias] = record.token

    async def get(self, token: str) -> KeyRecord | None:
        return self._keys.get(token)

    async def by_alias(self, alias: str) -> KeyRecord | None:
        token = self._aliases.get(alias)
        return self._keys.get(token) if token else None

    async def put(self, record: KeyRecord, previous_alias: str | None = None) -> bool:
        owner = self._aliases.get(record.key_alias) if record.key_alias else None
        if owner is not None and owner != record.token:
            return False
        if previous_alias and previous_alias != record.key_alias:
            self._aliases.pop(previous_alias, None)
        self._index(record)
        if self.db is not None:
            await self.db.run(self.db.save_key, record)
        return True

    async def save(self, record: KeyRecord) -> None:
        """Store `record` whoever held its alias here (Redis said the alias is its own)."""
        old = self._keys.get(record.token)
        if old is not None and old.key_alias and self._aliases.get(old.key_alias) == old.token:
            del self._aliases[old.key_alias]
        self._index(record)
        if self.db is not None:
            await self.db.run(self.db.save_key, record)

    def peek(self, token: str) -> KeyRecord | None:
        return self._keys.get(token)

    async def delete(self, tokens: list[str]) -> None:
        for token in tokens:
            record = self._keys.pop(token, None)
            if record is not None and self._aliases.get(record.key_alias or "") == token:
                del self._aliases[record.key_alias or ""]
        if self.db is not None:
            await self.db.run(self.db.delete_keys, tokens)

    async def all(self) -> list[KeyRecord]:
        return list(self._keys.values())

    async def close(self) -> None:
        pass  # the KeysDB is closed by whoever opened it


_PUT = """
local owner = redis.call('HGET', KEYS[2], ARGV[2])
if ARGV[2] ~= '' and owner and owner ~= ARGV[1] then return 0 end
if ARGV[4] ~= '' and ARGV[4] ~= ARGV[2] then
  if redis.call('HGET', KEYS[2], ARGV[4]) == ARGV[1] then redis.call('HDEL', KEYS[2], ARGV[4]) end
end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[2], ARGV[2], ARGV[1]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""

_PUSH = """
local deleted = {}
for i = 1, #ARGV, 3 do
  local token, alias = ARGV[i], ARGV[i + 2]
  if redis.call('SISMEMBER', KEYS[3], token) == 1 then
    table.insert(deleted, token)
  elseif redis.call('HSETNX', KEYS[1], token, ARGV[i + 1]) == 1 and alias ~= '' then
    redis.call('HSETNX', KEYS[2], alias, token)
  end
end
return deleted
"""
"""Put back records Redis lacks (never over a newer one); returns tokens deleted elsewhere."""

_DELETE = """
for i = 1, #ARGV, 2 do
  if ARGV[i + 1] ~= '' and redis.call('HGET', KEYS[2], ARGV[i + 1]) == ARGV[i] then
    redis.call('HDEL', KEYS[2], ARGV[i + 1])
  end
  redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('SADD', KEYS[3], ARGV[i])
end
return 1
"""

PUSH_BATCH = 500


class RedisKeyStore:
    """Keys in the Redis hash `<namespace>:auth:keys` (aliases in `<namespace>:auth:aliases`,
    deleted tokens in the set `<namespace>:auth:deleted`) in front of `local`, the store of
    record.

    Writes go to Redis first (it decides alias clashes between proxies), then to `local`; they
    need Redis (:class:`RedisDown` when it is down). Reads ask Redis; a miss falls back to
    `local` and puts the record back; a record read from Redis that `local` lacks or holds
    older is saved to `local`. With Redis down, reads are answered from `local` when
    `serve_local_when_down`, else raise :class:`RedisDown`.
    """

    def __init__(
        self,
        client: Any,
        namespace: str = "mitmroute",
        local: MemoryKeyStore | None = None,
        link: RedisLink | None = None,
        serve_local_when_down: bool = False,
    ) -> None:
        self.client = client
        self.local = local if local is not None else MemoryKeyStore()
        self.link = link if link is not None else RedisLink(client, namespace, watch=False)
        self.serve_local_when_down = serve_local_when_down
        self.keys_key = f"{namespace}:auth:keys"
        self.aliases_key = f"{namespace}:auth:aliases"
        self.deleted_key = f"{namespace}:auth:deleted"
        self._put = client.register_script(_PUT)
        self._push = client.register_script(_PUSH)
        self._delete = client.register_script(_DELETE)

    async def _read(self, op: Callable[[], Any]) -> Any:
        """`op()` on Redis, or None when Redis is down and `local` may answer."""
        try:
            return await self.link.call(op)
        except RedisDown:
            if self.serve_local_when_down:
                return None
            raise

    async def get(self, token: str) -> KeyRecord | None:
        found = await self._read(lambda: self._get_pipe(token))
        if found is None:  # Redis is down
            return await self.local.get(token)
        raw, deleted = found
        if raw is not None:
            record = KeyRecord.from_json(raw)
            if self.local.peek(token) != record:
                await self.local.save(record)
            return record
        record = self.local.peek(token)
        if record is None:
            return None
        if deleted:  # deleted through another proxy
            await self.local.delete([token])
            return None
        await self.push([record])  # Redis lost it: put it back
        return None if self.local.peek(token) is None else record

    async def _get_pipe(self, token: str) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(self.keys_key, token)
            pipe.sismember(self.deleted_key, token)
            return await pipe.execute()

    async def by_alias(self, alias: str) -> KeyRecord | None:
        token = await self._read(lambda: self.client.hget(self.aliases_key, alias))
        if token is None:
            record = await self.local.by_alias(alias)
            if record is None or not self.link.up:
                return record
            return await self.get(record.token)
        return await self.get(token.decode() if isinstance(token, bytes) else token)

    async def put(self, record: KeyRecord, previous_alias: str | None = None) -> bool:
        ok = await self.link.call(
            lambda: self._put(
                keys=[self.keys_key, self.aliases_key, self.deleted_key],
                args=[record.token, record.key_alias or "", record.to_json(), previous_alias or ""],
            )
        )
        if ok:
            await self.local.save(record)
        return bool(ok)

    async def delete(self, tokens: list[str]) -> None:
        known = [await self.get(t) for t in tokens]
        args: list[str] = []
        for token, record in zip(tokens, known, strict=True):
            alias = record.key_alias if record is not None else None
            args += [token, alias or ""]
        await self.link.call(
            lambda: self._delete(
                keys=[self.keys_key, self.aliases_key, self.deleted_key], args=args
            )
        )
        await self.local.delete(tokens)

    async def all(self) -> list[KeyRecord]:
        found = await self._read(self._all_pipe)
        if found is None:
            return await self.local.all()
        raw, deleted = found
        records = {token: KeyRecord.from_json(v) for token, v in raw.items()}
        tokens = {t.decode() if isinstance(t, bytes) else t for t in records}
        gone = {t.decode() if isinstance(t, bytes) else t for t in deleted}
        out = list(records.values())
        out += [r for r in await self.local.all() if r.token not in tokens | gone]
        return out

    async def _all_pipe(self) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys_key)
            pipe.smembers(self.deleted_key)
            return await pipe.execute()

    async def push(self, records: list[KeyRecord]) -> None:
        """Put `records` back where Redis lacks them; drop those deleted through another
        proxy from `local`."""
        for i in range(0, len(records), PUSH_BATCH):
            args: list[str] = []
            for r in records[i : i + PUSH_BATCH]:
                args += [r.token, r.to_json(), r.key_alias or ""]
            deleted = await self.link.call(
                lambda args=args: self._push(
                    keys=[self.keys_key, self.aliases_key, self.deleted_key], args=args
                ),
                self.link.probe_timeout,
            )
            if deleted:
                await self.local.delete(
                    [t.decode() if isinstance(t, bytes) else t for t in deleted]
                )

    async def push_all(self) -> None:
        """After Redis lost data (or came back): put back every key of the store of record."""
        await self.push(await self.local.all())

    async def close(self) -> None:
        pass  # the client and the local store are closed by whoever opened them


def sort_records(records: Iterable[KeyRecord]) -> list[KeyRecord]:
    """Oldest first, a stable order for /key/list pages."""
    return sorted(records, key=lambda r: (r.created_at, r.token))

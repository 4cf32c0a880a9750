"""Budgets and rate limits per virtual key, in-process or shared through Redis.

**Budgets.** A key's spend is counted per budget window: windows of ``budget_duration``
anchored at the key's creation (a ``30d`` key resets every 30 days after it was made), or one
lifetime window without a duration. Amounts are integer nano-dollars, so Redis adds them
atomically and nothing is lost to float rounding.

*Reserve on start, settle on finish.* A request is admitted while
``spend + outstanding reservations < max_budget``; it then reserves its estimated cost
(:class:`CostEstimator`: prompt bytes / 4 at the group's highest input price, plus
``max_tokens`` (else 1024) at its highest output price). When the exchange finishes the
reservation is dropped and the real cost added. Concurrent requests see each other's
reservations, so as long as estimates are not below real costs the spend ends below
``max_budget`` + one request's estimate, however many requests race. Reservations expire after
the router's timeout + 60 s, so a crashed proxy cannot hold a budget for ever.

**Rate limits.** ``rpm_limit`` / ``tpm_limit`` count per clock minute, as LiteLLM does. A
request is admitted while the minute's request count is below ``rpm_limit`` and its token count
below ``tpm_limit``; tokens (``usage.total_tokens``) are added when the exchange finishes.

**Backends.** :class:`MemoryLimiter` keeps dicts on the event loop (single-threaded, so check and
reserve are one step) and persists spend to the keys DuckDB file (with ``database_url``: this
process's share in PostgreSQL) a second after it changes and at shutdown. :class:`RedisLimiter`
admits with one Lua script and settles with another, so any number of proxies on one Redis
enforce one limit; each proxy's share of a key's spend comes from its spend log (with
``database_url``: from PostgreSQL, :mod:`mitmroute.auth.pg`), so Redis losing its data loses no
spend, and a Redis outage drops no settlement (see the class).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Any, Protocol

from mitmroute.auth.link import RedisDown, RedisLink
from mitmroute.config import parse_duration
from mitmroute.money import Pricing

if TYPE_CHECKING:
    from mitmroute.auth.keys import KeyRecord, KeysDB
    from mitmroute.auth.ledger import Ledger
    from mitmroute.auth.pg import PgKeysDB
    from mitmroute.config import GeneralSettings, RouterConfig
    from mitmroute.exchange import Exchange

log = logging.getLogger("mitmroute.auth")

NANOS = 10**9
MINUTE = 60
FLUSH_DELAY = 1.0
SHARE_FLUSH_DELAY = 1.0
"""Seconds between a settlement and the batch that writes this proxy's shares to
PostgreSQL (with database_url): what a SIGKILL can lose from the budget counter of record."""
DEFAULT_OUTPUT_TOKENS = 1024
BYTES_PER_TOKEN = 4


def usd_to_nanos(usd: Decimal | float | int | None) -> int:
    """Dollars to integer nano-dollars, rounded up (a budget never under-counts)."""
    if usd is None:
        return 0
    value = usd if isinstance(usd, Decimal) else Decimal(str(usd))
    return int((value * NANOS).to_integral_value(ROUND_CEILING))


def nanos_to_usd(nanos: int) -> float:
    return nanos / NANOS


# --- what a key may use ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """One key's limits: its own, with general_settings' budget for keys that set none."""

    token: str
    max_budget: int | None = None
    """Nano-dollars per window; None = no budget."""
    budget_seconds: float | None = None
    """Window length; None = one lifetime window."""
    anchor: float = 0.0
    """Epoch seconds the windows count from (the key's creation)."""
    rpm: int | None = None
    tpm: int | None = None

    @classmethod
    def of(cls, record: KeyRecord, general: GeneralSettings | None = None) -> Policy:
        max_budget, duration = record.max_budget, record.budget_duration
        if max_budget is None and general is not None:
            max_budget = general.max_budget
            duration = duration or general.budget_duration
        return cls(
            token=record.token,
            max_budget=usd_to_nanos(max_budget) if max_budget is not None else None,
            budget_seconds=parse_duration(duration, "budget_duration") if duration else None,
            anchor=record.created_at.timestamp(),
            rpm=record.rpm_limit,
            tpm=record.tpm_limit,
        )

    def window(self, now: float) -> int:
        if not self.budget_seconds:
            return 0
        return int((now - self.anchor) // self.budget_seconds)

    def reset_at(self, now: float) -> float | None:
        """When the current budget window ends (epoch seconds)."""
        if not self.budget_seconds:
            return None
        return self.anchor + (self.window(now) + 1) * self.budget_seconds


@dataclass(slots=True)
class Reservation:
    """Budget held for one admitted request until its exchange settles it."""

    policy: Policy
    nanos: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    key_alias: str | None = None
    team: str | None = None
    local: bool = False
    """Held in this process only (admitted while Redis was down)."""


@dataclass(slots=True)
class Verdict:
    """The answer to 'may this request start?'."""

    policy: Policy
    reason: str | None = None
    """None when admitted; else 'rpm', 'tpm' or 'budget'."""
    reservation: Reservation | None = None
    requests: int = 0
    """Requests this minute, this one included when admitted."""
    tokens: int = 0
    spent: int = 0
    reserved: int = 0
    now: float = 0.0

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def minute_left(self) -> float:
        return MINUTE - (self.now % MINUTE)

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers (and Retry-After on a rate-limit rejection)."""
        out: dict[str, str] = {}
        reset = f"{math.ceil(self.minute_left)}s"
        if self.policy.rpm is not None:
            out["x-ratelimit-limit-requests"] = str(self.policy.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, self.policy.rpm - self.requests))
            out["x-ratelimit-reset-requests"] = reset
        if self.policy.tpm is not None:
            out["x-ratelimit-limit-tokens"] = str(self.policy.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, self.policy.tpm - self.tokens))
            out["x-ratelimit-reset-tokens"] = reset
        if self.reason in ("rpm", "tpm"):
            out["retry-after"] = str(math.ceil(self.minute_left))
        return out


@dataclass(frozen=True, slots=True)
class BudgetUpdate:
    """A key's spend moved from `before` to `after` (nano-dollars) in its current window."""

    token: str
    key_alias: str | None
    team: str | None
    before: int
    after: int
    max_budget: int | None
    window: int
    reset_at: float | None

    def crossed(self, fraction: float) -> bool:
        """Did this change cross `fraction` of the budget (upwards)?"""
        if not self.max_budget:
            return False
        line = self.max_budget * fraction
        return self.before < line <= self.after

    @property
    def remaining_usd(self) -> float | None:
        if self.max_budget is None:
            return None
        return nanos_to_usd(self.max_budget - self.after)


class Limiter(Protocol):
    async def admit(self, policy: Policy, estimate: int, now: float | None = None) -> Verdict: ...
    async def settle(self, reservation: Reservation, cost: int, tokens: int,
                     now: float | None = None) -> BudgetUpdate: ...  # fmt: skip
    async def spent(self, policy: Policy, now: float | None = None) -> int: ...
    async def forget(self, token: str) -> None: ...
    async def close(self) -> None: ...


# --- in-process ------------------------------------------------------------------------------


class MemoryLimiter:
    """Limits of one process; spend survives restarts through the keys DuckDB file."""

    def __init__(self, db: KeysDB | None = None, reservation_ttl: float = 660.0,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.db = db
        self.reservation_ttl = reservation_ttl
        self._clock = clock
        self._spend: dict[str, tuple[int, int]] = db.load_spend() if db else {}
        self._reserved: dict[str, dict[str, tuple[int, float]]] = {}
        self._requests: dict[str, tuple[int, int]] = {}
        self._tokens: dict[str, tuple[int, int]] = {}
        self._dirty: set[str] = set()
        self._flush: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def _count(table: dict[str, tuple[int, int]], token: str, window: int) -> int:
        held = table.get(token)
        return held[1] if held is not None and held[0] == window else 0

    def _held(self, token: str, now: float) -> int:
        held = self._reserved.get(token)
        if not held:
            return 0
        for rid in [rid for rid, (_, until) in held.items() if until <= now]:
            del held[rid]
        return sum(n for n, _ in held.values())

    async def admit(self, policy: Policy, estimate: int, now: float | None = None) -> Verdict:
        now = self._clock() if now is None else now
        token, minute = policy.token, int(now // MINUTE)
        requests = self._count(self._requests, token, minute)
        tokens = self._count(self._tokens, token, minute)
        spent = self._count(self._spend, token, policy.window(now))
        reserved = self._held(token, now) if policy.max_budget is not None else 0
        verdict = Verdict(policy, requests=requests, tokens=tokens, spent=spent,
                          reserved=reserved, now=now)  # fmt: skip
        if policy.rpm is not None and requests >= policy.rpm:
            verdict.reason = "rpm"
        elif policy.tpm is not None and tokens >= policy.tpm:
            verdict.reason = "tpm"
        elif policy.max_budget is not None and spent + reserved >= policy.max_budget:
            verdict.reason = "budget"
        if verdict.reason is not None:
            return verdict
        reservation = Reservation(policy, estimate if policy.max_budget is not None else 0)
        if reservation.nanos:
            held = self._reserved.setdefault(token, {})
            held[reservation.id] = (reservation.nanos, now + self.reservation_ttl)
        self._requests[token] = (minute, requests + 1)
        verdict.requests, verdict.reservation = requests + 1, reservation
        return verdict

    async def settle(self, reservation: Reservation, cost: int, tokens: int,
                     now: float | None = None) -> BudgetUpdate:  # fmt: skip
        now = self._clock() if now is None else now
        policy, token = reservation.policy, reservation.policy.token
        held = self._reserved.get(token)
        if held is not None:
            held.pop(reservation.id, None)
            if not held:
                del self._reserved[token]
        if tokens > 0:
            minute = int(now // MINUTE)
            self._tokens[token] = (minute, self._count(self._tokens, token, minute) + tokens)
        window = policy.window(now)
        before = self._count(self._spend, token, window)
        after = before + max(cost, 0)
        if after != before or token not in self._spend:
            self._spend[token] = (window, after)
            self._mark(token)
        return BudgetUpdate(token, reservation.key_alias, reservation.team, before, after,
                            policy.max_budget, window, policy.reset_at(now))  # fmt: skip

    async def spent(self, policy: Policy, now: float | None = None) -> int:
        now = self._clock() if now is None else now
        return self._count(self._spend, policy.token, policy.window(now))

    def seed(self, token: str, window: int, nanos: int) -> None:
        """Take `nanos` as the key's spend in `window` (known elsewhere; not persisted)."""
        self._spend[token] = (window, nanos)

    async def forget(self, token: str) -> None:
        for table in (self._spend, self._reserved, self._requests, self._tokens):
            table.pop(token, None)
        self._dirty.discard(token)

    def _mark(self, token: str) -> None:
        if self.db is None:
            return
        self._dirty.add(token)
        if self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(FLUSH_DELAY, self._start_flush)

    def _start_flush(self) -> None:
        self._flush = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Write changed spend to the keys file (on its writer thread)."""
        if self.db is None or not self._dirty:
            return
        rows = [(t, *self._spend[t]) for t in self._dirty if t in self._spend]
        self._dirty.clear()
        try:
            await self.db.run(self.db.save_spend, rows)
        except Exception as e:  # kept: the totals are written by the next flush
            log.warning("auth: could not persist key spend (retried): %s", e)
            for token, *_ in rows:
                self._mark(token)

    async def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush()
        if self._flush is not None:  # the last flush failed: nothing will run it again
            self._flush.cancel()
            self._flush = None


# --- Redis ---------------------------------------------------------------------------------

_SHARE = """
local share = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local before = share
if tonumber(ARGV[2]) > share then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
  share = tonumber(ARGV[2])
end
local spent = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do spent = spent + tonumber(v) end
"""
"""Every script starts here. KEYS[1] is the key's spend hash for one window, ARGV[1..3] this
ledger's field, its share and the hash's ttl: raise the field to the share (never lower it),
then sum all the shares into `spent`."""

_PUSH = _SHARE + "return {spent, share}"

_ADMIT = (
    _SHARE
    + """
local requests = tonumber(redis.call('GET', KEYS[2]) or '0')
local tokens = tonumber(redis.call('GET', KEYS[3]) or '0')
local rpm, tpm, budget = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now, ttl = tonumber(ARGV[9]), tonumber(ARGV[10])
local reserved = 0
if budget >= 0 then
  local held = redis.call('HGETALL', KEYS[4])
  for i = 1, #held, 2 do
    local sep = string.find(held[i + 1], ':', 1, true)
    local amount = tonumber(string.sub(held[i + 1], 1, sep - 1))
    if tonumber(string.sub(held[i + 1], sep + 1)) <= now then
      redis.call('HDEL', KEYS[4], held[i])
    else
      reserved = reserved + amount
    end
  end
end
local code = 0
if rpm >= 0 and requests >= rpm then code = 1
elseif tpm >= 0 and tokens >= tpm then code = 2
elseif budget >= 0 and spent + reserved >= budget then code = 3
else
  if budget >= 0 and tonumber(ARGV[7]) > 0 then
    redis.call('HSET', KEYS[4], ARGV[8], ARGV[7] .. ':' .. (now + ttl))
    redis.call('PEXPIRE', KEYS[4], ttl)
  end
  requests = redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], 120)
end
return {code, requests, tokens, spent, reserved, share}
"""
)
"""KEYS: spend hash, rpm, tpm, reservations; ARGV 4-10: rpm, tpm, budget (-1 = none),
estimate, reservation id, now and reservation ttl (ms)."""

_SETTLE = (
    _SHARE
    + """
if ARGV[4] ~= '' then redis.call('HDEL', KEYS[2], ARGV[4]) end
local tokens = tonumber(ARGV[5])
if tokens > 0 then
  redis.call('INCRBY', KEYS[3], tokens)
  redis.call('EXPIRE', KEYS[3], 120)
end
return {spent - (share - before), spent, share}
"""
)
"""KEYS: spend hash, reservations, tpm; ARGV 4-5: reservation id ('' = none), tokens."""

_RAISE_ALL = """
for i = 2, #ARGV, 2 do
  if tonumber(ARGV[i + 1]) > tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0') then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
if tonumber(ARGV[1]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return 1
"""
"""Raise several shares of one spend hash (KEYS[1]): ARGV[1] the ttl, then field, value
pairs."""

_REASONS = {1: "rpm", 2: "tpm", 3: "budget"}

QUEUE_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class _Queued:
    """What a settlement still has to do in Redis (its spend is in the ledger's share)."""

    reservation_key: str
    reservation_id: str | None
    tpm_key: str
    tokens: int
    minute: int


class RedisLimiter:
    """Limits shared by every proxy on one Redis (keys `<namespace>:auth:{<token>}:...`).

    **Spend** is a hash per key and budget window whose fields are the shares of each spend
    log (`ledger_id`, one per proxy's `spend_db`); a key's spend is their sum. This proxy's
    share is kept here too (`_mine`): read from the spend log the first time a key is seen
    (:class:`~mitmroute.auth.ledger.Ledger`), then raised by each settlement, and written to
    Redis as an absolute value that only ever grows (every admit and settle carries it). So a
    Redis that lost its data gets this share back on the next request, and a settlement that
    Redis missed is in the next value written: none is ever lost.

    **Redis down.** A settlement is kept in a bounded queue (reservation release and tokens)
    and applied when Redis answers again; its cost is already in the share. An admission
    raises :class:`RedisDown`, or, with `serve_local_when_down`, is decided in this process
    (:class:`MemoryLimiter`: rpm/tpm of this proxy only; spend = this share + the other
    shares last seen).
    """

    def __init__(
        self,
        client: Any,
        namespace: str = "mitmroute",
        reservation_ttl: float = 660.0,
        clock: Callable[[], float] = time.time,
        *,
        link: RedisLink | None = None,
        ledger: Ledger | None = None,
        ledger_id: str | None = None,
        serve_local_when_down: bool = False,
        queue_limit: int = QUEUE_LIMIT,
        shares: PgKeysDB | None = None,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.shares = shares
        self._dirty_shares: dict[tuple[str, int], int] = {}
        """(token, window) -> this proxy's share, not yet written to PostgreSQL."""
        self._share_flush: asyncio.TimerHandle | None = None
        self._share_tasks: set[asyncio.Task[None]] = set()
        self.reservation_ttl = reservation_ttl
        self._clock = clock
        self.link = link if link is not None else RedisLink(client, namespace, watch=False)
        self.ledger = ledger
        self.me = ledger_id or uuid.uuid4().hex
        self.serve_local_when_down = serve_local_when_down
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)
        self._push = client.register_script(_PUSH)
        self._raise_all = client.register_script(_RAISE_ALL)
        self._mine: dict[str, tuple[int, int]] = {}
        """token -> (window, nano-dollars): this ledger's share of the key's spend."""
        self._others: dict[str, tuple[int, int]] = {}
        """token -> (window, nano-dollars): the other shares, as last seen in Redis."""
        self._policies: dict[str, Policy] = {}
        self._loading: dict[tuple[str, int], asyncio.Task[dict[str, int] | None]] = {}
        self._unread: set[tuple[str, int]] = set()
        """(token, window) whose ledger read failed: read again at the key's next request."""
        self._local = MemoryLimiter(reservation_ttl=reservation_ttl, clock=clock)
        self._queue: deque[_Queued] = deque()
        self.queue_limit = queue_limit
        self._unpushed: set[str] = set()
        """Tokens whose share Redis may lack (a settlement failed)."""

    def _key(self, token: str, *parts: object) -> str:
        return ":".join([f"{self.namespace}:auth:{{{token}}}", *map(str, parts)])

    def _spend_key(self, policy: Policy, now: float) -> str:
        return self._key(policy.token, "spent", policy.window(now))

    @staticmethod
    def _spend_ttl(policy: Policy) -> int:
        return math.ceil(policy.budget_seconds + 3600) if policy.budget_seconds else 0

    # --- this ledger's share ------------------------------------------------------------

    def _held(self, token: str, window: int) -> int | None:
        held = self._mine.get(token)
        return held[1] if held is not None and held[0] == window else None

    def _raise(self, token: str, window: int, nanos: int) -> None:
        held = self._mine.get(token)
        if held is None or held[0] < window or (held[0] == window and held[1] < nanos):
            self._mine[token] = (window, nanos)

    async def _share(self, policy: Policy, now: float) -> int:
        """This ledger's share of the key's spend in the window of `now` (read once)."""
        window = policy.window(now)
        self._policies[policy.token] = policy
        held = self._held(policy.token, window)
        key = (policy.token, window)
        if held is not None and key not in self._unread:
            return held
        task = self._loading.get(key)
        if task is None:
            since = {policy.token: _window_start(policy, window)}
            task = asyncio.get_running_loop().create_task(self._read_ledger(since))
            self._loading[key] = task
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        found = await asyncio.shield(task)
        if found is None:  # not read: what is held for now, and read again next time
            self._unread.add(key)
            return held or 0
        self._unread.discard(key)
        self._raise(policy.token, window, found.get(policy.token, 0))
        held = self._held(policy.token, window)
        return held if held is not None else 0

    async def _read_ledger(self, since: dict[str, float]) -> dict[str, int] | None:
        """Spend per token from the ledger; None when it could not be read."""
        if self.ledger is None:
            return {}
        try:
            return await self.ledger.spend_since(since)
        except Exception as e:
            log.warning("auth: cannot read key spend from the spend log: %s", e)
            return None

    def _others_of(self, token: str, window: int) -> int:
        held = self._others.get(token)
        return held[1] if held is not None and held[0] == window else 0

    # --- the Limiter protocol -----------------------------------------------------------

    async def admit(self, policy: Policy, estimate: int, now: float | None = None) -> Verdict:
        now = self._clock() if now is None else now
        mine = await self._share(policy, now)
        minute, window = int(now // MINUTE), policy.window(now)
        reservation = Reservation(policy, estimate if policy.max_budget is not None else 0)
        keys = [
            self._spend_key(policy, now),
            self._key(policy.token, "rpm", minute),
            self._key(policy.token, "tpm", minute),
            self._key(policy.token, "reserved"),
        ]
        args = [
            self.me,
            mine,
            self._spend_ttl(policy),
            -1 if policy.rpm is None else policy.rpm,
            -1 if policy.tpm is None else policy.tpm,
            -1 if policy.max_budget is None else policy.max_budget,
            reservation.nanos,
            reservation.id,
            int(now * 1000),
            int(self.reservation_ttl * 1000),
        ]
        try:
            found = await self.link.call(lambda: self._admit(keys=keys, args=args))
        except RedisDown:
            if not self.serve_local_when_down:
                raise
            return await self._admit_locally(policy, estimate, now)
        code, requests, tokens, spent, reserved, share = map(int, found)
        self._raise(policy.token, window, share)
        self._others[policy.token] = (window, spent - share)
        verdict = Verdict(
            policy,
            _REASONS.get(code),
            requests=requests,
            tokens=tokens,
            spent=spent,
            reserved=reserved,
            now=now,
        )
        if verdict.ok:
            verdict.reservation = reservation
        return verdict

    async def _admit_locally(self, policy: Policy, estimate: int, now: float) -> Verdict:
        window = policy.window(now)
        mine = self._held(policy.token, window) or 0
        self._local.seed(policy.token, window, mine + self._others_of(policy.token, window))
        verdict = await self._local.admit(policy, estimate, now)
        if verdict.reservation is not None:
            verdict.reservation.local = True
        return verdict

    async def settle(
        self, reservation: Reservation, cost: int, tokens: int, now: float | None = None
    ) -> BudgetUpdate:
        now = self._clock() if now is None else now
        policy = reservation.policy
        token, window, minute = policy.token, policy.window(now), int(now // MINUTE)
        await self._share(policy, now)
        cost, tokens = max(cost, 0), max(tokens, 0)
        mine = (self._held(token, window) or 0) + cost
        self._mine[token] = (window, mine)
        if cost:
            self._persist(token, window, mine)
        await self._local.settle(reservation, 0, tokens, now)  # this proxy's tpm, if Redis dies
        queued = _Queued(
            self._key(token, "reserved"),
            None if reservation.local else reservation.id,
            self._key(token, "tpm", minute),
            tokens,
            minute,
        )
        keys = [self._spend_key(policy, now), queued.reservation_key, queued.tpm_key]
        args = [self.me, mine, self._spend_ttl(policy), queued.reservation_id or "", tokens]
        try:
            found = await self.link.call(lambda: self._settle(keys=keys, args=args))
            before, after, share = map(int, found)
        except RedisDown:
            self._enqueue(token, queued)
            others = self._others_of(token, window)
            before, after = others + mine - cost, others + mine
        else:
            self._others[token] = (window, after - share)
        return BudgetUpdate(
            token,
            reservation.key_alias,
            reservation.team,
            before,
            after,
            policy.max_budget,
            window,
            policy.reset_at(now),
        )

    def _enqueue(self, token: str, queued: _Queued) -> None:
        self._unpushed.add(token)
        if queued.reservation_id is None and not queued.tokens:
            return
        if len(self._queue) >= self.queue_limit:
            # the oldest release only frees budget its reservation's ttl frees anyway
            self._queue.popleft()
            log.warning(
                "auth: settlement queue full (%d): oldest reservation release dropped",
                self.queue_limit,
            )
        self._queue.append(queued)

    async def spent(self, policy: Policy, now: float | None = None) -> int:
        now = self._clock() if now is None else now
        mine, window = await self._share(policy, now), policy.window(now)
        args = [self.me, mine, self._spend_ttl(policy)]
        key = self._spend_key(policy, now)
        try:
            spent, share = await self.link.call(lambda: self._push(keys=[key], args=args))
        except RedisDown:
            if not self.serve_local_when_down:
                raise
            return mine + self._others_of(policy.token, window)
        self._others[policy.token] = (window, int(spent) - int(share))
        return int(spent)

    async def forget(self, token: str) -> None:
        for table in (self._mine, self._others, self._policies):
            table.pop(token, None)
        self._unpushed.discard(token)
        for held in [k for k in self._dirty_shares if k[0] == token]:
            del self._dirty_shares[held]
        await self._local.forget(token)
        pattern = f"{self.namespace}:auth:{{{token}}}:*"

        async def delete() -> None:
            keys = [k async for k in self.client.scan_iter(match=pattern, count=100)]
            if keys:
                await self.client.delete(*keys)

        await self.link.call(delete, self.link.probe_timeout)

    # --- putting Redis right again ------------------------------------------------------

    async def sync(self, policies: list[Policy]) -> None:
        """After Redis lost data or came back: read the spend log for the keys not seen yet
        (with database_url: every instance's share from PostgreSQL), write every share this
        ledger holds, and apply the queued settlements."""
        now = self._clock()
        if self.shares is not None:
            await self._restore_shares(policies, now)
        since: dict[str, float] = {}
        for policy in policies:
            self._policies[policy.token] = policy
            if self._held(policy.token, policy.window(now)) is None:
                since[policy.token] = _window_start(policy, policy.window(now))
        found = await self._read_ledger(since) if since else {}
        for token in since:
            window = self._policies[token].window(now)
            if found is None:  # read at the key's next request
                self._unread.add((token, window))
            else:
                self._raise(token, window, found.get(token, 0))
        self._unpushed.update(self._mine)
        await self.drain()

    async def drain(self) -> None:
        """Write the shares Redis may lack and apply queued settlements (batches of 500)."""
        now = self._clock()
        while self._unpushed or self._queue:
            tokens = [self._unpushed.pop() for _ in range(min(500, len(self._unpushed)))]
            queued = [self._queue.popleft() for _ in range(min(500, len(self._queue)))]
            try:
                await self.link.call(
                    functools.partial(self._drain, tokens, queued, now), self.link.probe_timeout
                )
            except RedisDown:
                self._unpushed.update(tokens)
                self._queue.extendleft(reversed(queued))
                raise

    async def _drain(self, tokens: list[str], queued: list[_Queued], now: float) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for token in tokens:
                policy = self._policies.get(token)
                held = self._held(token, policy.window(now)) if policy is not None else None
                if policy is None or held is None:
                    continue  # its window is over
                args = [self.me, held, self._spend_ttl(policy)]
                await self._push(keys=[self._spend_key(policy, now)], args=args, client=pipe)
            for q in queued:
                if q.reservation_id is not None:
                    pipe.hdel(q.reservation_key, q.reservation_id)
                if q.tokens and q.minute == int(now // MINUTE):
                    pipe.incrby(q.tpm_key, q.tokens)
                    pipe.expire(q.tpm_key, 120)
            await pipe.execute()

    @property
    def pending(self) -> bool:
        """Settlements or shares still to write to Redis."""
        return bool(self._queue or self._unpushed)

    # --- shares in PostgreSQL (database_url) --------------------------------------------

    async def _restore_shares(self, policies: list[Policy], now: float) -> None:
        """Raise every instance's share in Redis to what PostgreSQL holds (batches of 500)."""
        assert self.shares is not None
        by_token = {p.token: p for p in policies}
        windows = {token: p.window(now) for token, p in by_token.items()}
        found = await self.shares.run(self.shares.shares, windows)
        for token, fields in found.items():
            if self.me in fields:
                self._raise(token, windows[token], fields[self.me])
        items = [(t, f) for t, f in found.items() if f]
        for i in range(0, len(items), 500):
            batch = items[i : i + 500]
            await self.link.call(
                functools.partial(self._restore, batch, by_token, now), self.link.probe_timeout
            )

    async def _restore(self, batch: list[tuple[str, dict[str, int]]],
                       policies: dict[str, Policy], now: float) -> None:  # fmt: skip
        async with self.client.pipeline(transaction=False) as pipe:
            for token, fields in batch:
                policy = policies[token]
                args: list[Any] = [self._spend_ttl(policy)]
                for instance, nanos in fields.items():
                    args += [instance, nanos]
                key = self._spend_key(policy, now)
                await self._raise_all(keys=[key], args=args, client=pipe)
            await pipe.execute()

    def _persist(self, token: str, window: int, nanos: int) -> None:
        """Queue this proxy's share for the next batch to PostgreSQL."""
        if self.shares is None:
            return
        key = (token, window)
        self._dirty_shares[key] = max(nanos, self._dirty_shares.get(key, 0))
        if self._share_flush is None:
            loop = asyncio.get_running_loop()
            self._share_flush = loop.call_later(SHARE_FLUSH_DELAY, self._start_share_flush)

    def _start_share_flush(self) -> None:
        self._share_flush = None
        task = asyncio.get_running_loop().create_task(self.flush_shares())
        self._share_tasks.add(task)
        task.add_done_callback(self._share_tasks.discard)

    async def flush_shares(self, retry: bool = True) -> None:
        """Write the queued shares to PostgreSQL (on its worker thread); kept for the next
        batch (`retry`) when it cannot be written."""
        if self.shares is None or not self._dirty_shares:
            return
        rows, self._dirty_shares = self._dirty_shares, {}
        try:
            await self.shares.run(
                self.shares.save_shares, [(t, w, n) for (t, w), n in rows.items()]
            )
        except Exception as e:
            for key, nanos in rows.items():
                self._dirty_shares[key] = max(nanos, self._dirty_shares.get(key, 0))
            log.warning("auth: cannot write key spend to PostgreSQL: %s", e)
            if retry and self._share_flush is None:
                loop = asyncio.get_running_loop()
                self._share_flush = loop.call_later(SHARE_FLUSH_DELAY, self._start_share_flush)

    async def close(self) -> None:
        """Write the last shares (the client and the link are closed by whoever opened
        them)."""
        if self._share_flush is not None:
            self._share_flush.cancel()
            self._share_flush = None
        if self._share_tasks:
            await asyncio.gather(*self._share_tasks, return_exceptions=True)
        await self.flush_shares(retry=False)


def _window_start(policy: Policy, window: int) -> float:
    """Epoch seconds the budget window `window` of `policy` starts at."""
    if not policy.budget_seconds:
        return policy.anchor
    return policy.anchor + window * policy.budget_seconds


# --- estimating and pricing ------------------------------------------------------------------


class CostEstimator:
    """Prices a request before it runs, to reserve budget; after it ran, the engine's cost
    (`exchange.cost_usd`, from mitmroute.money) is the one that counts."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        pricing = Pricing.for_config(config)
        rates = {d.id: pricing.rates(d) for d in config.deployments}
        groups = config.groups()
        settings = config.router
        self._rates: dict[str, tuple[Decimal, Decimal]] = {}
        for group in groups:
            reachable = {group}
            for ladder in (
                settings.fallbacks,
                settings.context_window_fallbacks,
                settings.content_policy_fallbacks,
            ):
                targets = [*ladder.get(group, []), *ladder.get("*", [])]
                reachable.update(settings.model_group_alias.get(t, t) for t in targets)
            found = [rates[d.id] for g in reachable for d in groups.get(g, [])]
            self._rates[group] = (
                max((r[0] for r in found), default=Decimal(0)),
                max((r[1] for r in found), default=Decimal(0)),
            )
        for name, router in config.complexity_routers.items():  # its dearest tier
            found = [self._rates[g] for g in router.groups]
            self._rates[name] = (max(r[0] for r in found), max(r[1] for r in found))

    def group_of(self, model: str) -> str:
        return self.config.router.model_group_alias.get(model, model)

    def estimate(self, model: str, body: dict[str, Any], body_size: int,
                 embeddings: bool = False) -> int:  # fmt: skip
        """Nano-dollars to reserve for a request to `model`."""
        in_rate, out_rate = self._rates.get(self.group_of(model), (Decimal(0), Decimal(0)))
        if not in_rate and not out_rate:
            return 0
        prompt = body_size // BYTES_PER_TOKEN + 1
        output = 0
        if not embeddings:
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
            output = limit if isinstance(limit, int) and limit > 0 else DEFAULT_OUTPUT_TOKENS
            n = body.get("n")
            output *= n if isinstance(n, int) and n > 1 else 1
        return usd_to_nanos(prompt * in_rate + output * out_rate)

    @staticmethod
    def cost(exchange: Exchange) -> Decimal:
        """What the exchange cost, as the engine priced it (0 when unpriced or a cache hit)."""
        return exchange.cost_usd if exchange.cost_usd is not None else Decimal(0)

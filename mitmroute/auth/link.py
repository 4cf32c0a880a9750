"""The auth path's connection to Redis: fast failure, a circuit breaker, and data-loss repair.

Every command runs under `timeout` (40 ms) with no redis-py retry loop. A dead Redis (refused)
fails a call at once; a hung one after the budget plus a 40 ms PING on a dedicated connection
(:meth:`RedisLink.call`), so a key decision waits at most about 100 ms. Then the breaker opens:
calls raise :class:`RedisDown` at once, without touching the network, and a watcher PINGs Redis
every `interval` seconds. When Redis answers again the breaker closes and this proxy's state is
pushed back (:meth:`RedisLink.resync`).

Data loss (a restart without persistence, a FLUSHALL, a failover to an empty replica) is seen
through the epoch key ``<namespace>:auth:epoch``: the first proxy to find it missing sets a new
random value, and every proxy whose remembered epoch differs pushes its keys and spend back
(the watcher checks once per `interval`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from mitmroute.redis_client import Breaker

log = logging.getLogger("mitmroute.auth")

T = TypeVar("T")

TIMEOUT = 0.04
"""Per command on the request path."""
THRESHOLD = 1
"""A call that fails while Redis answers no PING either is enough to go local."""
INTERVAL = 0.25
PROBE_TIMEOUT = 1.0
"""Per command off the request path (probes, resync)."""

_EPOCH = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""


class RedisDown(Exception):
    """Redis did not answer in time, or is known to be down (breaker open)."""


class RedisLink:
    def __init__(
        self,
        client: Any,
        namespace: str = "mitmroute",
        *,
        label: str = "redis",
        timeout: float = TIMEOUT,
        threshold: int = THRESHOLD,
        interval: float = INTERVAL,
        probe_timeout: float = PROBE_TIMEOUT,
        watch: bool = True,
    ) -> None:
        self.client = client
        self.watch = watch
        """Run the watcher (probe, data-loss check); off for a bare store in tests."""
        self.label = label
        self.timeout = timeout
        self.interval = interval
        self.probe_timeout = probe_timeout
        self.breaker = Breaker(threshold)
        self.epoch_key = f"{namespace}:auth:epoch"
        self.epoch: str | None = None
        """The epoch this proxy last pushed its state into; None before the first push."""
        self.resync_hooks: list[Callable[[], Awaitable[None]]] = []
        """Push this proxy's whole state (after data loss, or when Redis is back)."""
        self.tick_hooks: list[Callable[[], Awaitable[None]]] = []
        """Write what failed to be written (each `interval` while Redis is up)."""
        self._epoch = client.register_script(_EPOCH)
        self._watcher: asyncio.Task[None] | None = None
        self._resyncing: asyncio.Task[None] | None = None
        self._closed = False
        self._answered_at = 0.0
        """When Redis last answered a call (monotonic); 0 = never yet (a cold pool)."""
        self._ping: asyncio.Task[bool] | None = None
        self._conn: Any = None

    @property
    def up(self) -> bool:
        return not self.breaker.is_open

    async def call(self, op: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        """`await op()` within the time budget; :class:`RedisDown` on any failure.

        A call still waiting when its budget is spent fails, and opens the breaker, only if
        Redis is not answering: no other call answered in the last budget and a PING on a
        connection of its own gets no answer within another budget either. Otherwise the call
        is only queued behind others on a busy proxy (or a cold pool): it goes on waiting, one
        budget at a time while Redis keeps answering, up to `probe_timeout` in all.
        """
        self.start()
        if self.breaker.is_open:
            raise RedisDown(f"redis at {self.label} is down")
        budget = timeout or self.timeout
        started = time.monotonic()
        task = asyncio.ensure_future(op())
        try:
            await asyncio.wait({task}, timeout=budget)
            if not task.done() and not await self._finish(task, started, budget):
                raise TimeoutError(f"no answer in {(time.monotonic() - started) * 1000:.0f} ms")
            result = task.result()
        except Exception as e:
            if _answered(e):  # Redis answered: an error, not an outage
                raise RedisDown(f"redis at {self.label}: {e}") from e
            self._failed(e)
            raise RedisDown(f"redis at {self.label}: {type(e).__name__}: {e}") from e
        finally:
            if not task.done():
                task.cancel()
        self._answered_at = time.monotonic()
        self.breaker.success()
        return result

    async def _finish(self, task: asyncio.Future[Any], started: float, budget: float) -> bool:
        """Let a late call go on, one budget at a time, while Redis shows it is alive; done
        before `probe_timeout`?"""
        deadline = started + max(budget, self.probe_timeout)
        while True:
            for _ in range(3):  # a reply already read lets the task finish at once
                await asyncio.sleep(0)
                if task.done():
                    return True
            now = time.monotonic()
            if now >= deadline:
                return False
            last = self._answered_at
            answering = last == 0.0 or (last > started and now - last < budget)
            if not answering and not await self._alive():
                return False
            await asyncio.wait({task}, timeout=max(0.0, min(budget, deadline - now)))
            if task.done():
                return True

    async def _alive(self) -> bool:
        """Does Redis answer a PING within `timeout`? (One PING at a time, shared.)"""
        ping = self._ping
        if ping is None or ping.done():
            ping = self._ping = asyncio.get_running_loop().create_task(self._ping_once())
        waited = time.monotonic()
        await asyncio.wait({ping}, timeout=self.timeout)
        late = time.monotonic() - waited - self.timeout
        if not ping.done() and late > self.timeout:
            # The event loop itself ran late (a proxy under load), so the PING had no fair
            # chance: give it the time the loop lost before calling Redis down. An idle loop is
            # never late, so a hung Redis is still found within the budget.
            await asyncio.wait({ping}, timeout=late)
        return ping.done() and ping.result()

    async def _ping_once(self) -> bool:
        """PING on a connection of its own, so a busy pool does not delay the answer (a
        connection that a Redis restart broke is replaced once)."""
        for fresh in (self._conn is None, True):
            try:
                if self._conn is None:
                    self._conn = self.client.connection_pool.make_connection()
                await self._conn.send_command("PING")
                await self._conn.read_response()
            except Exception as e:
                log.debug("auth: redis ping failed (%s)", type(e).__name__)
                conn, self._conn = self._conn, None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.disconnect()
                if fresh or isinstance(e, TimeoutError):
                    return False
                continue
            self._answered_at = time.monotonic()
            return True
        return False

    def _failed(self, exc: BaseException) -> None:
        if not self.breaker.failure():
            log.debug("auth: redis call failed (%s: %s)", type(exc).__name__, exc)
            return
        log.warning(
            "auth: redis unavailable at %s (%s); virtual-key requests follow "
            "allow_requests_on_db_unavailable until it answers again",
            self.label,
            type(exc).__name__,
        )

    # --- the watcher ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the watcher (needs a running loop; the first call does it)."""
        if self.watch and self._watcher is None and not self._closed:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        await self._ping_once()  # opens the PING connection before it is needed
        while not self._closed:
            try:
                await self._check()
            except RedisDown:
                pass
            except Exception:
                log.exception("auth: redis watcher")
            await asyncio.sleep(self.interval)

    async def _check(self) -> None:
        if self.breaker.is_open:
            if not await self._probe():
                return
            down_for = time.monotonic() - self.breaker.opened_at
            self.breaker.close()
            log.warning("auth: redis back at %s after %.1f s", self.label, down_for)
            await self.resync()
            return
        current = await self.call(self._get_epoch, self.probe_timeout)
        if self.epoch is None or _text(current) != self.epoch:
            await self.resync()
        for hook in self.tick_hooks:
            await hook()

    async def _probe(self) -> bool:
        try:
            return await asyncio.wait_for(self._ping_once(), self.probe_timeout)
        except TimeoutError:
            return False

    async def resync(self) -> None:
        """Push this proxy's state into Redis under the current epoch (one at a time)."""
        if self._resyncing is None or self._resyncing.done():
            self._resyncing = asyncio.get_running_loop().create_task(self._resync())
        await asyncio.shield(self._resyncing)

    async def _resync(self) -> None:
        try:
            epoch = _text(await self.call(self._claim_epoch, self.probe_timeout))
            if self.epoch is not None and epoch != self.epoch:
                log.warning(
                    "auth: redis at %s lost its data; pushing keys and spend back", self.label
                )
            for hook in self.resync_hooks:
                await hook()
        except RedisDown as e:
            log.info("auth: redis resync postponed: %s", e)
            return
        except Exception:
            log.exception("auth: redis resync failed")
            return
        self.epoch = epoch

    def _get_epoch(self) -> Awaitable[Any]:
        return self.client.get(self.epoch_key)

    def _claim_epoch(self) -> Awaitable[Any]:
        return self._epoch(keys=[self.epoch_key], args=[uuid.uuid4().hex])

    async def close(self) -> None:
        self._closed = True
        for task in (self._watcher, self._resyncing, self._ping):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.disconnect()


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _answered(error: Exception) -> bool:
    """Redis answered the command with an error (a script's, a wrong type): not an outage."""
    from redis.exceptions import ResponseError  # loaded by then: the client raised it

    return isinstance(error, ResponseError)

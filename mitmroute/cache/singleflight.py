"""Single flight: identical requests in flight at the same time make one upstream call.

The first request for a key becomes the *leader*; requests with the same key that arrive before
it finishes become *followers* and wait for the leader's `publish()`. Followers then answer from
the shared result. If the leader finishes without publishing (error, client gone, cancelled) or
misses its deadline, the waiting followers are released with no result and each proceeds on its
own — a failing leader never makes its followers fail, and nobody waits longer than the deadline.

Scope: one flight table per process. Across processes that share a Redis cache, the leader of
each process's flight also takes part in `cache.shared_flight`: a short Redis lock per key, so
one process calls upstream and the others' leaders wait (bounded) for its stored answer and
hand it to their followers. That costs a miss one Redis round trip before the upstream call
and saves an upstream call per extra process; `on_release` tells the cache when a leader leaves
without publishing, so the lock can go at once.

Usage (the engine)::

    async with flights.flight(key) as f:
        if f.result is not None:
            ...answer from f.result...
        else:
            answer = ...call upstream...     # raise -> followers proceed on their own
            f.publish(answer)                # followers wake up now
            ...store it in the cache before leaving the block...

For a leader whose answer completes in a callback (streaming), use `join(key)` and call
`publish()` and then `release()` on the returned flight yourself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

DEFAULT_DEADLINE = 120.0


class _Call[T]:
    __slots__ = ("deadline", "future")

    def __init__(self, future: asyncio.Future[T | None], deadline: float) -> None:
        self.future = future
        self.deadline = deadline

    def resolve(self, value: T | None) -> None:
        if not self.future.done():
            self.future.set_result(value)


class Flight[T]:
    """One request's place in a flight: the leader, or a follower with (maybe) a result."""

    __slots__ = ("_call", "_owner", "key", "leader", "result")

    def __init__(
        self,
        owner: SingleFlight[T],
        key: str,
        *,
        call: _Call[T] | None = None,
        result: T | None = None,
    ) -> None:
        self._owner = owner
        self._call = call
        self.key = key
        self.leader = call is not None
        self.result = result
        """A copy of the leader's published answer; None when this request must call upstream."""

    def publish(self, value: T) -> None:
        """Hand the answer to every follower (leader only; a no-op for anyone else)."""
        if self._call is not None:
            self._call.resolve(value)

    def release(self) -> None:
        """Leave the flight; followers still waiting proceed on their own. Idempotent."""
        call, self._call = self._call, None
        if call is not None:
            published = call.future.done()
            call.resolve(None)
            self._owner._forget(self.key, call, published)


class SingleFlight[T]:
    """The in-process flight table, keyed by cache key."""

    def __init__(
        self,
        *,
        deadline: float = DEFAULT_DEADLINE,
        share: Callable[[T], T] | None = None,
        on_release: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.deadline = deadline
        self._share = share
        self._on_release = on_release
        """Called with (key, published) when a leader leaves its flight."""
        self._calls: dict[str, _Call[T]] = {}
        self.leaders = 0
        self.shared = 0
        self.alone = 0

    def __len__(self) -> int:
        return len(self._calls)

    async def join(self, key: str, *, deadline: float | None = None) -> Flight[T]:
        """Lead a new flight, or wait (bounded by the leader's deadline) for the current one."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        call = self._calls.get(key)
        if call is None or call.deadline <= now:
            if call is not None:
                call.resolve(None)  # a leader past its deadline: release its followers
            call = _Call(loop.create_future(), now + (deadline or self.deadline))
            self._calls[key] = call
            self.leaders += 1
            return Flight(self, key, call=call)
        if not call.future.done():
            await asyncio.wait((call.future,), timeout=call.deadline - now)
        value = call.future.result() if call.future.done() else None
        if value is None:
            self.alone += 1
            return Flight(self, key)
        self.shared += 1
        return Flight(self, key, result=self._share(value) if self._share else value)

    @asynccontextmanager
    async def flight(self, key: str, *, deadline: float | None = None) -> AsyncIterator[Flight[T]]:
        """`join` + `release` on exit, whatever happens inside."""
        f = await self.join(key, deadline=deadline)
        try:
            yield f
        finally:
            f.release()

    def _forget(self, key: str, call: _Call[T], published: bool) -> None:
        if self._calls.get(key) is call:
            del self._calls[key]
        if self._on_release is not None:
            self._on_release(key, published)

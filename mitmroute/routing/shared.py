"""Routing state several proxies share through Redis: each deployment's requests and tokens
this minute, and its recent latencies (what LiteLLM's router keeps in its Redis cache).

Keys, under the cache namespace (`cache_params.namespace`, default `mitmroute`):

- `<ns>:routing:usage:<minute>`: a hash, `<deployment id>:rpm` and `:tpm` -> count; expires
  after two minutes;
- `<ns>:routing:latency:<kind>:<deployment id>`: a list of seconds, newest first, trimmed to
  `max_latency_list_size`; expires `ttl` seconds after the last push;
- cooldowns: see `routing.shared_cooldowns` (same client and breaker).

Redis never fails or stalls a request: a call has a 100 ms budget and on any failure returns
None (the caller keeps its local state); writes go in the background. After `threshold`
failures in a row a breaker skips Redis altogether, PINGing it every `probe_interval` seconds
until it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mitmroute.redis_client import GuardedCalls, RedisTarget, connect

log = logging.getLogger("mitmroute.routing")

USAGE_TTL = 120
"""Seconds a minute's usage hash outlives its minute's start."""


class SharedState:
    def __init__(
        self,
        client: Any,
        namespace: str = "mitmroute",
        *,
        label: str = "redis",
        timeout: float = 0.1,
        probe_interval: float = 1.0,
        threshold: int = 3,
    ) -> None:
        self.client = client
        self.prefix = f"{namespace}:routing"
        self.label = label
        self.guard = GuardedCalls(
            client,
            label=label,
            timeout=timeout,
            probe_interval=probe_interval,
            probe_timeout=1.0,
            threshold=threshold,
            log=log,
            what="routing",
            while_down="routing on this proxy's own counts",
            when_back="sharing routing state again",
        )
        self.breaker = self.guard.breaker
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    def connect(cls, target: RedisTarget, namespace: str, **kwargs: Any) -> SharedState:
        client = connect(
            url=target.url, host=target.host, port=target.port, password=target.password
        )
        return cls(client, namespace, label=target.label, **kwargs)

    @property
    def available(self) -> bool:
        return not self.breaker.is_open

    async def start(self) -> None:
        """Warm one connection; an unreachable Redis opens the breaker at once."""
        await self.guard.warm()

    async def drain(self) -> None:
        """Wait for the writes under way."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.guard.close()
        with contextlib.suppress(Exception):
            await self.client.aclose()

    # --- reads --------------------------------------------------------------------------------

    async def read(
        self,
        minute: int,
        usage_ids: Sequence[str],
        latency_ids: Sequence[str],
        kinds: Sequence[str],
        size: int,
    ) -> tuple[dict[str, tuple[int, int]], dict[tuple[str, str], list[float]]] | None:
        """(requests, tokens) this minute per deployment id, and latency samples (newest first)
        per (id, kind), in one round trip; None when Redis can't say."""
        if not usage_ids and not latency_ids:
            return {}, {}
        lists = [(d, k) for d in latency_ids for k in kinds]

        async def op() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            if usage_ids:
                fields = [f"{d}:{n}" for d in usage_ids for n in ("rpm", "tpm")]
                pipe.hmget(self._usage_key(minute), fields)
            for deployment_id, kind in lists:
                pipe.lrange(self._latency_key(kind, deployment_id), 0, size - 1)
            return await pipe.execute()

        replies = await self.guard.call(op, None)
        if replies is None:
            return None
        try:
            usage: dict[str, tuple[int, int]] = {}
            if usage_ids:
                counts = [int(v or 0) for v in replies.pop(0)]
                for i, deployment_id in enumerate(usage_ids):
                    usage[deployment_id] = (counts[2 * i], counts[2 * i + 1])
            latencies = {
                key: [float(v) for v in values] for key, values in zip(lists, replies, strict=True)
            }
        except (ValueError, TypeError, IndexError) as exc:  # someone else's data under our keys
            log.debug("routing: unreadable shared state (%s)", exc)
            return None
        return usage, latencies

    # --- writes (in the background) -----------------------------------------------------------

    def add_usage(
        self, minute: int, deployment_id: str, requests: int = 0, tokens: int = 0
    ) -> None:
        key = self._usage_key(minute)

        async def op() -> None:
            pipe = self.client.pipeline(transaction=False)
            if requests:
                pipe.hincrby(key, f"{deployment_id}:rpm", requests)
            if tokens:
                pipe.hincrby(key, f"{deployment_id}:tpm", tokens)
            pipe.expire(key, USAGE_TTL)
            await pipe.execute()

        if requests or tokens:
            self.background(op)

    def add_latency(
        self, deployment_id: str, kind: str, seconds: float, ttl: float, size: int
    ) -> None:
        key = self._latency_key(kind, deployment_id)

        async def op() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.lpush(key, repr(seconds))
            pipe.ltrim(key, 0, size - 1)
            pipe.expire(key, max(1, math.ceil(ttl)))
            await pipe.execute()

        self.background(op)

    # --- plumbing -----------------------------------------------------------------------------

    def _usage_key(self, minute: int) -> str:
        return f"{self.prefix}:usage:{minute}"

    def _latency_key(self, kind: str, deployment_id: str) -> str:
        return f"{self.prefix}:latency:{kind}:{deployment_id}"

    def background(self, op: Callable[[], Awaitable[Any]]) -> None:
        """Run `op` under the guard without waiting for it (nothing when the breaker is open)."""
        if self.breaker.is_open:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): nothing to share with
        task = loop.create_task(self.guard.call(op, None))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

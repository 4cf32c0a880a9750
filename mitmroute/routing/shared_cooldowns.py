"""Cooldowns shared by every proxy on one Redis: when one proxy rests a deployment, the others
rest it too, until the same moment.

Under the cache namespace (`cache_params.namespace`, default `mitmroute`):

- channel `<ns>:routing:cooldowns`: each new cooldown as JSON `{"d": deployment id, "u": end
  (ms since the Unix epoch), "s": seconds, "r": reason, "o": the proxy that decided}`; every
  proxy subscribes and adopts it (`Cooldowns.adopt`) as soon as it arrives;
- `<ns>:routing:cooldown:<deployment id>`: the same JSON, expiring when the rest ends (PXAT), so
  a proxy that starts, or resubscribes after an outage, reads what it missed (one MGET of its
  own deployments' keys).

Deciding stays local (this proxy's failures and `allowed_fails`); only the decision travels.
Publishing is one background script call (set the key unless it already ends later, then
PUBLISH), so no request waits on Redis: `Cooldowns.cooling()` stays a dict lookup. The end is a
wall-clock instant (on several hosts, keep their clocks in NTP sync); a proxy never rests a
deployment longer than the cooldown's own length, whatever its clock says. A proxy that adopts
a cooldown neither counts nor alerts it: the one that decided does. Redis down: each proxy cools
on its own failures, exactly as without Redis, at no cost; the subscription comes back by itself
and catches up from the keys.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from mitmroute.redis_client import Subscription
from mitmroute.routing.cooldown import Cooldowns
from mitmroute.routing.shared import SharedState

log = logging.getLogger("mitmroute.routing")

PUBLISH_IF_LATER = """
local held = redis.call('GET', KEYS[1])
if held then
  local ok, doc = pcall(cjson.decode, held)
  if ok and type(doc) == 'table' and tonumber(doc.u) and tonumber(doc.u) >= tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
"""
"""KEYS[1] the deployment's key; ARGV: end (ms since the epoch), message, channel."""


class SharedCooldowns:
    """Publishes this proxy's cooldowns and adopts the other proxies'."""

    def __init__(
        self,
        shared: SharedState,
        cooldowns: Cooldowns,
        deployment_ids: Iterable[str],
        *,
        wall: Callable[[], float] = time.time,
        retry_interval: float = 1.0,
    ) -> None:
        self.shared = shared
        self.cooldowns = cooldowns
        self.deployment_ids = sorted(set(deployment_ids))
        self.origin = uuid.uuid4().hex[:12]
        """This proxy, so it skips its own messages."""
        self.wall = wall
        self.channel = f"{shared.prefix}:cooldowns"
        self.adopted = 0
        """Cooldowns taken over from other proxies."""
        self._script = shared.client.register_script(PUBLISH_IF_LATER)
        self.subscription = Subscription(
            shared.client,
            [self.channel],
            self._received,
            on_connect=self.catch_up,
            retry_interval=retry_interval,
            log=log,
        )
        cooldowns.listeners.append(self.publish)

    def start(self) -> None:
        self.subscription.start()

    async def close(self) -> None:
        await self.subscription.close()

    def key(self, deployment_id: str) -> str:
        return f"{self.shared.prefix}:cooldown:{deployment_id}"

    def publish(self, deployment_id: str, seconds: float, reason: str) -> None:
        """A `Cooldowns` listener: tell the other proxies (in the background)."""
        end_ms = round((self.wall() + seconds) * 1000)
        message = json.dumps(
            {"d": deployment_id, "u": end_ms, "s": seconds, "r": reason, "o": self.origin},
            separators=(",", ":"),
        )
        key = self.key(deployment_id)

        async def op() -> Any:
            return await self._script(keys=[key], args=[end_ms, message, self.channel])

        self.shared.background(op)

    async def catch_up(self) -> None:
        """Adopt the cooldowns still running for this config's deployments (after subscribing,
        so nothing published meanwhile is missed)."""
        if not self.deployment_ids:
            return
        keys = [self.key(d) for d in self.deployment_ids]
        values = await self.shared.guard.call(lambda: self.shared.client.mget(keys), None)
        for value in values or ():
            if value is not None:
                self._apply(value, caught_up=True)

    def _received(self, channel: str, data: bytes) -> None:
        self._apply(data, caught_up=False)

    def _apply(self, data: bytes, *, caught_up: bool) -> None:
        try:
            doc = json.loads(data)
            deployment_id, end_ms, seconds = str(doc["d"]), int(doc["u"]), float(doc["s"])
            origin, reason = doc.get("o"), str(doc.get("r") or "")
        except (ValueError, KeyError, TypeError) as exc:
            log.debug("routing: unreadable shared cooldown (%s)", exc)
            return
        if deployment_id not in self.deployment_ids or (origin == self.origin and not caught_up):
            return
        left = min(seconds, end_ms / 1000 - self.wall())
        if self.cooldowns.adopt(deployment_id, left):
            self.adopted += 1
            log.info(
                "deployment %s cooling down for %.1fs (%s, decided by another proxy)",
                deployment_id,
                left,
                reason,
            )

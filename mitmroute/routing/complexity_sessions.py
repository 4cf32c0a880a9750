"""Session stickiness for complexity routers: an agent conversation never drops to a lower tier
within its TTL.

**Which conversation.** A request names its conversation by a session header (the router's
`session_headers`: `x-session-id`, `session_id`, Codex's `session-id`, Claude Code's
`x-claude-code-session-id`) or `metadata.session_id`; else by its first messages (the system
prompt and the first user turn, which a client re-sends with every turn). A conversation found
by its first messages starts afresh on its first turn (no assistant message yet), so a new chat
that opens like an old one does not inherit the old one's tier. Keys are scoped by the caller's
key hash and the router: another key can't raise (and so spend on) your session.

**Where.** In this process (an LRU of `MAX_LOCAL` sessions, idle TTL), and in Redis too when the
config has one (`router_settings.redis_host`/`redis_url` or a Redis cache): one Lua script
raises the stored tier and refreshes its TTL atomically, so every proxy on that Redis agrees.
Each call is bounded (50 ms) and behind a breaker (see `mitmroute.cache.redis_store`): Redis
down, slow or flushed never fails a request, it only leaves stickiness to this process.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mitmroute.cache.redis_store import RedisStore

MAX_LOCAL = 100_000
_HEAD = 4000
"""Characters of the system prompt and first user turn (from each end) that name a
conversation: enough to tell conversations apart, cheap on a 50 KB agent prompt."""

_RAISE = """
local v = tonumber(redis.call('GET', KEYS[1]) or '-1')
local t = tonumber(ARGV[1])
if ARGV[3] == '1' or t > v then v = t end
redis.call('SET', KEYS[1], v, 'PX', ARGV[2])
return v
"""


@dataclass(frozen=True, slots=True)
class SessionKey:
    digest: str
    fresh: bool
    """The first turn of a conversation recognised by its first messages: its record starts
    anew instead of inheriting."""
    source: str
    """`header` or `conversation`."""


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "".join(
            p.get("text", "") if isinstance(p, dict) and isinstance(p.get("text"), str) else ""
            for p in content
        )
    else:
        text = ""
    return text if len(text) <= 2 * _HEAD else f"{text[:_HEAD]}{len(text)}{text[-_HEAD:]}"


def session_key(
    router: str,
    scope: str | None,
    headers: Mapping[str, str],
    body: Mapping[str, Any],
    header_names: tuple[str, ...],
) -> SessionKey | None:
    """The conversation a request belongs to, or None (a single prompt with no session)."""
    named = next((headers[h] for h in header_names if headers.get(h)), None)
    metadata = body.get("metadata")
    if named is None and isinstance(metadata, dict) and isinstance(metadata.get("session_id"), str):
        named = metadata["session_id"] or None
    h = hashlib.sha256(f"{router}\0{scope or ''}\0".encode())
    if named is not None:
        h.update(b"h\0" + named.encode())
        return SessionKey(h.hexdigest()[:40], False, "header")
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    first_user, history = None, False
    h.update(b"c\0")
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if first_user is None and role in ("system", "developer"):
            h.update(_content(message).encode() + b"\0")
        elif role == "user" and first_user is None:
            first_user = message
        elif role == "assistant":
            history = True
            break
    if first_user is None:
        return None
    h.update(_content(first_user).encode())
    return SessionKey(h.hexdigest()[:40], not history, "conversation")


class _RedisTiers(RedisStore):
    """The shared record: one atomic raise-and-refresh per request (bounded, breaker)."""

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._script = client.register_script(_RAISE)

    async def raise_to(self, key: str, tier: int, ttl: float, fresh: bool) -> int | None:
        px = max(1, int(ttl * 1000))
        value = await self.guard.call(
            lambda: self._script(keys=[key], args=[tier, px, "1" if fresh else "0"]), None
        )
        return int(value) if value is not None else None


class SessionTiers:
    """The highest tier each live session reached; in-process, and in Redis when given."""

    def __init__(
        self,
        redis: _RedisTiers | None = None,
        namespace: str = "mitmroute",
        clock: Any = time.monotonic,
    ) -> None:
        self.redis = redis
        self.namespace = namespace
        self._clock = clock
        self._local: OrderedDict[str, tuple[int, float]] = OrderedDict()

    @classmethod
    def connect(cls, target: Any, namespace: str) -> SessionTiers:
        """With a `mitmroute.auth.RedisTarget` (or None: this process only)."""
        if target is None:
            return cls(namespace=namespace)
        from mitmroute.redis_client import connect

        client = connect(
            url=target.url, host=target.host, port=target.port, password=target.password
        )
        return cls(_RedisTiers(client, label=f"{target.label} (tier sessions)"), namespace)

    async def start(self) -> None:
        if self.redis is not None:
            await self.redis.start()

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()

    async def hold(self, key: SessionKey, tier: int, ttl: float) -> int:
        """Record that the session reached `tier`; return the highest tier it holds now (just
        `tier` on a fresh conversation)."""
        now = self._clock()
        held = tier
        if not key.fresh:
            entry = self._local.get(key.digest)
            if entry is not None and entry[1] > now:
                held = max(held, entry[0])
        if self.redis is not None:
            shared = await self.redis.raise_to(
                f"{self.namespace}:tier-session:{key.digest}", held, ttl, key.fresh
            )
            if shared is not None:
                held = max(held, shared)
        self._local[key.digest] = (held, now + ttl)
        self._local.move_to_end(key.digest)
        while len(self._local) > MAX_LOCAL:
            self._local.popitem(last=False)
        return held

"""Stored responses: what `previous_response_id`, `GET` and `DELETE /v1/responses/{id}` need.

A response created with `store` (OpenAI's default) is kept with its whole input (the items of
every turn before it, then its own) and its output, so a later request continues the
conversation from it alone, whatever happened to older responses since.

Where: an in-process LRU bounded by count and bytes (`LOCAL_MAX_ENTRIES`, `LOCAL_MAX_BYTES`);
with a Redis response cache in the config (`cache_params.type: redis`), Redis, shared by every
proxy on it, under `<namespace>:response:<id>`; the local LRU then only holds what Redis has not
(yet) taken, so a Redis outage loses nothing this proxy stored meanwhile. For how long: `TTL`
(24 h) after creation, in both. Entries are JSON, zlib-compressed over `COMPRESS_OVER` bytes; one
larger than `MAX_ENTRY_BYTES` after compression is not stored (a warning says so).

Each entry records the key (its sha256) that created it: only requests with the same key see it.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mitmroute.cache.local import LocalStore

log = logging.getLogger("mitmroute.responses")

TTL = 24 * 3600.0
LOCAL_MAX_ENTRIES = 10_000
LOCAL_MAX_BYTES = 64 * 1024 * 1024
MAX_ENTRY_BYTES = 8 * 1024 * 1024
COMPRESS_OVER = 4096


@dataclass(slots=True)
class StoredResponse:
    response: dict[str, Any]
    """The `response` object as it was answered."""
    input: list[dict[str, Any]]
    """Every input item the model saw (previous turns first), as items with ids."""
    owner: str | None
    """sha256 of the key that created it (None: created without a key)."""

    @property
    def context(self) -> list[dict[str, Any]]:
        """What a request continuing from this response starts from: its input, then output."""
        return [*self.input, *self.response.get("output", [])]

    def to_bytes(self) -> bytes:
        doc = {"v": 1, "response": self.response, "input": self.input, "owner": self.owner}
        data = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        return zlib.compress(data, 3) if len(data) > COMPRESS_OVER else data

    @classmethod
    def from_bytes(cls, data: bytes) -> StoredResponse:
        doc = json.loads(data if data[:1] == b"{" else zlib.decompress(data))
        return cls(doc["response"], doc["input"], doc.get("owner"))


def local_store(clock: Callable[[], float] = time.monotonic) -> LocalStore:
    """The in-process LRU, with the bounds above."""
    return LocalStore(max_entries=LOCAL_MAX_ENTRIES, max_bytes=LOCAL_MAX_BYTES, clock=clock)


class Remote(Protocol):
    """A shared byte store (`mitmroute.cache.RedisStore`): bounded, never raises."""

    async def get(self, key: str) -> bytes | None: ...
    async def put(self, key: str, value: bytes, ttl: float | None) -> bool: ...
    async def delete(self, *keys: str) -> int: ...


class ResponseStore:
    """Stored responses by id, in the local LRU and, when there is one, a shared Remote."""

    def __init__(
        self, local: LocalStore, remote: Remote | None = None, *, namespace: str = "mitmroute"
    ) -> None:
        self.local = local
        self.remote = remote
        self.prefix = f"{namespace}:response:"

    @staticmethod
    def new_local(**kwargs: Any) -> LocalStore:
        return LocalStore(
            max_entries=kwargs.get("max_entries", LOCAL_MAX_ENTRIES),
            max_bytes=kwargs.get("max_bytes", LOCAL_MAX_BYTES),
            **({"clock": kwargs["clock"]} if "clock" in kwargs else {}),
        )

    async def put(self, stored: StoredResponse) -> bool:
        """Keep `stored` for TTL seconds; False when it is too large to keep."""
        rid = stored.response["id"]
        data = stored.to_bytes()
        if len(data) > MAX_ENTRY_BYTES:
            log.warning("responses: %s not stored: %d bytes compressed", rid, len(data))
            return False
        if not self.local.put_now(rid, data, TTL):
            return False
        if self.remote is not None and await self.remote.put(self.prefix + rid, data, TTL):
            self.local.delete_now(rid)  # Redis has it: one copy, which DELETE reaches
        return True

    async def get(self, rid: str, owner: str | None) -> StoredResponse | None:
        """The response `rid`, if it is stored and was created with the key `owner`."""
        data = None
        if self.remote is not None:
            data = await self.remote.get(self.prefix + rid)
        if data is None:
            data = self.local.get_now(rid)
        if data is None:
            return None
        try:
            stored = StoredResponse.from_bytes(data)
        except (ValueError, KeyError, TypeError, zlib.error):
            log.warning("responses: stored %s is unreadable", rid)
            return None
        return stored if stored.owner == owner else None

    async def delete(self, rid: str, owner: str | None) -> bool:
        """Forget `rid`; False when there was no such response (for this key)."""
        if await self.get(rid, owner) is None:
            return False
        self.local.delete_now(rid)
        if self.remote is not None:
            await self.remote.delete(self.prefix + rid)
        return True

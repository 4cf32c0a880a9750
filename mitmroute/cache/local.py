"""In-process LRU of serialized answers, bounded by entry count and bytes, with TTL expiry."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

ENTRY_OVERHEAD = 64
"""Bytes charged per entry on top of key and value, so tiny entries still count."""


class LocalStore:
    """A byte store: `get`/`put` of `bytes` values; everything runs inline on the event loop.

    Expired entries are dropped when read, or evicted as least recently used. Sizes are charged as
    `len(key) + len(value) + ENTRY_OVERHEAD`.
    """

    name = "local"

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    async def start(self) -> None:
        """Nothing to connect."""

    async def close(self) -> None:
        self.clear()

    async def get(self, key: str) -> bytes | None:
        return self.get_now(key)

    async def put(self, key: str, value: bytes, ttl: float | None) -> bool:
        return self.put_now(key, value, ttl)

    def get_now(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self._clock():
            self._remove(key)
            return None
        self._items.move_to_end(key)
        return value

    def put_now(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Store `value`; False when it cannot fit at all."""
        size = self._size(key, value)
        if size > self.max_bytes or self.max_entries <= 0:
            return False
        if key in self._items:
            self._remove(key)
        expires = self._clock() + ttl if ttl is not None else float("inf")
        self._items[key] = (expires, value)
        self._bytes += size
        self._make_room()
        return True

    def delete_now(self, key: str) -> bool:
        """Remove `key`; False when it was not there."""
        if key not in self._items:
            return False
        self._remove(key)
        return True

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def _make_room(self) -> None:
        # Least recently used first; expired entries nobody reads drift to the front.
        while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
            key = next(iter(self._items))
            self._remove(key)
            self.evictions += 1

    def _remove(self, key: str) -> None:
        _, value = self._items.pop(key)
        self._bytes -= self._size(key, value)

    @staticmethod
    def _size(key: str, value: bytes) -> int:
        return len(key) + len(value) + ENTRY_OVERHEAD

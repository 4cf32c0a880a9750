"""Reads usage off a stream that passes through unrouted, without changing or holding it."""

from __future__ import annotations

import contextlib
import json

from mitmroute.exchange import Exchange, Usage
from mitmroute.streaming.sse import SSEParser


class PassthroughTap:
    """Watches a passed-through stream go by (unchanged) to read its usage for the spend log."""

    __slots__ = ("exchange", "parser", "usage")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.parser = SSEParser()
        self.usage: Usage | None = None

    def observe(self, data: bytes) -> bytes:
        for event in self.parser.feed(data) if data else self.parser.finish():
            if '"usage"' in event.data:
                with contextlib.suppress(ValueError, TypeError):
                    self.usage = (
                        Usage.from_openai(json.loads(event.data).get("usage")) or self.usage
                    )
        return data

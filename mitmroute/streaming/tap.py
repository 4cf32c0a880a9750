"""Reads usage off a stream that passes through unrouted, without changing or holding it."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from mitmroute.exchange import Exchange, Usage
from mitmroute.streaming.sse import SSEParser


class PassthroughTap:
    """Watches a passed-through stream go by (unchanged) to read its usage for the spend log:
    OpenAI's usage chunk, or Anthropic's counts spread over `message_start` and
    `message_delta` (for a Messages request, spend-log endpoint `messages`)."""

    __slots__ = ("_counts", "exchange", "parser", "usage")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.parser = SSEParser()
        self.usage: Usage | None = None
        self._counts: dict[str, Any] | None = {} if exchange.endpoint == "messages" else None

    def observe(self, data: bytes) -> bytes:
        for event in self.parser.feed(data) if data else self.parser.finish():
            if '"usage"' in event.data:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    self.usage = self._usage(json.loads(event.data)) or self.usage
        return data

    def _usage(self, data: dict[str, Any]) -> Usage | None:
        if self._counts is None:
            return Usage.from_openai(data.get("usage"))
        usage = data.get("usage") or (data.get("message") or {}).get("usage") or {}
        self._counts.update({k: v for k, v in usage.items() if isinstance(v, int)})
        return Usage.from_anthropic(self._counts)

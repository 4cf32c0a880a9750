"""Server-sent events as the WHATWG spec reads them, for checking streams byte for byte."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    event: str | None
    """The `event:` field; None when the event had none (OpenAI's chat streams)."""
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


def parse_sse(raw: bytes | str) -> list[Event]:
    """Every event of a stream: `data:` lines joined by newlines, comments and `id:`/`retry:`
    ignored, an event dispatched at a blank line (one still open at the end is dropped, as a
    browser would)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    events: list[Event] = []
    name: str | None = None
    data: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line:
            if data:
                events.append(Event(name, "\n".join(data)))
            name, data = None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
    return events


def openai_chunks(raw: bytes | str) -> tuple[list[Any], bool]:
    """An OpenAI-style stream (`data: {...}` ... `data: [DONE]`): its JSON payloads, and
    whether it ended with [DONE] (and nothing after it)."""
    events = parse_sse(raw)
    done = bool(events) and events[-1].data == "[DONE]"
    payloads = [e.json() for e in events if e.data != "[DONE]"]
    if any(e.data == "[DONE]" for e in events[:-1]):
        done = False
    return payloads, done

"""A stream of chat completion chunks as the Responses API's stream of events.

`EventWriter` is pure: chunks in, event dicts out, each with its `sequence_number`. It opens an
output item when its first delta arrives (reasoning, a message with output_text or refusal
parts, a function_call or custom_tool_call per tool call) and closes a reasoning item or a
message when another kind of item begins; tool calls stay open (a backend may interleave their
arguments) until the answer ends. Then every item is closed and `response.completed` (or
`response.incomplete`, after `length` or `content_filter`) carries the whole response. A
failure mid-stream ends with an `error` event and `response.failed`.

`stream_events` drives it over the engine's SSE bytes as they arrive, never holding the stream;
only a custom tool's input is sent whole when its call ends (the backend streams it as JSON).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mitmroute.exchange import Exchange, Usage
from mitmroute.inbound.responses.answer import (
    Draft,
    call_item,
    call_item_id,
    custom_input,
    message_item,
    output_text,
    reasoning_item,
    reasoning_text,
    status_of,
)
from mitmroute.inbound.responses.request import Item, ToolSpec, ToolTable, new_id
from mitmroute.streaming.sse import SSEParser

Event = dict[str, Any]

DELTA = {
    "output_text": "response.output_text.delta",
    "refusal": "response.refusal.delta",
    "reasoning_text": "response.reasoning_text.delta",
}
DONE = {
    "output_text": "response.output_text.done",
    "refusal": "response.refusal.done",
    "reasoning_text": "response.reasoning_text.done",
}


@dataclass(slots=True)
class _Text:
    """An open message or reasoning item: its parts as (type, text)."""

    kind: str
    index: int
    id: str
    parts: list[list[str]] = field(default_factory=list)

    def where(self) -> dict[str, Any]:
        """Where the current part is: item id, output index, content index."""
        return {
            "item_id": self.id,
            "output_index": self.index,
            "content_index": len(self.parts) - 1,
        }

    def item(self, status: str) -> Item:
        if self.kind == "reasoning":
            return reasoning_item(self.id, "".join(t for _, t in self.parts), status)
        return message_item(self.id, [_part(kind, text) for kind, text in self.parts], status)


@dataclass(slots=True)
class _Call:
    """A tool call: announced once its name is known."""

    call_id: str = ""
    name: str = ""
    arguments: str = ""
    pending: str = ""
    index: int = -1
    id: str = ""
    spec: ToolSpec | None = None

    def item(self, status: str) -> Item:
        assert self.spec is not None
        return call_item(self.spec, self.id, self.call_id, self.arguments, status)


def _part(kind: str, text: str) -> dict[str, Any]:
    if kind == "output_text":
        return output_text(text)
    if kind == "refusal":
        return {"type": "refusal", "refusal": text}
    return {"type": "reasoning_text", "text": text}


class EventWriter:
    """Responses stream events for one answer, from its chat completion chunks."""

    def __init__(self, draft: Draft, tools: ToolTable) -> None:
        self.draft = draft
        self.tools = tools
        self.sequence = 0
        self.output: dict[int, Item] = {}
        """Closed items by output index."""
        self.final: dict[str, Any] | None = None
        """The response of the last event (completed, incomplete or failed)."""
        self.finish_reason: str | None = None
        self._text: _Text | None = None
        self._calls: dict[int, _Call] = {}
        self._next = 0

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return event

    def start(self) -> list[Event]:
        response = self.draft.response("in_progress", [])
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        out: list[Event] = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if thought := reasoning_text(delta):
                out += self._delta("reasoning", "reasoning_text", thought)
            if isinstance(delta.get("content"), str) and delta["content"]:
                out += self._delta("message", "output_text", delta["content"])
            if isinstance(delta.get("refusal"), str) and delta["refusal"]:
                out += self._delta("message", "refusal", delta["refusal"])
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    out += self._call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return out

    def complete(self, usage: Usage | None) -> list[Event]:
        """Close every item; `response.completed`, or `response.incomplete`."""
        status, reason = status_of(self.finish_reason)
        item_status = "completed" if status == "completed" else "incomplete"
        out = self._close_text(item_status)
        for call in sorted(self._calls.values(), key=lambda c: c.index):
            out += self._close_call(call, item_status)
        output = [self.output[i] for i in sorted(self.output)]
        self.final = self.draft.response(status, output, usage=usage, incomplete=reason)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return [*out, self._event(kind, response=self.final)]

    def fail(self, message: str, code: str | None, usage: Usage | None) -> list[Event]:
        """An `error` event and `response.failed`, with the output so far."""
        items = dict(self.output)
        if self._text is not None:
            items[self._text.index] = self._text.item("incomplete")
        for call in self._calls.values():
            if call.spec is not None and call.index not in items:
                items[call.index] = call.item("incomplete")
        output = [items[i] for i in sorted(items)]
        error = {
            "code": "rate_limit_exceeded" if code == "rate_limit_exceeded" else "server_error",
            "message": message,
        }
        self.final = self.draft.response("failed", output, usage=usage, error=error)
        return [
            self._event("error", code=code, message=message, param=None),
            self._event("response.failed", response=self.final),
        ]

    # --- text: messages and reasoning ---------------------------------------------------------

    def _delta(self, kind: str, part: str, delta: str) -> list[Event]:
        out: list[Event] = []
        text = self._text
        if text is not None and text.kind != kind:
            out += self._close_text("completed")
            text = None
        if text is None:
            text = self._text = _Text(
                kind, self._index(), new_id("msg" if kind == "message" else "rs")
            )
            item = text.item("in_progress")
            out.append(
                self._event("response.output_item.added", output_index=text.index, item=item)
            )
        if not text.parts or text.parts[-1][0] != part:
            out += self._close_part(text)
            text.parts.append([part, ""])
            added = self._event("response.content_part.added", **text.where(), part=_part(part, ""))
            out.append(added)
        text.parts[-1][1] += delta
        where = text.where()
        extra = {"logprobs": []} if part == "output_text" else {}
        out.append(self._event(DELTA[part], **where, delta=delta, **extra))
        return out

    def _close_part(self, text: _Text) -> list[Event]:
        if not text.parts:
            return []
        kind, value = text.parts[-1]
        where = text.where()
        if kind == "refusal":
            done = self._event(DONE[kind], **where, refusal=value)
        elif kind == "output_text":
            done = self._event(DONE[kind], **where, text=value, logprobs=[])
        else:
            done = self._event(DONE[kind], **where, text=value)
        return [done, self._event("response.content_part.done", **where, part=_part(kind, value))]

    def _close_text(self, status: str) -> list[Event]:
        text, self._text = self._text, None
        if text is None:
            return []
        out = self._close_part(text)
        item = self.output[text.index] = text.item(status)
        out.append(self._event("response.output_item.done", output_index=text.index, item=item))
        return out

    # --- tool calls ------------------------------------------------------------------------

    def _call(self, delta: dict[str, Any]) -> list[Event]:
        call = self._calls.setdefault(int(delta.get("index") or 0), _Call())
        if isinstance(delta.get("id"), str) and delta["id"] and not call.call_id:
            call.call_id = delta["id"]
        fn = delta.get("function") or {}
        if isinstance(fn.get("name"), str) and call.spec is None:
            call.name += fn["name"]
        if isinstance(fn.get("arguments"), str):
            call.pending += fn["arguments"]
        out: list[Event] = []
        if call.spec is None and call.name:
            out += self._announce(call)
        if call.spec is not None and call.pending:
            if call.spec.kind == "function":
                out.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=call.id,
                        output_index=call.index,
                        delta=call.pending,
                    )
                )
            call.arguments += call.pending
            call.pending = ""
        return out

    def _announce(self, call: _Call) -> list[Event]:
        out = self._close_text("completed")
        call.spec = self.tools.spec(call.name)
        call.id, call.index = call_item_id(call.spec), self._index()
        call.call_id = call.call_id or new_id("call")
        item = call_item(call.spec, call.id, call.call_id, "", "in_progress")
        out.append(self._event("response.output_item.added", output_index=call.index, item=item))
        return out

    def _close_call(self, call: _Call, status: str) -> list[Event]:
        out = self._announce(call) if call.spec is None else []
        assert call.spec is not None
        call.arguments += call.pending
        call.pending = ""
        where = {"item_id": call.id, "output_index": call.index}
        if call.spec.kind == "custom":
            text = custom_input(call.arguments)
            out.append(self._event("response.custom_tool_call_input.delta", **where, delta=text))
            out.append(self._event("response.custom_tool_call_input.done", **where, input=text))
        else:
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    **where,
                    name=call.spec.name,
                    arguments=call.arguments,
                )
            )
        item = self.output[call.index] = call.item(status)
        out.append(self._event("response.output_item.done", output_index=call.index, item=item))
        return out

    def _index(self) -> int:
        self._next += 1
        return self._next - 1


def encode(events: list[Event]) -> bytes:
    """`event: <type>` / `data: <json>` blocks, as OpenAI sends them."""
    return b"".join(
        b"event: %s\ndata: %s\n\n"
        % (e["type"].encode(), json.dumps(e, separators=(",", ":")).encode())
        for e in events
    )


class _ChatReader:
    """The engine's chat SSE bytes, parsed: chunks go to the writer; `[DONE]` and an error
    event are noted."""

    def __init__(self, writer: EventWriter) -> None:
        self.writer = writer
        self.parser = SSEParser()
        self.done = False
        self.error: dict[str, Any] | None = None

    def read(self, data: bytes, *, last: bool = False) -> list[Event]:
        events = self.parser.feed(data) + (self.parser.finish() if last else [])
        out: list[Event] = []
        for event in events:
            if self.error is not None or self.done:
                break
            if event.data == "[DONE]":
                self.done = True
                continue
            try:
                chunk = json.loads(event.data)
            except ValueError:
                chunk = {
                    "error": {"message": "unreadable stream data", "code": "bad_upstream_stream"}
                }
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                error = chunk["error"]
                self.error = error if isinstance(error, dict) else {"message": str(error)}
                break
            out += self.writer.feed(chunk)
        return out


async def stream_events(
    chunks: AsyncIterator[bytes],
    writer: EventWriter,
    exchange: Exchange | None,
    finished: Callable[[dict[str, Any]], Awaitable[None]],
) -> AsyncIterator[bytes]:
    """Responses events for the engine's chat stream, written as its chunks arrive. The last
    event comes once the engine's stream has ended (its spend row, and usage, are then final);
    `finished(response)` runs just before it (to store the response)."""
    reader = _ChatReader(writer)
    try:
        first = await anext(chunks, b"")  # pulled first: the engine's stream is then started
        yield encode(writer.start() + reader.read(first))
        async for data in chunks:
            if events := reader.read(data):
                yield encode(events)
        if events := reader.read(b"", last=True):
            yield encode(events)
    except Exception as e:  # an unreadable stream: say so in the stream, never truncate
        reader.error = {
            "message": f"the answer could not be read: {type(e).__name__}",
            "code": "bad_upstream_stream",
        }
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    usage = exchange.usage if exchange is not None else None
    if reader.error is None and reader.done:
        last = writer.complete(usage)
    else:
        error = reader.error or {"message": "the stream ended early", "code": "stream_truncated"}
        last = writer.fail(str(error.get("message")), error.get("code"), usage)
    assert writer.final is not None
    await finished(writer.final)
    yield encode(last)

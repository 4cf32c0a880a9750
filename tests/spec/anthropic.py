"""Does an object have Anthropic's shape? Parsed with the `anthropic` SDK's own types, strictly.

    parse_anthropic("Message", obj)             # -> anthropic.types.Message
    parse_anthropic("RawMessageStreamEvent", e) # one streamed event's data
    parse_anthropic("ErrorResponse", obj)       # {"type": "error", "error": {...}}
    check_message_stream(raw_sse_bytes)         # every event, their order; -> the final Message

Stricter than the SDK is with a live API, on purpose (a dialect should write what the API
writes, not what a lenient parser forgives):

* pydantic strict mode: no coercion (`"3"` is not an int, `1` is not a bool);
* no fields the SDK's types don't know (they allow extras; here each one is an error), unless
  `allow_extra=True`;
* the keys Anthropic's API always sends are required even where the SDK gives them a default
  (`stop_reason` and `stop_sequence` of a Message, say: null, but present).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from anthropic.types import (
    Message,
    MessageTokensCount,
    RawMessageStreamEvent,
)
from anthropic.types.shared import ErrorResponse
from pydantic import BaseModel, TypeAdapter, ValidationError

from tests.spec.sse import Event, parse_sse


class ShapeError(AssertionError):
    """An object that does not have the shape Anthropic's API (and SDK) uses."""


SHAPES: dict[str, Any] = {
    "Message": Message,
    "RawMessageStreamEvent": RawMessageStreamEvent,
    "ErrorResponse": ErrorResponse,
    "MessageTokensCount": MessageTokensCount,
}

ALWAYS_SENT: dict[str, frozenset[str]] = {
    "Message": frozenset(
        {"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"}
    ),
    "Usage": frozenset({"input_tokens", "output_tokens"}),
    "ErrorResponse": frozenset({"type", "error"}),
}
"""Keys the API always writes (null where there is nothing to say), by SDK class name."""

BLOCK_DELTAS = {
    "text": {"text_delta", "citations_delta"},
    "tool_use": {"input_json_delta"},
    "server_tool_use": {"input_json_delta"},
    "thinking": {"thinking_delta", "signature_delta"},
    "redacted_thinking": set(),
}
"""Which delta types may follow a content_block_start of each block type."""


@functools.cache
def _adapter(shape: str) -> TypeAdapter[Any]:
    if shape not in SHAPES:
        raise KeyError(f"unknown Anthropic shape {shape!r}: one of {sorted(SHAPES)}")
    return TypeAdapter(SHAPES[shape])


def parse_anthropic(shape: str, obj: Any, *, allow_extra: bool = False) -> Any:
    """Parse `obj` as the SDK type named `shape`; raise ShapeError on anything off."""
    try:
        value = _adapter(shape).validate_python(obj, strict=True)
    except ValidationError as e:
        raise ShapeError(f"{shape}: {e}\nobject: {json.dumps(obj)[:2000]}") from None
    problems = list(_missing(value, obj, shape))
    if not allow_extra:
        problems += [f"{path}: a field the SDK doesn't know" for path in _extras(value, shape)]
    if problems:
        raise ShapeError(f"{shape}: " + "; ".join(problems) + f"\nobject: {json.dumps(obj)[:2000]}")
    return value


def _extras(value: Any, path: str) -> list[str]:
    found: list[str] = []
    if isinstance(value, BaseModel):
        found += [f"{path}.{key}" for key in (value.model_extra or {})]
        for name in type(value).model_fields:
            found += _extras(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _extras(item, f"{path}[{i}]")
    return found


def _missing(value: Any, raw: Any, path: str) -> list[str]:
    """Keys of ALWAYS_SENT absent from the raw object, wherever its class appears."""
    found: list[str] = []
    if isinstance(value, BaseModel) and isinstance(raw, dict):
        required = ALWAYS_SENT.get(type(value).__name__, frozenset())
        found += [f"{path}.{key}: missing (the API always sends it)" for key in required - set(raw)]
        for name in type(value).model_fields:
            if name in raw:
                found += _missing(getattr(value, name), raw[name], f"{path}.{name}")
    elif isinstance(value, list) and isinstance(raw, list):
        for i, (item, raw_item) in enumerate(zip(value, raw, strict=False)):
            found += _missing(item, raw_item, f"{path}[{i}]")
    return found


def check_message_stream(raw: bytes | str | list[Event], *, allow_extra: bool = False) -> Message:
    """Check a Messages SSE stream: each event's data parses (strictly) and names the same
    type as its `event:` line; `ping` events may come anywhere; the order is message_start,
    then each content block (start, its deltas, stop; indexes 0, 1, ...), then message_delta,
    then message_stop. An `error` event ends a stream early (raised as ShapeError if its data
    isn't an ErrorResponse, returned as-is otherwise: raise on it in the caller if unwanted).

    Returns the final Message, accumulated from the events by the SDK's own code and parsed
    strictly like any other Message.
    """
    from anthropic.lib.streaming._messages import accumulate_event

    events = parse_sse(raw) if not isinstance(raw, list) else raw
    snapshot: Any = None
    json_bufs: dict[int, bytes] = {}
    state = "start"
    open_block: tuple[int, str] | None = None
    next_index = 0
    for i, event in enumerate(events):
        where = f"event {i} ({event.event})"
        data = json.loads(event.data)
        if event.event != data.get("type"):
            raise ShapeError(f"{where}: `event: {event.event}` but data type {data.get('type')!r}")
        if event.event == "ping":
            if data != {"type": "ping"}:
                raise ShapeError(f"{where}: a ping is exactly {{'type': 'ping'}}: {data}")
            continue
        if event.event == "error":
            parse_anthropic("ErrorResponse", data, allow_extra=allow_extra)
            raise ShapeError(f"{where}: the stream ended with an error event: {data}")
        parsed = parse_anthropic("RawMessageStreamEvent", data, allow_extra=allow_extra)
        kind = parsed.type
        if kind == "message_start":
            if state != "start":
                raise ShapeError(f"{where}: message_start after {state}")
            _missing_in_start = _missing(parsed.message, data["message"], "message")
            if _missing_in_start:
                raise ShapeError(f"{where}: " + "; ".join(_missing_in_start))
            state = "blocks"
        elif kind == "content_block_start":
            if state != "blocks" or open_block is not None:
                raise ShapeError(f"{where}: content_block_start while {state}/{open_block}")
            if parsed.index != next_index:
                raise ShapeError(f"{where}: block index {parsed.index}, expected {next_index}")
            open_block = (parsed.index, parsed.content_block.type)
            next_index += 1
        elif kind == "content_block_delta":
            if open_block is None or parsed.index != open_block[0]:
                raise ShapeError(f"{where}: delta for block {parsed.index}, open: {open_block}")
            allowed = BLOCK_DELTAS.get(open_block[1])
            if allowed is not None and parsed.delta.type not in allowed:
                raise ShapeError(f"{where}: {parsed.delta.type} in a {open_block[1]} block")
        elif kind == "content_block_stop":
            if open_block is None or parsed.index != open_block[0]:
                raise ShapeError(f"{where}: stop for block {parsed.index}, open: {open_block}")
            open_block = None
        elif kind == "message_delta":
            if state != "blocks" or open_block is not None:
                raise ShapeError(f"{where}: message_delta while {state}/{open_block}")
            state = "delta"
        elif kind == "message_stop":
            if state != "delta":
                raise ShapeError(f"{where}: message_stop before message_delta")
            state = "stopped"
        elif state == "stopped":
            raise ShapeError(f"{where}: an event after message_stop")
        snapshot = accumulate_event(event=parsed, current_snapshot=snapshot, json_bufs=json_bufs)
    if state != "stopped":
        raise ShapeError(f"the stream ended without message_stop (last state: {state})")
    # the SDK's own accumulation, as a client would see the message (its parsed_output extras
    # are the SDK's, not the stream's)
    return parse_anthropic("Message", snapshot.to_dict(), allow_extra=True)

"""Server-sent events: an incremental parser, the encoder, and a chunk assembler."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mitmroute import errors
from mitmroute.exchange import Usage

DONE = b"data: [DONE]\n\n"
_COMPACT = json.JSONEncoder(separators=(",", ":")).encode
"""`json.dumps(x, separators=...)` builds a new encoder on every call: one, built once."""


@dataclass(slots=True)
class Event:
    data: str
    event: str | None = None


class SSEParser:
    """Splits a byte stream, fed in arbitrary pieces, into complete events."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Event]:
        self._buffer += data
        if b"\n\n" not in self._buffer and b"\r\n\r\n" not in self._buffer:
            return []
        text = self._buffer.replace(b"\r\n", b"\n")
        *blocks, self._buffer = text.split(b"\n\n")
        events = []
        for block in blocks:
            if block.startswith(b"data: ") and b"\n" not in block:  # the usual: one data line
                events.append(Event(block[6:].decode("utf-8", "replace")))
                continue
            event = _parse_block(block.decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
        return events

    def finish(self) -> list[Event]:
        """The last event when the stream ended without a blank line."""
        rest, self._buffer = self._buffer, b""
        event = _parse_block(rest.decode("utf-8", "replace").strip("\r\n"))
        return [event] if event is not None else []


def _parse_block(block: str) -> Event | None:
    data_lines: list[str] = []
    name = None
    for line in block.split("\n"):
        if not line or line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "data":
            data_lines.append(value)
        elif key == "event":
            name = value
    if not data_lines and name is None:
        return None
    return Event(data="\n".join(data_lines), event=name)


def encode(chunk: dict[str, Any]) -> bytes:
    """One `data: {...}` event."""
    return b"data: " + _COMPACT(chunk).encode() + b"\n\n"


def encode_error(message: str, *, etype: str = "server_error", code: str | None = None) -> bytes:
    """An SSE error event the openai SDK raises on (it checks `error` in each data object)."""
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def encode_native_error(error: errors.ProxyError, dialect: str) -> bytes:
    """An `event: error` in a native (Anthropic) stream, as its SDK raises on."""
    return b"event: error\ndata: " + errors.render(error, dialect) + b"\n\n"


@dataclass(slots=True)
class ChunkAssembler:
    """Folds `chat.completion.chunk` dicts into the equivalent `chat.completion` body.

    Used for the spend log (usage, token estimates), the cache (a streamed answer is stored as
    a whole completion) and for the model that answered.
    """

    id: str | None = None
    model: str | None = None
    created: int | None = None
    system_fingerprint: str | None = None
    usage: Usage | None = None
    object: str | None = None
    """The chunks' `object`: `chat.completion.chunk`, or `text_completion` (legacy)."""
    chunks: int = 0
    _choices: dict[int, dict[str, Any]] = field(default_factory=dict)

    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        self.id = self.id or chunk.get("id")
        self.model = chunk.get("model") or self.model
        self.created = self.created or chunk.get("created")
        self.object = self.object or chunk.get("object")
        self.system_fingerprint = chunk.get("system_fingerprint") or self.system_fingerprint
        if chunk.get("usage"):
            self.usage = Usage.from_openai(chunk["usage"])
        for choice in chunk.get("choices") or ():
            self._add_choice(choice)

    def _add_choice(self, choice: dict[str, Any]) -> None:
        # text comes in pieces, one per chunk: kept in lists and joined once at the end (adding
        # each piece to a string held in a dict copies it whole: quadratic on long answers)
        index = choice.get("index", 0)
        acc = self._choices.setdefault(
            index,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": {},
                "finish_reason": None,
                "refusal": None,
                "reasoning_content": [],
            },
        )
        delta = choice.get("delta") or {}
        if delta.get("role"):
            acc["role"] = delta["role"]
        if delta.get("content") is not None:
            _piece(acc, "content", delta["content"])
        if isinstance(choice.get("text"), str):  # legacy /v1/completions chunks
            _piece(acc, "content", choice["text"])
        if delta.get("reasoning_content"):
            acc["reasoning_content"].append(delta["reasoning_content"])
        if delta.get("refusal") is not None:
            _piece(acc, "refusal", delta["refusal"])
        for call in delta.get("tool_calls") or ():
            slot = acc["tool_calls"].setdefault(
                call.get("index", 0), {"id": None, "name": [], "arguments": []}
            )
            if call.get("id"):
                slot["id"] = call["id"]
            fn = call.get("function") or {}
            if fn.get("name"):
                slot["name"].append(fn["name"])
            if fn.get("arguments"):
                slot["arguments"].append(fn["arguments"])
        if choice.get("finish_reason"):
            acc["finish_reason"] = choice["finish_reason"]

    @property
    def finished(self) -> bool:
        """True when every choice seen has a finish reason."""
        return bool(self._choices) and all(c["finish_reason"] for c in self._choices.values())

    def text(self) -> str:
        """All generated text and tool arguments, for token estimates."""
        parts: list[str] = []
        for c in self._choices.values():
            parts += c["content"] or ()
            for call in c["tool_calls"].values():
                parts += call["name"]
                parts += call["arguments"]
        return "".join(parts)

    def completion(self) -> dict[str, Any]:
        """The assembled `chat.completion` body."""
        choices = []
        for index in sorted(self._choices):
            c = self._choices[index]
            message: dict[str, Any] = {"role": c["role"], "content": _joined(c["content"])}
            if c["refusal"] is not None:
                message["refusal"] = "".join(c["refusal"])
            if c["reasoning_content"]:
                message["reasoning_content"] = "".join(c["reasoning_content"])
            if c["tool_calls"]:
                message["tool_calls"] = [
                    _tool_call(c["tool_calls"][i]) for i in sorted(c["tool_calls"])
                ]
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "finish_reason": c["finish_reason"],
                    "logprobs": None,
                }
            )
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.system_fingerprint:
            body["system_fingerprint"] = self.system_fingerprint
        if self.usage is not None:
            body["usage"] = self.usage.to_openai()
        return body


def _piece(acc: dict[str, Any], key: str, text: str) -> None:
    """Add `text` to the pieces of `acc[key]` (None until the first: `content` stays null in a
    tool-call-only answer)."""
    if acc[key] is None:
        acc[key] = [text]
    else:
        acc[key].append(text)


def _joined(pieces: list[str] | None) -> str | None:
    return None if pieces is None else "".join(pieces)


def _tool_call(slot: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": slot["id"],
        "type": "function",
        "function": {"name": "".join(slot["name"]), "arguments": "".join(slot["arguments"])},
    }

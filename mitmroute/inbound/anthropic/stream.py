"""The engine's chat-completion stream as a Messages event stream, translated as it arrives.

Each piece of the engine's SSE (fed in any split) becomes the Messages events it stands for at
once: `message_start` with the first chunk, then per content block `content_block_start`,
its deltas (`thinking_delta`, `text_delta`, `input_json_delta`) and `content_block_stop`. A
new kind of content (reasoning, text, another tool call) closes the open block. The closing
`message_delta` (stop_reason, stop_sequence, usage) and `message_stop` are written by `close`,
once the engine's stream has ended and its books are closed: its usage is the spend log's.
`message_start` reports usage 0 (OpenAI backends count the prompt only at the end); the
SDK takes the final counts from `message_delta`. An error event of the engine becomes an
`error` event, as Anthropic sends mid-stream.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from mitmroute.exchange import Usage
from mitmroute.inbound.anthropic.response import message_id, stop_of, usage_of
from mitmroute.streaming.sse import SSEParser


def event(kind: str, data: dict[str, Any]) -> bytes:
    """One Messages SSE event."""
    payload = json.dumps({"type": kind, **data}, separators=(",", ":"), ensure_ascii=False)
    return f"event: {kind}\ndata: {payload}\n\n".encode()


def error_event(error: Any) -> bytes:
    """An Anthropic `error` event for the engine's OpenAI-shaped stream error."""
    error = error if isinstance(error, dict) else {"message": str(error)}
    etype, code = str(error.get("type") or ""), str(error.get("code") or "")
    if etype == "overloaded_error":
        kind = "overloaded_error"
    elif "rate_limit" in etype or "rate_limit" in code:
        kind = "rate_limit_error"
    elif code == "upstream_stream_stalled" or "timeout" in code:
        kind = "timeout_error"
    else:
        kind = "api_error"
    message = str(error.get("message") or "the stream failed")
    return event("error", {"error": {"type": kind, "message": message}})


class MessagesStream:
    """Turns the engine's chat SSE bytes into Messages SSE bytes, incrementally."""

    def __init__(self, model: str, stop_sequences: tuple[str, ...] = ()) -> None:
        self._parser = SSEParser()
        self._model = model
        self._stops = stop_sequences
        self._started = False
        self._open: tuple[str, int] | None = None
        """The open content block: its kind (`thinking`, `text`, `tool:<n>`) and index."""
        self._blocks = 0
        self._tools: dict[int, int] = {}
        """OpenAI tool call index -> content block index."""
        self._finish: Any = None
        self._matched: Any = None
        self._usage: Usage | None = None
        self.done = False
        """The engine's stream ended well (`[DONE]`)."""
        self.failed = False
        """An error event was written: nothing follows it."""

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for ev in self._parser.feed(data):
            if self.failed:
                break
            if ev.data == "[DONE]":
                self.done = True
                continue
            chunk = json.loads(ev.data)
            if isinstance(chunk, dict) and "error" in chunk:
                self.failed = True
                out.append(error_event(chunk["error"]))
                continue
            self._chunk(chunk, out)
        return b"".join(out)

    def close(self, usage: Usage | None) -> bytes:
        """The closing events, with the exchange's final `usage` (else the stream's own)."""
        if self.failed:
            return b""
        out: list[bytes] = []
        if not self.done:
            self.failed = True
            error = {"type": "api_error", "message": "the stream ended before it was complete"}
            return event("error", {"error": error})
        self._start({}, out)
        self._close_block(out)
        reason, sequence = stop_of(self._finish, self._matched, self._stops, bool(self._tools))
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        out.append(
            event("message_delta", {"delta": delta, "usage": usage_of(usage or self._usage)})
        )
        out.append(event("message_stop", {}))
        return b"".join(out)

    # --- chunks ---------------------------------------------------------------------------

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        self._start(chunk, out)
        if chunk.get("usage"):
            self._usage = Usage.from_openai(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                index = self._block("thinking", {"thinking": "", "signature": ""}, out)
                out.append(self._delta(index, {"type": "thinking_delta", "thinking": reasoning}))
            text = delta.get("content") or delta.get("refusal")
            if isinstance(text, str) and text:
                index = self._block("text", {"text": ""}, out)
                out.append(self._delta(index, {"type": "text_delta", "text": text}))
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    self._tool_call(call, out)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
            if choice.get("stop_reason") is not None:
                self._matched = choice["stop_reason"]

    def _tool_call(self, call: dict[str, Any], out: list[bytes]) -> None:
        n = call.get("index", 0)
        fn = call.get("function") or {}
        if n not in self._tools:
            start = {
                "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                "name": fn.get("name") or "",
                "input": {},
            }
            self._tools[n] = self._block(f"tool:{n}", start, out, kind="tool_use")
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            delta = {"type": "input_json_delta", "partial_json": arguments}
            out.append(self._delta(self._tools[n], delta))

    # --- events ---------------------------------------------------------------------------

    def _start(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        if self._started:
            return
        self._started = True
        message = {
            "id": message_id(chunk.get("id")),
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model") or self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_of(None),
        }
        out.append(event("message_start", {"message": message}))

    def _block(
        self, name: str, start: dict[str, Any], out: list[bytes], *, kind: str | None = None
    ) -> int:
        """The index of the open block `name`, opening it (and closing another) if needed."""
        if self._open is not None and self._open[0] == name:
            return self._open[1]
        self._close_block(out)
        index = self._blocks
        self._blocks += 1
        self._open = (name, index)
        block = {"type": kind or name, **start}
        out.append(event("content_block_start", {"index": index, "content_block": block}))
        return index

    def _close_block(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(event("content_block_stop", {"index": self._open[1]}))
            self._open = None

    @staticmethod
    def _delta(index: int, delta: dict[str, Any]) -> bytes:
        return event("content_block_delta", {"index": index, "delta": delta})

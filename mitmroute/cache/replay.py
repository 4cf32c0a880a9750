"""Replay a stored answer as the SSE stream a model would have sent.

A `chat.completion` becomes `chat.completion.chunk` events: a role chunk, reasoning, content
or refusal in word-sized deltas, each tool call as a header delta (index, id, type, name, empty
arguments) followed by argument fragments, a chunk with `finish_reason` (carrying the stored
logprobs, if any), then the usage chunk (only when the client asked with
`stream_options.include_usage`), then `data: [DONE]`. A `text_completion` is replayed the same way
with `text` deltas. Every chunk carries the stored `id`, `created` and `model`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from mitmroute.streaming.sse import DONE, encode

PIECE_MAX = 16
"""Longest delta of a short text; longer words are cut."""
ARGS_PIECE = 12
"""Tool-call argument fragment size (for short arguments)."""
MAX_PIECES = 256
"""Long texts get longer deltas, so a replay stays around this many chunks per text (and its
cost on the event loop bounded, about 1 ms)."""

_WORDS = re.compile(r"\s*\S+\s*|\s+")
_ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def split_text(text: str, *, max_pieces: int = MAX_PIECES) -> list[str]:
    """Word-sized pieces (a word with its surrounding spaces, cut at `PIECE_MAX`); words are
    grouped when the text is long, so there are at most about `max_pieces` pieces."""
    target = max(1, -(-len(text) // max_pieces))
    longest = max(PIECE_MAX, 2 * target)
    pieces: list[str] = []
    buf = ""
    for word in _WORDS.findall(text):
        for start in range(0, len(word), longest):
            buf += word[start : start + longest]
            if len(buf) >= target:
                pieces.append(buf)
                buf = ""
    if buf:
        pieces.append(buf)
    return pieces


def replay_stream(
    answer_body: dict[str, Any],
    *,
    include_usage: bool,
    usage: dict[str, Any] | None = None,
) -> bytes:
    """A complete SSE body (ending in `[DONE]`) for a streamed cache hit.

    `usage` overrides the stored usage in the final chunk; with `include_usage` and no usage at
    all, a zero usage is sent so clients that wait for it still get one.
    """
    usage = usage or answer_body.get("usage") or dict(_ZERO_USAGE)
    env = _envelope(answer_body)
    # Every chunk is the same envelope around one choice: serialize the envelope once.
    head = {**env, "usage": None} if include_usage else env
    prefix = b"data: " + _dumps(head)[:-1] + b',"choices":['
    if answer_body.get("object") == "text_completion":
        choices = _text_choices(answer_body)
    else:
        choices = _chat_choices(answer_body)
    out = [prefix + _dumps(choice) + b"]}\n\n" for choice in choices]
    if include_usage:
        out.append(encode({**env, "choices": [], "usage": usage}))
    out.append(DONE)
    return b"".join(out)


def answer_chunks(answer_body: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole answer as the stream chunks that carry it (the last one with its usage)."""
    env = _envelope(answer_body)
    if answer_body.get("object") == "text_completion":
        choices = _text_choices(answer_body)
    else:
        choices = _chat_choices(answer_body)
    chunks = [{**env, "choices": [choice]} for choice in choices]
    if isinstance(answer_body.get("usage"), dict):
        chunks.append({**env, "choices": [], "usage": answer_body["usage"]})
    return chunks


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _envelope(body: dict[str, Any]) -> dict[str, Any]:
    obj = "text_completion" if body.get("object") == "text_completion" else "chat.completion.chunk"
    env: dict[str, Any] = {
        "id": body.get("id") or "chatcmpl-cached",
        "object": obj,
        "created": body.get("created") or 0,
        "model": body.get("model") or "",
    }
    for name in ("system_fingerprint", "service_tier"):
        if body.get(name) is not None:
            env[name] = body[name]
    return env


def _chat_choices(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None):
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    for choice in body.get("choices") or ():
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        content = message.get("content")
        if isinstance(content, list):  # content parts: replay their text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        first: dict[str, Any] = {"role": message.get("role") or "assistant"}
        first["content"] = "" if isinstance(content, str) else None
        if message.get("refusal") is not None:
            first["refusal"] = ""
        yield chunk(index, first)
        for field in ("reasoning_content", "reasoning"):
            if isinstance(message.get(field), str):
                for piece in split_text(message[field]):
                    yield chunk(index, {field: piece})
        for piece in split_text(content or ""):
            yield chunk(index, {"content": piece})
        for piece in split_text(message.get("refusal") or ""):
            yield chunk(index, {"refusal": piece})
        for i, call in enumerate(message.get("tool_calls") or ()):
            yield from _tool_call_chunks(i, call, lambda d, ix=index: chunk(ix, d))
        yield chunk(index, {}, choice.get("finish_reason") or "stop", choice.get("logprobs"))


def _tool_call_chunks(i: int, call: dict[str, Any], chunk: Any) -> Iterator[dict[str, Any]]:
    fn = call.get("function") or {}
    head = {
        "index": i,
        "id": call.get("id"),
        "type": call.get("type") or "function",
        "function": {"name": fn.get("name") or "", "arguments": ""},
    }
    yield chunk({"tool_calls": [head]})
    args = fn.get("arguments") or ""
    size = max(ARGS_PIECE, -(-len(args) // MAX_PIECES))
    for start in range(0, len(args), size):
        piece = args[start : start + size]
        yield chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})


def _text_choices(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for choice in body.get("choices") or ():
        index = choice.get("index", 0)
        for piece in split_text(choice.get("text") or ""):
            yield {"index": index, "text": piece, "logprobs": None, "finish_reason": None}
        yield {"index": index, "text": "", "logprobs": choice.get("logprobs"),
               "finish_reason": choice.get("finish_reason") or "stop"}  # fmt: skip

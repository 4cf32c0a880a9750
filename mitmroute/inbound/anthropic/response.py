"""The engine's answers in Messages shapes: a chat completion becomes a `message` object, an
error becomes Anthropic's `{"type": "error", "error": {type, message}}`.

- Content: reasoning (`reasoning_content` / `reasoning`) -> a `thinking` block with an empty
  `signature` (there is none to give), then text, then `tool_use` blocks (`arguments` parsed;
  arguments that are not a JSON object become `{}`).
- `stop_reason`: stop -> end_turn, or stop_sequence when the backend names the sequence it hit
  (vLLM's `stop_reason`); length -> max_tokens; tool_calls (or tool calls at all) -> tool_use;
  content_filter -> refusal.
- `usage` is the exchange's, the numbers the spend log holds: input_tokens are the prompt
  tokens less cache reads and writes, which are reported apart (0 when the backend says none).
- `model` is the model that answered, as the backend names it (as on the OpenAI route).
- Errors keep the status the engine gave them, so the anthropic SDK raises and retries as for
  the real API (429 and 5xx are retried, `x-should-retry` is honoured); their type follows
  the status (`mitmroute.errors.render`). A 503 (no deployment could answer, an upstream
  overload included) is `overloaded_error`: the SDK retries it as it does Anthropic's 529.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from mitmroute import errors
from mitmroute.errors import ProxyError
from mitmroute.exchange import Usage

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def message_id(chat_id: Any) -> str:
    """A Messages id for a chat completion id (`chatcmpl-abc` -> `msg_abc`)."""
    if isinstance(chat_id, str) and chat_id:
        return "msg_" + chat_id.removeprefix("chatcmpl-").removeprefix("msg_")
    return f"msg_{uuid.uuid4().hex}"


def usage_of(usage: Usage | None) -> dict[str, int]:
    """Anthropic's usage object for the engine's usage."""
    if usage is None:
        usage = Usage()
    cached, created = usage.cached_tokens, usage.cache_creation_tokens
    return {
        "input_tokens": max(usage.prompt_tokens - cached - created, 0),
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": cached,
        "output_tokens": usage.completion_tokens,
    }


def stop_of(
    finish: Any, matched: Any, stop_sequences: tuple[str, ...], tool_calls: bool
) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for a chat choice's finish_reason.

    `matched` is the stop string the backend reports having hit, where it does (vLLM)."""
    if finish in (None, "stop") and tool_calls:
        return "tool_use", None
    if finish == "stop" and isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return STOP_REASONS.get(finish, "end_turn"), None


def tool_input(arguments: Any) -> dict[str, Any]:
    """A tool call's `arguments` (a JSON string) as the object `tool_use.input` must be."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def to_message(
    completion: dict[str, Any],
    usage: Usage | None,
    *,
    model: str,
    stop_sequences: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The Messages `message` object for a `chat.completion` body."""
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    msg = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = _text(msg.get("content")) or _text(msg.get("refusal"))
    if text:
        content.append({"type": "text", "text": text})
    calls = [c for c in msg.get("tool_calls") or () if isinstance(c, dict)]
    for call in calls:
        fn = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                "name": fn.get("name") or "",
                "input": tool_input(fn.get("arguments")),
            }
        )
    reason, sequence = stop_of(
        choice.get("finish_reason"), choice.get("stop_reason"), stop_sequences, bool(calls)
    )
    return {
        "id": message_id(completion.get("id")),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model") or model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage_of(usage),
    }


def render_error(error: ProxyError) -> bytes:
    return errors.render(error, "anthropic")

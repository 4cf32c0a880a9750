"""The `response` object: the request's echoed fields, output items made from a chat
completion, and usage from the spend log's own counts (so the two always agree)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from mitmroute.exchange import Usage
from mitmroute.inbound.responses.request import Item, ToolSpec, ToolTable, new_id

INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
"""Chat finish reasons that make a response `incomplete`, with the reason it gives."""


def usage_of(usage: Usage | None) -> dict[str, Any] | None:
    """Responses usage for the engine's (the ledger's) usage."""
    if usage is None:
        return None
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cached_tokens,
            "cache_write_tokens": usage.cache_creation_tokens,
        },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


@dataclass(slots=True)
class Draft:
    """What every state of one response shares: id, creation time, model, echoed fields."""

    model: str
    echo: dict[str, Any]
    id: str = ""
    created_at: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or new_id("resp")
        self.created_at = self.created_at or int(time.time())

    def response(
        self,
        status: str,
        output: list[Item],
        *,
        usage: Usage | None = None,
        error: dict[str, str] | None = None,
        incomplete: str | None = None,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "model": self.model,
            "output": output,
            **self.echo,
            "max_tool_calls": None,
            **({"usage": usage_of(usage)} if usage is not None else {}),
        }


def status_of(finish_reason: str | None) -> tuple[str, str | None]:
    """The response status (and incomplete reason) for a chat finish reason."""
    reason = INCOMPLETE.get(finish_reason or "")
    return ("incomplete", reason) if reason else ("completed", None)


# --- output items ------------------------------------------------------------------------------


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> Item:
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": parts,
    }


def reasoning_item(item_id: str, text: str | None, status: str) -> Item:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {
        "id": item_id,
        "type": "reasoning",
        "summary": [],
        "content": content,
        "encrypted_content": None,
        "status": status,
    }


def call_item_id(spec: ToolSpec) -> str:
    return new_id("ctc" if spec.kind == "custom" else "fc")


def call_item(spec: ToolSpec, item_id: str, call_id: str, arguments: str, status: str) -> Item:
    """A `function_call`, or a `custom_tool_call` for a custom tool (its `input` argument)."""
    if spec.kind == "custom":
        item: Item = {
            "id": item_id,
            "type": "custom_tool_call",
            "status": status,
            "call_id": call_id,
            "name": spec.name,
            "input": custom_input(arguments),
        }
    else:
        item = {
            "id": item_id,
            "type": "function_call",
            "status": status,
            "call_id": call_id,
            "name": spec.name,
            "arguments": arguments,
        }
    if spec.namespace:
        item["namespace"] = spec.namespace
    return item


def custom_input(arguments: str) -> str:
    """A custom tool's text from the chat tool call's arguments (`{"input": ...}`)."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get("input"), str):
        return value["input"]
    return arguments


def reasoning_text(message: dict[str, Any]) -> str | None:
    """Reasoning a backend sent beside the answer (`reasoning_content`, or `reasoning`)."""
    for key in ("reasoning_content", "reasoning"):
        if isinstance(message.get(key), str) and message[key]:
            return message[key]
    return None


def _text_of(content: Any) -> str:
    """A message's text: a string, or the text of its parts (some servers send parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def output_of(completion: dict[str, Any], tools: ToolTable) -> tuple[list[Item], str | None]:
    """The output items of a `chat.completion`, and its finish reason."""
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    finish = choice.get("finish_reason")
    status = "incomplete" if finish in INCOMPLETE else "completed"
    items: list[Item] = []
    if (thought := reasoning_text(message)) is not None:
        items.append(reasoning_item(new_id("rs"), thought, "completed"))
    calls = [c for c in message.get("tool_calls") or () if isinstance(c, dict)]
    parts = []
    if text := _text_of(message.get("content")):
        parts.append(output_text(text))
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        parts.append({"type": "refusal", "refusal": message["refusal"]})
    if parts or not calls:
        items.append(message_item(new_id("msg"), parts or [output_text("")], status))
    for call in calls:
        fn = call.get("function") or {}
        spec = tools.spec(str(fn.get("name") or ""))
        call_id = call.get("id") or new_id("call")
        arguments = fn.get("arguments") or ""
        items.append(call_item(spec, call_item_id(spec), call_id, arguments, status))
    return items, finish

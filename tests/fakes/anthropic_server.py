"""A fake Anthropic Messages API (`POST /v1/messages`) for tests, on aiohttp.

In-process::

    server = FakeAnthropic(api_key="sk-ant-test")  # api_key=None accepts any non-empty key
    base = server.start()  # "http://127.0.0.1:<free port>", served from a background thread
    ...  # server.requests: list[Received] (headers, parsed body, status, reported usage)
    server.stop()  # or: with FakeAnthropic() as server: ...

As a process (e2e tests): ``python tests/fakes/anthropic_server.py --port N [--host H]
[--api-key K]``; prints ``listening on http://H:N`` once it accepts connections.

It speaks the real wire protocol (JSON, and SSE with message_start / ping /
content_block_start / content_block_delta / content_block_stop / message_delta / message_stop)
and answers what the real API rejects with Anthropic-shaped errors: a missing or invalid key
(401; `x-api-key` or `Authorization: Bearer`), a missing or unknown `anthropic-version`, unknown
top-level fields, missing `model`/`messages`/`max_tokens`, a first turn that isn't the user's,
roles that don't alternate (stricter than the API, which merges them), empty text blocks,
tool_use / tool_result blocks that don't pair up, and sampling parameters (temperature, top_p,
top_k) under API version 2026-10-21.

Scripted behaviours, chosen by the text of the last user turn (case-insensitive):

    "use two tools"  text, then tool_use blocks for the first two tools (or the first one twice)
    "use tool"       text, then a tool_use block for the first tool (input from its schema)
    "fail NNN"       an error answer with status NNN and Anthropic's type for it (529 overloaded)
    "too long"       400 "prompt is too long: 250000 tokens > 200000 maximum"
    "refuse"         stop_reason "refusal"
    "think"          a thinking block before the text
    "slow"           a 200 ms pause before each content delta (one pause when not streaming)
    "break"          stream: a little text, then an `error` event (overloaded_error), then EOF
    "cut"            stream: a little text, then EOF without message_delta / message_stop
    "leak key"       echoes the key it received, like a careless gateway: a 401 "invalid
                     x-api-key: <key>"; streamed, a little text then an `error` event naming it
    tool results     (a last user turn with tool_result blocks) "Got the tool result: ..."
    anything else    "Hello from fake Claude! You said: <text>"

`POST /v1/messages/count_tokens` answers `{"input_tokens": N}` (N as for a message, cache
prefix included) and refuses what the real endpoint does: fields a count can't take
(`max_tokens`, `stream`, `metadata`, ...) and the message checks above; "fail NNN" works there
too.

The text is cut at the first stop sequence (stop_reason "stop_sequence") and at `max_tokens`
words (stop_reason "max_tokens").

Usage is deterministic: one output token per word of text or thinking, ceil(len(json)/4) per
tool input; input tokens are ceil(len(json.dumps([tools, system, messages]))/4). With
`cache_control` somewhere, the prefix up to the last marked block (order: tools, system,
messages) is cached: its tokens are reported as cache_creation_input_tokens the first time this
server sees it, as cache_read_input_tokens afterwards, and input_tokens is the rest (at least 1).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import re
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

VERSIONS = frozenset({"2023-01-01", "2023-06-01", "2026-10-21"})
SAMPLING = ("temperature", "top_p", "top_k")
TOP_LEVEL = frozenset({
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
    "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "service_tier",
    "container", "output_config", "mcp_servers", "context_management", "inference_geo",
    "cache_control",
})  # fmt: skip
COUNT_TOP_LEVEL = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "cache_control",
        "speed",
        "context_management",
        "mcp_servers",
    }
)
BLOCK_KEYS = {
    "text": {"type", "text", "cache_control", "citations"},
    "image": {"type", "source", "cache_control"},
    "document": {"type", "source", "cache_control", "title", "context", "citations"},
    "tool_use": {"type", "id", "name", "input", "cache_control"},
    "tool_result": {"type", "tool_use_id", "content", "is_error", "cache_control"},
    "thinking": {"type", "thinking", "signature"},
    "redacted_thinking": {"type", "data"},
}
ROLE_BLOCKS = {
    "user": {"text", "image", "document", "tool_result"},
    "assistant": {"text", "tool_use", "thinking", "redacted_thinking"},
}
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 529: "overloaded_error",
}  # fmt: skip
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
TOOL_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
SLOW_DELAY = 0.2
PAIRING = "Each `tool_use` block must have a matching `tool_result` block in the next message."
SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache"}


class Reject(Exception):
    """An error answer: status, Anthropic error type, message."""

    def __init__(self, status: int, message: str, etype: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.etype = etype or ERROR_TYPES.get(status, "api_error")


@dataclass
class Received:
    """One request the fake received, for assertions."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int = 200
    usage: dict[str, int] | None = None
    query: str = ""
    sent: bytes = b""
    """The body of the answer, exactly as written (streams: every event)."""


# --- validation -------------------------------------------------------------------------------


def key_of(headers: Any) -> str:
    """The key a request carries (`x-api-key` or `Authorization: Bearer`), or ""."""
    auth = headers.get("authorization", "")
    return headers.get("x-api-key") or (auth[7:] if auth.lower().startswith("bearer ") else "")


def check_headers(headers: Any, api_key: str | None) -> str:
    """The API version asked for; raises Reject on a missing/bad key or version."""
    key = key_of(headers)
    if not key:
        raise Reject(401, "x-api-key header is required")
    if api_key is not None and key != api_key:
        raise Reject(401, "invalid x-api-key")
    version = headers.get("anthropic-version")
    if not version:
        raise Reject(400, "anthropic-version: header is required")
    if version not in VERSIONS:
        raise Reject(400, f"anthropic-version: {version!r} is not a valid version")
    return version


def check_body(body: Any, version: str, *, count: bool = False) -> None:
    """Raise Reject(400) for what the Messages API (or, `count`, count_tokens) refuses."""
    if not isinstance(body, dict):
        raise Reject(400, "request body must be a JSON object")
    for key in body:
        if key not in (COUNT_TOP_LEVEL if count else TOP_LEVEL):
            raise Reject(400, f"{key}: Extra inputs are not permitted")
    for key in ("model", "messages") if count else ("model", "max_tokens", "messages"):
        if key not in body:
            raise Reject(400, f"{key}: Field required")
    if not isinstance(body["model"], str) or not body["model"]:
        raise Reject(400, "model: Input should be a valid string")
    mt = body.get("max_tokens", 0)
    if isinstance(mt, bool) or not isinstance(mt, int) or mt < 0:
        raise Reject(400, "max_tokens: Input should be a valid non-negative integer")
    for key in SAMPLING:
        if key in body and version == "2026-10-21":
            raise Reject(400, f"{key}: is not supported with anthropic-version {version}")
    for key, top in (("temperature", 1.0), ("top_p", 1.0), ("top_k", math.inf)):
        value = body.get(key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value is not None and not (number and 0 <= value <= top):
            raise Reject(400, f"{key}: Input should be between 0 and {top}")
    _check_system(body.get("system"))
    stops = body.get("stop_sequences", [])
    if not isinstance(stops, list) or not all(isinstance(s, str) and s.strip() for s in stops):
        raise Reject(400, "stop_sequences: each must be a string with non-whitespace")
    if not set(body.get("metadata") or {}) <= {"user_id"}:
        raise Reject(400, "metadata: only user_id is permitted")
    _check_tools(body.get("tools"), body.get("tool_choice"))
    _check_messages(body["messages"])


def _check_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise Reject(400, "system: Input should be a valid string or list")
    for i, block in enumerate(system):
        _check_block(block, f"system.{i}", {"text"})


def _check_tools(tools: Any, choice: Any) -> None:
    names = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or not TOOL_NAME.match(str(tool.get("name"))):
            raise Reject(400, f"tools.{i}.name: String should match pattern '{TOOL_NAME.pattern}'")
        if tool.get("type") not in (None, "custom"):  # a server tool: its own fields, no schema
            _check_cache_control(tool, f"tools.{i}")
            names.append(tool["name"])
            continue
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise Reject(400, f"tools.{i}.input_schema.type: Input should be 'object'")
        extra = set(tool) - {"name", "description", "input_schema", "cache_control", "type"}
        if extra:
            raise Reject(400, f"tools.{i}.{sorted(extra)[0]}: Extra inputs are not permitted")
        _check_cache_control(tool, f"tools.{i}")
        names.append(tool["name"])
    if len(set(names)) != len(names):
        raise Reject(400, "tools: Tool names must be unique.")
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise Reject(400, "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    if not set(choice) <= {"type", "name", "disable_parallel_tool_use"}:
        raise Reject(400, "tool_choice: Extra inputs are not permitted")
    if kind == "tool" and choice.get("name") not in names:
        raise Reject(400, f"tool_choice.name: tool {choice.get('name')!r} not found in tools")


def _check_cache_control(obj: dict[str, Any], where: str) -> None:
    cc = obj.get("cache_control")
    if cc is not None and (not isinstance(cc, dict) or cc.get("type") != "ephemeral"):
        raise Reject(400, f"{where}.cache_control.type: Input should be 'ephemeral'")


def _check_block(block: Any, where: str, allowed: set[str]) -> None:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind not in allowed:
        raise Reject(400, f"{where}.type: Input tag {kind!r} is not allowed here")
    extra = set(block) - BLOCK_KEYS[kind]
    if extra:
        raise Reject(400, f"{where}.{sorted(extra)[0]}: Extra inputs are not permitted")
    _check_cache_control(block, where)
    if kind == "text" and (not isinstance(block.get("text"), str) or not block["text"]):
        raise Reject(400, f"{where}: text content blocks must be non-empty")
    if kind == "image":
        src = block.get("source") or {}
        ok = (src.get("type") == "url" and isinstance(src.get("url"), str)) or (
            src.get("type") == "base64" and src.get("media_type") in IMAGE_TYPES
            and isinstance(src.get("data"), str))  # fmt: skip
        if not ok:
            raise Reject(400, f"{where}.source: invalid image source")
    if kind == "tool_use" and not (
        TOOL_ID.match(str(block.get("id"))) and isinstance(block.get("name"), str)
        and isinstance(block.get("input"), dict)):  # fmt: skip
        raise Reject(400, f"{where}: tool_use blocks need an id, a name and an object input")
    if kind == "tool_result":
        content = block.get("content", "")
        if not isinstance(block.get("tool_use_id"), str):
            raise Reject(400, f"{where}.tool_use_id: Field required")
        for j, inner in enumerate(content if isinstance(content, list) else []):
            _check_block(inner, f"{where}.content.{j}", {"text", "image"})


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise Reject(400, "messages: at least one message is required")
    previous_tool_ids: set[str] = set()
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ROLE_BLOCKS or not set(msg) <= {"role", "content"}:
            raise Reject(400, f"messages.{i}: a message needs a user/assistant role and content")
        if i == 0 and role != "user":
            raise Reject(400, 'messages: first message must use the "user" role')
        if i > 0 and messages[i - 1]["role"] == role:
            raise Reject(400, f'messages: roles must alternate between "user" and "assistant", '
                         f'but found multiple "{role}" roles in a row')  # fmt: skip
        content = msg.get("content")
        if not isinstance(content, str | list) or not content:
            raise Reject(400, f"messages.{i}.content: must be a non-empty string or list")
        blocks = _blocks(msg)
        for j, block in enumerate(blocks):
            _check_block(block, f"messages.{i}.content.{j}", ROLE_BLOCKS[role])
        results = {b["tool_use_id"] for b in blocks if b["type"] == "tool_result"}
        if unexpected := results - previous_tool_ids:
            raise Reject(400, f"messages.{i}: unexpected `tool_use_id` found in `tool_result` "
                         f"blocks: {sorted(unexpected)}. {PAIRING}")  # fmt: skip
        if missing := previous_tool_ids - results:
            raise Reject(400, f"messages.{i}: `tool_use` ids were found without `tool_result` "
                         f"blocks immediately after: {sorted(missing)}. {PAIRING}")  # fmt: skip
        previous_tool_ids = {b["id"] for b in blocks if b["type"] == "tool_use"}
    last = messages[-1]
    if last["role"] == "assistant" and _blocks(last)[-1].get("text", "x")[-1:].isspace():
        raise Reject(400, "final assistant content cannot end with trailing whitespace")


# --- scripted answers -------------------------------------------------------------------------


def _json_tokens(value: Any) -> int:
    return math.ceil(len(json.dumps(value)) / 4)


def _words(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text)


def _sample(schema: dict[str, Any]) -> Any:
    """A deterministic value for a JSON schema."""
    kind = schema.get("type")
    if kind == "object":
        return {k: _sample(v) for k, v in (schema.get("properties") or {}).items()}
    if schema.get("enum"):
        return schema["enum"][0]
    return {"string": "test", "integer": 1, "number": 1.5, "boolean": True, "array": []}.get(kind)


def last_user_text(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The text of the last user turn, and its tool_result blocks."""
    blocks = _blocks(messages[-1]) if messages[-1]["role"] == "user" else []
    text = " ".join(b["text"] for b in blocks if b["type"] == "text")
    return text, [b for b in blocks if b["type"] == "tool_result"]


def _result_text(result: dict[str, Any]) -> str:
    content = result.get("content", "")
    if isinstance(content, str):
        return content
    return " ".join(b.get("text", "") for b in content if b.get("type") == "text")


@dataclass
class Plan:
    """What to answer: content blocks, stop reason, and stream behaviour."""

    content: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = "end_turn"
    stop_sequence: str | None = None
    slow: bool = False
    brk: bool = False
    cut: bool = False
    leak: str = ""
    """The key to name in a mid-stream error event ("leak key")."""


def plan(body: dict[str, Any], id_prefix: str = "toolu_fake", key: str = "") -> Plan:
    """The scripted answer to a valid request (raises Reject for the failure triggers)."""
    text, results = last_user_text(body["messages"])
    low = text.lower()
    if m := re.search(r"fail (\d{3})", low):
        status = int(m.group(1))
        raise Reject(status, "Overloaded" if status == 529 else f"scripted failure {status}")
    if "too long" in low:
        raise Reject(400, "prompt is too long: 250000 tokens > 200000 maximum")
    leak = key if "leak key" in low else ""
    if leak and not body.get("stream"):
        raise Reject(401, f"invalid x-api-key: {key}")
    p = Plan(slow="slow" in low, brk="break" in low, cut="cut" in low, leak=leak)
    if "think" in low:
        p.content.append({"type": "thinking", "thinking": "Let me think step by step.",
                          "signature": "fake-signature"})  # fmt: skip
    answer = "Hello from fake Claude! You said: " + text if text else "Hello from fake Claude!"
    if results:
        answer = "Got the tool result: " + " | ".join(_result_text(r) for r in results)
    tools = body.get("tools") or []
    calls = (tools * 2)[:2] if "use two tools" in low else tools[:1] if "use tool" in low else []
    if calls:
        answer = "I'll use " + " and ".join(t["name"] for t in calls) + "."
    for stop in body.get("stop_sequences") or []:
        if stop in answer:
            answer, calls = answer[: answer.index(stop)], []
            p.stop_reason, p.stop_sequence = "stop_sequence", stop
    words = _words(answer)
    if len(words) > body["max_tokens"]:
        answer, p.stop_reason, calls = "".join(words[: body["max_tokens"]]), "max_tokens", []
    if answer:
        p.content.append({"type": "text", "text": answer})
    for n, tool in enumerate(calls):
        p.content.append({"type": "tool_use", "id": f"{id_prefix}_{n}", "name": tool["name"],
                          "input": _sample(tool["input_schema"])})  # fmt: skip
    if calls:
        p.stop_reason = "tool_use"
    if "refuse" in low:
        p.stop_reason = "refusal"
    return p


def output_tokens(content: list[dict[str, Any]]) -> int:
    """Deterministic output token count of content blocks."""
    total = 0
    for block in content:
        if block["type"] in ("text", "thinking"):
            total += len(_words(block.get("text") or block.get("thinking") or ""))
        elif block["type"] == "tool_use":
            total += _json_tokens(block["input"])
    return total


def cache_prefix(body: dict[str, Any]) -> list[Any]:
    """The request parts up to the last `cache_control` marker (tools, system, messages)."""
    system = body.get("system")
    parts: list[Any] = list(body.get("tools") or [])
    parts += system if isinstance(system, list) else [system] if system else []
    for msg in body["messages"]:
        parts += [{"role": msg["role"]}, *_blocks(msg)]
    marked = [i for i, p in enumerate(parts) if isinstance(p, dict) and p.get("cache_control")]
    return parts[: marked[-1] + 1] if marked else []


def usage_for(body: dict[str, Any], content: list[Any], seen: set[str]) -> dict[str, int]:
    """The usage to report; records a newly cached prefix in `seen`."""
    system = body.get("system")
    total = _json_tokens([body.get("tools") or [], system or "", body["messages"]])
    prefix = cache_prefix(body)
    cached = _json_tokens(prefix) if prefix else 0
    key = hashlib.sha256(json.dumps(prefix).encode()).hexdigest()
    hit = bool(prefix) and key in seen
    if prefix:
        seen.add(key)
    return {"input_tokens": max(1, total - cached),
            "cache_creation_input_tokens": 0 if hit else cached,
            "cache_read_input_tokens": cached if hit else 0,
            "output_tokens": output_tokens(content)}  # fmt: skip


# --- streaming --------------------------------------------------------------------------------


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def _block_events(index: int, block: dict[str, Any]) -> list[bytes]:
    """content_block_start, the deltas, content_block_stop for one block."""
    kind = block["type"]
    if kind == "text":
        start = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": w} for w in _words(block["text"])]
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": w} for w in _words(block["thinking"])]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
    else:
        start = {**block, "input": {}}
        raw = json.dumps(block["input"])
        pieces = [""] + [raw[i : i + 8] for i in range(0, len(raw), 8)]
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in pieces]
    return [
        _sse("content_block_start", {"index": index, "content_block": start}),
        *(_sse("content_block_delta", {"index": index, "delta": d}) for d in deltas),
        _sse("content_block_stop", {"index": index}),
    ]


def stream_events(message: dict[str, Any], p: Plan) -> list[bytes]:
    """The whole SSE stream of `message`, shortened for the "break" and "cut" triggers."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": 1}}  # fmt: skip
    events = [_sse("message_start", {"message": start}), _sse("ping", {})]
    for index, block in enumerate(message["content"]):
        events += _block_events(index, block)
    if p.brk or p.cut or p.leak:
        events = events[:5]
        if p.brk or p.leak:
            message = f"Overloaded (key {p.leak})" if p.leak else "Overloaded"
            events.append(_sse("error", {"error": {"type": "overloaded_error",
                                                   "message": message}}))  # fmt: skip
        return events
    delta = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
    events.append(_sse("message_delta", {"delta": delta, "usage": usage}))
    events.append(_sse("message_stop", {}))
    return events


# --- the server -------------------------------------------------------------------------------


def error_body(status: int, message: str, etype: str, request_id: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": etype, "message": message},
            "request_id": request_id}  # fmt: skip


class FakeAnthropic:
    """The fake API; `start()` serves it on a loopback port from a background thread."""

    def __init__(self, *, api_key: str | None = None, host: str = "127.0.0.1", port: int = 0):
        self.api_key, self.host, self.port = api_key, host, port
        self.requests: list[Received] = []
        self._seen: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def _not_found(self, request: web.Request) -> web.Response:
        body = error_body(404, f"Not found: {request.path}", "not_found_error", "req_fake_404")
        return web.json_response(body, status=404)

    async def _received(self, request: web.Request) -> Received:
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        headers = {k.lower(): v for k, v in request.headers.items()}
        rec = Received(request.method, request.path, headers, body, query=request.query_string)
        self.requests.append(rec)
        return rec

    async def _count_tokens(self, request: web.Request) -> web.Response:
        rid = f"req_fake_{len(self.requests)}"
        rec = await self._received(request)
        try:
            version = check_headers(request.headers, self.api_key)
            if not isinstance(rec.body, dict):
                raise Reject(400, "There was an issue with your request body: invalid JSON")
            check_body(rec.body, version, count=True)
            plan({**rec.body, "max_tokens": 1 << 30})  # the failure triggers
        except Reject as e:
            rec.status = e.status
            payload = error_body(e.status, e.message, e.etype, rid)
            return web.json_response(payload, status=e.status, headers={"request-id": rid})
        body = rec.body
        tokens = _json_tokens([body.get("tools") or [], body.get("system") or "", body["messages"]])
        return web.json_response({"input_tokens": tokens}, headers={"request-id": rid})

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        n = len(self.requests)
        rid = f"req_fake_{n}"
        rec = await self._received(request)
        body = rec.body
        try:
            version = check_headers(request.headers, self.api_key)
            if isinstance(body, str):
                raise Reject(400, "There was an issue with your request body: invalid JSON")
            check_body(body, version)
            p = plan(body, f"toolu_fake{n}", key_of(request.headers))
        except Reject as e:
            rec.status = e.status
            headers = {"request-id": rid, **({"retry-after": "1"} if e.status == 429 else {})}
            payload = error_body(e.status, e.message, e.etype, rid)
            return web.json_response(payload, status=e.status, headers=headers)
        rec.usage = usage_for(body, p.content, self._seen)
        message = {"id": f"msg_fake_{n}", "type": "message", "role": "assistant",
                   "model": body["model"], "content": p.content, "stop_reason": p.stop_reason,
                   "stop_sequence": p.stop_sequence, "usage": rec.usage}  # fmt: skip
        if not body.get("stream"):
            if p.slow:
                await asyncio.sleep(SLOW_DELAY)
            rec.sent = json.dumps(message).encode()
            headers = {"request-id": rid, "anthropic-ratelimit-requests-remaining": "99"}
            return web.Response(body=rec.sent, content_type="application/json", headers=headers)
        resp = web.StreamResponse(headers={**SSE_HEADERS, "request-id": rid})
        await resp.prepare(request)
        for event in stream_events(message, p):
            if p.slow and event.startswith(b"event: content_block_delta"):
                await asyncio.sleep(SLOW_DELAY)
            rec.sent += event
            await resp.write(event)
        await resp.write_eof()
        return resp

    async def _serve(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    def start(self) -> str:
        """Serve from a background thread; returns the base URL (no `/v1`)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        return self.base_url

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop is None or self._thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = self._runner = None

    def __enter__(self) -> FakeAnthropic:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake Anthropic Messages API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=None, help="the only key accepted (default: any)")
    args = parser.parse_args(argv)
    server = FakeAnthropic(api_key=args.api_key, host=args.host, port=args.port)
    ready = lambda _msg: print(f"listening on http://{args.host}:{args.port}", flush=True)  # noqa: E731
    web.run_app(server.app(), host=args.host, port=args.port, print=ready, access_log=None)


if __name__ == "__main__":
    main()

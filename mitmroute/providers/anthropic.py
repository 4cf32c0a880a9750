"""Anthropic's Messages API behind OpenAI's chat completions API.

Requests go to `POST {api_base}/v1/messages` with `anthropic-version: 2023-06-01` (API version
2026-10-21 rejects `temperature`/`top_p`, which OpenAI clients send routinely).

Clients that speak the Messages API themselves (`mitmroute.inbound.anthropic`) are served
natively (`build_native`): their body goes upstream with only `model` and the credentials
swapped, with their own `anthropic-version` and `anthropic-beta` headers and query string, and
the answer (body or SSE bytes) goes back unchanged; it is still read here (`parse`, `stream`)
for the spend log and the cache.

Translation choices beyond plain renames:

- system and developer messages (wherever they appear) become `system`, in order: a string, or
  a list of text blocks when any carries `cache_control`.
- same-role turns are merged, `tool` results are folded into user turns (results first), and a
  "." user turn is prepended when the conversation does not start with the user.
- `response_format` json_schema -> `output_config.format` (structured outputs); `text` is
  ignored; `json_object` has no equivalent and counts as unsupported.
- `top_k` and `thinking` (Anthropic's own) pass through; `metadata`, `cache`, `store` and
  `stream_options` never go upstream (Anthropic always streams usage).
- `n` > 1, `logprobs`, `top_logprobs`, `logit_bias`, non-zero `presence_penalty` /
  `frequency_penalty`, `seed`, `reasoning_effort` and any other unknown key are unsupported:
  dropped under `drop_params`, else a 400 naming the parameter.
- thinking blocks become `message.reasoning_content` / `delta.reasoning_content`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from mitmroute.config import Deployment
from mitmroute.errors import ProxyError, bad_request, upstream_error
from mitmroute.exchange import Usage
from mitmroute.providers.base import CHAT, Provider, StreamTranslator, UpstreamCall
from mitmroute.streaming.sse import Event, SSEParser

if TYPE_CHECKING:
    from mitmroute.request import NativeRequest

ANTHROPIC_VERSION = "2023-06-01"
NATIVE_CLIENT_HEADERS = ("anthropic-version", "anthropic-beta")
"""A native client's own headers that go upstream with its request."""
DEFAULT_MAX_TOKENS = 4096
# `max_tokens` sent when the client gives none: the model's documented output limit. The
# longest prefix of the model name wins, so dated ids (claude-opus-4-20250514) match too.
MAX_TOKENS_BY_MODEL: dict[str, int] = {
    "claude-3-haiku": 4096, "claude-3-opus": 4096, "claude-3-5-haiku": 8192,
    "claude-3-5-sonnet": 8192, "claude-3-7-sonnet": 64000, "claude-sonnet-4": 64000,
    "claude-opus-4": 32000, "claude-opus-4-5": 64000, "claude-haiku-4-5": 64000,
}  # fmt: skip
PLACEHOLDER_USER_TEXT = "."
STOP_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
    "model_context_window_exceeded": "length", "tool_use": "tool_calls",
    "refusal": "content_filter",
}  # fmt: skip
ERROR_STATUS = {
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
    "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
    "rate_limit_error": 429, "api_error": 500, "timeout_error": 504, "overloaded_error": 529,
}  # fmt: skip
ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded", 529: "overloaded"}
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
IGNORED = frozenset({"model", "metadata", "cache", "store", "stream_options"})
HANDLED = frozenset({
    "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "thinking", "stop", "stream", "tools", "functions", "tool_choice", "function_call",
    "parallel_tool_calls", "user", "response_format",
})  # fmt: skip
# OpenAI parameters Anthropic can't honour, with the values that ask for nothing.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0),
    "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "seed": (None,),
}  # fmt: skip

TOOL_ID_INVALID = re.compile(r"[^a-zA-Z0-9_-]")  # Anthropic's tool ids match ^[a-zA-Z0-9_-]+$

Block = dict[str, Any]
Chunk = dict[str, Any]


# --- request ----------------------------------------------------------------------------------


def messages_url(api_base: str) -> str:
    """The Messages endpoint under `api_base` (with or without a trailing `/v1`)."""
    base = api_base.rstrip("/")
    if base.endswith("/v1/messages"):
        return base
    return f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"


def default_max_tokens(model: str) -> int:
    """The documented output limit of `model`, else DEFAULT_MAX_TOKENS."""
    prefixes = [p for p in MAX_TOKENS_BY_MODEL if model.startswith(p)]
    return MAX_TOKENS_BY_MODEL[max(prefixes, key=len)] if prefixes else DEFAULT_MAX_TOKENS


def unsupported_params(body: dict[str, Any]) -> list[str]:
    """Keys of `body` Anthropic can't do, in body order."""
    out = []
    for key, value in body.items():
        if key in IGNORED or (key in NEUTRAL and value in NEUTRAL[key]):
            continue
        fmt = value.get("type") if key == "response_format" and isinstance(value, dict) else None
        if key not in HANDLED or fmt == "json_object":
            out.append(key)
    return out


def to_anthropic(body: dict[str, Any], model: str, *, drop_params: bool) -> dict[str, Any]:
    """The Messages API request for an OpenAI chat body."""
    unsupported = unsupported_params(body)
    if unsupported and not drop_params:
        raise bad_request(
            f"anthropic does not support the parameter `{unsupported[0]}` "
            "(set drop_params: true to drop it)",
            param=unsupported[0],
        )
    system, messages = convert_messages(body.get("messages"))
    out: dict[str, Any] = {"model": model, "max_tokens": _max_tokens(body, model)}
    if system:
        out["system"] = system
    out["messages"] = messages
    if (temperature := body.get("temperature")) is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise bad_request("`temperature` must be a number", param="temperature")
        out["temperature"] = min(max(float(temperature), 0.0), 1.0)  # OpenAI allows up to 2
    out.update({k: body[k] for k in ("top_p", "top_k", "thinking") if body.get(k) is not None})
    if stop := _stop_sequences(body.get("stop")):
        out["stop_sequences"] = stop
    if tools := convert_tools(body):
        out["tools"] = tools
        if (choice := convert_tool_choice(body)) is not None:
            out["tool_choice"] = choice
    if "response_format" not in unsupported and (fmt := _output_format(body)) is not None:
        out["output_config"] = {"format": fmt}
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}
    if body.get("stream"):
        out["stream"] = True
    return out


def _max_tokens(body: dict[str, Any], model: str) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad_request(f"`{key}` must be a positive integer", param=key)
            return value
    return default_max_tokens(model)


def _output_format(body: dict[str, Any]) -> Block | None:
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    schema = (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
    return {"type": "json_schema", "schema": schema}


def _stop_sequences(stop: Any) -> list[str]:
    items = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad_request("`stop` must be a string or a list of strings", param="stop")
    return [s for s in items if s.strip()]  # the API rejects whitespace-only sequences


def convert_tools(body: dict[str, Any]) -> list[Block]:
    """`tools` (function tools only) and legacy `functions` as Anthropic tools."""
    out = []
    for i, tool in enumerate(body.get("tools") or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function":
            raise bad_request("anthropic supports only function tools", param=f"tools[{i}]")
        out.append(_tool(fn, tool.get("cache_control") or fn.get("cache_control")))
    out.extend(_tool(fn, fn.get("cache_control")) for fn in body.get("functions") or [])
    return out


def _tool(fn: dict[str, Any], cache_control: Any) -> Block:
    if not isinstance(fn.get("name"), str):
        raise bad_request("every tool needs a function name", param="tools")
    tool: Block = {"name": fn["name"]}
    if fn.get("description"):
        tool["description"] = fn["description"]
    tool["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
    if cache_control:
        tool["cache_control"] = cache_control
    return tool


def convert_tool_choice(body: dict[str, Any]) -> Block | None:
    """`tool_choice` / `function_call` and `parallel_tool_calls: false` as Anthropic's."""
    choice = body.get("tool_choice", body.get("function_call"))
    named = (choice.get("function") or choice) if isinstance(choice, dict) else {}
    out: Block | None
    if choice is None:
        out = None
    elif choice in ("auto", "required", "none"):
        out = {"type": {"auto": "auto", "required": "any", "none": "none"}[choice]}
    elif isinstance(named, dict) and isinstance(named.get("name"), str):
        out = {"type": "tool", "name": named["name"]}
    else:
        raise bad_request(f"unsupported tool_choice {choice!r}", param="tool_choice")
    if body.get("parallel_tool_calls") is False:
        out = out or {"type": "auto"}
        if out["type"] != "none":
            out["disable_parallel_tool_use"] = True
    return out


def convert_messages(messages: Any) -> tuple[str | list[Block], list[Block]]:
    """OpenAI `messages` as Anthropic's `system` and alternating `messages`."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list", param="messages")
    system: list[Block] = []
    turns: list[tuple[str, list[Block]]] = []
    pending_fn: dict[str, str] = {}  # legacy function_call name -> the tool_use id made for it
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, dict) else None
        if role in ("system", "developer"):
            system.extend(_cached(msg, _parts(msg.get("content"), where, {"text"})))
        elif role == "user":
            turns.append(("user", _cached(msg, _parts(msg.get("content"), where))))
        elif role == "assistant":
            turns.append(("assistant", _cached(msg, _assistant(msg, i, pending_fn))))
        elif role in ("tool", "function"):
            call_id = msg.get("tool_call_id") or pending_fn.pop(str(msg.get("name")), None)
            if not isinstance(call_id, str):
                raise bad_request(f"{where} has no matching tool call id", param=where)
            turns.append(("user", _cached(msg, [_tool_result(call_id, msg, where)])))
        else:
            raise bad_request(f"{where}: unsupported role {role!r}", param=f"{where}.role")
    if any("cache_control" in b for b in system):
        return system, _alternate(turns)
    return "\n\n".join(b["text"] for b in system), _alternate(turns)


def _cached(msg: dict[str, Any], blocks: list[Block]) -> list[Block]:
    """A message-level `cache_control` lands on the message's last block."""
    if msg.get("cache_control") and blocks and "cache_control" not in blocks[-1]:
        blocks[-1] = {**blocks[-1], "cache_control": msg["cache_control"]}
    return blocks


def _parts(content: Any, where: str, allowed: set[str] | None = None) -> list[Block]:
    """Content (a string or a list of parts) as content blocks; empty text is skipped."""
    if content is None or content == "":
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list", param=f"{where}.content")
    out = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if (allowed is not None and kind not in allowed) or kind not in _PART_TYPES:
            raise bad_request(f"{at}: {kind!r} parts are not supported here", param=at)
        block = _PART_TYPES[kind](part, at)
        if block is not None:
            if part.get("cache_control"):
                block["cache_control"] = part["cache_control"]
            out.append(block)
    return out


def _text(part: dict[str, Any], where: str) -> Block | None:
    text = part.get("text", part.get("refusal"))
    return {"type": "text", "text": text} if text else None


def _data_uri(url: str, where: str) -> tuple[str, str]:
    header, _, data = url.partition(",")
    if not header.endswith(";base64") or not data:
        raise bad_request(f"{where}: only base64 data URIs are supported", param=where)
    return header[len("data:") : -len(";base64")].split(";")[0], data


def _image(part: dict[str, Any], where: str) -> Block:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    if not isinstance(url, str) or not url.startswith("data:"):
        raise bad_request(f"{where}: image_url must be an http(s) URL or a data URI", param=where)
    media_type, data = _data_uri(url, where)
    if media_type not in IMAGE_TYPES:
        raise bad_request(f"{where}: unsupported image type {media_type!r}", param=where)
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


_PART_TYPES: dict[Any, Callable[[dict[str, Any], str], Block | None]] = {
    "text": _text, "refusal": _text, "image_url": _image,
}  # fmt: skip


def _assistant(msg: dict[str, Any], i: int, pending_fn: dict[str, str]) -> list[Block]:
    where = f"messages[{i}]"
    blocks = _parts(msg.get("content"), where, {"text", "refusal"})
    for j, call in enumerate(msg.get("tool_calls") or []):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not call.get("id"):
            raise bad_request(f"{where}.tool_calls[{j}] needs an id and a function", param=where)
        blocks.append(_tool_use(call["id"], fn, f"{where}.tool_calls[{j}].function.arguments"))
    if isinstance(fn := msg.get("function_call"), dict):
        pending_fn[str(fn.get("name"))] = call_id = f"toolu_fc_{i}"
        blocks.append(_tool_use(call_id, fn, f"{where}.function_call.arguments"))
    return blocks


def _tool_use(call_id: str, fn: dict[str, Any], where: str) -> Block:
    raw = fn.get("arguments") or "{}"
    try:
        args = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        raise bad_request(f"{where} is not valid JSON: {raw[:100]!r}", param=where) from None
    if not isinstance(args, dict):
        raise bad_request(f"{where} must be a JSON object", param=where)
    tool_id = TOOL_ID_INVALID.sub("_", call_id)
    return {"type": "tool_use", "id": tool_id, "name": fn.get("name"), "input": args}


def _tool_result(call_id: str, msg: dict[str, Any], where: str) -> Block:
    content = msg.get("content")
    if not isinstance(content, str):
        content = _parts(content, where, {"text", "image_url"})
    tool_id = TOOL_ID_INVALID.sub("_", call_id)
    return {"type": "tool_result", "tool_use_id": tool_id, "content": content}


def _alternate(turns: list[tuple[str, list[Block]]]) -> list[Block]:
    """Merge same-role turns, drop empty ones, start with the user, tool results first."""
    merged: list[Block] = []
    for role, blocks in turns:
        if blocks and merged and merged[-1]["role"] == role:
            merged[-1]["content"].extend(blocks)
        elif blocks:
            merged.append({"role": role, "content": list(blocks)})
    if not merged or merged[0]["role"] != "user":
        placeholder = {"type": "text", "text": PLACEHOLDER_USER_TEXT}
        merged.insert(0, {"role": "user", "content": [placeholder]})
    for turn in merged:
        if turn["role"] == "user":
            turn["content"].sort(key=lambda b: b["type"] != "tool_result")  # stable
    final = merged[-1]["content"]
    if merged[-1]["role"] == "assistant" and final[-1]["type"] == "text":
        # The API rejects a final (prefill) assistant turn that ends in whitespace.
        final[-1] = {**final[-1], "text": final[-1]["text"].rstrip()}
        if not final[-1]["text"]:
            final.pop()
            if not final:
                merged.pop()
    return merged


# --- response ---------------------------------------------------------------------------------


def finish_reason(stop_reason: str | None) -> str:
    """OpenAI's finish_reason for Anthropic's stop_reason."""
    return STOP_REASONS.get(stop_reason or "", "stop")


def usage_to_openai(usage: dict[str, Any]) -> dict[str, Any]:
    """OpenAI usage: prompt tokens include cache reads and cache writes."""
    created = int(usage.get("cache_creation_input_tokens") or 0)
    read = int(usage.get("cache_read_input_tokens") or 0)
    return Usage(
        prompt_tokens=int(usage.get("input_tokens") or 0) + created + read,
        completion_tokens=int(usage.get("output_tokens") or 0),
        cached_tokens=read,
        cache_creation_tokens=created,
    ).to_openai()


def _tool_call(block: dict[str, Any]) -> dict[str, Any]:
    arguments = json.dumps(block.get("input") or {})
    return {"id": block["id"], "type": "function",
            "function": {"name": block["name"], "arguments": arguments}}  # fmt: skip


def to_openai(msg: dict[str, Any], created: int) -> dict[str, Any]:
    """A `chat.completion` body for an Anthropic Message."""
    blocks = [b for b in msg.get("content") or [] if isinstance(b, dict)]
    texts = [b.get("text") or "" for b in blocks if b.get("type") == "text"]
    thinking = [b.get("thinking") or "" for b in blocks if b.get("type") == "thinking"]
    calls = [_tool_call(b) for b in blocks if b.get("type") == "tool_use"]
    message: dict[str, Any] = {"role": "assistant", "refusal": None,
                               "content": "".join(texts) if texts else None}  # fmt: skip
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    choice = {"index": 0, "message": message, "logprobs": None,
              "finish_reason": finish_reason(msg.get("stop_reason"))}  # fmt: skip
    return {"id": f"chatcmpl-{msg.get('id', '')}", "object": "chat.completion",
            "created": created, "model": msg.get("model"), "choices": [choice],
            "usage": usage_to_openai(msg.get("usage") or {})}  # fmt: skip


def anthropic_error(status: int, payload: Any) -> ProxyError:
    """An OpenAI-shaped error for Anthropic's error answer; 529 (overloaded) becomes 503."""
    err = upstream_error(status, payload, provider="anthropic")
    code = err.code or ERROR_CODES.get(status)
    if status == 529:
        return replace(err, status=503, type="overloaded_error", code=code, retryable=True)
    return replace(err, code=code)


def _bad_upstream(what: str, data: Any) -> ProxyError:
    return ProxyError(502, f"anthropic sent {what}: {data[:200]!r}", "server_error",
                      code="bad_upstream_response", retryable=True)  # fmt: skip


class AnthropicStream(StreamTranslator):
    """Anthropic's SSE events as OpenAI `chat.completion.chunk` dicts.

    An `error` event raises at once, or, when the same `feed` already produced chunks, on the
    next `feed`/`finish` call, so no chunk before the error is lost.
    """

    def __init__(self, on_error: Callable[[int, Any], ProxyError], model: str) -> None:
        self._parser = SSEParser()
        self._on_error = on_error
        self._id = "chatcmpl-anthropic"
        self._model = model
        self._created = int(time.time())
        self._usage: dict[str, int] = {}
        self._tools: dict[int, int] = {}  # content block index -> tool call index
        self._error: ProxyError | None = None
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, data: bytes) -> list[Chunk]:
        return self._handle(self._parser.feed(data))

    def finish(self) -> list[Chunk]:
        return self._handle(self._parser.finish())

    def _handle(self, events: list[Event]) -> list[Chunk]:
        if self._error is not None:
            raise self._error
        out: list[Chunk] = []
        for event in events:
            try:
                out.extend(self._event(event))
            except ProxyError as e:
                if not out:
                    raise
                self._error = e
                break
        return out

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None) -> Chunk:
        chunk = {"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                 "model": self._model, "choices": []}  # fmt: skip
        if delta is not None:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            chunk["choices"].append(choice)
        return chunk

    def _event(self, event: Event) -> list[Chunk]:
        try:
            data = json.loads(event.data) if event.data else {}
        except ValueError:
            raise _bad_upstream("invalid stream data", event.data) from None
        if not isinstance(data, dict):
            raise _bad_upstream("unexpected stream data", event.data)
        kind = data.get("type") or event.event
        if kind == "message_start":
            msg = data.get("message") or {}
            self._id = f"chatcmpl-{msg.get('id', 'anthropic')}"
            self._model = msg.get("model") or self._model
            self._add_usage(msg.get("usage"))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._block_start(data.get("index", 0), data.get("content_block") or {})
        if kind == "content_block_delta":
            return self._block_delta(data.get("index", 0), data.get("delta") or {})
        if kind == "message_delta":
            self._add_usage(data.get("usage"))
            reason = (data.get("delta") or {}).get("stop_reason")
            return [self._chunk({}, finish_reason(reason))] if reason else []
        if kind == "message_stop":
            self._done = True
            return [{**self._chunk(None), "usage": usage_to_openai(self._usage)}]
        if kind == "error":
            etype = (data.get("error") or {}).get("type")
            raise self._on_error(ERROR_STATUS.get(etype, 500), data)
        return []  # ping, content_block_stop, and event types added later

    def _block_start(self, index: int, block: dict[str, Any]) -> list[Chunk]:
        if block.get("type") == "tool_use":
            self._tools[index] = len(self._tools)
            fn = {"name": block["name"], "arguments": ""}
            call = {"index": self._tools[index], "id": block["id"], "type": "function",
                    "function": fn}  # fmt: skip
            return [self._chunk({"tool_calls": [call]})]
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        return []

    def _block_delta(self, index: int, delta: dict[str, Any]) -> list[Chunk]:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if kind == "input_json_delta" and delta.get("partial_json") and index in self._tools:
            call = {"index": self._tools[index], "function": {"arguments": delta["partial_json"]}}
            return [self._chunk({"tool_calls": [call]})]
        if kind == "thinking_delta" and delta.get("thinking"):
            return [self._chunk({"reasoning_content": delta["thinking"]})]
        return []

    def _add_usage(self, usage: Any) -> None:
        for key, value in (usage or {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                self._usage[key] = value  # message_delta counts are cumulative


class AnthropicProvider(Provider):
    """`anthropic/<model>` deployments: chat completions via the Messages API, and Messages
    requests as they are."""

    name = "anthropic"
    endpoints = frozenset({CHAT})
    native = "anthropic"
    native_headers = ("request-id", "anthropic-ratelimit-")

    def build_native(
        self, native: NativeRequest, client_headers: Mapping[str, str], deployment: Deployment
    ) -> UpstreamCall:
        payload = {**native.body, "model": deployment.model}
        headers = {"anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
        for name in NATIVE_CLIENT_HEADERS:
            if value := client_headers.get(name):
                headers[name] = value
        if deployment.api_key:
            headers["x-api-key"] = deployment.api_key
        headers.update(deployment.extra_headers)
        url = messages_url(deployment.api_base)
        if native.endpoint != "messages":
            url += native.endpoint.removeprefix("messages")
        if native.query:
            url += "?" + native.query
        return UpstreamCall("POST", url, headers, json.dumps(payload).encode())

    def build(
        self, endpoint: str, body: dict[str, Any], deployment: Deployment, *, drop_params: bool
    ) -> UpstreamCall:
        payload = to_anthropic(body, deployment.model, drop_params=drop_params)
        headers = {"anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
        if deployment.api_key:
            headers["x-api-key"] = deployment.api_key
        headers.update(deployment.extra_headers)
        url = messages_url(deployment.api_base)
        return UpstreamCall("POST", url, headers, json.dumps(payload).encode())

    def parse(self, endpoint: str, raw: bytes, deployment: Deployment) -> dict[str, Any]:
        try:
            msg = json.loads(raw)
        except ValueError:
            raise _bad_upstream("invalid JSON", raw) from None
        if isinstance(msg, dict) and msg.get("type") == "error":
            err = msg.get("error") if isinstance(msg.get("error"), dict) else {}
            raise self.error(ERROR_STATUS.get(err.get("type"), 500), msg)
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), list):
            raise _bad_upstream("an unexpected body", raw)
        return to_openai(msg, int(time.time()))

    def stream(self, endpoint: str, deployment: Deployment) -> StreamTranslator:
        return AnthropicStream(self.error, deployment.model)

    def error(self, status: int, payload: Any) -> ProxyError:
        return anthropic_error(status, payload)

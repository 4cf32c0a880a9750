"""Ollama's native API (`ollama/` and `ollama_chat/`): /api/chat, /api/generate, /api/embed.

Streams are NDJSON; `prompt_eval_count` / `eval_count` become OpenAI `usage`.
`reasoning_effort` asks a thinking model to think (`think: true`); its `thinking` comes back
as `reasoning_content`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from mitmroute.config import Deployment
from mitmroute.errors import ProxyError, bad_request
from mitmroute.providers.base import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    Provider,
    StreamTranslator,
    UpstreamCall,
)

# OpenAI parameter -> Ollama `options` key.
OPTION_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_tokens": "num_predict",
    "max_completion_tokens": "num_predict",
    "stop": "stop",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
IGNORED = {
    "model",
    "messages",
    "prompt",
    "input",
    "stream",
    "stream_options",
    "user",
    "n",
    "tools",
    "tool_choice",
    "response_format",
    "metadata",
    "store",
    "parallel_tool_calls",
    "reasoning_effort",
}
DONE_REASONS = {"stop": "stop", "length": "length", "load": "stop"}


def _options(body: dict[str, Any], drop_params: bool) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in body.items():
        if key in OPTION_NAMES:
            options[OPTION_NAMES[key]] = (
                [value] if key == "stop" and isinstance(value, str) else value
            )
        elif key not in IGNORED and not drop_params and value not in (None, False):
            raise bad_request(f"Ollama does not support the parameter `{key}`", param=key)
    if body.get("n", 1) not in (1, None) and not drop_params:
        raise bad_request("Ollama does not support `n` > 1", param="n")
    return options


def _message(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.get("role", "user")}
    content = m.get("content")
    if isinstance(content, list):
        texts, images = [], []
        for part in content:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if url.startswith("data:") and "," in url:
                    images.append(url.split(",", 1)[1])
                else:
                    raise bad_request("Ollama takes images as data: URIs only", param="messages")
        out["content"] = "".join(texts)
        if images:
            out["images"] = images
    else:
        out["content"] = content or ""
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {
                "function": {
                    "name": c["function"]["name"],
                    "arguments": json.loads(c["function"].get("arguments") or "{}"),
                }
            }
            for c in m["tool_calls"]
        ]
    return out


def _usage(payload: dict[str, Any]) -> dict[str, int]:
    prompt = int(payload.get("prompt_eval_count") or 0)
    completion = int(payload.get("eval_count") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _tool_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {
                "name": c["function"]["name"],
                "arguments": json.dumps(c["function"].get("arguments") or {}),
            },
        }
        for c in message.get("tool_calls") or ()
    ]


class OllamaStream(StreamTranslator):
    """NDJSON lines of /api/chat or /api/generate become chat/text completion chunks."""

    def __init__(self, endpoint: str, model: str) -> None:
        self._buffer = b""
        self._done = False
        self._endpoint = endpoint
        self._id = f"{'chatcmpl' if endpoint == CHAT else 'cmpl'}-{uuid.uuid4().hex}"
        self._created = int(time.time())
        self._model = model
        self._started = False
        self._tool_index = 0

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        return [c for line in lines if line.strip() for c in self._line(json.loads(line))]

    def finish(self) -> list[dict[str, Any]]:
        rest, self._buffer = self._buffer, b""
        return self._line(json.loads(rest)) if rest.strip() else []

    @property
    def done(self) -> bool:
        return self._done

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self._endpoint == CHAT else "text_completion"
        return {
            "id": self._id,
            "object": kind,
            "created": self._created,
            "model": self._model,
            "choices": choices,
            **extra,
        }

    def _line(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        if "error" in payload:
            raise ProxyError(
                502, f"ollama: {payload['error']}", "server_error", code="upstream_error"
            )
        self._model = payload.get("model", self._model)
        out = []
        if self._endpoint == CHAT:
            message = payload.get("message") or {}
            delta: dict[str, Any] = {}
            if not self._started:
                delta["role"] = "assistant"
                self._started = True
            if message.get("thinking"):
                delta["reasoning_content"] = message["thinking"]
            if message.get("content"):
                delta["content"] = message["content"]
            calls = _tool_calls(message)
            if calls:
                delta["tool_calls"] = [
                    {"index": self._tool_index + i, **c} for i, c in enumerate(calls)
                ]
                self._tool_index += len(calls)
            if delta:
                out.append(self._chunk([{"index": 0, "delta": delta, "finish_reason": None}]))
        elif payload.get("response"):
            out.append(
                self._chunk(
                    [
                        {
                            "index": 0,
                            "text": payload["response"],
                            "finish_reason": None,
                            "logprobs": None,
                        }
                    ]
                )
            )
        if payload.get("done"):
            reason = (
                "tool_calls"
                if self._tool_index
                else DONE_REASONS.get(payload.get("done_reason", "stop"), "stop")
            )
            key = "delta" if self._endpoint == CHAT else "text"
            out.append(
                self._chunk(
                    [
                        {"index": 0, "delta": {}, "finish_reason": reason}
                        if key == "delta"
                        else {"index": 0, "text": "", "finish_reason": reason, "logprobs": None}
                    ]
                )
            )
            out.append(self._chunk([], usage=_usage(payload)))
            self._done = True
        return out


class OllamaProvider(Provider):
    name = "ollama"
    endpoints = frozenset({CHAT, COMPLETIONS, EMBEDDINGS})

    def build(
        self, endpoint: str, body: dict[str, Any], deployment: Deployment, *, drop_params: bool
    ) -> UpstreamCall:
        out: dict[str, Any] = {"model": deployment.model}
        if endpoint == EMBEDDINGS:
            path, out["input"] = "/api/embed", body.get("input")
        else:
            out["stream"] = bool(body.get("stream"))
            out["options"] = _options(body, drop_params)
            if endpoint == CHAT:
                path = "/api/chat"
                out["messages"] = [_message(m) for m in body.get("messages") or ()]
                if body.get("tools"):
                    out["tools"] = body["tools"]
                if body.get("reasoning_effort"):
                    out["think"] = True
            else:
                path, out["prompt"] = "/api/generate", body.get("prompt")
            response_format = body.get("response_format") or {}
            if response_format.get("type") == "json_object":
                out["format"] = "json"
            elif response_format.get("type") == "json_schema":
                out["format"] = (response_format.get("json_schema") or {}).get("schema", "json")
        headers = {"content-type": "application/json", **deployment.extra_headers}
        if deployment.api_key:
            headers["authorization"] = f"Bearer {deployment.api_key}"
        return UpstreamCall("POST", deployment.api_base + path, headers, json.dumps(out).encode())

    def parse(self, endpoint: str, raw: bytes, deployment: Deployment) -> dict[str, Any]:
        payload = json.loads(raw)
        created = int(time.time())
        model = payload.get("model", deployment.model)
        if endpoint == EMBEDDINGS:
            data = [
                {"object": "embedding", "index": i, "embedding": e}
                for i, e in enumerate(payload.get("embeddings") or ())
            ]
            prompt = int(payload.get("prompt_eval_count") or 0)
            return {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
            }
        reason = DONE_REASONS.get(payload.get("done_reason", "stop"), "stop")
        if endpoint == COMPLETIONS:
            choice = {
                "index": 0,
                "text": payload.get("response", ""),
                "finish_reason": reason,
                "logprobs": None,
            }
            return {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": _usage(payload),
            }
        message = payload.get("message") or {}
        calls = _tool_calls(message)
        out_message: dict[str, Any] = {
            "role": "assistant",
            "content": message.get("content"),
            "refusal": None,
        }
        if message.get("thinking"):
            out_message["reasoning_content"] = message["thinking"]
        if calls:
            out_message["tool_calls"] = calls
            reason = "tool_calls"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "message": out_message, "finish_reason": reason, "logprobs": None}
            ],
            "usage": _usage(payload),
        }

    def stream(self, endpoint: str, deployment: Deployment) -> StreamTranslator:
        return OllamaStream(endpoint, deployment.model)

    def error(self, status: int, payload: Any) -> ProxyError:
        if isinstance(payload, dict) and isinstance(payload.get("error"), str):
            payload = {"error": {"message": f"ollama: {payload['error']}"}}
        if status == 404:
            return ProxyError(
                404,
                _message_of(payload),
                "invalid_request_error",
                code="model_not_found",
                kind="bad_request",
            )
        return super().error(status, payload)


def _message_of(payload: Any) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("message"))
    return str(payload)

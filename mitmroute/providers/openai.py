"""OpenAI and every OpenAI-compatible server (vLLM, llama.cpp, LM Studio, Groq, ...).

The body goes upstream as the client wrote it, with the deployment's model name; streams are
asked for usage (`stream_options.include_usage`) so the spend log gets exact counts.
"""

from __future__ import annotations

import json
from typing import Any

from mitmroute.config import Deployment
from mitmroute.errors import ProxyError, upstream_error
from mitmroute.providers.base import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    Provider,
    StreamTranslator,
    UpstreamCall,
)
from mitmroute.streaming.sse import SSEParser


class OpenAIStream(StreamTranslator):
    """OpenAI's own SSE chunks pass through as dicts; `[DONE]` ends the stream."""

    __slots__ = ("_done", "_parser", "_provider", "last_events")

    def __init__(self, provider: str) -> None:
        self._parser = SSEParser()
        self._done = False
        self._provider = provider
        self.last_events: list[bytes] | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return self._chunks(self._parser.feed(data))

    def finish(self) -> list[dict[str, Any]]:
        return self._chunks(self._parser.finish())

    def _chunks(self, events: list) -> list[dict[str, Any]]:
        out = []
        raw: list[bytes] | None = []
        for event in events:
            if event.data == "[DONE]":
                self._done = True
                continue
            if raw is not None:
                if "\n" in event.data:  # a data field of several lines: encoded anew
                    raw = None
                else:
                    raw.append(f"data: {event.data}\n\n".encode())
            try:
                chunk = json.loads(event.data)
            except ValueError:
                raise ProxyError(
                    502,
                    f"upstream sent invalid stream data: {event.data[:200]!r}",
                    "server_error",
                    code="bad_upstream_stream",
                ) from None
            if isinstance(chunk, dict) and "error" in chunk:
                status = chunk["error"].get("status") if isinstance(chunk["error"], dict) else None
                code = status if isinstance(status, int) and 400 <= status < 600 else 500
                raise upstream_error(code, chunk, provider=self._provider)
            out.append(chunk)
        self.last_events = raw
        return out

    @property
    def done(self) -> bool:
        return self._done


class OpenAIProvider(Provider):
    name = "openai"
    endpoints = frozenset({CHAT, COMPLETIONS, EMBEDDINGS})
    verbatim = True

    def build(
        self, endpoint: str, body: dict[str, Any], deployment: Deployment, *, drop_params: bool
    ) -> UpstreamCall:
        out = dict(body)
        out["model"] = deployment.model
        if out.get("stream") and endpoint in (CHAT, COMPLETIONS):
            options = dict(out.get("stream_options") or {})
            options["include_usage"] = True
            out["stream_options"] = options
        headers = {"content-type": "application/json"}
        if deployment.api_key:
            headers["authorization"] = f"Bearer {deployment.api_key}"
        headers.update(deployment.extra_headers)
        url = f"{deployment.api_base}/{endpoint}"
        return UpstreamCall("POST", url, headers, json.dumps(out).encode())

    def parse(self, endpoint: str, raw: bytes, deployment: Deployment) -> dict[str, Any]:
        try:
            body = json.loads(raw)
        except ValueError:
            raise ProxyError(
                502,
                "upstream answered with invalid JSON",
                "server_error",
                code="bad_upstream_response",
                retryable=True,
            ) from None
        if isinstance(body, dict) and "error" in body and not body.get("choices"):
            # some gateways answer 200 with an error object: an error, never a cacheable answer
            raise upstream_error(502, body, provider=self.name)
        if not isinstance(body, dict):
            raise ProxyError(
                502,
                "upstream answered with a non-object JSON body",
                "server_error",
                code="bad_upstream_response",
                retryable=True,
            )
        return body

    def stream(self, endpoint: str, deployment: Deployment) -> StreamTranslator:
        return OpenAIStream(self.name)

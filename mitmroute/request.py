"""The engine's boundary: the request it is given, the reply it returns, and small helpers
for reading requests (endpoint, bearer key)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mitmroute.bodies import parse_json_object
from mitmroute.errors import ProxyError
from mitmroute.exchange import Exchange
from mitmroute.providers import CHAT, COMPLETIONS, EMBEDDINGS

ROUTED_ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS)
JSON_HEADERS = {"content-type": "application/json"}
SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}


@dataclass(slots=True)
class ClientRequest:
    """What the engine needs of an intercepted request."""

    method: str
    path: str
    headers: Mapping[str, str]
    """Lower-case header names."""
    body: bytes
    identity: dict[str, Any] = field(default_factory=dict)
    """What authentication learned of the caller: key_alias, team, api_key_hash, user_id, and
    for a virtual key with a budget `budget_share` (its settled spend in the current window /
    max_budget, when admitted; a complexity router's budget step-down reads it)."""
    scheme: str = "https"
    host: str = ""
    port: int = 443
    """Where the client meant the request to go (the intercepted host)."""
    ledger_endpoint: str | None = None
    """What the client called, as the spend log names it, when an inbound dialect translated
    the request (`responses`, `messages`); None: the path's own endpoint."""
    native: NativeRequest | None = None
    """The client's own request, when an inbound dialect translated it: a deployment whose
    provider speaks that dialect is sent this instead of the translation."""


@dataclass(frozen=True, slots=True)
class NativeRequest:
    """A request in an inbound dialect (e.g. Anthropic's Messages), as the client sent it.

    The engine never reads it; `Upstream` hands it to a provider that speaks `dialect`, which
    sends it with only the model and credentials swapped. Other providers get the engine's
    (OpenAI chat) translation, unless `untranslatable` names something only this dialect
    can carry: then they are skipped, as a deployment that can't take a parameter is.
    """

    dialect: str
    endpoint: str
    """The dialect's endpoint, e.g. `messages` or `messages/count_tokens`."""
    body: dict[str, Any]
    query: str = ""
    """The query string the client sent (`beta=true`), without `?`."""
    untranslatable: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    """Parameters of the translation a backend may not have (`reasoning_effort`, `top_k`):
    when it refuses the request (400), the same deployment is asked once more without those
    the refusal names (all of them when it names none)."""

    def cache_body(self) -> dict[str, Any]:
        """What the response cache keys the request by: the client's own body (a translation
        may leave out what changes the answer), marked with its dialect."""
        return {**self.body, "native_dialect": self.dialect}


@dataclass(slots=True)
class Reply:
    """The engine's answer: a whole body, a stream of bytes, or 'let it pass through'."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    passthrough: bool = False
    exchange: Exchange | None = None
    native: bool = False
    """The body or stream is already in the client's own dialect (`ClientRequest.native` was
    answered by a provider that speaks it): the inbound layer passes it on unchanged."""
    error: ProxyError | None = None
    """The error this reply carries (status >= 400), for a dialect to render in its shape."""


def endpoint_of(path: str) -> str | None:
    """`/v1/chat/completions?x` -> `chat/completions`; None for paths outside `/v1/`."""
    path = path.split("?", 1)[0]
    if not path.startswith("/v1/"):
        return None
    return path[4:].rstrip("/")


def new_exchange(request: ClientRequest, endpoint: str) -> Exchange:
    """The record of a request that just arrived: who sent it, when, with which tags."""
    identity = request.identity
    key = client_key(request.headers)
    tags = [t.strip() for t in request.headers.get("x-mitmroute-tags", "").split(",") if t.strip()]
    return Exchange(
        request_id=new_request_id(),
        started_at=now_utc(),
        endpoint=endpoint,
        api_key_hash=identity.get("api_key_hash") or (hash_key(key) if key else None),
        key_alias=identity.get("key_alias"),
        team=identity.get("team"),
        tags=tags,
        clock_start=time.perf_counter(),
    )


def new_request_id() -> str:
    """`mr-` and a random version-4 UUID's hex, without building a `uuid.UUID` (a third of
    a request's bookkeeping)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    return "mr-" + raw.hex()


def endpoint_name(path: str) -> str:
    """The spend log's `endpoint`: `chat/completions` for a `/v1/` path, else the whole path."""
    return endpoint_of(path) or path.split("?", 1)[0]


def refused_exchange(request: ClientRequest, error: ProxyError) -> Exchange:
    """The spend-log record of a request the proxy answered with an error before routing it
    (a refused path, auth, budget, rate limit, a body it can't read, an internal failure)."""
    exchange = new_exchange(request, endpoint_name(request.path))
    exchange.status_code, exchange.error_type = error.status, error.code or error.type
    with contextlib.suppress(ProxyError):
        body = parse_json_object(request.body)
        model = body.get("model")
        exchange.requested_model = model if isinstance(model, str) and model else None
        exchange.stream = body.get("stream") is True
    exchange.ended_at, exchange.latency_ms = exchange.started_at, 0.0
    return exchange


@functools.lru_cache(maxsize=4096)
def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    if value[:7].lower() == "bearer ":
        return value[7:].strip() or None
    return None


def client_key(headers: Mapping[str, str]) -> str | None:
    """The key a client presents: `Authorization: Bearer <key>` (OpenAI's way), else
    `x-api-key` (Anthropic's)."""
    return bearer(headers) or headers.get("x-api-key", "").strip() or None


def now_utc() -> datetime:
    return datetime.now(UTC)

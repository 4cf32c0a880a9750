"""The request story: match, parse, pick a deployment, (cache), call with fallbacks, translate,
respond, log.

`Engine.handle` takes a plain `ClientRequest` and returns a `Reply`; it knows nothing of
mitmproxy, so it is tested directly. The addon in `mitmroute.addons.router` adapts flows to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp

from mitmroute import errors
from mitmroute.cache import (
    CacheControls,
    CachedAnswer,
    Flight,
    ResponseCache,
    cache_key,
    parse_controls,
    replay_stream,
    scope_id,
)
from mitmroute.config import Deployment, RouterConfig
from mitmroute.errors import ProxyError
from mitmroute.exchange import Attempt, Exchange, Usage
from mitmroute.providers import CHAT, COMPLETIONS, EMBEDDINGS, Provider, provider_for
from mitmroute.providers.base import StreamTranslator
from mitmroute.routing.cooldown import Cooldowns
from mitmroute.routing.ladder import (
    backoff,
    build_ladder,
    parse_retry_after,
    retries_for,
    special_fallbacks,
)
from mitmroute.routing.limits import DeploymentLimits
from mitmroute.routing.picker import DeploymentPicker
from mitmroute.spend import PriceBook, estimate_prompt_tokens, estimate_text_tokens
from mitmroute.streaming.sse import DONE, ChunkAssembler, SSEParser, encode, encode_error

log = logging.getLogger("mitmroute")

ROUTED_ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS)
JSON_HEADERS = {"content-type": "application/json"}
SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
FORWARDED_CLIENT_HEADERS = ("openai-organization", "openai-project")


@dataclass(slots=True)
class ClientRequest:
    """What the engine needs of an intercepted request."""

    method: str
    path: str
    headers: Mapping[str, str]
    """Lower-case header names."""
    body: bytes
    identity: dict[str, Any] = field(default_factory=dict)
    """What authentication learned of the caller: key_alias, team, api_key_hash, ..."""


@dataclass(slots=True)
class Reply:
    """The engine's answer: a whole body, a stream of bytes, or 'let it pass through'."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    passthrough: bool = False
    exchange: Exchange | None = None


@dataclass(slots=True)
class Answer:
    """A successful upstream answer, before it becomes a Reply."""

    deployment: Deployment
    body: dict[str, Any] | None = None
    raw: bytes | None = None
    """The backend's own bytes, when they already are the OpenAI answer (no re-encoding)."""
    stream: _OpenStream | None = None


@dataclass(slots=True)
class CacheTicket:
    """A request's dealings with the cache: its key, controls, hit, and single flight."""

    key: str
    controls: CacheControls
    hit: CachedAnswer | None = None
    flight: Flight[CachedAnswer] | None = None

    def release(self) -> None:
        if self.flight is not None:
            self.flight.release()
            self.flight = None


@dataclass(slots=True)
class _OpenStream:
    response: aiohttp.ClientResponse
    translator: StreamTranslator
    first: list[dict[str, Any]]
    read_timeout: float | None


class PassthroughTap:
    """Watches a passed-through stream go by (unchanged) to read its usage for the spend log."""

    __slots__ = ("exchange", "parser", "usage")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.parser = SSEParser()
        self.usage: Usage | None = None

    def observe(self, data: bytes) -> bytes:
        for event in self.parser.feed(data) if data else self.parser.finish():
            if '"usage"' in event.data:
                with contextlib.suppress(ValueError, TypeError):
                    self.usage = (
                        Usage.from_openai(json.loads(event.data).get("usage")) or self.usage
                    )
        return data


def endpoint_of(path: str) -> str | None:
    """`/v1/chat/completions?x` -> `chat/completions`; None for paths outside `/v1/`."""
    path = path.split("?", 1)[0]
    if not path.startswith("/v1/"):
        return None
    return path[4:].rstrip("/")


def refused_exchange(request: ClientRequest, error: ProxyError) -> Exchange | None:
    """The spend-log record of a request refused before routing (auth, budget, rate limit)."""
    endpoint = endpoint_of(request.path)
    if endpoint not in ROUTED_ENDPOINTS:
        return None
    key = bearer(request.headers)
    exchange = Exchange(
        request_id=f"mr-{uuid.uuid4().hex}",
        started_at=now_utc(),
        endpoint=endpoint,
        api_key_hash=request.identity.get("api_key_hash") or (hash_key(key) if key else None),
        key_alias=request.identity.get("key_alias"),
        team=request.identity.get("team"),
        status_code=error.status,
        error_type=error.code or error.type,
        clock_start=time.perf_counter(),
    )
    with contextlib.suppress(ValueError, AttributeError):
        body = json.loads(request.body)
        exchange.requested_model = str(body.get("model")) if body.get("model") else None
        exchange.stream = body.get("stream") is True
    exchange.ended_at, exchange.latency_ms = exchange.started_at, 0.0
    return exchange


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    if value[:7].lower() == "bearer ":
        return value[7:].strip() or None
    return None


def now_utc() -> datetime:
    return datetime.now(UTC)


class Engine:
    """Routes OpenAI API requests to the deployments of one RouterConfig."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.groups = config.groups()
        self.cooldowns = Cooldowns(config.router.allowed_fails, config.router.cooldown_time)
        self.limits = DeploymentLimits()
        self.picker = DeploymentPicker(self.cooldowns, self.limits.at_limit)
        self.listeners: list[Callable[[Exchange], None]] = []
        """Called once per finished exchange (spend log, metrics, budgets)."""
        self.prices = PriceBook.load(config.general.price_file)
        self.session: aiohttp.ClientSession | None = None
        self.cache = ResponseCache.from_settings(config.cache) if config.cache.enabled else None
        self._tasks: set[asyncio.Task] = set()

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the pooled upstream session (idempotent; also done on first use)."""
        if self.session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=60
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )
        if self.cache is not None:
            await self.cache.start()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.cache is not None:
            await self.cache.close()

    # --- the story ------------------------------------------------------------------------

    def intercepts(self, host: str) -> bool:
        return host.lower() in self.config.general.intercept_hosts

    async def handle(self, request: ClientRequest) -> Reply:
        """Answer one intercepted request (never raises)."""
        endpoint = endpoint_of(request.path)
        if endpoint == "models" and request.method == "GET":
            return self._models()
        if endpoint not in ROUTED_ENDPOINTS or request.method != "POST":
            return Reply(passthrough=True)
        exchange = self._new_exchange(request, endpoint)
        if self.session is None:
            await self.start()
        ticket: CacheTicket | None = None
        try:
            body = self._parse_body(request.body, endpoint)
            exchange.requested_model = body["model"]
            exchange.user = body.get("user") if isinstance(body.get("user"), str) else None
            exchange.stream = body.get("stream") is True
            group = self.config.router.model_group_alias.get(body["model"], body["model"])
            if group not in self.groups:
                if self.config.general.passthrough_unknown_models:
                    return Reply(passthrough=True, exchange=exchange)
                raise errors.model_not_found(body["model"])
            exchange.model_group = group
            controls = parse_controls(body, request.headers, self.config.cache, endpoint=endpoint)
            if (
                self.cache is not None
                and controls.active
                and not (exchange.stream and endpoint != CHAT)
            ):
                ticket = await self._cache_ticket(endpoint, group, body, exchange, controls)
                if ticket.hit is not None:
                    return self._hit_reply(ticket, exchange, body)
            answer = await self._route(request, endpoint, body, group, exchange)
        except ProxyError as e:
            if ticket is not None:
                ticket.release()
            return self._error_reply(e, exchange, ticket)
        except Exception as e:  # fail closed, never leak the request unrouted
            if ticket is not None:
                ticket.release()
            log.exception("[%s] internal error", exchange.request_id)
            return self._error_reply(
                errors.internal_error(f"mitmroute internal error: {e}"), exchange, ticket
            )
        return self._success_reply(answer, exchange, body, endpoint, ticket)

    # --- cache ------------------------------------------------------------------------------

    async def _cache_ticket(
        self,
        endpoint: str,
        group: str,
        body: dict[str, Any],
        exchange: Exchange,
        controls: CacheControls,
    ) -> CacheTicket:
        """Look the request up; on a miss, join its single flight (maybe someone else's)."""
        assert self.cache is not None
        scope = scope_id(
            self.config.cache.scope, key_hash=exchange.api_key_hash, team=exchange.team
        )
        key = cache_key(endpoint, group, body, namespace=controls.namespace, scope_id=scope)
        ticket = CacheTicket(key, controls)
        if not controls.read:
            return ticket
        ticket.hit = await self.cache.get(key, max_age=controls.max_age)
        if ticket.hit is None:
            ticket.flight = await self.cache.join(key)
            ticket.hit = ticket.flight.result
            if ticket.hit is not None:
                ticket.release()
        return ticket

    def _hit_reply(self, ticket: CacheTicket, exchange: Exchange, body: dict[str, Any]) -> Reply:
        hit = ticket.hit
        assert hit is not None
        exchange.cache_hit = True
        exchange.deployment = hit.deployment
        exchange.status_code = 200
        exchange.usage = Usage.from_openai(hit.body.get("usage"))
        exchange.cost_usd = Decimal(0)
        exchange.saved_usd = hit.cost
        self.finish(exchange)
        if exchange.stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            payload = replay_stream(hit.body, include_usage=include_usage)
            headers = self._headers(exchange, SSE_HEADERS, ticket)
        else:
            payload = json.dumps(hit.body).encode()
            headers = self._headers(exchange, JSON_HEADERS, ticket)
        return Reply(200, headers, payload, exchange=exchange)

    def _store(self, ticket: CacheTicket | None, exchange: Exchange, body: dict[str, Any]) -> None:
        """Share a complete, successful answer with waiting requests and the cache."""
        if ticket is None or self.cache is None:
            return
        answer = CachedAnswer.now(
            body, exchange.deployment or "", exchange.model_group or "", exchange.cost_usd
        )
        if ticket.flight is not None:
            ticket.flight.publish(answer)
            ticket.release()
        if ticket.controls.write:
            task = asyncio.get_running_loop().create_task(
                self.cache.put(ticket.key, answer, ttl=ticket.controls.ttl)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _new_exchange(self, request: ClientRequest, endpoint: str) -> Exchange:
        identity = request.identity
        key = bearer(request.headers)
        tags = [
            t.strip() for t in request.headers.get("x-mitmroute-tags", "").split(",") if t.strip()
        ]
        return Exchange(
            request_id=f"mr-{uuid.uuid4().hex}",
            started_at=now_utc(),
            endpoint=endpoint,
            api_key_hash=identity.get("api_key_hash") or (hash_key(key) if key else None),
            key_alias=identity.get("key_alias"),
            team=identity.get("team"),
            tags=tags,
            clock_start=time.perf_counter(),
        )

    def _parse_body(self, raw: bytes, endpoint: str) -> dict[str, Any]:
        try:
            body = json.loads(raw) if raw else None
        except ValueError as e:
            raise errors.bad_request(f"The request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise errors.bad_request("The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise errors.bad_request("you must provide a model parameter", param="model")
        if "stream" in body and not isinstance(body["stream"], bool | None):
            raise errors.bad_request("`stream` must be a boolean", param="stream")
        if endpoint == CHAT:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise errors.bad_request("`messages` must be a non-empty array", param="messages")
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise errors.bad_request(
                        f"messages[{i}] must be an object with a role", param=f"messages[{i}]"
                    )
        elif endpoint == COMPLETIONS and "prompt" not in body:
            raise errors.bad_request("you must provide a prompt parameter", param="prompt")
        elif endpoint == EMBEDDINGS and "input" not in body:
            raise errors.bad_request("you must provide an input parameter", param="input")
        return body

    # --- routing with retries and fallbacks --------------------------------------------------

    async def _route(
        self,
        request: ClientRequest,
        endpoint: str,
        body: dict[str, Any],
        group: str,
        exchange: Exchange,
    ) -> Answer:
        settings = self.config.router
        ladder = build_ladder(group, settings)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.timeout
        failures: list[str] = []
        tried: set[str] = set()
        retries = 0
        last: ProxyError | None = None
        while True:
            deployments = self.groups[ladder.group]
            deployment = self.picker.pick(deployments, tried)
            if deployment is None or (deployment.id in tried and ladder.has_next):
                if deployment is None:
                    failures.append(
                        f"{ladder.group}: every deployment is cooling down or at its rpm/tpm limit"
                    )
                if ladder.advance():
                    tried, retries = set(), 0
                    continue
                if deployment is None:
                    raise self._exhausted(group, failures, last)
            if deployment.id in tried:
                if last is None or retries >= retries_for(last, settings):
                    raise self._exhausted(group, failures, last)
                retries += 1
                retry_after = parse_retry_after(last.headers.get("retry-after"))
                wait = backoff(retries, settings, retry_after)
                if loop.time() + wait >= deadline:
                    failures.append(f"deadline of {settings.timeout:g}s reached")
                    raise self._exhausted(group, failures, last)
                await asyncio.sleep(wait)
            tried.add(deployment.id)
            self.limits.started(deployment)
            try:
                answer = await self._attempt(
                    request, endpoint, body, deployment, exchange, deadline - loop.time()
                )
            except ProxyError as e:
                last = e
                failures.append(f"{deployment.litellm_model} ({deployment.api_base}): {e}")
                if e.retryable:
                    retry_after = parse_retry_after(e.headers.get("retry-after"))
                    self.cooldowns.failure(
                        deployment.id, e.kind, retry_after if e.status == 429 else None
                    )
                    if loop.time() >= deadline:
                        failures.append(f"deadline of {settings.timeout:g}s reached")
                        raise self._exhausted(group, failures, last) from None
                    continue
                targets = special_fallbacks(e, ladder.group, settings)
                if targets and ladder.switch(targets):
                    tried, retries = set(), 0
                    continue
                raise
            self.cooldowns.success(deployment.id)
            exchange.fallback_used = ladder.position > 0
            return answer

    def _exhausted(self, group: str, failures: list[str], last: ProxyError | None) -> ProxyError:
        # nothing tried at all: everything was resting or at its limit, so "try later"
        rate_limited = last is None or last.kind == "rate_limit"
        tried = "; ".join(failures) or "nothing was tried"
        message = f"No deployment of `{group}` could answer. Tried: {tried}"
        if rate_limited:
            return ProxyError(
                429,
                message,
                "rate_limit_exceeded",
                code="all_deployments_failed",
                kind="rate_limit",
            )
        return ProxyError(503, message, "server_error", code="all_deployments_failed", kind="error")

    async def _attempt(
        self,
        request: ClientRequest,
        endpoint: str,
        body: dict[str, Any],
        deployment: Deployment,
        exchange: Exchange,
        remaining: float,
    ) -> Answer:
        provider = provider_for(deployment.provider)
        if endpoint not in provider.endpoints:
            raise errors.bad_request(
                f"`{deployment.litellm_model}` does not serve /v1/{endpoint}", param="model"
            )
        call = provider.build(endpoint, body, deployment, drop_params=self.config.drop_params)
        headers = call.headers
        if not deployment.api_key and provider.name == "openai":
            # No key of our own: the client's key (and org/project) go to its own OpenAI.
            if auth := request.headers.get("authorization"):
                headers = {**headers, "authorization": auth}
            for name in FORWARDED_CLIENT_HEADERS:
                if name in request.headers:
                    headers[name] = request.headers[name]
        stream = bool(body.get("stream")) and endpoint != EMBEDDINGS
        timeout = min(deployment.timeout or self.config.router.timeout, remaining)
        started, t0 = now_utc(), time.perf_counter()
        attempt = Attempt(
            len(exchange.attempts) + 1, deployment.litellm_model, deployment.api_base, started
        )
        exchange.attempts.append(attempt)
        try:
            if stream:
                first_byte = deployment.stream_timeout or self.config.router.stream_timeout
                opened = await self._open_stream(
                    provider,
                    endpoint,
                    deployment,
                    call.url,
                    headers,
                    call.body,
                    timeout,
                    min(first_byte or timeout, remaining),
                )
                attempt.status_code = 200
                return Answer(deployment, stream=opened)
            result, raw = await self._call(
                provider, endpoint, deployment, call.url, headers, call.body, timeout
            )
            attempt.status_code = 200
            return Answer(deployment, body=result, raw=raw if provider.verbatim else None)
        except ProxyError as e:
            attempt.status_code, attempt.error_type = e.status, e.code or e.kind
            raise
        finally:
            attempt.latency_ms = (time.perf_counter() - t0) * 1000

    async def _call(
        self,
        provider: Provider,
        endpoint: str,
        deployment: Deployment,
        url: str,
        headers: dict[str, str],
        data: bytes,
        timeout: float,
    ) -> tuple[dict[str, Any], bytes]:
        """The parsed answer and the bytes it was parsed from."""
        assert self.session is not None
        try:
            async with self.session.post(
                url, data=data, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise self._upstream_error(provider, resp, raw)
                return provider.parse(endpoint, raw, deployment), raw
        except TimeoutError:
            raise errors.upstream_timeout(
                f"{deployment.litellm_model} did not answer within {timeout:.1f}s"
            ) from None
        except aiohttp.ClientError as e:
            raise errors.upstream_unreachable(
                f"{deployment.litellm_model} unreachable: {type(e).__name__}: {e}"
            ) from None

    async def _open_stream(
        self,
        provider: Provider,
        endpoint: str,
        deployment: Deployment,
        url: str,
        headers: dict[str, str],
        data: bytes,
        timeout: float,
        first_byte: float,
    ) -> _OpenStream:
        """Open the upstream stream and wait for its first chunk: failing before that point
        is still invisible to the client (the ladder moves on)."""
        assert self.session is not None
        resp = None
        try:
            resp = await asyncio.wait_for(
                self.session.post(url, data=data, headers=headers), first_byte
            )
            if resp.status >= 400:
                raw = await asyncio.wait_for(resp.read(), first_byte)
                raise self._upstream_error(provider, resp, raw)
            translator = provider.stream(endpoint, deployment)
            first: list[dict[str, Any]] = []
            while not first:
                data_in = await asyncio.wait_for(resp.content.readany(), first_byte)
                if not data_in:
                    first = translator.finish()
                    if not first:
                        raise ProxyError(
                            502,
                            f"{deployment.litellm_model} closed the stream before sending anything",
                            "server_error",
                            code="upstream_stream_empty",
                            retryable=True,
                        )
                    break
                first = translator.feed(data_in)
            read_timeout = deployment.stream_timeout or self.config.router.stream_timeout
            return _OpenStream(resp, translator, first, read_timeout or timeout)
        except TimeoutError:
            if resp is not None:
                resp.close()
            raise errors.upstream_timeout(
                f"{deployment.litellm_model} sent no stream data within {first_byte:.1f}s"
            ) from None
        except aiohttp.ClientError as e:
            if resp is not None:
                resp.close()
            raise errors.upstream_unreachable(
                f"{deployment.litellm_model} unreachable: {type(e).__name__}: {e}"
            ) from None
        except ProxyError:
            if resp is not None:
                resp.close()
            raise

    @staticmethod
    def _upstream_error(provider: Provider, resp: aiohttp.ClientResponse, raw: bytes) -> ProxyError:
        try:
            payload: Any = json.loads(raw)
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        error = provider.error(resp.status, payload)
        for name in ("retry-after", "retry-after-ms"):
            if name in resp.headers:
                value = resp.headers[name]
                if name == "retry-after-ms":
                    value = str(float(value) / 1000)
                error.headers["retry-after"] = value
        return error

    # --- replies ---------------------------------------------------------------------------

    def _headers(
        self, exchange: Exchange, base: Mapping[str, str], ticket: CacheTicket | None = None
    ) -> dict[str, str]:
        headers = {**base, "x-mitmroute-request-id": exchange.request_id}
        if exchange.deployment:
            headers["x-mitmroute-deployment"] = exchange.deployment
        headers["x-mitmroute-attempts"] = str(len(exchange.attempts))
        if ticket is not None:
            headers["x-mitmroute-cache"] = "HIT" if exchange.cache_hit else "MISS"
            headers["x-mitmroute-cache-key"] = ticket.key
        return headers

    def _error_reply(
        self, error: ProxyError, exchange: Exchange, ticket: CacheTicket | None = None
    ) -> Reply:
        exchange.status_code = error.status
        exchange.error_type = error.code or error.type
        headers = self._headers(exchange, JSON_HEADERS, ticket)
        for name, value in error.headers.items():
            if name != "retry-after" or error.status == 429:
                headers[name] = value
        self.finish(exchange)
        return Reply(error.status, headers, error.to_bytes(), exchange=exchange)

    def _success_reply(
        self,
        answer: Answer,
        exchange: Exchange,
        body: dict[str, Any],
        endpoint: str,
        ticket: CacheTicket | None,
    ) -> Reply:
        deployment = answer.deployment
        exchange.deployment = deployment.litellm_model
        exchange.provider = deployment.provider
        exchange.api_base = deployment.api_base
        exchange.status_code = 200
        if answer.stream is not None:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = self._relay(answer.stream, exchange, body, include_usage, deployment, ticket)
            return Reply(
                200, self._headers(exchange, SSE_HEADERS, ticket), stream=chunks, exchange=exchange
            )
        assert answer.body is not None
        exchange.usage = Usage.from_openai(answer.body.get("usage"))
        if exchange.usage is None or (exchange.usage.total_tokens == 0 and endpoint != EMBEDDINGS):
            self._estimate(exchange, body, answer.body)
        self.finish(exchange, deployment)
        self._store(ticket, exchange, answer.body)
        payload = answer.raw or json.dumps(answer.body).encode()
        return Reply(200, self._headers(exchange, JSON_HEADERS, ticket), payload, exchange=exchange)

    async def _relay(
        self,
        opened: _OpenStream,
        exchange: Exchange,
        body: dict[str, Any],
        include_usage: bool,
        deployment: Deployment,
        ticket: CacheTicket | None,
    ) -> AsyncIterator[bytes]:
        """Translate upstream bytes into the client's SSE stream, chunk by chunk."""
        assembler = ChunkAssembler()
        resp, translator = opened.response, opened.translator

        def render(chunks: list[dict[str, Any]]) -> bytes:
            out = []
            for chunk in chunks:
                assembler.add(chunk)
                if chunk.get("usage") is not None and not include_usage:
                    if not chunk.get("choices"):
                        continue
                    chunk = {k: v for k, v in chunk.items() if k != "usage"}
                out.append(encode(chunk))
            return b"".join(out)

        try:
            first = render(opened.first)
            exchange.ttft_ms = (time.perf_counter() - exchange.clock_start) * 1000
            yield first
            while True:
                data = await asyncio.wait_for(resp.content.readany(), opened.read_timeout)
                if not data:
                    break
                if out := render(translator.feed(data)):
                    yield out
            if out := render(translator.finish()):
                yield out
            if not (translator.done or assembler.finished):
                raise ProxyError(
                    502,
                    f"{deployment.litellm_model} ended the stream early",
                    "server_error",
                    code="upstream_stream_truncated",
                )
            yield DONE
        except ProxyError as e:
            exchange.error_type = e.code or e.type
            exchange.status_code = e.status
            yield encode_error(e.message, etype=e.type, code=e.code)
        except TimeoutError:
            exchange.error_type, exchange.status_code = "upstream_stream_stalled", 504
            yield encode_error(
                f"{deployment.litellm_model} stalled mid-stream", code="upstream_stream_stalled"
            )
        except aiohttp.ClientError as e:
            exchange.error_type, exchange.status_code = "upstream_stream_broken", 502
            yield encode_error(
                f"{deployment.litellm_model} broke the stream: {e}", code="upstream_stream_broken"
            )
        except (GeneratorExit, asyncio.CancelledError):
            exchange.error_type = "client_disconnected"
            raise
        finally:
            resp.close()
            exchange.usage = assembler.usage
            completion = assembler.completion()
            if exchange.usage is None or exchange.usage.total_tokens == 0:
                self._estimate(exchange, body, completion)
            self.finish(exchange, deployment)
            if exchange.error_type is None and (translator.done or assembler.finished):
                if exchange.usage is not None and "usage" not in completion:
                    completion["usage"] = exchange.usage.to_openai()
                self._store(ticket, exchange, completion)
            elif ticket is not None:
                ticket.release()

    @staticmethod
    def _estimate(exchange: Exchange, body: dict[str, Any], answer: dict[str, Any]) -> None:
        """Count tokens locally when the backend reported none (usage_source 'estimated')."""
        model = str(body.get("model") or "")
        texts = []
        for choice in answer.get("choices") or ():
            message = choice.get("message") or {}
            texts.append(str(message.get("content") or choice.get("text") or ""))
            for call in message.get("tool_calls") or ():
                texts.append(json.dumps(call.get("function") or {}))
        prompt = estimate_prompt_tokens(body, model)
        completion = estimate_text_tokens("".join(texts), model) if any(texts) else 0
        exchange.usage = Usage(
            prompt_tokens=prompt, completion_tokens=completion, source="estimated"
        )

    def _models(self) -> Reply:
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "mitmroute"}
            for name in [*self.groups, *self.config.router.model_group_alias]
        ]
        body = json.dumps({"object": "list", "data": data}).encode()
        return Reply(200, dict(JSON_HEADERS), body)

    def finish_passthrough(
        self, exchange: Exchange, status: int, body: bytes | None, usage: Usage | None
    ) -> None:
        """Log an exchange that went to its original host unrouted."""
        exchange.status_code = status
        exchange.deployment = f"passthrough/{exchange.requested_model}"
        exchange.provider = "openai"
        if body and usage is None:
            with contextlib.suppress(ValueError, AttributeError):
                usage = Usage.from_openai(json.loads(body).get("usage"))
        exchange.usage = usage
        if status >= 400 and exchange.error_type is None:
            exchange.error_type = "upstream_error"
        self.finish(exchange)

    def finish(self, exchange: Exchange, deployment: Deployment | None = None) -> None:
        """Close the books on an exchange and hand it to every listener."""
        exchange.ended_at = now_utc()
        exchange.latency_ms = (time.perf_counter() - exchange.clock_start) * 1000
        if deployment is not None and exchange.usage is not None:
            self.limits.used(deployment, exchange.usage.total_tokens)
        if exchange.usage is not None and not exchange.cache_hit and exchange.provider:
            model = deployment.model if deployment else exchange.requested_model or ""
            exchange.cost_usd = self.prices.cost(
                exchange.provider, model, exchange.usage, deployment
            )
        for listener in self.listeners:
            try:
                listener(exchange)
            except Exception:
                log.exception("exchange listener failed")

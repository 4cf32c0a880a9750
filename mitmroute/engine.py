"""The request story: match, parse, pick a deployment, (cache), call with fallbacks, translate,
respond, log.

`Engine.handle` takes a plain `ClientRequest` and returns a `Reply`; it knows nothing of
mitmproxy, so it is tested directly. The addon in `mitmroute.addons.router` adapts flows to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from mitmroute import errors
from mitmroute.bodies import parse_json_object
from mitmroute.cache import (
    CacheControls,
    CachedAnswer,
    ResponseCache,
    cache_key,
    parse_controls,
    replay_stream,
    scope_id,
)
from mitmroute.cache.ticket import CacheTicket
from mitmroute.config import Deployment, RouterConfig
from mitmroute.errors import ProxyError
from mitmroute.exchange import Exchange, Usage
from mitmroute.money import Pricing
from mitmroute.providers import CHAT, COMPLETIONS, EMBEDDINGS
from mitmroute.request import (
    JSON_HEADERS,
    ROUTED_ENDPOINTS,
    SSE_HEADERS,
    ClientRequest,
    Reply,
    endpoint_name,
    endpoint_of,
    new_exchange,
    now_utc,
)
from mitmroute.routing.complexity_router import REASON_HEADER, TIER_HEADER, ComplexityRouters
from mitmroute.routing.plan import Stop, Wait
from mitmroute.routing.state import RoutingState
from mitmroute.spend import estimate_prompt_tokens, estimate_text_tokens
from mitmroute.streaming.pipe import pipe_stream
from mitmroute.streaming.sse import ChunkAssembler
from mitmroute.upstream import Answer, Upstream

log = logging.getLogger("mitmroute")


class Engine:
    """Routes OpenAI API requests to the deployments of one RouterConfig."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.groups = config.groups()
        self.listeners: list[Callable[[Exchange], None]] = []
        """Called once per finished exchange (spend log, metrics, budgets)."""
        self.pricing = Pricing.for_config(config)
        self.routing = RoutingState(config, self.pricing)
        self.cooldowns = self.routing.cooldowns
        self.tiers = ComplexityRouters(config, self.pricing)
        """`auto_router/complexity_router` model names and how they pick a tier's group."""
        self.upstream = Upstream(config)
        self._started = False
        self.cache = ResponseCache.from_settings(config.cache) if config.cache.enabled else None
        self._tasks: set[asyncio.Task] = set()

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the pooled upstream session and the cache (idempotent; also on first use)."""
        if self._started:
            return
        self._started = True
        await self.upstream.start()
        await self.routing.start()
        if self.cache is not None:
            await self.cache.start()
        await self.tiers.start()

    async def close(self) -> None:
        await self.upstream.close()
        await self.routing.close()
        await self.tiers.close()
        if self.cache is not None:
            await self.cache.close()
        self._started = False

    # --- the story ------------------------------------------------------------------------

    async def handle(self, request: ClientRequest) -> Reply:
        """Answer one intercepted request (never raises). Whatever it becomes, routed,
        answered, refused or passed through, the Reply carries its spend-log Exchange.
        Cancelled (its client went away), it logs the Exchange as `client_disconnected`."""
        endpoint = endpoint_of(request.path)
        if endpoint == "models" and request.method == "GET":
            return self._models(new_exchange(request, endpoint))
        if endpoint not in ROUTED_ENDPOINTS or request.method != "POST":
            return Reply(
                passthrough=True, exchange=new_exchange(request, endpoint_name(request.path))
            )
        exchange = new_exchange(request, request.ledger_endpoint or endpoint)
        ticket: CacheTicket | None = None
        try:
            if not self._started:
                await self.start()
            body = self._parse_body(request.body, endpoint)
            exchange.requested_model = body["model"]
            exchange.user = body.get("user") if isinstance(body.get("user"), str) else None
            exchange.stream = body.get("stream") is True
            group = self.config.router.model_group_alias.get(body["model"], body["model"])
            if group in self.tiers:  # a complexity router: a tier's group, before the cache
                group = await self.tiers.route(group, request, body, endpoint, exchange)
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
                keyed = body if request.native is None else request.native.cache_body()
                ticket = await self._cache_ticket(endpoint, group, keyed, exchange, controls)
                if ticket.hit is not None:
                    return self._hit_reply(ticket, exchange, body)
            answer = await self._route(request, endpoint, body, group, exchange)
            return self._success_reply(answer, exchange, body, endpoint, ticket)
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
        except asyncio.CancelledError:  # the client went away: the call stops, one row says so
            if ticket is not None:
                ticket.release()
            gone = errors.client_disconnected()
            exchange.status_code, exchange.error_type = gone.status, gone.code
            self.finish(exchange)
            raise

    def group_of(self, model: str) -> str | None:
        """The model group a requested model names (aliases resolved; a complexity router's
        baseline group), None when unknown."""
        group = self.config.router.model_group_alias.get(model, model)
        if group in self.tiers:
            return self.tiers.routers[group].baseline
        return group if group in self.groups else None

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
            ticket.flight = await self.cache.join(key, shared=controls.write)
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

    @staticmethod
    def _parse_body(raw: bytes, endpoint: str) -> dict[str, Any]:
        """The request body, with every parameter the proxy itself reads checked for type."""
        body = parse_json_object(raw)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise errors.bad_request("you must provide a model parameter", param="model")
        if body.get("stream") is not None and not isinstance(body["stream"], bool):
            raise errors.bad_request("`stream` must be a boolean", param="stream")
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise errors.bad_request(
                    "`stream_options` must be an object", param="stream_options"
                )
            if not isinstance(options.get("include_usage", False), bool):
                raise errors.bad_request(
                    "`stream_options.include_usage` must be a boolean",
                    param="stream_options.include_usage",
                )
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise errors.bad_request("`user` must be a string", param="user")
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
        """Call deployments as the routing plan says until one answers or the plan gives up."""
        await self.routing.refresh(group)
        plan = self.routing.plan(group, request_id=exchange.request_id, stream=exchange.stream)
        while True:
            step = plan.next()
            if isinstance(step, Stop):
                raise step.error
            if isinstance(step, Wait):
                await asyncio.sleep(step.seconds)
                continue
            deployment = step.deployment
            try:
                answer = await self.upstream.attempt(
                    request, endpoint, body, deployment, exchange, plan.time_left()
                )
            except ProxyError as e:
                plan.failed(deployment, e)
                continue
            except BaseException:
                plan.abandoned(deployment)
                raise
            plan.succeeded(deployment)
            exchange.fallback_used = plan.fallback_used
            return answer

    # --- replies ---------------------------------------------------------------------------

    def _headers(
        self, exchange: Exchange, base: Mapping[str, str], ticket: CacheTicket | None = None
    ) -> dict[str, str]:
        headers = {**base, "x-mitmroute-request-id": exchange.request_id}
        if exchange.deployment:
            headers["x-mitmroute-deployment"] = exchange.deployment
        headers["x-mitmroute-attempts"] = str(len(exchange.attempts))
        if (route := exchange.tier_route) is not None:
            if route.tier is not None:
                headers[TIER_HEADER] = route.tier
            headers[REASON_HEADER] = route.reason
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
        return Reply(error.status, headers, error.to_bytes(), exchange=exchange, error=error)

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
        exchange.api_base = deployment.public_base
        exchange.status_code = 200
        if answer.stream is not None:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = pipe_stream(
                answer.stream,
                exchange,
                include_usage=include_usage,
                label=deployment.litellm_model,
                on_end=functools.partial(self._stream_ended, exchange, body, deployment, ticket),
                estimate=functools.partial(self._estimated, body),
            )
            headers = self._headers(exchange, SSE_HEADERS, ticket)
            if answer.headers:
                headers.update(answer.headers)
            return Reply(200, headers, stream=chunks, exchange=exchange, native=answer.native)
        assert answer.body is not None
        exchange.usage = Usage.from_openai(answer.body.get("usage"))
        if exchange.usage is None or (exchange.usage.total_tokens == 0 and endpoint != EMBEDDINGS):
            self._estimate(exchange, body, answer.body)
        self.finish(exchange, deployment)
        self._store(ticket, exchange, answer.body)
        payload = answer.raw or json.dumps(answer.body).encode()
        headers = self._headers(exchange, JSON_HEADERS, ticket)
        if answer.headers:
            headers.update(answer.headers)
        return Reply(200, headers, payload, exchange=exchange, native=answer.native)

    def _stream_ended(
        self,
        exchange: Exchange,
        body: dict[str, Any],
        deployment: Deployment,
        ticket: CacheTicket | None,
        assembler: ChunkAssembler,
        complete: bool,
    ) -> None:
        """Close the books on a streamed answer; cache it when it arrived whole."""
        exchange.usage = assembler.usage
        completion = assembler.completion()
        if exchange.usage is None or exchange.usage.total_tokens == 0:
            self._estimate(exchange, body, completion)
        self.finish(exchange, deployment)
        if complete and not body.get("logprobs"):
            if exchange.usage is not None and "usage" not in completion:
                completion["usage"] = exchange.usage.to_openai()
            self._store(ticket, exchange, completion)
        elif ticket is not None:
            ticket.release()

    @classmethod
    def _estimated(cls, body: dict[str, Any], assembler: ChunkAssembler) -> Usage:
        """The usage a stream would have reported, counted locally."""
        probe = Exchange("", now_utc(), "")
        cls._estimate(probe, body, assembler.completion())
        assert probe.usage is not None
        return probe.usage

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

    def _models(self, exchange: Exchange) -> Reply:
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "mitmroute"}
            for name in [*self.groups, *self.tiers.routers, *self.config.router.model_group_alias]
        ]
        body = json.dumps({"object": "list", "data": data}).encode()
        exchange.status_code, exchange.deployment = 200, "mitmroute/models"
        self.finish(exchange)
        return Reply(200, self._headers(exchange, JSON_HEADERS), body, exchange=exchange)

    def finish_passthrough(
        self, exchange: Exchange, status: int, body: bytes | None, usage: Usage | None
    ) -> None:
        """Log an exchange that went to its original host unrouted."""
        exchange.status_code = status
        exchange.deployment = f"passthrough/{exchange.requested_model or exchange.endpoint}"
        exchange.provider = "anthropic" if exchange.endpoint.startswith("messages") else "openai"
        if body and usage is None:
            read = Usage.from_anthropic if exchange.endpoint == "messages" else Usage.from_openai
            with contextlib.suppress(ValueError, AttributeError):
                usage = read(json.loads(body).get("usage"))
        exchange.usage = usage
        if status >= 400 and exchange.error_type is None:
            exchange.error_type = "upstream_error"
        self.finish(exchange)

    def finish(self, exchange: Exchange, deployment: Deployment | None = None) -> None:
        """Close the books on an exchange and hand it to every listener."""
        exchange.ended_at = now_utc()
        exchange.latency_ms = (time.perf_counter() - exchange.clock_start) * 1000
        if deployment is not None:
            self.routing.finished(deployment, exchange)
        if exchange.usage is not None and not exchange.cache_hit and exchange.provider:
            model = deployment.model if deployment else exchange.requested_model or ""
            exchange.cost_usd = self.pricing.cost(
                exchange.provider, model, exchange.usage, deployment
            )
            self.tiers.price_baseline(exchange)
        for listener in self.listeners:
            try:
                listener(exchange)
            except Exception:
                log.exception("exchange listener failed")

"""`POST /v1/messages/count_tokens`: `{"input_tokens": N}` for a Messages request.

Counted by Anthropic itself when the model's group has an `anthropic/` deployment that isn't
resting (the client's body, model swapped, sent with that deployment's key, or the client's own
where it may go); counted locally (`mitmroute.spend.tokens`) when there is none, or when none
answers (unreachable, 5xx, 429, 401/403/404). A 4xx about the request itself comes back as
Anthropic sent it. The header `x-mitmroute-token-count` says which: `anthropic` or
`estimated`. Counting is free: its spend row has cost 0 and no tokens.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from mitmroute import errors
from mitmroute.errors import ProxyError
from mitmroute.providers import provider_for
from mitmroute.request import JSON_HEADERS, ClientRequest, NativeRequest, Reply, new_exchange
from mitmroute.spend import estimate_prompt_tokens

if TYPE_CHECKING:
    from mitmroute.config import Deployment
    from mitmroute.engine import Engine
    from mitmroute.exchange import Exchange

COUNT_TOKENS = "messages/count_tokens"
SOURCE_HEADER = "x-mitmroute-token-count"
FALL_THROUGH = frozenset({401, 403, 404, 408, 409, 429})
"""Statuses of a native count that say "this deployment can't", not "this request is wrong"."""


async def count_tokens(
    engine: Engine, request: ClientRequest, body: dict[str, Any], query: str
) -> Reply:
    """Answer a (checked) count_tokens request."""
    exchange = new_exchange(request, COUNT_TOKENS)
    model = body["model"]
    exchange.requested_model = model
    group = engine.group_of(model)
    if group is None:
        if engine.config.general.passthrough_unknown_models:
            return Reply(passthrough=True, exchange=exchange)
        return _error(engine, exchange, errors.model_not_found(model))
    exchange.model_group = group
    try:
        await engine.start()
        native = NativeRequest("anthropic", COUNT_TOKENS, body, query)
        for deployment in engine.groups[group]:
            resting = engine.cooldowns.remaining(deployment.id) > 0
            if deployment.provider != "anthropic" or resting:
                continue
            reply = await _native(engine, request, native, deployment, exchange)
            if reply is not None:
                return reply
    except asyncio.CancelledError:  # the client went away: its row says so
        gone = errors.client_disconnected()
        exchange.status_code, exchange.error_type = gone.status, gone.code
        engine.finish(exchange)
        raise
    tokens = estimate_prompt_tokens(body, model)
    exchange.deployment = "mitmroute/count_tokens"
    payload = json.dumps({"input_tokens": tokens}).encode()
    return _done(engine, exchange, 200, payload, {SOURCE_HEADER: "estimated"})


async def _native(
    engine: Engine,
    request: ClientRequest,
    native: NativeRequest,
    deployment: Deployment,
    exchange: Exchange,
) -> Reply | None:
    """Anthropic's own count, or its error about the request; None to count elsewhere."""
    call = provider_for(deployment.provider).build_native(native, request.headers, deployment)
    timeout = deployment.timeout or engine.config.router.timeout
    try:
        status, headers, raw = await engine.upstream.forward(
            request, deployment, call, exchange, timeout
        )
    except ProxyError:
        return None
    if status >= 500 or status in FALL_THROUGH:
        return None
    if status < 300:
        try:
            counted = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(counted, dict) or not isinstance(counted.get("input_tokens"), int):
            return None
    exchange.deployment = deployment.litellm_model
    exchange.provider, exchange.api_base = deployment.provider, deployment.public_base
    if status >= 400:
        exchange.error_type = "upstream_error"
    return _done(engine, exchange, status, raw, {**headers, SOURCE_HEADER: "anthropic"})


def _done(
    engine: Engine, exchange: Exchange, status: int, payload: bytes, extra: dict[str, str]
) -> Reply:
    exchange.status_code = status
    exchange.cost_usd = Decimal(0)
    engine.finish(exchange)
    headers = {**JSON_HEADERS, **extra, "request-id": extra.get("request-id", exchange.request_id)}
    headers["x-mitmroute-request-id"] = exchange.request_id
    if exchange.deployment:
        headers["x-mitmroute-deployment"] = exchange.deployment
    headers["x-mitmroute-attempts"] = str(len(exchange.attempts))
    return Reply(status, headers, payload, exchange=exchange)


def _error(engine: Engine, exchange: Exchange, error: ProxyError) -> Reply:
    exchange.status_code, exchange.error_type = error.status, error.code or error.type
    engine.finish(exchange)
    headers = {**JSON_HEADERS, "request-id": exchange.request_id}
    headers["x-mitmroute-request-id"] = exchange.request_id
    body = errors.render(error, "anthropic")
    return Reply(error.status, headers, body, exchange=exchange, error=error)

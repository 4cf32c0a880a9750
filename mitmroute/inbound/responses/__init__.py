"""OpenAI's Responses API (`/v1/responses`), answered by any deployment through the engine.

The adapter's story: `POST /v1/responses` is checked and translated into a chat completions
body (`request.py`; a `previous_response_id` first brings back the stored conversation,
`store.py`), the engine answers it like any chat request (routing, fallbacks, cache, keys, the
spend log, with the row's endpoint `responses`), and the answer is translated back: a chat
completion into a `response` object (`answer.py`), a stream of chunks into the Responses event
stream as it arrives (`events.py`). The response is then stored unless `store` is false.
`GET` and `DELETE /v1/responses/{id}`, and `GET /v1/responses/{id}/input_items`, are answered
from the store. Errors keep OpenAI's shape.

A model the config doesn't list passes through to the original host unchanged (when
`passthrough_unknown_models` is on), hosted tools and all.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from mitmroute import errors
from mitmroute.bodies import parse_json_object
from mitmroute.cache import RedisStore
from mitmroute.config import OPENAI_COMPATIBLE, RouterConfig
from mitmroute.errors import ProxyError
from mitmroute.exchange import Usage
from mitmroute.inbound.responses.answer import Draft, output_of, status_of
from mitmroute.inbound.responses.events import EventWriter, stream_events
from mitmroute.inbound.responses.request import Translated, translate
from mitmroute.inbound.responses.store import ResponseStore, StoredResponse, local_store
from mitmroute.request import (
    JSON_HEADERS,
    SSE_HEADERS,
    ClientRequest,
    Reply,
    bearer,
    hash_key,
    new_exchange,
    refused_exchange,
)

if TYPE_CHECKING:
    from mitmroute.engine import Engine

__all__ = ["ResponsesInbound"]

log = logging.getLogger("mitmroute")

CREATE = "/v1/responses"
STORED = "/v1/responses/"
RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
PAGE_LIMIT = 20


class ResponsesInbound:
    name = "responses"

    def __init__(self, store: ResponseStore | None = None) -> None:
        self._local = store.local if store is not None else local_store()
        self._fixed = store
        self._stores: weakref.WeakKeyDictionary[Engine, ResponseStore] = weakref.WeakKeyDictionary()

    async def handle(self, engine: Engine, request: ClientRequest) -> Reply:
        bare = request.path.split("?", 1)[0]
        endpoint = "responses" if bare == CREATE else _stored_endpoint(bare)
        try:
            if bare == CREATE and request.method == "POST":
                return await self._create(engine, request)
            return await self._stored(engine, request, endpoint)
        except ProxyError as e:
            return _refuse(engine, request, e, endpoint)
        except Exception as e:  # fail closed: an answer in the client's shape, never a crash
            log.exception("responses: internal error")
            error = errors.internal_error(f"mitmroute internal error: {e}")
            return _refuse(engine, request, error, endpoint)

    def store_for(self, engine: Engine) -> ResponseStore:
        """The local LRU, with the Redis of the engine's response cache when it has one."""
        if self._fixed is not None:
            return self._fixed
        store = self._stores.get(engine)
        if store is None:
            cache = getattr(engine, "cache", None)
            remote = cache.store if cache is not None else None
            store = ResponseStore(
                self._local,
                remote if isinstance(remote, RedisStore) else None,
                namespace=engine.config.cache.namespace,
            )
            self._stores[engine] = store
        return store

    # --- POST /v1/responses ------------------------------------------------------------------

    async def _create(self, engine: Engine, request: ClientRequest) -> Reply:
        body = parse_json_object(request.body)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise errors.bad_request("you must provide a model parameter", param="model")
        group = engine.config.router.model_group_alias.get(model, model)
        if group not in engine.groups and group not in engine.tiers:
            if not engine.config.general.passthrough_unknown_models:
                raise errors.model_not_found(model)
            exchange = new_exchange(request, "responses")
            exchange.requested_model, exchange.stream = model, body.get("stream") is True
            return Reply(passthrough=True, exchange=exchange)
        owner = owner_of(request)
        store = self.store_for(engine)
        context = None
        if (previous := body.get("previous_response_id")) is not None:
            if not isinstance(previous, str):
                raise errors.bad_request(
                    "`previous_response_id` must be a string", param="previous_response_id"
                )
            stored = None
            if RESPONSE_ID.fullmatch(previous):
                try:
                    stored = await store.get(previous, owner)
                except asyncio.CancelledError:  # the client went away: its row says so
                    _refuse(engine, request, errors.client_disconnected(), "responses")
                    raise
            if stored is None:
                raise ProxyError(
                    404,
                    f"Previous response with id '{previous}' not found.",
                    "invalid_request_error",
                    code="previous_response_not_found",
                    param="previous_response_id",
                    kind="bad_request",
                )
            context = stored.context
        translated = translate(body, context, openai_only=openai_only(engine.config, group))
        draft = Draft(model, translated.echo)
        chat = ClientRequest(
            method="POST",
            path="/v1/chat/completions",
            headers=request.headers,
            body=json.dumps(translated.chat).encode(),
            identity=request.identity,
            scheme=request.scheme,
            host=request.host,
            port=request.port,
            ledger_endpoint="responses",
        )
        reply = await engine.handle(chat)
        if reply.passthrough or reply.status >= 400:
            return reply  # errors are OpenAI-shaped already, as the Responses API's are
        save = functools.partial(_save, store, translated, owner)
        if translated.stream:
            chunks = reply.stream if reply.stream is not None else _once(reply.body)
            writer = EventWriter(draft, translated.tools)
            events = stream_events(chunks, writer, reply.exchange, save)
            headers = {**reply.headers, **SSE_HEADERS}
            return Reply(200, headers, stream=events, exchange=reply.exchange)
        completion = json.loads(reply.body)
        output, finish = output_of(completion, translated.tools)
        status, reason = status_of(finish)
        usage = reply.exchange.usage if reply.exchange is not None else None
        if usage is None:
            usage = Usage.from_openai(completion.get("usage"))
        response = draft.response(status, output, usage=usage, incomplete=reason)
        await save(response)
        return Reply(200, reply.headers, json.dumps(response).encode(), exchange=reply.exchange)

    # --- GET / DELETE /v1/responses/{id}[/input_items] -------------------------------------------

    async def _stored(self, engine: Engine, request: ClientRequest, endpoint: str) -> Reply:
        path, _, query = request.path.partition("?")
        rid, _, sub = path.removeprefix(STORED).partition("/")
        method = request.method
        if (
            not path.startswith(STORED)
            or sub not in ("", "input_items")
            or method not in ("GET", "DELETE")
            or (sub and method != "GET")
        ):
            raise ProxyError(
                404,
                f"mitmroute does not answer {method} {path}.",
                "invalid_request_error",
                code="unknown_url",
                kind="bad_request",
            )
        owner = owner_of(request)
        store = self.store_for(engine)
        stored = await store.get(rid, owner) if RESPONSE_ID.fullmatch(rid) else None
        if stored is None:
            raise ProxyError(
                404,
                f"Response with id '{rid}' not found.",
                "invalid_request_error",
                kind="bad_request",
            )
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        if method == "DELETE":
            await store.delete(rid, owner)
            answer: dict[str, Any] = {"id": rid, "object": "response", "deleted": True}
        elif sub:
            answer = _page(stored.input, params)
        elif params.get("stream", "false").lower() == "true":
            raise errors.bad_request(
                "mitmroute does not replay stored responses as streams", param="stream"
            )
        else:
            answer = stored.response
        exchange = new_exchange(request, endpoint)
        exchange.status_code, exchange.deployment = 200, "mitmroute/responses"
        exchange.requested_model = stored.response.get("model")
        engine.finish(exchange)
        headers = {**JSON_HEADERS, "x-mitmroute-request-id": exchange.request_id}
        return Reply(200, headers, json.dumps(answer).encode(), exchange=exchange)


def owner_of(request: ClientRequest) -> str | None:
    """Who a stored response belongs to: the sha256 of the caller's key (the spend log's)."""
    if hashed := request.identity.get("api_key_hash"):
        return hashed
    key = bearer(request.headers)
    return hash_key(key) if key else None


def openai_only(config: RouterConfig, group: str) -> bool:
    """True when OpenAI-only hints may go upstream: `drop_params` is on, or every deployment
    the request may reach (its group and every fallback ladder from it) is OpenAI-compatible."""
    if config.drop_params:
        return True
    groups = config.groups()
    settings = config.router
    seen, todo = set(), [group]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if (router := config.complexity_routers.get(current)) is not None:
            todo.extend(router.groups)  # any tier may answer
        for deployment in groups.get(current, ()):
            if deployment.provider not in OPENAI_COMPATIBLE:
                return False
        for ladder in (
            settings.fallbacks,
            settings.context_window_fallbacks,
            settings.content_policy_fallbacks,
        ):
            for target in ladder.get(current, ladder.get("*", [])):
                todo.append(settings.model_group_alias.get(target, target))
    return True


async def _save(
    store: ResponseStore, translated: Translated, owner: str | None, response: dict[str, Any]
) -> None:
    if translated.store:
        await store.put(StoredResponse(response, translated.items, owner))


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _page(items: list[dict[str, Any]], params: dict[str, str]) -> dict[str, Any]:
    """A page of input items: `limit` (1-100, default 20), `order` (desc by default), `after`."""
    try:
        limit = min(max(int(params.get("limit", PAGE_LIMIT)), 1), 100)
    except ValueError:
        raise errors.bad_request("`limit` must be an integer", param="limit") from None
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise errors.bad_request("`order` must be 'asc' or 'desc'", param="order")
    ordered = items if order == "asc" else items[::-1]
    if after := params.get("after"):
        ids = [item.get("id") for item in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }


def _stored_endpoint(path: str) -> str:
    """The spend log's endpoint for a stored-response path (the id left out)."""
    return "responses/{id}/input_items" if path.endswith("/input_items") else "responses/{id}"


def _refuse(engine: Engine, request: ClientRequest, error: ProxyError, endpoint: str) -> Reply:
    exchange = refused_exchange(request, error)
    exchange.endpoint = endpoint
    engine.finish(exchange)
    headers = {**JSON_HEADERS, **error.headers, "x-mitmroute-request-id": exchange.request_id}
    return Reply(error.status, headers, error.to_bytes(), exchange=exchange)

"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) as an inbound
dialect: Claude Code and every app on the anthropic SDKs, answered by the router.

A Messages request is checked and translated into an OpenAI chat completion (`request.py`),
answered by the engine like any other (routing, fallbacks, cache, keys, spend log with
endpoint `messages`), and the answer translated back (`response.py`, `stream.py`). The
client's own body rides along (`ClientRequest.native`): an `anthropic/` deployment is sent it
as it is, and its answer or stream comes back as it is (see `mitmroute.providers.anthropic`).
Errors are Anthropic's shape. `count_tokens` is answered by `count.py`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from mitmroute.bodies import parse_json_object
from mitmroute.errors import ProxyError, internal_error, upstream_error
from mitmroute.inbound.anthropic.count import COUNT_TOKENS, count_tokens
from mitmroute.inbound.anthropic.request import Translation, translate
from mitmroute.inbound.anthropic.response import render_error, to_message
from mitmroute.inbound.anthropic.stream import MessagesStream, event
from mitmroute.providers import CHAT
from mitmroute.request import (
    JSON_HEADERS,
    ClientRequest,
    NativeRequest,
    Reply,
    endpoint_of,
    refused_exchange,
)

if TYPE_CHECKING:
    from mitmroute.engine import Engine

__all__ = ["MessagesInbound"]

log = logging.getLogger("mitmroute")

DIALECT = "anthropic"
MESSAGES = "messages"


class MessagesInbound:
    name = DIALECT

    async def handle(self, engine: Engine, request: ClientRequest) -> Reply:
        endpoint = endpoint_of(request.path) or MESSAGES
        query = request.path.partition("?")[2]
        try:
            body = parse_json_object(request.body)
            translation = translate(body, count_only=endpoint == COUNT_TOKENS)
        except ProxyError as e:
            return refuse(engine, request, e)
        if endpoint == COUNT_TOKENS:
            return await count_tokens(engine, request, body, query)
        native = NativeRequest(
            DIALECT, MESSAGES, body, query, translation.untranslatable, translation.optional
        )
        chat = ClientRequest(
            method=request.method,
            path=f"/v1/{CHAT}",
            headers=request.headers,
            body=json.dumps(translation.chat).encode(),
            identity=request.identity,
            scheme=request.scheme,
            host=request.host,
            port=request.port,
            ledger_endpoint=MESSAGES,
            native=native,
        )
        reply = await engine.handle(chat)
        return answer(reply, translation)


def refuse(engine: Engine, request: ClientRequest, error: ProxyError) -> Reply:
    """A request answered with an error before the engine saw it (and its spend row)."""
    exchange = refused_exchange(request, error)
    engine.finish(exchange)
    headers = {**JSON_HEADERS, "request-id": exchange.request_id}
    headers["x-mitmroute-request-id"] = exchange.request_id
    return Reply(error.status, headers, render_error(error), exchange=exchange, error=error)


def answer(reply: Reply, translation: Translation) -> Reply:
    """The engine's reply in Messages shapes."""
    if reply.passthrough:
        return reply  # the original request goes to the original host, unchanged
    headers = dict(reply.headers)
    if reply.exchange is not None:
        headers.setdefault("request-id", reply.exchange.request_id)
    if reply.status >= 400:
        error = reply.error or _error_of(reply)
        headers["content-type"] = JSON_HEADERS["content-type"]
        body = render_error(error)
        return Reply(error.status, headers, body, exchange=reply.exchange, error=error)
    if reply.native:
        reply.headers = headers
        return reply
    model = str(translation.chat["model"])
    usage = reply.exchange.usage if reply.exchange is not None else None
    if translation.stream:
        messages = MessagesStream(model, translation.stop_sequences)
        if reply.stream is None:  # a cache hit: the whole stream at once
            events = messages.feed(reply.body) + messages.close(usage)
            return Reply(200, headers, events, exchange=reply.exchange)
        stream = _translated(reply, messages)
        return Reply(200, headers, stream=stream, exchange=reply.exchange)
    completion = json.loads(reply.body)
    message = to_message(completion, usage, model=model, stop_sequences=translation.stop_sequences)
    return Reply(200, headers, json.dumps(message).encode(), exchange=reply.exchange)


def _error_of(reply: Reply) -> ProxyError:
    try:
        payload = json.loads(reply.body)
    except ValueError:
        payload = reply.body.decode("utf-8", "replace")
    return upstream_error(reply.status, payload, provider="mitmroute")


async def _translated(reply: Reply, messages: MessagesStream) -> AsyncIterator[bytes]:
    """The engine's chat stream as Messages events, piece by piece; `message_delta` carries
    the exchange's usage, final once the engine's stream has ended."""
    stream = reply.stream
    assert stream is not None
    try:
        async for data in stream:
            if out := messages.feed(data):
                yield out
        yield messages.close(reply.exchange.usage if reply.exchange is not None else None)
    except Exception as e:  # a bug of ours: say so in the stream rather than cut it short
        log.exception("messages: could not translate a stream")
        if not messages.failed:
            error = internal_error(f"mitmroute internal error: {type(e).__name__}")
            yield event("error", {"error": {"type": "api_error", "message": error.message}})
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()

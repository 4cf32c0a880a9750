"""Anthropic's Messages API (`/v1/messages`): not translated yet, answered 404 (placeholder)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmroute import errors
from mitmroute.errors import ProxyError
from mitmroute.request import JSON_HEADERS, Reply, endpoint_name, refused_exchange

if TYPE_CHECKING:
    from mitmroute.engine import Engine
    from mitmroute.request import ClientRequest


class MessagesInbound:
    name = "anthropic"

    async def handle(self, engine: Engine, request: ClientRequest) -> Reply:
        error = ProxyError(404, f"{endpoint_name(request.path)} is not routed yet",
                           "invalid_request_error", code="unknown_url")  # fmt: skip
        exchange = refused_exchange(request, error)
        engine.finish(exchange)
        return Reply(
            error.status, dict(JSON_HEADERS), errors.render(error, "anthropic"), exchange=exchange
        )

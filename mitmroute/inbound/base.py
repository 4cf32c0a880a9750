"""What every inbound dialect provides."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mitmroute.engine import Engine
    from mitmroute.request import ClientRequest, Reply


class Inbound(Protocol):
    name: str
    """`openai`, `responses` or `anthropic`: also the dialect its errors are written in."""

    async def handle(self, engine: Engine, request: ClientRequest) -> Reply:
        """Answer one request in this dialect (never raises): translate it into the engine's
        request, let the engine answer, translate the Reply (body, stream or error) back."""
        ...

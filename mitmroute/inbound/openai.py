"""OpenAI's chat completions, completions, embeddings and models: the engine's own language."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mitmroute.engine import Engine
    from mitmroute.request import ClientRequest, Reply


class OpenAIInbound:
    name = "openai"

    async def handle(self, engine: Engine, request: ClientRequest) -> Reply:
        return await engine.handle(request)

"""Inbound dialects: the wire formats clients speak to the proxy.

Each dialect turns its requests into the engine's request (an OpenAI chat completion, the
engine's one language) and the engine's answers, streams and errors back into its own wire
format, so the engine, routing, fallbacks, cache, keys and ledger stay dialect-free:

* `openai`: chat completions, completions, embeddings, models (the engine's own language);
* `responses`: OpenAI's Responses API (`/v1/responses`);
* `anthropic`: Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`).
"""

from __future__ import annotations

from mitmroute.inbound.anthropic import MessagesInbound
from mitmroute.inbound.base import Inbound
from mitmroute.inbound.openai import OpenAIInbound
from mitmroute.inbound.responses import ResponsesInbound

__all__ = ["Inbound", "inbound_for"]

_OPENAI = OpenAIInbound()
_BY_PREFIX: tuple[tuple[str, Inbound], ...] = (
    ("/v1/responses", ResponsesInbound()),
    ("/v1/messages", MessagesInbound()),
)


def inbound_for(path: str) -> Inbound:
    """The dialect a (canonical) request path speaks."""
    bare = path.split("?", 1)[0]
    for prefix, inbound in _BY_PREFIX:
        if bare == prefix or bare.startswith(prefix + "/"):
            return inbound
    return _OPENAI

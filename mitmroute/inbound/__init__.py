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
_RESPONSES = ResponsesInbound()
_MESSAGES = MessagesInbound()
MESSAGES_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})


def inbound_for(path: str) -> Inbound:
    """The dialect a (canonical) request path speaks; other paths of Anthropic's API (batches,
    models, ...) are the engine's, which passes them through by the gate's rule."""
    bare = path.split("?", 1)[0]
    if bare == "/v1/responses" or bare.startswith("/v1/responses/"):
        return _RESPONSES
    if bare in MESSAGES_PATHS:
        return _MESSAGES
    return _OPENAI

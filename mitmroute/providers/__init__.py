"""Backend kinds, one module each: `openai` (and every OpenAI-compatible server), `ollama`,
`anthropic`. `provider_for` maps a deployment's provider prefix to its implementation."""

from __future__ import annotations

from functools import cache

from mitmroute.config import OPENAI_COMPATIBLE
from mitmroute.providers.base import CHAT, COMPLETIONS, EMBEDDINGS, Provider

__all__ = ["CHAT", "COMPLETIONS", "EMBEDDINGS", "Provider", "provider_for"]


@cache
def provider_for(prefix: str) -> Provider:
    """The provider implementation for a `litellm_params.model` prefix."""
    if prefix in OPENAI_COMPATIBLE:
        from mitmroute.providers.openai import OpenAIProvider

        return OpenAIProvider()
    if prefix in ("ollama", "ollama_chat"):
        from mitmroute.providers.ollama import OllamaProvider

        return OllamaProvider()
    if prefix == "anthropic":
        from mitmroute.providers.anthropic import AnthropicProvider

        return AnthropicProvider()
    raise KeyError(prefix)

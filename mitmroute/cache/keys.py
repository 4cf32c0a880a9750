"""Cache keys: the sha256 of a normalized request.

What counts is decided by a *denylist*: every request parameter enters the key except the ones
named in `IGNORED_PARAMS`, which provably do not change what the model says (who asks, how the
answer travels, what it costs). A parameter this module has never heard of therefore changes
the key — a new OpenAI knob can cause a miss, never a wrong hit.

Normalization (two requests that mean the same thing share one key):
- the model group replaces the raw `model` (deployments of a group share entries);
- JSON key order is irrelevant, top-level `null` values equal absent ones;
- integral floats equal ints (`temperature: 1.0` == `temperature: 1`);
- defaults that are the same on every backend are dropped (`n: 1`; `encoding_format: "float"`
  for embeddings);
- for chat, `max_tokens` and `max_completion_tokens` are the same knob.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

KEY_VERSION = 1
"""Bump when the normalization changes, so old entries become unreachable instead of wrong."""

IGNORED_PARAMS: frozenset[str] = frozenset(
    {
        # Replaced by the model group.
        "model",
        # Who is asking and bookkeeping: identical questions from two users get one answer.
        "user", "metadata", "safety_identifier", "prompt_cache_key", "store", "tags",
        "litellm_metadata", "proxy_server_request",
        # How the answer travels: a streamed and a non-streamed request share one entry.
        "stream", "stream_options", "timeout", "request_timeout", "stream_timeout",
        "extra_headers", "extra_query", "api_key", "api_base", "base_url", "api_version",
        "organization",
        # What it costs and how fast it comes, not what it says. `service_tier` (auto, default,
        # flex, priority) selects a price/latency class of the same model, so it is ignored.
        "service_tier", "prompt_cache_retention",
        # Cache, retry and fallback knobs of this proxy and of LiteLLM.
        "cache", "caching", "num_retries", "max_retries", "fallbacks",
        "context_window_fallbacks", "mock_testing_fallbacks", "drop_params",
    }
)  # fmt: skip

_DROP_DEFAULTS: dict[str, dict[str, Any]] = {
    "chat/completions": {"n": 1},
    "completions": {"n": 1},
    "embeddings": {"encoding_format": "float"},
}


def _canonical(value: Any) -> Any:
    """Integral floats become ints, recursively; everything else is kept as is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def normalize(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """The parameters of `body` that change the answer, in canonical form."""
    params = {
        k: _canonical(v) for k, v in body.items() if k not in IGNORED_PARAMS and v is not None
    }
    for name, default in _DROP_DEFAULTS.get(endpoint, {}).items():
        if params.get(name) == default:
            del params[name]
    if endpoint == "chat/completions" and "max_tokens" in params:
        params.setdefault("max_completion_tokens", params["max_tokens"])
        if params["max_completion_tokens"] == params["max_tokens"]:
            del params["max_tokens"]
    return params


def cache_key(
    endpoint: str,
    model_group: str,
    body: dict[str, Any],
    *,
    namespace: str,
    scope_id: str | None,
) -> str:
    """`{namespace}:{sha256 hex}` of endpoint, model group, scope and normalized parameters."""
    material = {
        "v": KEY_VERSION,
        "endpoint": endpoint,
        "group": model_group,
        "scope": scope_id,
        "params": normalize(endpoint, body),
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{namespace}:{digest}"


def scope_id(scope: str, *, key_hash: str | None = None, team: str | None = None) -> str | None:
    """The `scope_id` for `cache_key` under `CacheSettings.scope`.

    `global` shares entries between everyone (None). `key` separates virtual keys. `team`
    separates teams; a request without a team falls back to its key, so a team-scoped cache never
    lets a team-less key read another key's answers.
    """
    if scope == "global":
        return None
    if scope == "team" and team:
        return f"team:{team}"
    return f"key:{key_hash or '-'}"

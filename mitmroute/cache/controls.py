"""Per-request cache controls: the body's `cache` object and the `Cache-Control` header.

Body (LiteLLM's spelling; `_` may replace `-`)::

    "cache": {"no-cache": true, "no-store": true, "ttl": 600, "s-maxage": 60,
              "namespace": "team-a", "use-cache": true}

Header: ``Cache-Control: no-cache, no-store, max-age=60`` (`s-maxage=N` is accepted too; other
directives are ignored). When body and header both give a max age, the smaller wins.

The `cache` object is always removed from the body (backends reject it), even when caching is
off, and invalid values are always a 400 naming the parameter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mitmroute.config import CacheSettings
from mitmroute.errors import bad_request

ENDPOINT_CALL_TYPES = {
    "chat/completions": "chat_completions",
    "completions": "completions",
    "embeddings": "embeddings",
}
"""Engine endpoint -> `CacheSettings.supported_call_types` name."""

BODY_CONTROLS = ("no-cache", "no-store", "ttl", "s-maxage", "namespace", "use-cache")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclass(frozen=True, slots=True)
class CacheControls:
    """What the cache may do for one request."""

    read: bool
    """Look up the cache (and join an identical in-flight request)."""
    write: bool
    """Store the answer."""
    ttl: float | None
    """Seconds the stored answer lives; None = the store's default."""
    max_age: float | None
    """Oldest acceptable hit in seconds (`s-maxage` / `max-age`); None = any age."""
    namespace: str
    """Key prefix for `cache_key`: the configured namespace, plus the request's if given."""

    @property
    def active(self) -> bool:
        return self.read or self.write


def infer_endpoint(body: Mapping[str, Any]) -> str:
    """Best guess of the endpoint from the body's shape (when the caller does not say)."""
    if "messages" in body:
        return "chat/completions"
    if "prompt" in body:
        return "completions"
    if "input" in body:
        return "embeddings"
    return "chat/completions"


def parse_controls(
    body: dict[str, Any],
    headers: Mapping[str, str],
    settings: CacheSettings,
    *,
    endpoint: str | None = None,
) -> CacheControls:
    """Read and remove the body's `cache` object, read `Cache-Control`, apply mode and call types.

    Raises `ProxyError` (400) naming the offending parameter.
    """
    raw = body.pop("cache", None)
    opts = _body_options(raw)
    header = _header_options(_get_header(headers, "cache-control"))

    call_type = ENDPOINT_CALL_TYPES.get(endpoint or infer_endpoint(body))
    enabled = settings.enabled and call_type in settings.supported_call_types
    use_cache = opts.get("use-cache")
    opted_in = use_cache if use_cache is not None else settings.mode == "default_on"
    on = enabled and opted_in

    ages = [a for a in (opts.get("s-maxage"), header.get("max-age")) if a is not None]
    namespace = settings.namespace
    if opts.get("namespace"):
        namespace = f"{namespace}:{opts['namespace']}"
    return CacheControls(
        read=on and not (opts.get("no-cache") or header.get("no-cache")),
        write=on and not (opts.get("no-store") or header.get("no-store")),
        ttl=opts.get("ttl", settings.ttl),
        max_age=min(ages) if ages else None,
        namespace=namespace,
    )


def _get_header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        for k, v in headers.items():
            if k.lower() == name:
                return v
    return value


def _body_options(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise bad_request(
            f'cache: expected an object like {{"no-cache": true}}, got {type(raw).__name__}',
            param="cache",
        )
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("_", "-").lower()
        param = f"cache.{key}"
        if name not in BODY_CONTROLS:
            raise bad_request(
                f"{param}: unknown cache control (known: {', '.join(BODY_CONTROLS)})", param=param
            )
        if value is None:
            continue
        if name in ("no-cache", "no-store", "use-cache"):
            if not isinstance(value, bool):
                raise bad_request(f"{param}: expected true or false, got {value!r}", param=param)
            out[name] = value
        elif name in ("ttl", "s-maxage"):
            out[name] = _seconds(value, param, positive=name == "ttl")
        elif not isinstance(value, str) or not _NAMESPACE.match(value):
            raise bad_request(
                f"{param}: expected 1-128 characters of A-Z a-z 0-9 _ . : -, got {value!r}",
                param=param,
            )
        else:
            out[name] = value
    return out


def _seconds(value: Any, param: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f"{param}: expected a number of seconds, got {value!r}", param=param)
    if value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise bad_request(f"{param}: must be {bound}, got {value!r}", param=param)
    return float(value)


def _header_options(value: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not value:
        return out
    for directive in value.split(","):
        name, _, arg = directive.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-cache", "no-store"):
            out[name] = True
        elif name in ("max-age", "s-maxage"):
            arg = arg.strip().strip('"')
            if not arg.isdigit():
                raise bad_request(
                    f"Cache-Control: {name} must be a whole number of seconds, got {arg!r}",
                    param="Cache-Control",
                )
            age = float(arg)
            out["max-age"] = min(age, out.get("max-age", age))
    return out

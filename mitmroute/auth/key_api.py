"""LiteLLM's key management API, answered by the proxy itself.

``POST /key/generate``, ``GET /key/info?key=``, ``POST /key/update``, ``POST /key/delete``
(``{"keys": [...]}`` or ``{"key_aliases": [...]}``) and ``GET /key/list`` (``page``, ``size``,
``key_alias``, ``team_id``, ``user_id``, ``return_full_object``), also under ``/v1/key/...``.
Same paths, fields and response shapes as LiteLLM; errors are OpenAI-shaped.

Each handler is a plain async function of a :class:`KeyAdmin` returning ``(status, body)``, so
the mitmproxy addon, the CLI (``scripts/keys.py``) and the tests share them. Only the master key
may manage keys; a virtual key may read its own ``/key/info``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from mitmroute.auth.keys import (
    KEY_PREFIX,
    KeyRecord,
    KeyStore,
    hash_key,
    make_record,
    new_key,
    parse_fields,
    sort_records,
    token_of,
    updated,
)
from mitmroute.auth.limits import Limiter, Policy, nanos_to_usd
from mitmroute.config import GeneralSettings
from mitmroute.errors import ProxyError

Result = tuple[int, dict[str, Any]]


@dataclass(slots=True)
class KeyAdmin:
    """What the key API works on."""

    store: KeyStore
    limiter: Limiter
    general: GeneralSettings | None = None
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls the key API: the master key, or a virtual key (`record`)."""

    is_master: bool = False
    record: KeyRecord | None = None


def _error(status: int, message: str, code: str, param: str | None = None,
           etype: str = "invalid_request_error") -> ProxyError:  # fmt: skip
    return ProxyError(status, message, etype, code=code, param=param)


def key_route(path: str) -> str | None:
    """`/key/generate?x` or `/v1/key/generate` -> `generate`; None for other paths."""
    path = path.split("?", 1)[0].rstrip("/")
    if path.startswith("/v1/"):
        path = path[3:]
    return path[5:] if path.startswith("/key/") else None


def _query(path: str) -> dict[str, str]:
    query = path.split("?", 1)[1] if "?" in path else ""
    return {k: v[-1] for k, v in parse_qs(query).items()}


def _json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError as e:
        raise _error(400, f"The request body is not valid JSON: {e}", "invalid_json") from None
    except RecursionError:
        raise _error(
            400, "The request body is not valid JSON: it is nested too deeply.", "body_too_deep"
        ) from None
    if not isinstance(body, dict):
        raise _error(400, "The request body must be a JSON object.", "invalid_json")
    return body


async def view(admin: KeyAdmin, record: KeyRecord) -> dict[str, Any]:
    """A record as the API shows it, with its spend in the current budget window."""
    policy = Policy.of(record, admin.general)
    now = admin.clock().timestamp()
    reset = policy.reset_at(now)
    return {
        **record.public(),
        "spend": nanos_to_usd(await admin.limiter.spent(policy, now)),
        "budget_reset_at": datetime.fromtimestamp(reset, UTC).isoformat() if reset else None,
    }


async def _find(admin: KeyAdmin, key: Any, param: str = "key") -> KeyRecord:
    if not isinstance(key, str) or not key:
        raise _error(400, f"`{param}` is required", "missing_key", param=param)
    record = await admin.store.get(token_of(key))
    if record is None:
        raise _error(404, "Key not found", "key_not_found", param=param)
    return record


# --- handlers --------------------------------------------------------------------------------


async def generate(admin: KeyAdmin, body: dict[str, Any]) -> Result:
    now = admin.clock()
    fields = parse_fields(body, now)
    key = body.get("key")
    if key is None:
        key = new_key()
    elif not isinstance(key, str) or not key.startswith(KEY_PREFIX) or len(key) < 8:
        raise _error(400, f"`key` must start with {KEY_PREFIX!r} and be 8+ characters",
                     "invalid_field", param="key")  # fmt: skip
    elif await admin.store.get(hash_key(key)) is not None:
        raise _error(400, "This key already exists", "key_exists", param="key")
    record = make_record(key, fields, now)
    if not await admin.store.put(record):
        raise _error(400, f"key_alias {record.key_alias!r} is already used by another key",
                     "key_alias_exists", param="key_alias")  # fmt: skip
    return 200, {"key": key, **await view(admin, record)}


async def info(admin: KeyAdmin, query: dict[str, str], caller: Caller) -> Result:
    key = query.get("key")
    if caller.record is not None:  # a virtual key may read itself only
        if key is not None and token_of(key) != caller.record.token:
            raise _error(403, "A virtual key may only read its own info", "permission_denied",
                         etype="permission_error")  # fmt: skip
        return 200, {"key": key or caller.record.key_name,
                     "info": await view(admin, caller.record)}  # fmt: skip
    record = await _find(admin, key)
    return 200, {"key": key, "info": await view(admin, record)}


async def update(admin: KeyAdmin, body: dict[str, Any]) -> Result:
    record = await _find(admin, body.get("key"))
    fields = parse_fields({k: v for k, v in body.items() if k != "key"}, admin.clock())
    new = updated(record, fields, admin.clock())
    if not await admin.store.put(new, previous_alias=record.key_alias):
        raise _error(400, f"key_alias {new.key_alias!r} is already used by another key",
                     "key_alias_exists", param="key_alias")  # fmt: skip
    return 200, {"key": body["key"], **await view(admin, new)}


async def delete(admin: KeyAdmin, body: dict[str, Any]) -> Result:
    keys, aliases = body.get("keys") or [], body.get("key_aliases") or []
    if not isinstance(keys, list) or not isinstance(aliases, list) or not (keys or aliases):
        raise _error(400, "Give `keys` (or `key_aliases`): a non-empty list", "missing_key",
                     param="keys")  # fmt: skip
    tokens: list[str] = []
    missing: list[str] = []
    for name, record in [
        *[(k, await admin.store.get(token_of(k)) if isinstance(k, str) and k else None)
          for k in keys],
        *[(a, await admin.store.by_alias(a) if isinstance(a, str) else None) for a in aliases],
    ]:  # fmt: skip
        if record is None:
            missing.append(str(name))
        else:
            tokens.append(record.token)
    if missing:
        raise _error(404, f"Keys not found, nothing deleted: {', '.join(missing)}",
                     "key_not_found", param="keys")  # fmt: skip
    await admin.store.delete(tokens)
    for token in tokens:
        await admin.limiter.forget(token)
    return 200, {"deleted_keys": [*keys, *aliases]}


def _positive_int(query: dict[str, str], name: str, default: int) -> int:
    try:
        value = int(query.get(name, default))
    except ValueError:
        raise _error(400, f"`{name}` must be an integer", "invalid_field", param=name) from None
    if value < 1:
        raise _error(400, f"`{name}` must be >= 1", "invalid_field", param=name)
    return value


async def list_keys(admin: KeyAdmin, query: dict[str, str]) -> Result:
    page, size = _positive_int(query, "page", 1), min(_positive_int(query, "size", 10), 100)
    records = sort_records(await admin.store.all())
    for name in ("key_alias", "team_id", "user_id"):
        if query.get(name):
            records = [r for r in records if getattr(r, name) == query[name]]
    chosen = records[(page - 1) * size : page * size]
    full = query.get("return_full_object", "").lower() in ("1", "true", "yes")
    keys: list[Any] = [await view(admin, r) for r in chosen] if full else [r.token for r in chosen]
    return 200, {"keys": keys, "total_count": len(records), "current_page": page,
                 "total_pages": max(1, math.ceil(len(records) / size))}  # fmt: skip


ROUTES: dict[str, str] = {"generate": "POST", "info": "GET", "update": "POST",
                          "delete": "POST", "list": "GET"}  # fmt: skip


async def handle(admin: KeyAdmin, method: str, path: str, raw: bytes, caller: Caller) -> Result:
    """Answer one key API request (never raises)."""
    try:
        return await _dispatch(admin, method.upper(), path, raw, caller)
    except ProxyError as e:
        return e.status, e.body()


async def _dispatch(admin: KeyAdmin, method: str, path: str, raw: bytes,
                    caller: Caller) -> Result:  # fmt: skip
    route = key_route(path)
    if route not in ROUTES:
        raise _error(404, f"Unknown key API route: /key/{route}", "not_found")
    if method != ROUTES[route]:
        raise _error(405, f"/key/{route} expects {ROUTES[route]}", "method_not_allowed")
    if route == "info":
        return await info(admin, _query(path), caller)
    if not caller.is_master:
        raise _error(403, "Only the master key may manage keys", "permission_denied",
                     etype="permission_error")  # fmt: skip
    handlers: dict[str, Callable[[], Awaitable[Result]]] = {
        "generate": lambda: generate(admin, _json_body(raw)),
        "update": lambda: update(admin, _json_body(raw)),
        "delete": lambda: delete(admin, _json_body(raw)),
        "list": lambda: list_keys(admin, _query(path)),
    }
    return await handlers[route]()

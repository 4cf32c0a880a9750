"""The gate: what becomes of a request to an intercepted host, decided once, in one place.

Every request to an intercepted host gets exactly one of four fates, and each is a spend row:

* ``route``: a model endpoint (``POST /v1/chat/completions``, ``/v1/completions``,
  ``/v1/embeddings``, ``/v1/responses``, ``/v1/messages``, ``/v1/messages/count_tokens``) goes
  through its inbound dialect to the engine;
* ``answer``: the proxy answers it itself (``GET /v1/models``, the key API ``/key/*``, stored
  responses: ``GET``/``DELETE /v1/responses/{id}``);
* ``passthrough``: the explicit rule: a well-formed path matching
  ``general_settings.passthrough_paths`` (default ``/v1/*``: the providers' other APIs, such
  as files or audio; Claude Code's own ``/api/*`` calls are refused at once) goes to the original
  host unchanged, as does a model the config doesn't list when ``passthrough_unknown_models``
  is on;
* ``refuse``: anything else (a path outside the rule, a malformed path, a WebSocket upgrade)
  is answered with an error in the client's API shape.

Paths are matched in canonical form (:func:`canonical_path`), so spellings such as
``//v1/chat/completions``, ``/V1/chat/completions``, ``/v1/%2e/chat/completions`` or
``/v1/chat%2Fcompletions`` are the route they spell, never an accidental passthrough.
"""

from __future__ import annotations

import fnmatch
import functools
import posixpath
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_to_bytes

from mitmroute import errors
from mitmroute.errors import ProxyError
from mitmroute.providers import CHAT, COMPLETIONS, EMBEDDINGS

Fate = Literal["route", "answer", "passthrough", "refuse"]

ROUTED = frozenset(
    {
        f"/v1/{CHAT}",
        f"/v1/{COMPLETIONS}",
        f"/v1/{EMBEDDINGS}",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
    }
)
ANSWERED = frozenset({"/v1/models"})
STORED_RESPONSES = "/v1/responses/"
"""`GET` and `DELETE /v1/responses/{id}[/input_items]`: responses the proxy stored itself."""
KEY_API_PREFIX = "/key/"
DEFAULT_PASSTHROUGH = ("/v1/*",)

_SAFE_PATH = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
"""Characters a canonical path may hold: RFC 3986 pchar less `%` and `;` (a decoded path
holding `%`, `;`, `?`, `#`, a backslash, a space or a control character is refused)."""


class BadPath(ValueError):
    """A request target that has no canonical form."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The gate's verdict on one request (kept in ``flow.metadata["mitmroute.gate"]``)."""

    fate: Fate
    path: str
    """The canonical path, with the query string as sent."""
    dialect: str = "openai"
    """Whose API shape the client speaks: errors are written in it."""
    error: ProxyError | None = None
    """Why it was refused (fate ``refuse``)."""

    @property
    def endpoint(self) -> str:
        """`chat/completions` for `/v1/chat/completions`; the whole path outside `/v1/`."""
        path = self.path.split("?", 1)[0]
        return path[4:] if path.startswith("/v1/") else path


def canonical_host(host: str) -> str:
    """`API.OpenAI.com.` -> `api.openai.com`."""
    return host.strip().rstrip(".").lower()


REMEMBERED_PATH_CHARS = 256
"""Paths up to this long are remembered (1024 of them): clients send the same few."""


def canonical_path(target: str) -> str:
    """Percent-decode, resolve `.` and `..`, collapse slashes, lower-case a `/v1` prefix; and
    lower-case the whole path when that spells a route the proxy knows. The query is kept.

    Raises BadPath for a target that is not an absolute path of safe characters once decoded
    (double encoding, `;` parameters, backslashes, control characters, non-ASCII).
    """
    path, sep, query = target.partition("?")
    if len(path) <= REMEMBERED_PATH_CHARS:
        return _remembered_path(path) + sep + query
    return _canonical(path) + sep + query


def _canonical(path: str) -> str:
    """`canonical_path` of a target without its query."""
    if not path.startswith("/"):
        raise BadPath("the request path must start with /")
    try:
        decoded = unquote_to_bytes(path).decode("ascii")
    except UnicodeDecodeError:
        raise BadPath("the request path holds bytes that are not ASCII") from None
    if not _SAFE_PATH.fullmatch(decoded):
        raise BadPath("the request path holds characters no API route has")
    trailing = decoded.endswith("/") and decoded != "/"
    canonical = posixpath.normpath("/" + decoded.lstrip("/"))
    if canonical.startswith("//"):
        canonical = "/" + canonical.lstrip("/")
    if canonical.lower() == "/v1" or canonical[:4].lower() == "/v1/":
        canonical = "/v1" + canonical[3:]
    known = canonical.lower()
    if known in ROUTED or known in ANSWERED or known.startswith(KEY_API_PREFIX):
        canonical = known
    elif trailing and canonical != "/":
        canonical += "/"
    return canonical


_remembered_path = functools.lru_cache(maxsize=1024)(_canonical)
"""`_canonical`, remembered (a refused path raises each time: exceptions are not kept)."""


def dialect_of(host: str, path: str = "") -> str:
    """Whose API shape a request speaks: Anthropic's on its host or its Messages paths."""
    if path.startswith("/v1/messages") or "anthropic" in host:
        return "anthropic"
    return "openai"


def decide(
    method: str,
    target: str,
    host: str,
    *,
    websocket: bool = False,
    passthrough_paths: tuple[str, ...] = DEFAULT_PASSTHROUGH,
) -> Decision:
    """The fate of one request to an intercepted host."""
    try:
        path = canonical_path(target)
    except BadPath as e:
        error = errors.bad_request(f"{e}.", code="bad_path")
        return Decision("refuse", target, dialect_of(host), error)
    bare = path.split("?", 1)[0].rstrip("/") or "/"
    dialect = dialect_of(host, bare)
    if websocket:
        return Decision("refuse", path, dialect, _no_websocket())
    if method == "POST" and bare in ROUTED:
        return Decision("route", path, dialect)
    if (method == "GET" and bare in ANSWERED) or bare.startswith(KEY_API_PREFIX):
        return Decision("answer", path, dialect)
    if method in ("GET", "DELETE") and bare.startswith(STORED_RESPONSES):
        return Decision("answer", path, dialect)
    if any(fnmatch.fnmatchcase(bare, p) for p in passthrough_paths):
        return Decision("passthrough", path, dialect)
    return Decision("refuse", path, dialect, _not_routed(method, bare))


def _not_routed(method: str, path: str) -> ProxyError:
    return ProxyError(
        404,
        f"mitmroute neither routes nor passes through {method} {path} "
        "(see general_settings.passthrough_paths).",
        "invalid_request_error",
        code="unknown_url",
        kind="bad_request",
    )


def _no_websocket() -> ProxyError:
    return ProxyError(
        426,
        "WebSocket connections to this host are not routed by mitmroute: use HTTP.",
        "invalid_request_error",
        code="websocket_not_supported",
        kind="bad_request",
    )

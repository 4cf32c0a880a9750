"""OpenAI-shaped errors that the proxy itself produces.

The status codes are chosen so that the official openai SDK raises the matching exception:
400 BadRequestError, 401 AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError,
429 RateLimitError, 5xx InternalServerError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(slots=True)
class ProxyError(Exception):
    """An error answered to the client as `{"error": {message, type, param, code}}`."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    retryable: bool = False
    """True when another attempt (retry or fallback) may succeed."""
    kind: str = "error"
    """Classification used by fallbacks: error, timeout, connect, rate_limit, context_window,
    content_policy, auth, bad_request."""

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message}"

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ProxyError:
    return ProxyError(
        400, message, "invalid_request_error", code=code, param=param, kind="bad_request"
    )


def model_not_found(model: str) -> ProxyError:
    return ProxyError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        "invalid_request_error",
        code="model_not_found",
        param="model",
        kind="bad_request",
    )


def internal_error(message: str) -> ProxyError:
    return ProxyError(500, message, "server_error", code="internal_error")


def client_disconnected() -> ProxyError:
    """The record of a request whose client went away before any answer (never sent: there is
    nobody to send it to). 499 is nginx's "client closed request"."""
    return ProxyError(
        499,
        "The client went away before it was answered.",
        "client_error",
        code="client_disconnected",
    )


def upstream_unreachable(message: str) -> ProxyError:
    return ProxyError(
        502, message, "server_error", code="upstream_unreachable", retryable=True, kind="connect"
    )


def upstream_timeout(message: str) -> ProxyError:
    return ProxyError(
        504, message, "server_error", code="upstream_timeout", retryable=True, kind="timeout"
    )


RETRYABLE_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))


def classify_status(status: int, message: str = "", code: str | None = None) -> str:
    """The error class of an upstream status (and its message), for retries and fallbacks."""
    text = f"{code or ''} {message}".lower()
    if status == 429:
        return "rate_limit"
    if status in (408,):
        return "timeout"
    if status >= 500:
        return "error"
    if (
        "context_length" in text
        or "context length" in text
        or "too many tokens" in text
        or ("prompt is too long" in text)
    ):
        return "context_window"
    if "content_policy" in text or "content policy" in text or "content_filter" in text:
        return "content_policy"
    if status in (401, 403):
        return "auth"
    return "bad_request"


def upstream_error(status: int, payload: object, *, provider: str) -> ProxyError:
    """Turn an upstream error response (any provider's shape) into a ProxyError."""
    message, etype, code, param = f"upstream {provider} answered {status}", None, None, None
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            etype = err.get("type")
            code = err.get("code")
            param = err.get("param")
        elif isinstance(err, str):
            message = err
    elif isinstance(payload, str) and payload.strip():
        message = payload.strip()[:500]
    kind = classify_status(status, message, code if isinstance(code, str) else None)
    if kind == "context_window":
        code = code or "context_length_exceeded"
    return ProxyError(
        status=status,
        message=message,
        type=str(etype or ("server_error" if status >= 500 else "invalid_request_error")),
        code=str(code) if code is not None else None,
        param=str(param) if param is not None else None,
        retryable=status in RETRYABLE_STATUSES,
        kind=kind,
    )


ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
"""Anthropic's error type per status, limited to the types the anthropic SDK models (its
`ErrorObject`): a 413 is `invalid_request_error` (the API says `request_too_large`, which the
SDK doesn't know); a 503 (no deployment could answer, a store unavailable) is
`overloaded_error`, retried by the SDK as it retries Anthropic's own 529 overloads."""


def render(error: ProxyError, dialect: str = "openai") -> bytes:
    """The error body in the client's own API shape (OpenAI's, or Anthropic's)."""
    if dialect != "anthropic":
        return error.to_bytes()
    kind = ANTHROPIC_ERROR_TYPES.get(error.status)
    if error.type == "overloaded_error":
        kind = "overloaded_error"
    elif kind is None:
        kind = "api_error" if error.status >= 500 else "invalid_request_error"
    return json.dumps({"type": "error", "error": {"type": kind, "message": error.message}}).encode()


def body_too_large(limit: int) -> ProxyError:
    return ProxyError(
        413,
        f"The request body is larger than this proxy accepts ({limit} bytes after "
        "decompression; general_settings.max_request_size_mb).",
        "invalid_request_error",
        code="request_too_large",
        kind="bad_request",
    )


def unsupported_encoding(encoding: str) -> ProxyError:
    return ProxyError(
        415,
        f"Unsupported content-encoding `{encoding}`: send identity, gzip, deflate or br.",
        "invalid_request_error",
        code="unsupported_content_encoding",
        kind="bad_request",
    )

"""Credentials: the secrets a config holds, scrubbing them from whatever a backend sends back,
and where a client's own key may go.

A `Redactor` is built once per config from its deployments: each `api_key`, the credentials in
an `api_base` (URL userinfo, query parameters such as `key=`, `api-key=`, `token=`) and
credential-like `extra_headers`. Upstream text passes through it where it enters the proxy
(`mitmroute.upstream`), so no client, log line or spend-log row sees a backend key. When no
secret occurs (the common case) the cost is one bytes `in` test per secret.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote, unquote, urlsplit

if TYPE_CHECKING:
    from mitmroute.config import Deployment
    from mitmroute.errors import ProxyError

MIN_SECRET_LENGTH = 8
"""Shorter values ("EMPTY", "ollama", "none") are placeholders, not credentials: redacting them
would corrupt ordinary answers."""
CREDENTIAL_NAME = re.compile(r"key|token|secret|passw|auth|sig|cred", re.IGNORECASE)
"""Query parameter and header names whose values are credentials (`api-version` is not)."""
VENDOR_PREFIX = re.compile(r"[a-z]{2,3}[-_](?:[a-z]{2,4}[-_])?")
"""The public part of a key's format (`sk-`, `sk-proj-`, `sk-ant-`, `gsk_`), kept in its mask."""
DEFAULT_PORTS = {"https": 443, "http": 80}


def mask(secret: str) -> str:
    """What a secret becomes: `sk-...wxyz` for a long key (as OpenAI shows them), else
    `[redacted]`."""
    if len(secret) < 20:
        return "[redacted]"
    prefix = m.group() if (m := VENDOR_PREFIX.match(secret)) else ""
    return f"{prefix}...{secret[-4:]}"


def deployment_secrets(deployment: Deployment) -> Iterator[str]:
    """Every credential a deployment sends upstream."""
    if deployment.api_key:
        yield deployment.api_key
    url = urlsplit(deployment.api_base)
    for part in (url.username, url.password):
        if part:
            yield part
            yield unquote(part)
    if url.username or url.password:  # what goes upstream: `Authorization: Basic <this>`
        basic = f"{unquote(url.username or '')}:{unquote(url.password or '')}"
        yield base64.b64encode(basic.encode()).decode()
    for name, value in parse_qsl(url.query):
        if CREDENTIAL_NAME.search(name):
            yield value
    for name, value in deployment.extra_headers.items():
        if CREDENTIAL_NAME.search(name):
            yield value
            yield value.partition(" ")[2]  # `Bearer <token>`, `Basic <token>`


def _forms(secret: str) -> set[str]:
    """The secret as a backend may write it back: as is, JSON-escaped, percent-encoded."""
    return {secret, json.dumps(secret)[1:-1], quote(secret, safe="")}


class Redactor:
    """Replaces every known secret in text or bytes with its mask."""

    __slots__ = ("_bytes", "_bytes_pattern", "_masks", "_text", "_text_pattern", "secrets")

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self.secrets = tuple(dict.fromkeys(s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH))
        masks: dict[str, str] = {}
        for secret in self.secrets:
            for form in _forms(secret):
                masks.setdefault(form, mask(secret))
        forms = sorted(masks, key=len, reverse=True)  # a longer secret wins over its substring
        self._masks = masks
        self._text = tuple(forms)
        self._bytes = tuple(f.encode() for f in forms)
        self._text_pattern: re.Pattern[str] | None = None
        self._bytes_pattern: re.Pattern[bytes] | None = None

    @classmethod
    def for_deployments(cls, deployments: Iterable[Deployment]) -> Redactor:
        return cls(s for d in deployments for s in deployment_secrets(d))

    def adding(self, secret: str | None) -> Redactor:
        """This redactor, also covering `secret` (e.g. a client key forwarded upstream)."""
        if not secret or secret in self.secrets or len(secret) < MIN_SECRET_LENGTH:
            return self
        return Redactor((*self.secrets, secret))

    def __bool__(self) -> bool:
        return bool(self._text)

    def text(self, text: str) -> str:
        for form in self._text:
            if form in text:
                break
        else:
            return text
        if self._text_pattern is None:
            self._text_pattern = re.compile("|".join(map(re.escape, self._text)))
        return self._text_pattern.sub(lambda m: self._masks[m.group()], text)

    def bytes(self, data: bytes) -> bytes:
        for form in self._bytes:
            if form in data:
                break
        else:
            return data
        if self._bytes_pattern is None:
            self._bytes_pattern = re.compile(b"|".join(map(re.escape, self._bytes)))
        return self._bytes_pattern.sub(lambda m: self._masks[m.group().decode()].encode(), data)

    def error(self, error: ProxyError) -> ProxyError:
        """Redact, in place, every text of an error built from what a backend said."""
        error.message = self.text(error.message)
        error.type = self.text(error.type)
        if error.code is not None:
            error.code = self.text(error.code)
        if error.param is not None:
            error.param = self.text(error.param)
        return error


class LineRedactor:
    """Redacts a byte stream read in arbitrary pieces, whole lines at a time.

    A secret never spans a line break, and SSE or NDJSON parsers wait for a line's end anyway,
    so holding back the unfinished line delays nothing.
    """

    __slots__ = ("_redactor", "_tail")

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._tail = b""

    def feed(self, data: bytes) -> bytes:
        if self._tail:
            data = self._tail + data
        cut = data.rfind(b"\n") + 1
        if cut == len(data):
            self._tail = b""
            return self._redactor.bytes(data)
        self._tail = data[cut:]
        return self._redactor.bytes(data[:cut])

    def finish(self) -> bytes:
        """The unfinished last line, redacted."""
        rest, self._tail = self._tail, b""
        return self._redactor.bytes(rest)


@functools.lru_cache(maxsize=256)
def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, with the scheme's default port when none is written."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").rstrip("."), parts.port or DEFAULT_PORTS.get(scheme, 0)


def same_origin(url: str, scheme: str, host: str, port: int) -> bool:
    """True when `url` points at exactly the scheme, host and port a client addressed."""
    return bool(host) and origin(url) == (scheme.lower(), host.lower().rstrip("."), port)

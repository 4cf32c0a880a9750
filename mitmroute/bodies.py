"""Request bodies as the proxy reads them: decompressed within a limit, parsed within a depth.

A compressed body is inflated incrementally and abandoned the moment it passes the limit, so
a small gzip bomb costs the limit at most, never its full inflated size.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import brotli

from mitmroute import errors
from mitmroute.errors import ProxyError

MAX_JSON_DEPTH = 128
"""Deepest nesting of arrays and objects a request body may have (JSON schemas of tools
rarely pass 20)."""

_STEP = 64 * 1024


def decode_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """`raw` decoded per its content-encoding, at most `limit` bytes of it.

    Raises ProxyError: 413 past the limit, 415 for an encoding this proxy doesn't read, 400
    for a body that doesn't decode.
    """
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        decoded = raw
    elif encoding in ("gzip", "x-gzip", "deflate"):
        decoded = _inflate(raw, limit, deflate=encoding == "deflate")
    elif encoding == "br":
        decoded = _unbrotli(raw, limit)
    else:
        raise errors.unsupported_encoding(encoding)
    if len(decoded) > limit:
        raise errors.body_too_large(limit)
    return decoded


def _inflate(raw: bytes, limit: int, *, deflate: bool) -> bytes:
    # gzip, or for `deflate` a zlib stream (what the RFC means) or a raw one (what some send)
    wbits = (zlib.MAX_WBITS | 32) if not deflate or raw[:1] == b"\x78" else -zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    out = bytearray()
    data = raw
    try:
        while data:
            out += inflater.decompress(data, limit + 1 - len(out))
            if len(out) > limit:
                raise errors.body_too_large(limit)
            data = inflater.unconsumed_tail
            if inflater.eof:
                break
        out += inflater.flush()
    except zlib.error as e:
        kind = "deflate" if deflate else "gzip"
        raise errors.bad_request(f"The request body is not valid {kind}: {e}") from None
    return bytes(out)


def _unbrotli(raw: bytes, limit: int) -> bytes:
    decompressor = brotli.Decompressor()
    try:
        out = bytearray(decompressor.process(raw, output_buffer_limit=_STEP))
        while not decompressor.is_finished() and not decompressor.can_accept_more_data():
            if len(out) > limit:
                raise errors.body_too_large(limit)
            out += decompressor.process(b"", output_buffer_limit=_STEP)
    except brotli.error as e:
        raise errors.bad_request(f"The request body is not valid brotli: {e}") from None
    if not decompressor.is_finished():
        raise errors.bad_request("The request body is truncated brotli.")
    return bytes(out)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    if not raw:
        raise errors.bad_request("The request body is empty: send a JSON object.")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as e:
        raise errors.bad_request(f"The request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise errors.bad_request("The request body must be a JSON object.")
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(body) > MAX_JSON_DEPTH:
        raise _too_deep()
    return body


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in `value` (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > MAX_JSON_DEPTH:
                return deepest
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest


def _too_deep() -> ProxyError:
    return errors.bad_request(
        f"The request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.",
        code="body_too_deep",
    )

"""A lean HTTP/1.1 client for the calls to backends, on asyncio Protocols.

It does only what `Upstream` needs: one request at a time on a connection, keep-alive
connections pooled per origin (closed after 60 s idle; one with anything to read while idle,
its server's close above all, is dropped before reuse; a request is never sent twice), TLS with
the system's trust, bodies by
Content-Length, chunked or until close, gzip/deflate decoded as they are read, and a body
reader with flow control (the socket stops being read while 64 KiB wait unread).

Its errors subclass aiohttp's public ones (the callers classify failures by those).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import select
import ssl
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from typing import NamedTuple
from urllib.parse import quote, unquote, urlsplit

import aiohttp

IDLE_TIMEOUT = 60.0
"""Seconds a pooled connection may stay idle before it is closed."""
HIGH_WATER = 64 * 1024
"""Unread body bytes above which the socket stops being read (until they are read)."""
MAX_LINE = 8190
"""Longest status line, header line or chunk-size line accepted."""
MAX_HEADERS = 128
MAX_HEAD = 64 * 1024
"""Longest response head (status line and headers) accepted."""
DECODE_STEP = 256 * 1024
"""Most decompressed bytes made from one read (a small compressed body may inflate a lot)."""
MAX_WHOLE_BODY = 256 * 1024 * 1024
"""Largest body `read()` gathers whole (decoded): a bigger one is an error, not memory."""
IDEMPOTENT = frozenset({"GET", "OPTIONS", "PUT", "DELETE"})
"""Methods sent again on a new connection when a reused one ends before any answer byte."""


class HTTPClientError(aiohttp.ClientError):
    """Any failure of this client to get a response (aiohttp.ClientError for the callers)."""


class ConnectError(HTTPClientError, aiohttp.ClientOSError):
    """No connection to the origin (refused, unresolvable, TLS handshake or certificate)."""


class Disconnected(HTTPClientError, aiohttp.ServerDisconnectedError):
    """The connection ended before the response's head was whole (or the client closed)."""


class PayloadError(HTTPClientError, aiohttp.ClientPayloadError):
    """The response body was cut short or could not be decoded."""


class ProtocolError(HTTPClientError):
    """The server's response is not well-formed HTTP/1.1 (or exceeds the size limits)."""


class InvalidRequest(ValueError):
    """A request this client refuses to send (a header with CR, LF or NUL, a bad URL)."""


class Headers(Mapping[str, str]):
    """A response's headers, read-only; names are case-insensitive, a repeated name gives its
    first value (`getall` gives them all)."""

    __slots__ = ("_first", "raw")

    def __init__(self, raw: list[tuple[str, str]]) -> None:
        self.raw = raw
        """(name, value) as received, in order."""
        first: dict[str, str] = {}
        for name, value in raw:
            first.setdefault(name.lower(), value)
        self._first = first

    def __getitem__(self, name: str) -> str:
        return self._first[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._first.get(name.lower(), default)

    def getall(self, name: str) -> list[str]:
        lowered = name.lower()
        return [v for k, v in self.raw if k.lower() == lowered]

    def __iter__(self) -> Iterator[str]:
        return iter(self._first)

    def __len__(self) -> int:
        return len(self._first)

    def __repr__(self) -> str:
        return f"Headers({list(self._first)})"  # names only: values may be secrets


class _Decoder:
    """Incremental gzip/deflate decoding, at most DECODE_STEP bytes out of each call."""

    __slots__ = ("_z", "deflate")

    def __init__(self, encoding: str) -> None:
        self.deflate = encoding == "deflate"
        self._z = None if self.deflate else zlib.decompressobj(16 + zlib.MAX_WBITS)

    def decode(self, data: bytes) -> tuple[bytes, bytes]:
        """Decoded bytes of `data`, and the part of `data` left for the next call."""
        if self._z is None:  # "deflate" is zlib-wrapped by the RFC, raw by some servers
            wrapped = len(data) < 2 or (data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0)
            self._z = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        try:
            return self._z.decompress(data, DECODE_STEP), self._z.unconsumed_tail
        except zlib.error as e:
            raise PayloadError(f"Can not decode content-encoding: {e}") from None

    def flush(self) -> bytes:
        """The rest, at the body's end; PayloadError when the compressed data stopped short."""
        if self._z is None:
            return b""
        try:
            rest = self._z.flush()
        except zlib.error as e:
            raise PayloadError(f"Can not decode content-encoding: {e}") from None
        if not self._z.eof:
            raise PayloadError("the compressed body ends before its compressed data does")
        return rest


class Body:
    """A response body as it arrives: `readany()` for what has come, `read()` for all of it."""

    __slots__ = ("_chunks", "_conn", "_decoder", "_eof", "_exc", "_size", "_waiter")

    def __init__(self, conn: Connection | None, decoder: _Decoder | None) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._conn = conn
        """The connection feeding this body while it is paused for it (flow control)."""
        self._decoder = decoder

    @property
    def at_eof(self) -> bool:
        """The whole body arrived and was read."""
        return self._eof and not self._chunks

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._conn = None
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        """The next read (or the one waiting now) raises `exc`, whatever is buffered."""
        self._exc = exc
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """Reads raise `exc` once what is buffered has been read (the connection broke)."""
        self._eof = True
        self._conn = None
        if self._exc is None:
            self._exc = exc if not self._chunks else _Later(exc)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def readany(self) -> bytes:
        """The bytes that have arrived since the last read (waits for some); b"" at the end."""
        while True:
            exc = self._exc
            if exc is not None and not isinstance(exc, _Later):
                raise exc
            if self._chunks:
                data = self._take()
                if self._decoder is None:
                    return data
                out, rest = self._decoder.decode(data)
                if rest:
                    self._chunks.appendleft(rest)
                    self._size += len(rest)
                if out:
                    return out
                continue
            if exc is not None:
                raise exc.exc  # type: ignore[attr-defined]
            if self._eof:
                if self._decoder is not None:
                    out, self._decoder = self._decoder.flush(), None
                    if out:
                        return out
                return b""
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def read(self, limit: int = MAX_WHOLE_BODY) -> bytes:
        """The whole (rest of the) body; PayloadError past `limit` bytes."""
        parts, size = [], 0
        while data := await self.readany():
            size += len(data)
            if size > limit:
                raise PayloadError(f"the answer is larger than {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        if self._conn is not None:
            self._conn.resume()
        return data


class _Later:
    """An error that waits behind the bytes buffered before it happened."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Response:
    """A response whose head has arrived; its body is `content`."""

    __slots__ = ("_conn", "content", "headers", "reason", "status", "version")

    def __init__(
        self,
        conn: Connection,
        version: str,
        status: int,
        reason: str,
        headers: Headers,
        content: Body,
    ) -> None:
        self._conn: Connection | None = conn
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content

    async def read(self) -> bytes:
        """The whole body (decoded)."""
        return await self.content.read()

    def close(self) -> None:
        """Done with this response: its connection is dropped unless the body came whole."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int


class Target(NamedTuple):
    """What a URL tells a request: where to connect and what to send in its head."""

    origin: Origin
    host_header: str
    path: str
    authorization: str | None
    """`Basic ...` from the URL's userinfo."""


_UNSAFE_IN_TARGET = re.compile(r"[^\x21-\x7e]")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


@functools.lru_cache(maxsize=512)
def parse_url(url: str) -> Target:
    """The `Target` of an http(s) URL; InvalidRequest when it has none."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as e:
        raise InvalidRequest(f"not a valid URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host:
        raise InvalidRequest("only http:// and https:// URLs with a host can be called")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise InvalidRequest("the URL's host name is not valid") from None
    default = 443 if scheme == "https" else 80
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port in (None, default) else f"{shown}:{port}"
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    if _UNSAFE_IN_TARGET.search(path):
        path = quote(path, safe="!#$%&'()*+,/:;=?@[]~")
    authorization = None
    if parts.username is not None or parts.password is not None:
        userinfo = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(userinfo.encode()).decode("ascii")
    return Target(Origin(scheme, host, port or default), host_header, path, authorization)


@functools.lru_cache(maxsize=1024)
def _valid_name(name: str) -> bool:
    return _TOKEN.match(name) is not None


_AUTO = frozenset(("host", "content-length", "transfer-encoding"))


def request_head(
    method: str, target: Target, headers: Mapping[str, str], length: int
) -> tuple[bytes, bool]:
    """The bytes of a request's head, and whether it lets the connection be kept (no
    `Connection: close`); InvalidRequest for a header that could split it."""
    lines = [f"{method} {target.path} HTTP/1.1\r\n"]
    given = set()
    keep = True
    host = target.host_header
    for name, value in headers.items():
        if not _valid_name(name):
            raise InvalidRequest("a request header name is not a valid token")
        lowered = name.lower()
        given.add(lowered)
        if lowered in _AUTO:
            if lowered == "host":
                host = value
            continue
        lines.append(f"{name}: {value}\r\n")
        if lowered == "connection" and "close" in value.lower():
            keep = False
    if target.authorization is not None:
        if "authorization" in given:
            raise InvalidRequest(
                "Cannot combine an Authorization header with credentials encoded in the URL"
            )
        lines.append(f"Authorization: {target.authorization}\r\n")
    if "accept" not in given:
        lines.append("Accept: */*\r\n")
    if "accept-encoding" not in given:
        lines.append("Accept-Encoding: gzip, deflate\r\n")
    lines.append(f"Host: {host}\r\nContent-Length: {length}\r\n\r\n")
    head = "".join(lines)
    breaks = len(lines) + 2  # one a line, two more in the last (Host, Content-Length, end)
    if head.count("\n") != breaks or head.count("\r") != breaks or "\0" in head:
        raise InvalidRequest("a request header holds a CR, LF or NUL character")
    # a client's header bytes that are not UTF-8 came in as surrogates: they go out as they came
    return head.encode("utf-8", "surrogateescape"), keep


_HEX = b"0123456789abcdefABCDEF"

# Where a connection's parser is.
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE = range(8)


class Connection(asyncio.Protocol):
    """One connection to an origin, carrying one request at a time."""

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.received = False
        """Some byte of the current request's response has come."""
        self.idle_since = 0.0
        self._state = _IDLE
        self._buf = b""
        """The start of something (a head, a chunk-size line) that needs more bytes."""
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._body: Body | None = None
        self._remaining = 0
        self._keep_alive = False
        self._keep_request = True
        self._paused = False
        self._aborted = False
        """This side cut the connection: a body read until close is not complete."""

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        state = self._state
        self._state = _IDLE
        head = self._head
        if head is not None:
            self._head = None
            if not head.done():
                why = f": {exc}" if exc else ""
                head.set_exception(Disconnected(f"Server disconnected{why}"))
        body = self._body
        if body is not None:
            self._body = None
            if state == _UNTIL_CLOSE and exc is None and not self._aborted:
                self._complete(reuse=False)
                body.feed_eof()
            else:
                self._detach()
                body.fail(PayloadError("Response payload is not completed"))
        self._pool.forget(self)

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self._state == _LENGTH and not self._buf:  # the common case, without copies
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                self._feed(data)
                return
            self._feed(data[:remaining] if len(data) > remaining else data)
            self._end_of_body(extra=len(data) > remaining)
            return
        if self._buf:
            data, self._buf = self._buf + data, b""
        try:
            self._parse(data)
        except ProtocolError as e:
            self._break(e)

    def eof_received(self) -> bool | None:
        return None  # the transport closes, connection_lost follows

    def pause_writing(self) -> None:  # bodies are small and in memory: nothing to throttle
        pass

    def resume_writing(self) -> None:
        pass

    # --- for Pool and Body --------------------------------------------------------------------

    def send(self, head: bytes, body: bytes, keep: bool) -> asyncio.Future[Response]:
        """Write a request (`keep`: it lets the connection be reused); the future gets its
        response's head."""
        assert self.transport is not None and self._state == _IDLE
        self.received = False
        self._keep_request = keep
        self._state = _HEAD
        self._head = asyncio.get_running_loop().create_future()
        if len(body) > 65536:
            self.transport.writelines((head, body))
        else:  # one send(); writelines' sendmsg also (un)registers a writer each time
            self.transport.write(head + body)
        return self._head

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self._aborted = True
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()

    def readable(self) -> bool:
        """Something waits to be read on this idle connection (its server's close, mostly,
        not yet seen by the event loop): it cannot carry a request."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLPRI | select.POLLRDHUP)
        return bool(poller.poll(0))

    def close_idle(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    # --- parsing ---------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        if self._body is not None and data:
            self._body.feed(data)

    def _parse(self, data: bytes) -> None:
        """Consume `data`; a part too short to parse yet waits in `_buf` for more."""
        pos, size = 0, len(data)
        while pos < size and not self.closed:
            state = self._state
            if state in (_CHUNK_DATA, _LENGTH):
                n = min(size - pos, self._remaining)
                self._feed(data[pos : pos + n] if n < size else data)
                pos += n
                self._remaining -= n
                if self._remaining:
                    continue
                if state == _LENGTH:
                    self._end_of_body(extra=pos < size)
                    return
                self._state = _CHUNK_END
            elif state == _CHUNK_SIZE:
                eol = _find_end(data, pos, b"\r\n", MAX_LINE, "a chunk-size line is too long")
                if eol < 0:
                    break
                digits = data[pos:eol].split(b";", 1)[0].strip(b" \t")
                pos = eol + 2
                if not digits or len(digits) > 15 or digits.strip(_HEX):
                    raise ProtocolError("a chunk size is not a hex number")
                self._remaining = int(digits, 16)
                self._state = _CHUNK_DATA if self._remaining else _TRAILERS
            elif state == _CHUNK_END:
                if size - pos < 2:
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise ProtocolError("a chunk does not end with CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _HEAD:
                eol = _find_end(data, pos, b"\r\n\r\n", MAX_HEAD, "the response head is too large")
                if eol < 0:
                    break
                head = data[pos:eol]
                pos = eol + 4
                if self._on_head(head):  # a whole answer without a body
                    self._end_of_body(extra=pos < size)
                    return
            elif state == _TRAILERS:
                eol = _find_end(data, pos, b"\r\n", MAX_LINE, "a trailer line is too long")
                if eol < 0:
                    break
                empty = eol == pos
                pos = eol + 2
                if empty:  # the end of the trailers (which are ignored)
                    self._end_of_body(extra=pos < size)
                    return
            elif state == _UNTIL_CLOSE:
                self._feed(data[pos:] if pos else data)
                return
            else:  # _IDLE: bytes nobody asked for (a late 408, garbage)
                self.abort()
                return
        if pos < size and not self.closed:
            self._buf = data[pos:]

    def _on_head(self, head: bytes) -> bool:
        """Parse a response head; True when it is the whole answer (no body follows)."""
        text = head.decode("utf-8", "surrogateescape")
        lines = text.split("\r\n")
        breaks = len(lines) - 1
        if text.count("\n") != breaks or text.count("\r") != breaks or "\0" in text:
            raise ProtocolError("the response head holds a bare CR, LF or a NUL")
        if breaks > MAX_HEADERS:
            raise ProtocolError("the response has too many headers")
        status_line = lines[0]
        if len(status_line) > MAX_LINE:
            raise ProtocolError("the status line is too long")
        parts = status_line.split(" ", 2)
        version = parts[0]
        if len(parts) < 2 or version not in ("HTTP/1.1", "HTTP/1.0"):
            raise ProtocolError("the response does not start with an HTTP/1.x status line")
        code = parts[1]
        if len(code) != 3 or not code.isdigit() or not code.isascii():
            raise ProtocolError("the response's status code is not 3 digits")
        status = int(code)
        raw: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name[-1] in " \t" or line[0] in " \t":
                raise ProtocolError("a response header line is malformed")
            if len(line) > MAX_LINE:
                raise ProtocolError("a response header line is too long")
            raw.append((name, value.strip(" \t")))
        if status < 200:
            if status == 101:
                raise ProtocolError("the server switched protocols")
            return False  # an interim answer (100 Continue, 103): the real one follows
        headers = Headers(raw)
        state, decoder = self._framing(status, headers, version)
        body = Body(self, decoder)
        reason = parts[2] if len(parts) > 2 else ""
        response = Response(self, version, status, reason, headers, body)
        self._response = response
        self._body = body
        self._state = state
        waiter, self._head = self._head, None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        else:
            response.close()  # nobody waits for it any more
        return state == _IDLE

    def _framing(self, status: int, headers: Headers, version: str) -> tuple[int, _Decoder | None]:
        """How the body is delimited (the parser's next state) and decoded; sets `_keep_alive`
        and `_remaining`."""
        encoding = (headers.get("content-encoding") or "").strip().lower()
        decoder = None
        if encoding in ("gzip", "x-gzip", "deflate"):
            decoder = _Decoder("deflate" if encoding == "deflate" else "gzip")
        elif encoding not in ("", "identity"):
            raise ProtocolError(f"unsupported content-encoding {encoding[:40]!r}")
        connection = ",".join(headers.getall("connection")).lower()
        if not self._keep_request:
            self._keep_alive = False
        elif version == "HTTP/1.1":
            self._keep_alive = "close" not in connection
        else:
            self._keep_alive = "keep-alive" in connection
        transfer = ",".join(headers.getall("transfer-encoding")) or None
        length = headers.get("content-length")
        if status in (204, 304):
            return _IDLE, decoder
        if transfer is not None:
            codings = [c.strip() for c in transfer.lower().split(",") if c.strip()]
            if (
                any(c not in ("chunked", "identity") for c in codings)
                or codings.count("chunked") > 1
            ):
                raise ProtocolError(f"unsupported transfer-encoding {transfer[:40]!r}")
            if "chunked" not in codings or codings[-1] != "chunked":
                self._keep_alive = False
                return _UNTIL_CLOSE, decoder
            if length is not None:  # both: Transfer-Encoding wins, and the connection ends
                self._keep_alive = False
            return _CHUNK_SIZE, decoder
        if length is None:
            self._keep_alive = False
            return _UNTIL_CLOSE, decoder
        values = {v.strip() for v in headers.getall("content-length")}
        length = length.strip()
        if len(values) != 1 or not (length.isascii() and length.isdigit()) or len(length) > 18:
            raise ProtocolError("the response's Content-Length is not valid")
        self._remaining = int(length)
        return (_LENGTH if self._remaining else _IDLE), decoder

    def _end_of_body(self, extra: bool) -> None:
        body = self._body
        self._body = None
        self._complete(reuse=self._keep_alive and not extra)
        if body is not None:
            body.feed_eof()

    def _complete(self, reuse: bool) -> None:
        """The response came whole: the connection is free again (or closed)."""
        self._state = _IDLE
        self._detach()
        self._buf = b""
        if self._paused:
            self.resume()
        transport = self.transport
        if reuse and not self.closed and transport and not transport.get_write_buffer_size():
            self._pool.release(self)
        else:
            self.close_idle()
            self._pool.forget(self)

    def _detach(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            response._conn = None

    def _break(self, error: ProtocolError) -> None:
        """A malformed response: whoever waits gets `error`, the connection is dropped."""
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)
        body, self._body = self._body, None
        if body is not None:
            self._detach()
            body.fail(PayloadError(str(error)))
        self._state = _IDLE
        self.abort()


class Pool:
    """Keep-alive connections per origin; an idle one is closed after IDLE_TIMEOUT."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context or _default_ssl_context()
        """What https connections trust: the system's store unless told otherwise (tests)."""
        self._idle: dict[Origin, list[Connection]] = {}
        self._busy: set[Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], data: bytes = b""
    ) -> Response:
        """Send a request and wait for its response's head; the body is read from it. (Not
        for HEAD: its answer would be read as if a body followed.)"""
        if self._closed:
            raise Disconnected("the HTTP client is closed")
        target = parse_url(url)
        head, keep = request_head(method, target, headers, len(data))
        conn = self._pooled(target.origin)
        if conn is not None:
            try:
                return await self._exchange(conn, head, data, keep)
            except (Disconnected, ConnectionError):
                if conn.received or self._closed or method not in IDEMPOTENT:
                    raise  # a POST the server may have acted on is never sent twice
                # closed while idle, as it seems: once more, on a new connection
        conn = await self._connect(target.origin)
        return await self._exchange(conn, head, data, keep)

    async def post(self, url: str, data: bytes, headers: Mapping[str, str]) -> Response:
        return await self.request("POST", url, headers, data)

    async def _exchange(self, conn: Connection, head: bytes, data: bytes, keep: bool) -> Response:
        self._busy.add(conn)
        waiter: asyncio.Future[Response] | None = None
        try:
            waiter = conn.send(head, data, keep)
            return await waiter
        except BaseException:
            if not _handed_back(waiter):  # else it may carry another request already
                conn.abort()
                self._busy.discard(conn)
            raise

    def _pooled(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if conn.closed or transport is None or transport.is_closing():
                continue
            if conn.readable():
                conn.abort()
                continue
            return conn
        return None

    async def _connect(self, origin: Origin) -> Connection:
        loop = asyncio.get_running_loop()
        tls = self._ssl if origin.scheme == "https" else None
        try:
            _, conn = await loop.create_connection(
                lambda: Connection(self, origin),
                origin.host,
                origin.port,
                ssl=tls,
                server_hostname=origin.host if tls is not None else None,
            )  # no happy_eyeballs_delay: Python 3.13.0's staggered_race fails an assertion
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
            message = f"Cannot connect to host {origin.host}:{origin.port}: {reason}"
            raise (ConnectError(e.errno, message) if e.errno else ConnectError(message)) from None
        if self._closed:
            conn.abort()
            raise Disconnected("the HTTP client is closed")
        return conn

    def release(self, conn: Connection) -> None:
        """`conn` finished a response and may carry another."""
        self._busy.discard(conn)
        if self._closed:
            conn.close_idle()
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self._idle.setdefault(conn.origin, []).append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_at(conn.idle_since + IDLE_TIMEOUT, self._sweep)

    def forget(self, conn: Connection) -> None:
        """`conn` is closed (an idle one leaves the pool at the next sweep or use)."""
        self._busy.discard(conn)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = None
        deadline = loop.time() - IDLE_TIMEOUT
        next_due: float | None = None
        for origin, idle in list(self._idle.items()):
            keep = []
            for conn in idle:
                if conn.closed:
                    continue
                if conn.idle_since <= deadline:
                    conn.close_idle()
                    continue
                keep.append(conn)
            if keep:
                self._idle[origin] = keep
                oldest = keep[0].idle_since + IDLE_TIMEOUT
                next_due = oldest if next_due is None else min(next_due, oldest)
            else:
                del self._idle[origin]
        if next_due is not None:
            self._sweeper = loop.call_at(next_due, self._sweep)

    def connections(self) -> int:
        """Open connections, idle or busy."""
        idle = sum(not c.closed for conns in self._idle.values() for c in conns)
        return idle + sum(not c.closed for c in self._busy)

    async def close(self) -> None:
        """Close every connection; responses still coming end with an error."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close_idle()
        self._idle.clear()
        for conn in list(self._busy):
            conn.abort()
        self._busy.clear()
        await asyncio.sleep(0)  # let the transports call connection_lost


def _find_end(data: bytes, pos: int, end: bytes, limit: int, too_long: str) -> int:
    """Where `end` starts after `pos`, -1 when more bytes are needed; ProtocolError
    (`too_long`) when more than `limit` bytes came without it."""
    eol = data.find(end, pos, pos + limit + len(end))
    if eol < 0 and len(data) - pos > limit:
        raise ProtocolError(too_long)
    return eol


def _handed_back(waiter: asyncio.Future[Response] | None) -> bool:
    """The response came whole before its caller resumed: its connection went back to the
    pool (or was closed) and is no longer this request's."""
    if waiter is None or not waiter.done() or waiter.cancelled() or waiter.exception():
        return False
    return waiter.result()._conn is None


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """The system's trust store, hostname checked (as aiohttp's default); made once."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(("http/1.1",))
    return context

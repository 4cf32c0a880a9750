"""The upstream HTTP/1.1 client against tiny raw servers on loopback: what goes on the wire,
how bodies are delimited and decoded, the keep-alive pool, TLS trust and its failures."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import socket
import ssl
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mitmroute import upstream_http
from mitmroute.upstream_http import (
    ConnectError,
    Disconnected,
    Headers,
    InvalidRequest,
    PayloadError,
    Pool,
    ProtocolError,
)
from tests.conftest import free_port

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Handler = Callable[[Reader, Writer, "Request"], Awaitable[bool]]


class Request:
    def __init__(self, line: str, headers: dict[str, str], body: bytes, raw: bytes = b"") -> None:
        self.line, self.headers, self.body, self.raw_headers = line, headers, body, raw


async def read_request(reader: Reader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    line, *fields = head.decode("latin-1").split("\r\n")[:-2]
    headers = {}
    for field in fields:
        name, _, value = field.partition(":")
        headers[name.lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(line, headers, body, head)


class RawServer:
    """Answers each request with `handler(reader, writer, request)`; the connection goes on
    while it returns True."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[Request] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: Reader, writer: Writer) -> None:
        self.connections += 1
        try:
            while (request := await read_request(reader)) is not None:
                self.requests.append(request)
                if not await self.handler(reader, writer, request):
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def answer(body: bytes = b"ok", *headers: str, status: str = "200 OK") -> Handler:
    """A handler sending one fixed response (Content-Length added unless given)."""

    async def handler(reader: Reader, writer: Writer, request: Request) -> bool:
        fields = list(headers)
        if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in fields):
            fields.append(f"Content-Length: {len(body)}")
        head = "".join(f"{h}\r\n" for h in fields)
        writer.write(f"HTTP/1.1 {status}\r\n{head}\r\n".encode() + body)
        await writer.drain()
        return not any(h.lower() == "connection: close" for h in fields)

    return handler


def then_stall(raw: bytes) -> Handler:
    """A handler that sends `raw` (the start of an answer) and then nothing more."""

    async def handler(reader: Reader, writer: Writer, request: Request) -> bool:
        writer.write(raw)
        await writer.drain()
        await asyncio.sleep(5)
        return False

    return handler


@pytest.fixture
async def pool():
    client = Pool()
    yield client
    await client.close()


async def fetch(pool: Pool, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    resp = await pool.post(url, b'{"q": 1}', headers or {})
    async with resp:
        return resp.status, await resp.read()


async def test_sequential_requests_share_one_keep_alive_connection(pool):
    async with RawServer(answer(b"hello", "Content-Type: text/plain")) as server:
        for _ in range(5):
            assert await fetch(pool, f"{server.url}/v1/chat?x=1") == (200, b"hello")
    assert server.connections == 1 and len(server.requests) == 5
    request = server.requests[0]
    assert request.line == "POST /v1/chat?x=1 HTTP/1.1"
    assert request.headers["host"] == f"127.0.0.1:{server.port}"
    assert request.headers["content-length"] == "8" and request.body == b'{"q": 1}'
    assert request.headers["accept"] == "*/*"
    assert request.headers["accept-encoding"] == "gzip, deflate"
    assert "user-agent" not in request.headers


async def test_the_calls_own_headers_go_as_given_and_replace_the_defaults(pool):
    async with RawServer(answer()) as server:
        headers = {"Accept": "application/json", "x-api-key": "k", "Content-Length": "999"}
        await fetch(pool, f"{server.url}/v1", headers)
    sent = server.requests[0].headers
    assert sent["accept"] == "application/json" and sent["x-api-key"] == "k"
    assert sent["accept-encoding"] == "gzip, deflate" and sent["content-length"] == "8"


async def test_url_userinfo_goes_as_basic_auth_and_never_with_another_authorization(pool):
    async with RawServer(answer()) as server:
        url = f"http://svc:p%40ss@127.0.0.1:{server.port}/v1"
        await fetch(pool, url)
        with pytest.raises(InvalidRequest):
            await fetch(pool, url, {"Authorization": "Bearer x"})
    assert server.requests[0].headers["authorization"] == "Basic c3ZjOnBAc3M="
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "header",
    [{"x-a": "v\r\nInjected: 1"}, {"x-a": "v\nx"}, {"x-a\r\nInjected": "1"}, {"x a": "1"}],
)
async def test_a_header_that_could_split_the_request_is_refused_before_sending(pool, header):
    async with RawServer(answer()) as server:
        with pytest.raises(InvalidRequest) as info:
            await fetch(pool, f"{server.url}/v1", header)
        assert isinstance(info.value, ValueError) and "Injected" not in str(info.value)
    assert server.connections == 0


async def test_a_connection_the_server_closed_while_idle_is_not_used_again(pool):
    async def answer_then_close_soon(reader: Reader, writer: Writer, request: Request) -> bool:
        await answer(b"ok")(reader, writer, request)
        await asyncio.sleep(0.05)
        return False  # an idle timeout of the server's

    async with RawServer(answer_then_close_soon) as server:
        assert await fetch(pool, f"{server.url}/") == (200, b"ok")
        await asyncio.sleep(0.2)
        assert pool.connections() == 0
        assert await fetch(pool, f"{server.url}/") == (200, b"ok")
    assert server.connections == 2 and len(server.requests) == 2


async def test_a_post_on_a_reused_connection_dropped_before_any_answer_byte_goes_once(pool):
    """The server may have acted on it (read it, then crashed): a POST is never sent twice."""

    async def first_then_drop(reader: Reader, writer: Writer, request: Request) -> bool:
        if len(server.requests) == 1:
            return await answer(b"first")(reader, writer, request)
        return False  # read the request, closed without a byte

    async with RawServer(first_then_drop) as server:
        assert await fetch(pool, f"{server.url}/") == (200, b"first")
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await fetch(pool, f"{server.url}/")
    assert len(server.requests) == 2


async def test_an_idle_connection_whose_close_the_loop_has_not_seen_yet_is_not_reused(pool):
    """The server's close is in the socket before the event loop has read it (the race with
    a server's idle timeout): the connection is dropped before the request goes, not after."""
    writers: list[Writer] = []

    async def keep(reader: Reader, writer: Writer, request: Request) -> bool:
        writers.append(writer)
        return await answer(b"ok")(reader, writer, request)

    async with RawServer(keep) as server:
        assert await fetch(pool, f"{server.url}/") == (200, b"ok")
        # the FIN goes now (abort() would close on the loop's next turn); no await in between:
        # the client's loop has not seen it
        writers[0].get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        assert await fetch(pool, f"{server.url}/") == (200, b"ok")
    assert server.connections == 2 and len(server.requests) == 2


async def test_header_bytes_a_client_sent_that_are_not_utf8_go_as_they_came(pool):
    async with RawServer(answer()) as server:
        value = b"beta-\xff".decode("utf-8", "surrogateescape")  # as flows.header_dict has it
        assert await fetch(pool, f"{server.url}/", {"anthropic-beta": value}) == (200, b"ok")
    assert server.requests[0].raw_headers.count(b"anthropic-beta: beta-\xff\r\n") == 1


async def test_a_body_read_whole_past_its_limit_is_an_error(pool):
    async with RawServer(answer(b"x" * 100)) as server:
        resp = await pool.post(f"{server.url}/", b"", {})
        with pytest.raises(aiohttp.ClientPayloadError, match="larger than"):
            await resp.content.read(limit=10)
        resp.close()


async def test_a_truncated_gzip_body_is_an_error(pool):
    whole = gzip.compress(b'{"answer": "a long enough text to be cut in two"}')
    async with RawServer(answer(whole[: len(whole) // 2], "Content-Encoding: gzip")) as server:
        resp = await pool.post(f"{server.url}/", b"", {})
        with pytest.raises(aiohttp.ClientPayloadError, match="ends before"):
            await resp.read()
        resp.close()


@pytest.mark.parametrize(
    "fields",
    [
        ("Transfer-Encoding: chunked", "Transfer-Encoding: gzip"),  # not chunked last: refused
        ("Transfer-Encoding: gzip, chunked",),
    ],
)
async def test_a_transfer_coding_other_than_chunked_is_refused(pool, fields):
    async with RawServer(answer(b"2\r\nhi\r\n0\r\n\r\n", *fields)) as server:
        with pytest.raises(aiohttp.ClientError, match="transfer-encoding"):
            await fetch(pool, f"{server.url}/")


async def test_a_second_connection_header_saying_close_is_honoured(pool):
    async with RawServer(answer(b"ok", "Connection: keep-alive", "Connection: close")) as server:
        assert await fetch(pool, f"{server.url}/") == (200, b"ok")
        assert await fetch(pool, f"{server.url}/") == (200, b"ok")
    assert server.connections == 2


async def test_a_new_connection_dropped_before_the_answer_is_an_error_not_a_retry(pool):
    async def drop(reader: Reader, writer: Writer, request: Request) -> bool:
        return False

    async with RawServer(drop) as server:
        with pytest.raises(Disconnected) as info:
            await fetch(pool, f"{server.url}/")
    assert isinstance(info.value, aiohttp.ServerDisconnectedError)
    assert server.connections == 1 and len(server.requests) == 1


async def test_a_reused_connection_dropped_after_part_of_the_answer_is_not_retried(pool):
    async def half_head(reader: Reader, writer: Writer, request: Request) -> bool:
        if len(server.requests) == 1:
            return await answer()(reader, writer, request)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-")
        await writer.drain()
        return False

    async with RawServer(half_head) as server:
        await fetch(pool, f"{server.url}/")
        with pytest.raises(Disconnected):
            await fetch(pool, f"{server.url}/")
    assert len(server.requests) == 2


async def test_connection_close_from_the_server_is_honoured(pool):
    async with RawServer(answer(b"bye", "Connection: close")) as server:
        for _ in range(3):
            assert await fetch(pool, f"{server.url}/") == (200, b"bye")
        await asyncio.sleep(0.05)
        assert pool.connections() == 0
    assert server.connections == 3


async def test_connection_close_from_the_caller_is_honoured(pool):
    async with RawServer(answer(b"ok")) as server:
        for _ in range(2):
            await fetch(pool, f"{server.url}/", {"Connection": "close"})
    assert server.connections == 2


async def test_an_http_1_0_answer_is_reused_only_with_keep_alive(pool):
    async def old(reader: Reader, writer: Writer, request: Request) -> bool:
        keep = len(server.requests) == 1
        extra = "Connection: keep-alive\r\n" if keep else ""
        writer.write(f"HTTP/1.0 200 OK\r\n{extra}Content-Length: 2\r\n\r\nok".encode())
        await writer.drain()
        return keep

    async with RawServer(old) as server:
        for _ in range(3):
            assert await fetch(pool, f"{server.url}/") == (200, b"ok")
    assert server.connections == 2


async def test_a_chunked_body_with_extensions_and_trailers(pool):
    async def chunked(reader: Reader, writer: Writer, request: Request) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"5;name=value\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        for piece in (b"6\r\n wor", b"ld\r\n", b"0;last\r\nX-Trailer: t\r\n", b"\r\n"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.005)
        return True

    async with RawServer(chunked) as server:
        resp = await pool.post(f"{server.url}/", b"", {})
        first = await resp.content.readany()
        assert first == b"hello"
        assert first + await resp.read() == b"hello world"
        assert await fetch(pool, f"{server.url}/") == (200, b"hello world")
    assert server.connections == 1


async def test_a_body_until_close(pool):
    async def until_close(reader: Reader, writer: Writer, request: Request) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of ")
        await writer.drain()
        writer.write(b"it")
        return False

    async with RawServer(until_close) as server:
        assert await fetch(pool, f"{server.url}/") == (200, b"all of it")
        assert await fetch(pool, f"{server.url}/") == (200, b"all of it")
    assert server.connections == 2


async def test_204_and_304_have_no_body_and_keep_the_connection(pool):
    async with RawServer(answer(b"", status="204 No Content")) as server:
        assert await fetch(pool, f"{server.url}/") == (204, b"")
        server.handler = answer(b"", "Content-Length: 0", status="304 Not Modified")
        assert await fetch(pool, f"{server.url}/") == (304, b"")
        server.handler = answer(b"after")
        assert await fetch(pool, f"{server.url}/") == (200, b"after")
    assert server.connections == 1


async def test_interim_1xx_answers_are_skipped(pool):
    async def interim(reader: Reader, writer: Writer, request: Request) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n")
        return await answer(b"final")(reader, writer, request)

    async with RawServer(interim) as server:
        assert await fetch(pool, f"{server.url}/") == (200, b"final")


async def test_headers_are_a_case_insensitive_read_only_mapping(pool):
    reply = answer(
        b"{}", "Content-Type: application/json", "Request-Id: r1", "X-Dup: a", "x-dup: b"
    )
    async with RawServer(reply) as server:
        resp = await pool.post(f"{server.url}/", b"", {})
        await resp.read()
    headers = resp.headers
    assert isinstance(headers, Headers)
    assert headers["content-type"] == "application/json" and headers.get("REQUEST-ID") == "r1"
    assert "request-id" in headers and "retry-after" not in headers
    assert headers.get("missing", "d") == "d" and headers["x-dup"] == "a"
    assert headers.getall("X-DUP") == ["a", "b"]
    assert dict(headers.items())["request-id"] == "r1"
    with pytest.raises(TypeError):
        headers["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw deflate"])
async def test_compressed_bodies_are_decoded(pool, encoding):
    text = b'{"answer": "' + b"word " * 5000 + b'"}'
    if encoding == "gzip":
        packed = gzip.compress(text)
    elif encoding == "deflate":
        packed = zlib.compress(text)
    else:
        z = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        packed = z.compress(text) + z.flush()
    name = "deflate" if "deflate" in encoding else "gzip"
    async with RawServer(answer(packed, f"Content-Encoding: {name}")) as server:
        assert await fetch(pool, f"{server.url}/") == (200, text)


async def test_a_chunked_gzip_stream_is_decoded_as_it_comes(pool):
    events = [f"data: {{'n': {i}}}\n\n".encode() for i in range(5)]
    z = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    got: list[bytes] = []

    async def stream(reader: Reader, writer: Writer, request: Request) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for event in events:
            piece = z.compress(event) + z.flush(zlib.Z_SYNC_FLUSH)
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.02)
        tail = z.flush()
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
        return True

    async with RawServer(stream) as server:
        resp = await pool.post(f"{server.url}/", b"", {})
        while data := await resp.content.readany():
            got.append(data)
    assert b"".join(got) == b"".join(events)
    assert len(got) >= 4  # each event as it came, not all at the end


async def test_a_bomb_is_decoded_in_bounded_steps(pool):
    packed = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    async with RawServer(answer(packed, "Content-Encoding: gzip")) as server:
        resp = await pool.post(f"{server.url}/", b"", {})
        total, largest = 0, 0
        while data := await resp.content.readany():
            total, largest = total + len(data), max(largest, len(data))
    assert total == 64 << 20 and largest <= upstream_http.DECODE_STEP


async def test_another_content_encoding_is_an_error(pool):
    async with RawServer(answer(b"x", "Content-Encoding: br")) as server:
        with pytest.raises(ProtocolError):
            await fetch(pool, f"{server.url}/")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_cut_short_is_a_payload_error(pool, framing):
    async def short(reader: Reader, writer: Writer, request: Request) -> bool:
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhel")
        await writer.drain()
        return False

    async with RawServer(short) as server:
        resp = await pool.post(f"{server.url}/", b"", {})
        assert await resp.content.readany() == b"hel"  # what came before the break is read
        with pytest.raises(PayloadError) as info:
            await resp.content.readany()
    assert isinstance(info.value, aiohttp.ClientPayloadError)


async def test_a_refused_connection_is_a_connection_error(pool):
    with pytest.raises(ConnectError) as info:
        await fetch(pool, f"http://127.0.0.1:{free_port()}/v1")
    assert isinstance(info.value, aiohttp.ClientOSError)
    assert isinstance(info.value, aiohttp.ClientConnectionError)
    assert "Cannot connect to host 127.0.0.1:" in str(info.value)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 10_000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 200 + b"Content-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Endless: " + b"a" * 200_000,
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Bare: a\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["long line", "many headers", "no end", "not http", "bare lf", "two lengths", "bad chunk"],
)
async def test_a_malformed_or_oversized_answer_is_an_error(pool, head):
    async def broken(reader: Reader, writer: Writer, request: Request) -> bool:
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(1)
        return False

    async with RawServer(broken) as server:
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(fetch(pool, f"{server.url}/"), 5)


async def test_set_exception_wakes_a_pending_read(pool):
    async with RawServer(then_stall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")) as server:
        resp = await pool.post(f"{server.url}/", b"", {})
        reading = asyncio.ensure_future(resp.content.readany())
        await asyncio.sleep(0.05)
        assert not reading.done()
        resp.content.set_exception(TimeoutError())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reading, 1)
        resp.close()


async def test_a_large_body_read_slowly_is_not_buffered_whole(pool):
    size = 10 << 20
    sent = 0

    async def big(reader: Reader, writer: Writer, request: Request) -> bool:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"x" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
            sent += len(block)
        return True

    async with RawServer(big) as server:
        resp = await pool.post(f"{server.url}/", b"", {})
        await asyncio.sleep(0.3)  # nobody reads: the client stops reading the socket
        buffered = resp.content._size
        assert buffered <= upstream_http.HIGH_WATER + 256 * 1024
        assert sent < size // 2
        total = 0
        while data := await resp.content.readany():
            total += len(data)
        assert total == size
        assert await fetch(pool, f"{server.url}/") == (200, b"x" * size)
    assert server.connections == 1


async def test_a_timeout_while_waiting_drops_the_connection(pool):
    async def late(reader: Reader, writer: Writer, request: Request) -> bool:
        if len(server.requests) == 1:
            await asyncio.sleep(0.5)
        return await answer(b"late")(reader, writer, request)

    async with RawServer(late) as server:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await fetch(pool, f"{server.url}/")
        assert await fetch(pool, f"{server.url}/") == (200, b"late")
    assert server.connections == 2


async def test_an_idle_connection_is_closed_after_the_keepalive_timeout(pool, monkeypatch):
    monkeypatch.setattr(upstream_http, "IDLE_TIMEOUT", 0.2)
    async with RawServer(answer()) as server:
        await fetch(pool, f"{server.url}/")
        assert pool.connections() == 1
        await asyncio.sleep(0.5)
        assert pool.connections() == 0
        await fetch(pool, f"{server.url}/")
    assert server.connections == 2


async def test_closing_the_client_fails_answers_under_way(pool):
    start = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n"
    async with RawServer(then_stall(start)) as server:
        resp = await pool.post(f"{server.url}/", b"", {})
        assert await resp.content.readany() == b"hi"
        await pool.close()
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(resp.content.readany(), 1)
        with pytest.raises(aiohttp.ClientConnectionError):
            await fetch(pool, f"{server.url}/")


# --- TLS ------------------------------------------------------------------------------------


def make_ca_and_cert(
    tmp: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1")
) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signs for `names`."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mitmroute test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt = x509.SubjectAlternativeName(
        [
            x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n)
            for n in names
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(alt, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem, cert_pem, key_pem = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_pem, cert_pem, key_pem


class TLSServer(RawServer):
    def __init__(self, handler: Handler, cert: Path, key: Path) -> None:
        super().__init__(handler)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)

    async def __aenter__(self) -> TLSServer:
        self.server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, ssl=self.context, ssl_handshake_timeout=5
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


async def test_tls_to_a_server_whose_ca_the_client_was_told_to_trust(tmp_path):
    ca, cert, key = make_ca_and_cert(tmp_path)
    trusting = Pool(ssl_context=ssl.create_default_context(cafile=str(ca)))
    try:
        async with TLSServer(answer(b"secure"), cert, key) as server:
            for host in ("127.0.0.1", "localhost"):
                assert await fetch(trusting, f"https://{host}:{server.port}/v1") == (
                    200,
                    b"secure",
                )
        assert server.connections == 2
        assert server.requests[1].headers["host"] == f"localhost:{server.port}"
    finally:
        await trusting.close()


async def test_tls_to_a_server_the_default_trust_does_not_know_is_refused(tmp_path, pool):
    _, cert, key = make_ca_and_cert(tmp_path)
    async with TLSServer(answer(b"secure"), cert, key) as server:
        with pytest.raises(ConnectError) as info:
            await fetch(pool, f"{server.url}/v1")
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert server.requests == []


async def test_tls_with_a_host_name_the_certificate_does_not_name_is_refused(tmp_path):
    ca, cert, key = make_ca_and_cert(tmp_path, ("llm.example",))
    trusting = Pool(ssl_context=ssl.create_default_context(cafile=str(ca)))
    try:
        async with TLSServer(answer(b"secure"), cert, key) as server:
            with pytest.raises(ConnectError) as info:
                await fetch(trusting, f"https://127.0.0.1:{server.port}/v1")
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    finally:
        await trusting.close()


# --- the parser, fed in every split -----------------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closing = False
        self.paused = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written += bytes(data)

    def writelines(self, lines) -> None:  # type: ignore[override]
        for line in lines:
            self.write(line)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


WIRE = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A:  spaced \t\r\n\r\n"
    b"3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: 1\r\n\r\n"
)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 50, len(WIRE)])
async def test_an_answer_split_anywhere_parses_the_same(step):
    pool = Pool()
    origin = upstream_http.Origin("http", "example", 80)
    conn = upstream_http.Connection(pool, origin)
    transport = FakeTransport()
    conn.connection_made(transport)
    head = conn.send(b"POST / HTTP/1.1\r\n\r\n", b"", True)
    for i in range(0, len(WIRE), step):
        conn.data_received(WIRE[i : i + step])
    resp = await head
    assert resp.status == 200 and resp.headers["x-a"] == "spaced"
    assert await resp.read() == b"abc0123456789abcdef"
    assert not transport.closing and pool.connections() == 1  # back in the pool

"""A loopback HTTP/1.1 server in the proxy's own process that streams bodies the addon makes.

mitmproxy can stream a response only when it comes from a server connection. So a streamed
answer is registered here under a one-time token, the flow is pointed at
`http://127.0.0.1:<port>/<token>`, and mitmproxy (with `flow.response.stream = True`) forwards
each chunk the moment this server writes it. No bytes are buffered whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

HIGH_WATER = 64 * 1024
"""Wait for the reader (mitmproxy) only when this much is buffered: chunks go out at once."""
BACKLOG = 4096
"""Connections the kernel queues for the relay until the loop accepts them: each new client
connection's first stream opens one, and a burst past a short queue costs each extra stream a
1 s SYN retry (the kernel caps this at net.core.somaxconn)."""
CLAIM_TIMEOUT = 10.0
"""A registered stream nobody fetches within this many seconds is closed."""


@dataclass(slots=True)
class RelayedStream:
    status: int
    headers: dict[str, str]
    chunks: AsyncIterator[bytes]


class StreamRelay:
    """Serves registered streams, once each, with chunked transfer encoding."""

    def __init__(self) -> None:
        self._pending: dict[str, tuple[RelayedStream, asyncio.TimerHandle]] = {}
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1") -> None:
        """Listen on a free loopback port (idempotent; also done on first use)."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._serve, host, 0, limit=1 << 16, backlog=BACKLOG
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for token in list(self._pending):
            await self._expire(token)
        if self._server is not None:
            self._server.close()
            self._server = None

    def register(self, stream: RelayedStream) -> str:
        """Keep `stream` until it is fetched; return the path to fetch it from."""
        token = secrets.token_urlsafe(16)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(CLAIM_TIMEOUT, lambda: loop.create_task(self._expire(token)))
        self._pending[token] = (stream, timer)
        return f"/{token}"

    async def abandon(self, path: str) -> None:
        """Close a registered stream nobody will fetch (its client went away)."""
        await self._expire(path.lstrip("/"), quiet=True)

    async def _expire(self, token: str, quiet: bool = False) -> None:
        entry = self._pending.pop(token, None)
        if entry is None:
            return
        entry[1].cancel()
        if not quiet:
            log.warning("relay: stream %s was never fetched; closing it", token[:6])
        chunks = entry[0].chunks
        with contextlib.suppress(Exception):
            # An async generator that never started ignores aclose(): step it to its first
            # yield (already in memory) so that closing runs its cleanup (upstream, books).
            await anext(chunks)
            await chunks.aclose()  # type: ignore[attr-defined]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                keep_alive = await self._answer(head, reader, writer)
                if not keep_alive:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _answer(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        path = parts[1] if len(parts) > 1 else "/"
        length = 0
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip() or 0)
        if length:
            await reader.readexactly(length)
        entry = self._pending.pop(path.lstrip("/"), None)
        if entry is None:
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            return True
        stream, timer = entry
        timer.cancel()
        lines = [f"HTTP/1.1 {stream.status} OK", "transfer-encoding: chunked"]
        lines += [f"{k}: {v}" for k, v in stream.headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        chunks = stream.chunks
        try:
            async for chunk in chunks:
                if chunk:
                    writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    if writer.transport.is_closing():
                        return False  # the client went away: stop reading upstream
                    if writer.transport.get_write_buffer_size() > HIGH_WATER:
                        await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        return True

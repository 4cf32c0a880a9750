"""A loopback HTTP/1.1 server in the proxy's own process that streams bodies the addon makes.

mitmproxy can stream a response only when it comes from a server connection. So a streamed
answer is registered here under a one-time token, the flow is pointed at
`http://127.0.0.1:<port>/<token>`, and mitmproxy (with `flow.response.stream = True`) forwards
each chunk the moment this server writes it. No bytes are buffered whole.

What is registered may be the answer itself or the task still making it: then the flow is
pointed here before the backend has answered, and mitmproxy's request to the relay overlaps
the backend call. The task's answer may be a stream or a whole body (an error, a cached
answer); a task nobody waits for any more is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus

log = logging.getLogger(__name__)

HIGH_WATER = 64 * 1024
"""Wait for the reader (mitmproxy) only when this much is buffered: chunks go out at once."""
BACKLOG = 4096
"""Connections the kernel queues for the relay until the loop accepts them: each new client
connection's first stream opens one, and a burst past a short queue costs each extra stream a
1 s SYN retry (the kernel caps this at net.core.somaxconn)."""
CLAIM_TIMEOUT = 10.0
"""A registered answer nobody fetches within this many seconds is dropped (its task cancelled,
its stream closed)."""
FRAMING = frozenset({"content-length", "transfer-encoding"})
FAILED = (
    b'{"error": {"message": "mitmroute internal error: the answer could not be made", '
    b'"type": "server_error", "param": null, "code": "internal_error"}}'
)
"""The body of a task that raised (its maker is meant to answer every failure itself)."""


@dataclass(slots=True)
class RelayedAnswer:
    """What the relay sends: a stream of chunks, or (`chunks` None) a whole `body`."""

    status: int
    headers: dict[str, str]
    chunks: AsyncIterator[bytes] | None = None
    body: bytes = b""


type Outcome = RelayedAnswer | asyncio.Task[RelayedAnswer]


class StreamRelay:
    """Serves registered answers, once each: streams chunked, whole bodies with a length."""

    def __init__(self) -> None:
        self._pending: dict[str, tuple[Outcome, asyncio.TimerHandle]] = {}
        self._waiting: dict[str, asyncio.Task[RelayedAnswer]] = {}
        """Fetched entries whose task has not answered yet."""
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
        for token in list(self._waiting):
            await _discard(self._waiting.pop(token))
        if self._server is not None:
            self._server.close()
            self._server = None

    def register(self, outcome: Outcome) -> str:
        """Keep `outcome` until it is fetched; return the path to fetch it from."""
        token = secrets.token_urlsafe(16)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(CLAIM_TIMEOUT, lambda: loop.create_task(self._expire(token)))
        self._pending[token] = (outcome, timer)
        return f"/{token}"

    async def abandon(self, path: str) -> None:
        """Drop an answer nobody will read (its client went away): cancel the task making it,
        close its stream; return once that is done."""
        token = path.lstrip("/")
        if (task := self._waiting.pop(token, None)) is not None:
            await _discard(task)
            return
        await self._expire(token, quiet=True)

    async def _expire(self, token: str, quiet: bool = False) -> None:
        entry = self._pending.pop(token, None)
        if entry is None:
            return
        entry[1].cancel()
        if not quiet:
            log.warning("relay: answer %s was never fetched; dropping it", token[:6])
        await _discard(entry[0])

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
        token = path.lstrip("/")
        entry = self._pending.pop(token, None)
        if entry is None:
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            return True
        outcome, timer = entry
        timer.cancel()
        answer = outcome if isinstance(outcome, RelayedAnswer) else await self._wait(token, outcome)
        if answer is None:
            return False  # abandoned while it was being made
        lines = [_status_line(answer.status)]
        lines += [f"{k}: {v}" for k, v in answer.headers.items() if k.lower() not in FRAMING]
        chunks = answer.chunks
        if chunks is None:
            lines.append(f"content-length: {len(answer.body)}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + answer.body)
            await writer.drain()
            return True
        lines.insert(1, "transfer-encoding: chunked")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
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

    async def _wait(self, token: str, task: asyncio.Task[RelayedAnswer]) -> RelayedAnswer | None:
        """The answer `task` makes; None when it was abandoned (and cancelled) meanwhile."""
        self._waiting[token] = task
        try:
            answer: RelayedAnswer | None = await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the relay itself is closing
            answer = None
        except Exception:
            log.exception("relay: the answer %s could not be made", token[:6])
            answer = RelayedAnswer(500, {"content-type": "application/json"}, body=FAILED)
        if self._waiting.pop(token, None) is None:
            return None  # abandon() took it: it closes the stream
        return answer


async def _discard(outcome: Outcome) -> None:
    """Stop an answer nobody will read: cancel the task making it, close its stream (an
    async generator's cleanup settles the upstream and the books)."""
    if isinstance(outcome, asyncio.Task):
        if not outcome.done():
            outcome.cancel()
            await asyncio.wait((outcome,))
        if outcome.cancelled() or outcome.exception() is not None:
            return
        outcome = outcome.result()
    chunks = outcome.chunks
    if chunks is None:
        return
    with contextlib.suppress(Exception):
        # An async generator that never started ignores aclose(): step it to its first
        # yield (already in memory) so that closing runs its cleanup (upstream, books).
        await anext(chunks)
        await chunks.aclose()  # type: ignore[attr-defined]


@functools.cache
def _status_line(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}"

"""The loopback relay: streams go out chunk by chunk; abandoned ones still clean up."""

from __future__ import annotations

import asyncio
import select
import socket
import time

from mitmroute.streaming.relay import RelayedAnswer, StreamRelay


async def test_relay_streams_chunks_and_abandon_runs_cleanup():
    relay = StreamRelay()
    await relay.start()
    cleaned: list[str] = []

    async def chunks(name: str):
        try:
            yield b"data: one\n\n"
            await asyncio.sleep(0.05)
            yield b"data: two\n\n"
        finally:
            cleaned.append(name)

    path = relay.register(RelayedAnswer(200, {"content-type": "text/event-stream"},
                                        chunks("fetched")))  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    await writer.drain()
    received = b""
    while b"0\r\n\r\n" not in received:
        received += await asyncio.wait_for(reader.read(4096), 2)
    writer.close()
    assert b"transfer-encoding: chunked" in received
    assert b"data: one" in received and b"data: two" in received

    never = relay.register(RelayedAnswer(200, {}, chunks("abandoned")))
    await relay.abandon(never)
    await relay.close()
    assert cleaned == ["fetched", "abandoned"]


async def test_relay_queues_a_burst_of_new_connections_before_its_loop_accepts_them():
    """Many streams starting at once on new client connections each open a relay connection;
    with a short listen queue the kernel drops the extra SYNs and each such stream waits 1 s
    for the retry. Here the loop accepts nothing while 300 connect: all must complete."""
    relay = StreamRelay()
    await relay.start()
    sockets, poller = [], select.poll()
    try:
        for _ in range(300):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", relay.port))
            sockets.append(sock)
            poller.register(sock, select.POLLOUT)
        pending, deadline = {s.fileno() for s in sockets}, time.monotonic() + 0.5
        while pending and time.monotonic() < deadline:  # blocks the loop on purpose
            for fd, _ in poller.poll(50):  # writable: the handshake is done
                pending.discard(fd)
                poller.unregister(fd)
        assert not pending, f"{len(pending)} of 300 handshakes left waiting for a SYN retry"
    finally:
        for sock in sockets:
            sock.close()
        await relay.close()


class _RecordingTransport:
    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class _RecordingWriter:
    """A StreamWriter stand-in that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.transport = _RecordingTransport()

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    async def drain(self) -> None:
        return None


async def test_relay_answers_an_empty_stream_with_its_head_and_the_last_chunk():
    relay = StreamRelay()

    async def nothing():
        return
        yield b""

    path = relay.register(RelayedAnswer(200, {}, nothing()))
    writer = _RecordingWriter()
    await relay._answer(
        f"GET {path} HTTP/1.1\r\n\r\n".encode(),
        asyncio.StreamReader(),
        writer,  # type: ignore[arg-type]
    )
    whole = b"".join(writer.writes)
    assert whole.startswith(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    assert whole.endswith(b"\r\n\r\n0\r\n\r\n")

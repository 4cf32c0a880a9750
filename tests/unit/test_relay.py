"""The loopback relay: streams go out chunk by chunk; abandoned ones still clean up."""

from __future__ import annotations

import asyncio
import select
import socket
import time

import pytest

from mitmroute.streaming import relay as relay_module
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


async def fetch(relay: StreamRelay, path: str) -> bytes:
    """One request to the relay, read until it closes or its answer is whole."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n".encode())
    await writer.drain()
    received = b""
    while data := await asyncio.wait_for(reader.read(4096), 2):
        received += data
        head, _, body = received.partition(b"\r\n\r\n")
        length = head.partition(b"content-length: ")[2].split(b"\r\n")[0]
        if length and len(body) >= int(length):
            break
    writer.close()
    return received


async def test_relay_waits_for_a_task_and_sends_a_whole_body_with_its_length_and_reason():
    """A flow is pointed at the relay before its answer exists: the relay waits for the task,
    and an answer that is not a stream (an error) goes out whole, with its own status."""
    relay = StreamRelay()
    await relay.start()

    async def answer() -> RelayedAnswer:
        await asyncio.sleep(0.05)  # the backend thinks
        body = b'{"error": {"message": "no"}}'
        return RelayedAnswer(400, {"content-type": "application/json", "content-length": "9"},
                             body=body)  # fmt: skip

    path = relay.register(asyncio.get_running_loop().create_task(answer()))
    received = await fetch(relay, path)
    await relay.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"content-length: 28" in head and b"content-length: 9" not in head
    assert b"transfer-encoding" not in head
    assert body == b'{"error": {"message": "no"}}'


@pytest.mark.parametrize("fetched", [False, True])
async def test_abandon_cancels_the_task_still_making_the_answer(fetched):
    """The client left before the first chunk: the backend call stops, fetched or not."""
    relay = StreamRelay()
    await relay.start()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def backend_call() -> RelayedAnswer:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("never answered")

    task = asyncio.get_running_loop().create_task(backend_call())
    path = relay.register(task)
    await started.wait()
    if fetched:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(f"POST {path} HTTP/1.1\r\ncontent-length: 0\r\n\r\n".encode())
        await writer.drain()
        while path.lstrip("/") not in relay._waiting:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(relay.abandon(path), 2)
    assert cancelled.is_set() and task.cancelled()
    if fetched:
        assert await asyncio.wait_for(reader.read(), 2) == b""  # closed, nothing sent
        writer.close()
    await relay.close()


async def test_an_answer_nobody_fetches_is_dropped_and_its_task_cancelled(monkeypatch):
    monkeypatch.setattr(relay_module, "CLAIM_TIMEOUT", 0.05)
    relay = StreamRelay()

    async def backend_call() -> RelayedAnswer:
        await asyncio.sleep(30)
        raise AssertionError("never answered")

    task = asyncio.get_running_loop().create_task(backend_call())
    relay.register(task)
    await asyncio.sleep(0.3)
    assert task.cancelled()
    assert not relay._pending

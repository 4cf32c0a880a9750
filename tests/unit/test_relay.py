"""The loopback relay: streams go out chunk by chunk; abandoned ones still clean up."""

from __future__ import annotations

import asyncio

from mitmroute.streaming.relay import RelayedStream, StreamRelay


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

    path = relay.register(RelayedStream(200, {"content-type": "text/event-stream"},
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

    never = relay.register(RelayedStream(200, {}, chunks("abandoned")))
    await relay.abandon(never)
    await relay.close()
    assert cleaned == ["fetched", "abandoned"]

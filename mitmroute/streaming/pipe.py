"""Pipes an open upstream stream to the client as OpenAI SSE, chunk by chunk.

Each read from the backend is translated and written at once (never buffered whole). The usage
chunk the router asked for is stripped when the client didn't ask for it; a stream that breaks,
stalls or ends early finishes with an SSE error event the openai SDK raises on, never as a
silently truncated success.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from mitmroute.errors import ProxyError
from mitmroute.exchange import Exchange
from mitmroute.streaming.sse import DONE, ChunkAssembler, encode, encode_error
from mitmroute.upstream import OpenStream


def _render(chunks: list[dict[str, Any]], assembler: ChunkAssembler, include_usage: bool) -> bytes:
    out = []
    for chunk in chunks:
        assembler.add(chunk)
        if chunk.get("usage") is not None and not include_usage:
            if not chunk.get("choices"):
                continue
            chunk = {k: v for k, v in chunk.items() if k != "usage"}
        out.append(encode(chunk))
    return b"".join(out)


async def pipe_stream(
    opened: OpenStream,
    exchange: Exchange,
    *,
    include_usage: bool,
    label: str,
    on_end: Callable[[ChunkAssembler, bool], None],
) -> AsyncIterator[bytes]:
    """Yield the client's SSE bytes; `on_end(assembler, complete)` runs once, however it ends."""
    assembler = ChunkAssembler()
    resp, translator = opened.response, opened.translator
    try:
        first = _render(opened.first, assembler, include_usage)
        exchange.ttft_ms = (time.perf_counter() - exchange.clock_start) * 1000
        yield first
        while True:
            data = await asyncio.wait_for(resp.content.readany(), opened.read_timeout)
            if not data:
                break
            if out := _render(translator.feed(data), assembler, include_usage):
                yield out
        if out := _render(translator.finish(), assembler, include_usage):
            yield out
        if not (translator.done or assembler.finished):
            raise ProxyError(
                502, f"{label} ended the stream early", "server_error",
                code="upstream_stream_truncated",
            )  # fmt: skip
        yield DONE
    except ProxyError as e:
        opened.redactor.error(e)
        exchange.error_type, exchange.status_code = e.code or e.type, e.status
        yield encode_error(e.message, etype=e.type, code=e.code)
    except TimeoutError:
        exchange.error_type, exchange.status_code = "upstream_stream_stalled", 504
        yield encode_error(f"{label} stalled mid-stream", code="upstream_stream_stalled")
    except aiohttp.ClientError as e:
        exchange.error_type, exchange.status_code = "upstream_stream_broken", 502
        message = opened.redactor.text(f"{label} broke the stream: {e}")  # may hold a URL
        yield encode_error(message, code="upstream_stream_broken")
    except (GeneratorExit, asyncio.CancelledError):
        exchange.error_type = "client_disconnected"
        raise
    except Exception as e:  # an answer we could not read: say so in the stream, don't truncate
        exchange.error_type, exchange.status_code = "bad_upstream_stream", 502
        yield encode_error(f"{label} sent a stream that could not be read: {type(e).__name__}",
                           code="bad_upstream_stream")  # fmt: skip
    finally:
        resp.close()
        complete = exchange.error_type is None and (translator.done or assembler.finished)
        on_end(assembler, complete)

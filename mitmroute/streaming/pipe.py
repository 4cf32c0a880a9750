"""Pipes an open upstream stream to the client as OpenAI SSE, chunk by chunk.

Each read from the backend is translated and written at once (never buffered whole). The usage
chunk the router asked for is stripped when the client didn't ask for it; a stream that breaks,
stalls or ends early finishes with an SSE error event the openai SDK raises on, never as a
silently truncated success.

A native stream (the backend speaks the client's own dialect, `OpenStream.native`) goes to the
client as the backend sent it (redacted), still translated on the side for the books; a
failure of ours ends it with an error event in that dialect.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from mitmroute.errors import ProxyError
from mitmroute.exchange import Exchange, Usage
from mitmroute.providers.base import StreamTranslator
from mitmroute.streaming.sse import DONE, ChunkAssembler, encode, encode_error, encode_native_error
from mitmroute.upstream import NativeTee, OpenStream
from mitmroute.upstream_http import Body


def _render(
    chunks: list[dict[str, Any]],
    assembler: ChunkAssembler,
    include_usage: bool,
    translator: StreamTranslator,
) -> bytes:
    """The client's bytes for `chunks`: each as the backend sent it when the translator kept
    that (`last_events`) and the chunk goes unchanged, else encoded anew."""
    events = translator.last_events
    if events is not None and len(events) != len(chunks):
        events = None  # not the events of these chunks
    out = []
    for i, chunk in enumerate(chunks):
        assembler.add(chunk)
        if "usage" in chunk and not include_usage:
            # The proxy asked for usage, the client didn't: take it out without a trace. A
            # usage chunk whose choices carry nothing (LiteLLM sends `[{"delta": {}}]`) goes.
            if chunk["usage"] is not None and not any(map(_carries, chunk.get("choices") or ())):
                continue
            chunk = {k: v for k, v in chunk.items() if k != "usage"}
        elif events is not None:
            out.append(events[i])
            continue
        out.append(encode(chunk))
    return b"".join(out)


def _usage_chunk(assembler: ChunkAssembler) -> dict[str, Any]:
    assert assembler.usage is not None
    return {
        "id": assembler.id,
        "object": assembler.object or "chat.completion.chunk",
        "created": assembler.created,
        "model": assembler.model,
        "choices": [],
        "usage": assembler.usage.to_openai(),
    }


def _carries(choice: Any) -> bool:
    """Whether a stream choice holds anything for the client (text, a call, a finish)."""
    if not isinstance(choice, dict):
        return True
    delta = choice.get("delta")
    return bool(
        choice.get("finish_reason")
        or choice.get("text")
        or choice.get("logprobs")
        or (isinstance(delta, dict) and any(v not in (None, "", [], {}) for v in delta.values()))
    )


class StallWatch:
    """Fails a read of `content` that has waited `timeout` seconds for data.

    One timer a stream, re-armed only when it fires; a read just notes when it began and
    ended. (`asyncio.wait_for` around each read costs a timeout context and a timer a chunk.)
    Time the consumer spends elsewhere (writing to a slow client) is not a stall."""

    __slots__ = ("_content", "_handle", "_loop", "_timeout", "reading_since")

    def __init__(self, content: Body, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._content = content
        self._timeout = timeout
        self.reading_since: float | None = None
        """When the read now waiting began (`loop.time()`), None between reads."""
        self._handle = self._loop.call_later(timeout, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        since = self.reading_since
        if since is not None and now - since >= self._timeout:
            self._content.set_exception(TimeoutError())
            return
        due = (since if since is not None else now) + self._timeout
        self._handle = self._loop.call_at(due, self._check)

    async def read(self) -> bytes:
        """The next bytes of the stream (b"" at its end); TimeoutError when they stall."""
        self.reading_since = self._loop.time()
        try:
            return await self._content.readany()
        finally:
            self.reading_since = None

    def close(self) -> None:
        self._handle.cancel()


def _tee(chunks: list[dict[str, Any]], assembler: ChunkAssembler, tee: NativeTee) -> bytes:
    for chunk in chunks:
        assembler.add(chunk)
    return tee.take()


def _failure(opened: OpenStream, message: str, status: int, etype: str, code: str | None) -> bytes:
    """The stream's last bytes when it fails: an error event the client's SDK raises on."""
    if opened.native is None:
        return encode_error(message, etype=etype, code=code)
    tee = opened.translator
    assert isinstance(tee, NativeTee)
    pending = tee.take()
    if tee.failed:  # the backend's own error event is in what it sent
        return pending
    error = ProxyError(status, message, etype, code=code)
    return pending + encode_native_error(error, opened.native)


async def pipe_stream(
    opened: OpenStream,
    exchange: Exchange,
    *,
    include_usage: bool,
    label: str,
    on_end: Callable[[ChunkAssembler, bool], None],
    estimate: Callable[[ChunkAssembler], Usage] | None = None,
) -> AsyncIterator[bytes]:
    """Yield the client's SSE bytes; `on_end(assembler, complete)` runs once, however it ends.

    A client that asked for usage gets its usage chunk even from a backend that reports none:
    `estimate` counts it (and the spend log then says `usage_source = 'estimated'`)."""
    assembler = ChunkAssembler()
    resp, translator = opened.response, opened.translator
    render: Callable[[list[dict[str, Any]]], bytes]
    if isinstance(translator, NativeTee):
        render = functools.partial(_tee, assembler=assembler, tee=translator)
    else:
        render = functools.partial(
            _render, assembler=assembler, include_usage=include_usage, translator=translator
        )
    watch = StallWatch(resp.content, opened.read_timeout) if opened.read_timeout else None
    read = watch.read if watch is not None else resp.content.readany
    try:
        first = render(opened.first)
        exchange.ttft_ms = (time.perf_counter() - exchange.clock_start) * 1000
        yield first
        while True:
            data = await read()
            if not data:
                break
            if out := render(translator.feed(data)):
                yield out
        if out := render(translator.finish()):
            yield out
        if not (translator.done or assembler.finished):
            message = f"{label} ended the stream early"
            raise ProxyError(502, message, "server_error", code="upstream_stream_truncated")
        if opened.native is None:
            if include_usage and assembler.usage is None and estimate is not None:
                assembler.usage = estimate(assembler)
                yield encode(_usage_chunk(assembler))
            yield DONE
    except ProxyError as e:
        opened.redactor.error(e)
        exchange.error_type, exchange.status_code = e.code or e.type, e.status
        yield _failure(opened, e.message, e.status, e.type, e.code)
    except TimeoutError:
        exchange.error_type, exchange.status_code = "upstream_stream_stalled", 504
        message = f"{label} stalled mid-stream"
        yield _failure(opened, message, 504, "server_error", "upstream_stream_stalled")
    except aiohttp.ClientError as e:
        exchange.error_type, exchange.status_code = "upstream_stream_broken", 502
        message = opened.redactor.text(f"{label} broke the stream: {e}")  # may hold a URL
        yield _failure(opened, message, 502, "server_error", "upstream_stream_broken")
    except (GeneratorExit, asyncio.CancelledError):
        exchange.error_type = "client_disconnected"
        raise
    except Exception as e:  # an answer we could not read: say so in the stream, don't truncate
        exchange.error_type, exchange.status_code = "bad_upstream_stream", 502
        message = f"{label} sent a stream that could not be read: {type(e).__name__}"
        yield _failure(opened, message, 502, "server_error", "bad_upstream_stream")
    finally:
        if watch is not None:
            watch.close()
        resp.close()
        complete = exchange.error_type is None and (translator.done or assembler.finished)
        on_end(assembler, complete)

"""Streams as real servers send them: a whole JSON answer to a streamed request, and LiteLLM's
usage chunk that carries an empty delta."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from aiohttp import web

from mitmroute.config import parse_config
from mitmroute.engine import Engine
from mitmroute.request import ClientRequest, Reply
from mitmroute.streaming.sse import SSEParser

ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello there"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}


async def serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1"


def engine_for(base: str) -> Engine:
    entry = {"model_name": "m", "litellm_params": {"model": "openai/m", "api_base": base}}
    return Engine(parse_config({"model_list": [entry]}))


async def open_stream(engine: Engine, **fields: Any) -> Reply:
    """The engine's reply to a streamed chat request for model `m` (with `fields` added)."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    body.update(fields)
    return await engine.handle(
        ClientRequest("POST", "/v1/chat/completions", {}, json.dumps(body).encode())
    )


async def stream(engine: Engine, include_usage: bool) -> list[dict]:
    fields = {"stream_options": {"include_usage": True}} if include_usage else {}
    reply = await open_stream(engine, **fields)
    assert reply.status == 200 and reply.stream is not None, reply.body
    raw = b"".join([chunk async for chunk in reply.stream])
    events = SSEParser().feed(raw)
    assert events[-1].data == "[DONE]"
    return [json.loads(e.data) for e in events[:-1]]


async def test_a_whole_json_answer_to_a_streamed_request_is_streamed_not_an_empty_stream_error():
    async def whole(request: web.Request) -> web.Response:
        return web.json_response(ANSWER)  # ignores `stream: true`, as some servers do

    runner, base = await serve(whole)
    engine = engine_for(base)
    try:
        chunks = await stream(engine, include_usage=True)
    finally:
        await engine.close()
        await runner.cleanup()
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "hello there"
    assert chunks[-1]["usage"]["total_tokens"] == 5


async def test_litellms_usage_chunk_with_an_empty_delta_leaves_no_extra_chunk():
    async def litellm_like(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        for chunk in (
            {**base, "choices": [{"index": 0, "delta": {"content": "hi"}}]},
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**base, "choices": [{"index": 0, "delta": {}}], "usage": ANSWER["usage"]},
        ):
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    runner, base = await serve(litellm_like)
    engine = engine_for(base)
    try:
        chunks = await stream(engine, include_usage=False)
    finally:
        await engine.close()
        await runner.cleanup()
    assert len(chunks) == 2  # the text and the finish; the usage chunk is gone whole
    assert all("usage" not in c for c in chunks)


def _chunk(delta: dict, finish: str | None = None) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def stalling_engine(base: str, stream_timeout: float) -> Engine:
    entry = {"model_name": "m", "litellm_params": {"model": "openai/m", "api_base": base}}
    config = {"model_list": [entry], "router_settings": {"stream_timeout": stream_timeout}}
    return Engine(parse_config(config))


async def test_a_backend_that_stalls_mid_stream_ends_it_with_a_stalled_error():
    async def stalls(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk({"content": "hi"}))
        await asyncio.sleep(1.0)
        return resp

    runner, base = await serve(stalls)
    engine = stalling_engine(base, 0.2)
    try:
        reply = await open_stream(engine)
        assert reply.stream is not None and reply.exchange is not None
        t0 = time.monotonic()
        raw = b"".join([chunk async for chunk in reply.stream])
        waited = time.monotonic() - t0
    finally:
        await engine.close()
        await runner.cleanup()
    events = SSEParser().feed(raw)
    assert json.loads(events[0].data)["choices"][0]["delta"]["content"] == "hi"
    assert json.loads(events[-1].data)["error"]["code"] == "upstream_stream_stalled"
    assert reply.exchange.status_code == 504
    assert 0.15 < waited < 0.8


async def test_a_request_cancelled_before_the_first_chunk_ends_the_call_and_logs_one_row():
    """The client went away while the backend was thinking (the relay cancels the engine's
    task): the backend's connection is closed and one row says `client_disconnected`."""
    asked, gone = asyncio.Event(), asyncio.Event()

    async def thinks(request: web.Request) -> web.StreamResponse:
        asked.set()
        try:
            await asyncio.sleep(10)
        finally:
            gone.set()  # aiohttp cancels a handler whose client hung up
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", thinks)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    engine = engine_for(f"http://127.0.0.1:{runner.addresses[0][1]}/v1")
    logged: list = []
    engine.listeners.append(logged.append)
    try:
        task = asyncio.get_running_loop().create_task(open_stream(engine))
        await asyncio.wait_for(asked.wait(), 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(gone.wait(), 2)
    finally:
        await engine.close()
        await runner.cleanup()
    assert [(e.status_code, e.error_type, e.stream) for e in logged] == [
        (499, "client_disconnected", True)
    ]


async def test_a_consumer_slower_than_the_stream_timeout_is_not_a_stall():
    """The timeout bounds a wait for the backend, not the time the client takes to read."""

    async def prompt(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for word in ("one", "two", "three"):
            await resp.write(_chunk({"content": word}))
            await asyncio.sleep(0.01)
        await resp.write(_chunk({}, "stop") + b"data: [DONE]\n\n")
        return resp

    runner, base = await serve(prompt)
    engine = stalling_engine(base, 0.15)
    try:
        reply = await open_stream(engine)
        assert reply.stream is not None
        raw = b""
        async for chunk in reply.stream:
            raw += chunk
            await asyncio.sleep(0.2)  # longer than the timeout, after each chunk
    finally:
        await engine.close()
        await runner.cleanup()
    events = SSEParser().feed(raw)
    assert events[-1].data == "[DONE]"
    assert b"error" not in raw


@pytest.mark.parametrize("api_key", [None, "sk-backend-secret-0123456789"])
async def test_unchanged_chunks_go_to_an_openai_client_byte_for_byte(api_key):
    """No re-encoding where the dialect matches: the backend's own bytes (its spacing, its
    UTF-8), while the usage chunk the client did not ask for is still taken out."""
    sent = [_chunk({"content": "héllo"}), _chunk({}, "stop")]
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    usage = {**base, "choices": [], "usage": ANSWER["usage"]}

    async def backend(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        body = sent[0].replace(b'"h\\u00e9llo"', '"héllo"'.encode())  # raw UTF-8, as some send
        sent[0] = body
        await resp.write(body)
        await resp.write(sent[1] + b"data: " + json.dumps(usage).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    runner, url = await serve(backend)
    params = {"model": "openai/m", "api_base": url, "api_key": api_key}  # a key: redacted
    engine = Engine(parse_config({"model_list": [{"model_name": "m", "litellm_params": params}]}))
    try:
        reply = await open_stream(engine)
        assert reply.stream is not None
        raw = b"".join([chunk async for chunk in reply.stream])
    finally:
        await engine.close()
        await runner.cleanup()
    assert raw == sent[0] + sent[1] + b"data: [DONE]\n\n"


def test_a_data_field_of_several_lines_is_encoded_anew_as_one_line():
    from mitmroute.providers.openai import OpenAIStream
    from mitmroute.streaming.pipe import _render
    from mitmroute.streaming.sse import ChunkAssembler

    stream = OpenAIStream("openai")
    chunks = stream.feed(b'data: {"id": "c",\ndata: "choices": []}\n\n')
    assert stream.last_events is None
    out = _render(chunks, ChunkAssembler(), False, stream)
    assert out == b'data: {"id":"c","choices":[]}\n\n'

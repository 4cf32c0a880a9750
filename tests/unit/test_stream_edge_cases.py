"""Streams as real servers send them: a whole JSON answer to a streamed request, and LiteLLM's
usage chunk that carries an empty delta."""

from __future__ import annotations

import json

from aiohttp import web

from mitmroute.config import parse_config
from mitmroute.engine import Engine
from mitmroute.request import ClientRequest
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


async def stream(engine: Engine, include_usage: bool) -> list[dict]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    reply = await engine.handle(
        ClientRequest("POST", "/v1/chat/completions", {}, json.dumps(body).encode())
    )
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

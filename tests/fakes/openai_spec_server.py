"""A fake OpenAI-compatible backend whose every answer has OpenAI's published shape.

tests/fakes/openai_server.py answers like the many servers that speak OpenAI's protocol
loosely (no `refusal`, no `logprobs` in stream choices, ...): good for routing tests, but a
shape check of what the proxy writes would then blame the proxy for what it passed on. This one
answers "echo: <last user text>" too, with every field the spec requires (its answers are
checked against the spec in tests/spec/test_openai_shapes.py), so a shape error seen through
the proxy is the proxy's own.

Routes: POST /v1/chat/completions (streamed or not, `stream_options.include_usage`),
/v1/completions, /v1/embeddings. `FakeSpecBackend().start()` serves it from a thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

from aiohttp import web


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


async def _chat_or_completion(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    is_chat = request.path.endswith("chat/completions")
    if is_chat:
        prompt = sum(len(_text(m.get("content")).split()) for m in body["messages"])
        last = [_text(m.get("content")) for m in body["messages"] if m.get("role") == "user"]
        words = ["echo:", *(last[-1].split() if last else [])]
    else:
        text = body["prompt"] if isinstance(body["prompt"], str) else " ".join(body["prompt"])
        prompt, words = len(text.split()), ["echo:", *text.split()]
    head = {
        "id": f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex[:12]}",
        "created": int(time.time()),
        "model": body["model"],
        "system_fingerprint": "fp_spec",
    }
    if not body.get("stream"):
        answer = " ".join(words)
        choice: dict[str, Any] = (
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": answer,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
            if is_chat
            else {"index": 0, "text": answer, "logprobs": None, "finish_reason": "stop"}
        )
        kind = "chat.completion" if is_chat else "text_completion"
        return web.json_response(
            {**head, "object": kind, "choices": [choice], "usage": _usage(prompt, len(words))}
        )
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)

    async def send(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> None:
        chunk = {**head, "object": "chat.completion.chunk" if is_chat else "text_completion"}
        chunk["choices"] = choices
        if include_usage:
            chunk["usage"] = usage
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    def piece(text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        if not is_chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant", "refusal": None} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    if is_chat:
        await send([piece("", role=True)])
    for i, word in enumerate(words):
        await send([piece(word if i == 0 else " " + word)])
    await send([piece(None if is_chat else "", "stop")])
    if include_usage:
        await send([], _usage(prompt, len(words)))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _embeddings(request: web.Request) -> web.Response:
    body = await request.json()
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    tokens = sum(len(str(x).split()) for x in inputs)
    data = [
        {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
        for i in range(len(inputs))
    ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return web.json_response(
        {"object": "list", "data": data, "model": body["model"], "usage": usage}
    )


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _chat_or_completion)
    app.router.add_post("/v1/completions", _chat_or_completion)
    app.router.add_post("/v1/embeddings", _embeddings)
    return app


class FakeSpecBackend:
    """The fake in a background thread; `url` is set by `start()`."""

    def __init__(self) -> None:
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self.url

    async def _start(self) -> None:
        self._runner = web.AppRunner(make_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> FakeSpecBackend:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""A fake chat backend that calls tools and reasons: OpenAI's `/v1/chat/completions` and
Ollama's `/api/chat`, streamed or not.

Scripted by the last user message (case-insensitive), like the other fakes:

    "use tool"     a tool call to the first tool, arguments from its schema (each string
                   property "Paris", each other property 1); streamed as a header delta and
                   the arguments in three pieces
    "use two"      two tool calls (the first two tools, or the first one twice)
    "think"        `reasoning_content` ("Let me think it over.") before the text
    tool results   (the last message is a tool result) "Got the tool result: <its text>"
    anything else  "echo: <last user text>"

Usage is deterministic: prompt_tokens = words in every message, completion_tokens = words of
the answer (text, reasoning and arguments). `requests` holds every body received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from typing import Any

from aiohttp import web

REASONING = "Let me think it over."


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _arguments(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool.get("function") or tool
    props = (fn.get("parameters") or {}).get("properties") or {}
    return {k: "Paris" if v.get("type") == "string" else 1 for k, v in props.items()}


def script(body: dict[str, Any]) -> tuple[str, str | None, list[dict[str, Any]], int]:
    """(text, reasoning, tool calls as (name, arguments json), prompt tokens) for a request."""
    messages = body.get("messages") or []
    prompt = sum(len(_text(m.get("content")).split()) for m in messages)
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        return f"Got the tool result: {_text(last.get('content'))}", None, [], prompt
    said = _text(last.get("content"))
    tools = body.get("tools") or []
    reasoning = REASONING if "think" in said.lower() else None
    wanted = 2 if "use two" in said.lower() else 1 if "use tool" in said.lower() else 0
    if wanted and tools:
        picked = (tools * 2)[:wanted] if len(tools) < wanted else tools[:wanted]
        calls = [
            {"name": (t.get("function") or t)["name"], "arguments": json.dumps(_arguments(t))}
            for t in picked
        ]
        return "", reasoning, calls, prompt
    return f"echo: {said}", reasoning, [], prompt


def _completion_tokens(text: str, reasoning: str | None, calls: list[dict[str, Any]]) -> int:
    words = len(text.split()) + len((reasoning or "").split())
    return words + sum(len(c["arguments"].split()) for c in calls)


class ToolChatServer:
    """The fake on a free port, served from a background thread."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ToolChatServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self.url

    def stop(self) -> None:
        if self._runner is not None:
            done = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            with contextlib.suppress(TimeoutError):
                done.result(3)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/api/chat", self._ollama)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    # --- OpenAI ------------------------------------------------------------------------------

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        text, reasoning, calls, prompt = script(body)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": _completion_tokens(text, reasoning, calls),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        finish = "tool_calls" if calls else "stop"
        base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": body["model"]}
        tool_calls = [
            {"id": f"call_{i}", "type": "function", "function": c} for i, c in enumerate(calls)
        ]
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": text or None}
            if reasoning:
                message["reasoning_content"] = reasoning
            if tool_calls:
                message["tool_calls"] = tool_calls
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            return web.json_response(
                {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            )
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def send(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any):
            choices = (
                [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            )
            chunk = {**base, "object": "chat.completion.chunk", "choices": choices, **extra}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        await send({"role": "assistant", "content": ""})
        if reasoning:
            for word in reasoning.split(" "):
                await send({"reasoning_content": word + " "})
        for i, word in enumerate(text.split(" ") if text else []):
            await send({"content": word if i == 0 else " " + word})
        for i, call in enumerate(tool_calls):
            header = {
                "index": i,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            await send({"tool_calls": [header]})
            args = call["function"]["arguments"]
            third = max(1, len(args) // 3)
            for piece in (args[:third], args[third : 2 * third], args[2 * third :]):
                await send({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        await send({}, finish)
        if (body.get("stream_options") or {}).get("include_usage"):
            await send(None, usage=usage)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    # --- Ollama ------------------------------------------------------------------------------

    async def _ollama(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        text, _, calls, prompt = script(body)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [
                {"function": {"name": c["name"], "arguments": json.loads(c["arguments"])}}
                for c in calls
            ]
        final = {
            "model": body["model"],
            "created_at": "2026-12-01T00:00:00Z",
            "done": True,
            "done_reason": "stop",
            "prompt_eval_count": prompt,
            "eval_count": _completion_tokens(text, None, calls),
        }
        if not body.get("stream"):
            return web.json_response({**final, "message": message})
        resp = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
        await resp.prepare(request)
        for i, word in enumerate(text.split(" ") if text else []):
            piece = {"role": "assistant", "content": word if i == 0 else " " + word}
            line = {"model": body["model"], "done": False, "message": piece}
            await resp.write(json.dumps(line).encode() + b"\n")
        if calls:
            line = {"model": body["model"], "done": False, "message": {**message, "content": ""}}
            await resp.write(json.dumps(line).encode() + b"\n")
        end = {**final, "message": {"role": "assistant", "content": ""}}
        await resp.write(json.dumps(end).encode() + b"\n")
        await resp.write_eof()
        return resp

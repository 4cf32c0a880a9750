"""A fake LLM backend speaking OpenAI's wire protocol (/v1/...) and Ollama's (/api/...).

Behaviour is chosen by the model name the proxy sends, so one fake serves every deployment:

  <anything>          answers normally: "echo: <last user text>"
  fail-<status>       answers <status> with an OpenAI-shaped error (fail-500, fail-429, ...)
  ratelimit-<secs>    429 with `Retry-After: <secs>`
  context             400 context_length_exceeded
  policy              400 content_policy_violation
  reset               drops the connection without answering
  hang                answers only after 20 s
  slow-<ms>           streams one word every <ms> milliseconds (non-streamed: waits)
  break               streams two chunks, then drops the connection
  no-usage            answers without usage (streamed and not)
  flaky-<n>[-<tag>]   fails with 503 for the first <n> requests, then answers (a tag of
                      its own gives a test a fresh count)
  leaky-<status>      answers <status> naming the key it received, as OpenAI does
                      ("Incorrect API key provided: Bearer sk-...")
  leaky-echo          answers "echo: <the key it received>" (streamed and not)
  leaky-break         streams two chunks, pauses, then an error event naming the key it received
  strict-<anything>   refuses `top_k`, `reasoning_effort` and more than 16384 output tokens as
                      api.openai.com does for gpt-4o (400 naming the first), else answers

Tools (chat and Ollama): a request with `tools` whose last user text says "use tool" is
answered with a call of the first tool (arguments sampled from its schema, streamed in small
pieces); a last `tool` message is answered "tool said: <its content>". Tool messages must
answer the assistant tool calls right before them, and every call must be answered (400
otherwise, as OpenAI does).

Token counts are deterministic: prompt_tokens = words in all messages, completion_tokens =
words in the answer. `GET /_stats` returns {"requests": [...bodies...], "usage": totals}.
Run: `python tests/fakes/openai_server.py --port N`, or `FakeBackend().start()` in a thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
import uuid
from typing import Any

from aiohttp import web


def _words(text: str) -> int:
    return len(text.split())


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class Behaviour:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.flaky: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def record(self, request: web.Request, body: dict[str, Any]) -> None:
        self.requests.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})

    def usage(self, prompt: int, completion: int) -> dict[str, int]:
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def _key_of(request: web.Request) -> str:
    """The credential a request carries, as a careless backend would quote it."""
    return request.headers.get("authorization") or request.headers.get("api-key") or "(none)"


async def _fault(model: str, state: Behaviour, request: web.Request) -> web.StreamResponse | None:
    """The error answer a model name asks for, or None to answer normally."""
    if model.startswith("leaky-") and model[6:].isdigit():
        status = int(model[6:])
        message = f"Incorrect API key provided: {_key_of(request)}"
        return web.json_response(
            {"error": {"message": message, "type": "invalid_request_error", "code": None}},
            status=status,
        )
    if model.startswith("fail-"):
        status = int(model.split("-", 1)[1])
        return web.json_response(
            {"error": {"message": f"fake failure {status}", "type": "server_error", "code": None}},
            status=status,
        )
    if model.startswith("ratelimit-"):
        return web.json_response(
            {
                "error": {
                    "message": "Rate limit reached",
                    "type": "requests",
                    "code": "rate_limit_exceeded",
                }
            },
            status=429,
            headers={"retry-after": model.split("-", 1)[1]},
        )
    if model == "context":
        return web.json_response(
            {
                "error": {
                    "message": "This model's maximum context length is 10 tokens.",
                    "type": "invalid_request_error",
                    "code": "context_length_exceeded",
                    "param": "messages",
                }
            },
            status=400,
        )
    if model == "policy":
        return web.json_response(
            {
                "error": {
                    "message": "rejected by content policy",
                    "type": "invalid_request_error",
                    "code": "content_policy_violation",
                }
            },
            status=400,
        )
    if model == "reset":
        assert request.transport is not None
        request.transport.abort()
        raise asyncio.CancelledError
    if model == "hang":
        await asyncio.sleep(20)
    if model.startswith("flaky-"):
        left = state.flaky.setdefault(model, int(model.split("-")[1]))
        if left > 0:
            state.flaky[model] = left - 1
            return web.json_response(
                {"error": {"message": "flaky", "type": "server_error"}}, status=503
            )
    return None


STRICT_REFUSED = {
    "top_k": "Unrecognized request argument supplied: top_k",
    "reasoning_effort": "Unsupported parameter: 'reasoning_effort' is not supported with this "
    "model.",
}


def _strict(model: str, body: dict[str, Any]) -> web.Response | None:
    if not model.startswith("strict-"):
        return None
    refused = [(p, m, "unsupported_parameter") for p, m in STRICT_REFUSED.items() if p in body]
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    if limit > 16384:
        message = (
            f"max_tokens is too large: {limit}. This model supports at most 16384 "
            f"completion tokens, whereas you provided {limit}."
        )
        refused.append(("max_tokens", message, "invalid_value"))
    if not refused:
        return None
    param, message, code = refused[0]  # OpenAI names the first problem only
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return web.json_response({"error": error}, status=400)


def _tool_pairing(messages: list[dict[str, Any]]) -> web.Response | None:
    """OpenAI's 400s for tool messages that don't answer the tool calls before them."""
    expected: set[str] = set()
    for i, m in enumerate(messages):
        if m.get("role") == "tool":
            if m.get("tool_call_id") not in expected:
                message = (
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    f"preceeding message with 'tool_calls' (messages.[{i}])."
                )
                return web.json_response(
                    {
                        "error": {
                            "message": message,
                            "type": "invalid_request_error",
                            "param": f"messages.[{i}]",
                            "code": None,
                        }
                    },
                    status=400,
                )
            expected.discard(m["tool_call_id"])
            continue
        if expected:
            message = (
                "An assistant message with 'tool_calls' must be followed by tool messages "
                f"responding to each 'tool_call_id'. Missing: {sorted(expected)}"
            )
            return web.json_response(
                {
                    "error": {
                        "message": message,
                        "type": "invalid_request_error",
                        "param": "messages",
                        "code": None,
                    }
                },
                status=400,
            )
        expected = {c["id"] for c in m.get("tool_calls") or ()}
    return None


def _sample(schema: dict[str, Any]) -> Any:
    kind = schema.get("type")
    if kind == "object":
        return {k: _sample(v) for k, v in (schema.get("properties") or {}).items()}
    return {"string": "test", "integer": 1, "number": 1.5, "boolean": True, "array": []}.get(kind)


def _tool_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """The tool call a request asks for ("use tool" with tools), else None."""
    tools = body.get("tools") or []
    last = (body.get("messages") or [{}])[-1]
    if not tools or last.get("role") != "user" or "use tool" not in _text_of(last.get("content")):
        return None
    fn = tools[0]["function"]
    arguments = json.dumps(_sample(fn.get("parameters") or {"type": "object"}))
    return {"name": fn["name"], "arguments": arguments}


def _answer_words(body: dict[str, Any]) -> tuple[list[str], int]:
    messages = body.get("messages")
    if messages is None:
        prompt = body.get("prompt", "")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        return ["echo:", *text.split()], _words(text)
    prompt_words = sum(_words(_text_of(m.get("content"))) for m in messages)
    if messages and messages[-1].get("role") == "tool":
        return ["tool", "said:", *_text_of(messages[-1].get("content")).split()], prompt_words
    last = next(
        (_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )
    return ["echo:", *last.split()], prompt_words


@web.middleware
async def reject_malformed(request: web.Request, handler: Any) -> web.StreamResponse:
    """What the real APIs do with a body of the wrong shape: a 400, never a 500."""
    try:
        return await handler(request)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        error = {"message": f"Invalid request: {type(e).__name__}", "type": "invalid_request_error",
                 "param": None, "code": None}  # fmt: skip
        return web.json_response({"error": error}, status=400)


def make_app(state: Behaviour) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state.record(request, body)
        model = body.get("model", "")
        if (fault := await _fault(model, state, request)) is not None:
            return fault
        refused = _strict(model, body) or _tool_pairing(body.get("messages") or [])
        if refused is not None:
            return refused
        words, prompt_tokens = _answer_words(body)
        call = _tool_call(body)
        if call is not None:
            return await _tool_answer(request, body, call, state, prompt_tokens)
        if model == "leaky-echo":
            words = ["echo:", _key_of(request).removeprefix("Bearer ")]
        is_chat = request.path.endswith("chat/completions")
        cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        delay = int(model.split("-", 1)[1]) / 1000 if model.startswith("slow-") else 0.0
        if not body.get("stream"):
            await asyncio.sleep(delay * len(words))
            text = " ".join(words)
            choice: dict[str, Any] = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
                if is_chat
                else {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            )
            out: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion" if is_chat else "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
            }
            if model != "no-usage":
                out["usage"] = state.usage(prompt_tokens, len(words))
            return web.json_response(out)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        kind = "chat.completion.chunk" if is_chat else "text_completion"

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = {
                "id": cid,
                "object": kind,
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        def piece(text: str, finish: str | None = None) -> dict[str, Any]:
            if is_chat:
                return {
                    "index": 0,
                    "delta": {"content": text} if text else {},
                    "finish_reason": finish,
                }
            return {"index": 0, "text": text, "finish_reason": finish}

        if is_chat:
            await send(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
        for i, word in enumerate(words):
            if delay:
                await asyncio.sleep(delay)
            await send([piece(word if i == 0 else " " + word)])
            if model == "break" and i == 1:
                # the chunks so far reach the proxy first: aiohttp's reader raises a reset it
                # sees before the proxy has read the data that came ahead of it
                await asyncio.sleep(0.2)
                assert request.transport is not None
                request.transport.abort()
                return resp
            if model == "leaky-break" and i == 1:
                await asyncio.sleep(0.2)  # the chunks so far reach the client first
                error = {"message": f"stream failed for key {_key_of(request)}", "code": None}
                await resp.write(b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
                await resp.write_eof()
                return resp
        await send([piece("", "stop")])
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        if include_usage and model != "no-usage":
            await send([], usage=state.usage(prompt_tokens, len(words)))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _tool_answer(
        request: web.Request,
        body: dict[str, Any],
        call: dict[str, Any],
        state: Behaviour,
        prompt_tokens: int,
    ) -> web.StreamResponse:
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
        call_id = f"call_{uuid.uuid4().hex[:12]}"
        completion_tokens = max(1, len(call["arguments"]) // 4)
        base = {"id": cid, "created": created, "model": body["model"]}
        if not body.get("stream"):
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": call_id, "type": "function", "function": call}],
            }
            choice = {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [choice],
                    "usage": state.usage(prompt_tokens, completion_tokens),
                }
            )
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def send(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any):
            choices = (
                [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            )
            chunk = {**base, "object": "chat.completion.chunk", "choices": choices, **extra}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        await send({"role": "assistant", "content": None})
        head = {
            "index": 0,
            "id": call_id,
            "type": "function",
            "function": {"name": call["name"], "arguments": ""},
        }
        await send({"tool_calls": [head]})
        args = call["arguments"]
        for i in range(0, len(args), 5):
            await send({"tool_calls": [{"index": 0, "function": {"arguments": args[i : i + 5]}}]})
        await send({}, "tool_calls")
        if (body.get("stream_options") or {}).get("include_usage"):
            await send(None, usage=state.usage(prompt_tokens, completion_tokens))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        state.record(request, body)
        if (fault := await _fault(body.get("model", ""), state, request)) is not None:
            return fault
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
            for i, _ in enumerate(inputs)
        ]
        tokens = sum(_words(str(x)) for x in inputs)
        usage = state.usage(tokens, 0)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": usage["total_tokens"]},
            }
        )

    async def ollama_chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state.record(request, body)
        model = body.get("model", "")
        if model.startswith("fail-"):
            return web.json_response({"error": "fake failure"}, status=int(model[5:]))
        if "stream" not in body:
            return web.json_response({"error": "test fake wants `stream` explicit"}, status=400)
        if body.get("think") and not model.startswith("think"):
            return web.json_response({"error": f'"{model}" does not support thinking'}, status=400)
        words, prompt_tokens = _answer_words(body)
        call = _tool_call(body)
        thinking = "Let me think." if body.get("think") else ""
        if call is not None:
            words = []
            message: dict[str, Any] = {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": call["name"], "arguments": json.loads(call["arguments"])}}
                ],
            }
        final = {
            "model": model,
            "created_at": "2026-11-24T00:00:00Z",
            "done": True,
            "done_reason": "stop",
            "prompt_eval_count": prompt_tokens,
            "eval_count": len(words),
        }
        state.usage(prompt_tokens, len(words))
        is_chat = request.path == "/api/chat"
        if not body["stream"]:
            text = " ".join(words)
            payload = (
                {"message": {"role": "assistant", "content": text}}
                if is_chat
                else {"response": text}
            )
            if call is not None:
                payload = {"message": message}
            if thinking:
                payload["message"]["thinking"] = thinking
            return web.json_response({**final, **payload})
        resp = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
        await resp.prepare(request)
        if thinking:
            line = {
                "model": model,
                "done": False,
                "message": {"role": "assistant", "content": "", "thinking": thinking},
            }
            await resp.write(json.dumps(line).encode() + b"\n")
        if call is not None:
            line = {"model": model, "done": False, "message": message}
            await resp.write(json.dumps(line).encode() + b"\n")
        for i, word in enumerate(words):
            text = word if i == 0 else " " + word
            payload = (
                {"message": {"role": "assistant", "content": text}}
                if is_chat
                else {"response": text}
            )
            await resp.write(
                json.dumps({"model": model, "done": False, **payload}).encode() + b"\n"
            )
        end = {"message": {"role": "assistant", "content": ""}} if is_chat else {"response": ""}
        await resp.write(json.dumps({**final, **end}).encode() + b"\n")
        await resp.write_eof()
        return resp

    async def ollama_embed(request: web.Request) -> web.Response:
        body = await request.json()
        state.record(request, body)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        tokens = sum(_words(str(x)) for x in inputs)
        state.usage(tokens, 0)
        return web.json_response(
            {
                "model": body["model"],
                "prompt_eval_count": tokens,
                "embeddings": [[0.5, 0.5] for _ in inputs],
            }
        )

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "requests": state.requests,
                "headers": state.headers,
                "prompt_tokens": state.prompt_tokens,
                "completion_tokens": state.completion_tokens,
            }
        )

    async def reset(request: web.Request) -> web.Response:
        state.__init__()  # type: ignore[misc]
        return web.json_response({})

    app = web.Application(middlewares=[reject_malformed])
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/api/chat", ollama_chat)
    app.router.add_post("/api/generate", ollama_chat)
    app.router.add_post("/api/embed", ollama_embed)
    app.router.add_get("/_stats", stats)
    app.router.add_post("/_reset", reset)
    return app


class FakeBackend:
    """The fake in a background thread of the test process."""

    def __init__(self) -> None:
        self.state = Behaviour()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        self._runner = web.AppRunner(make_app(self.state), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            cleanup = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            with contextlib.suppress(TimeoutError):  # a `hang` handler may still be sleeping
                cleanup.result(3)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    web.run_app(
        make_app(Behaviour()),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=lambda *_: None,
    )


if __name__ == "__main__":
    main()

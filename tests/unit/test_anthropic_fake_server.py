"""The fake Anthropic server: it rejects what the real API rejects, speaks the wire protocol the
official SDK expects, and round-trips with AnthropicProvider."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from mitmroute.config import Deployment
from mitmroute.errors import ProxyError
from mitmroute.providers.anthropic import AnthropicProvider
from mitmroute.providers.base import CHAT
from tests.fakes.anthropic_server import FakeAnthropic

KEY = "sk-ant-test"
PROVIDER = AnthropicProvider()
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
BODY = {"model": "claude-x", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY}}]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=KEY) as fake:
        yield fake


def dep(server: FakeAnthropic) -> Deployment:
    return Deployment(model_name="claude", provider="anthropic", model="claude-sonnet-4-5",
                      litellm_model="anthropic/claude-sonnet-4-5", api_base=server.base_url,
                      api_key=KEY)  # fmt: skip


async def post(url: str, headers: dict[str, str], data: bytes) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(
        url, headers=headers, data=data) as resp:  # fmt: skip
        return resp.status, await resp.json()


async def raw_post(server: FakeAnthropic, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await post(f"{server.base_url}/v1/messages", headers, data)


async def chat(server: FakeAnthropic, body: dict[str, Any]) -> dict[str, Any]:
    """One non-streamed OpenAI chat request through the provider and the fake."""
    call = PROVIDER.build(CHAT, {"model": "gpt-4o", **body}, dep(server), drop_params=False)
    status, payload = await post(call.url, call.headers, call.body)
    if status != 200:
        raise PROVIDER.error(status, payload)
    return PROVIDER.parse(CHAT, json.dumps(payload).encode(), dep(server))


async def chat_stream(server: FakeAnthropic, body: dict[str, Any]) -> tuple[list[dict], Any]:
    """One streamed request; the chunks and the translator."""
    body = {"model": "gpt-4o", **body, "stream": True}
    call = PROVIDER.build(CHAT, body, dep(server), drop_params=False)
    translator = PROVIDER.stream(CHAT, dep(server))
    chunks: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session, session.post(
        call.url, headers=call.headers, data=call.body) as resp:  # fmt: skip
        assert resp.status == 200 and resp.headers["content-type"] == "text/event-stream"
        async for data in resp.content.iter_any():
            chunks += translator.feed(data)
    return chunks + translator.finish(), translator


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


# --- rejections -------------------------------------------------------------------------------

NO_VERSION = {"x-api-key": KEY}
BEARER = {"authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"}
NEW_API = {**HEADERS, "anthropic-version": "2026-10-21"}
TOOL_USE = {"role": "assistant", "content": [
    {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]}  # fmt: skip
RESULT = {"role": "user", "content": [
    {"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}]}  # fmt: skip


@pytest.mark.parametrize(("headers", "body", "status", "text"), [
    ({"anthropic-version": "2023-06-01"}, BODY, 401, "x-api-key"),
    ({**HEADERS, "x-api-key": "wrong"}, BODY, 401, "invalid x-api-key"),
    (NO_VERSION, BODY, 400, "anthropic-version"),
    ({**HEADERS, "anthropic-version": "2024-99-99"}, BODY, 400, "anthropic-version"),
    (HEADERS, b"{nope", 400, "invalid JSON"),
    (HEADERS, {k: v for k, v in BODY.items() if k != "max_tokens"}, 400, "max_tokens: Field"),
    (HEADERS, {**BODY, "n": 2}, 400, "n: Extra inputs"),
    (HEADERS, {**BODY, "messages": [{"role": "assistant", "content": "x"}]}, 400, "first"),
    (HEADERS, {**BODY, "messages": [user("a"), user("b")]}, 400, "alternate"),
    (HEADERS, {**BODY, "messages": [{"role": "system", "content": "s"}, user("a")]}, 400, "role"),
    (HEADERS, {**BODY, "messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
     400, "non-empty"),
    (HEADERS, {**BODY, "messages": [user("a"), TOOL_USE, user("b")]}, 400, "without"),
    (HEADERS, {**BODY, "messages": [user("a"), {"role": "assistant", "content": "x"}, RESULT]},
     400, "unexpected `tool_use_id`"),
    (HEADERS, {**BODY, "temperature": 1.5}, 400, "temperature"),
    (HEADERS, {**BODY, "top_p": "high"}, 400, "top_p"),
    (NEW_API, {**BODY, "temperature": 0.5}, 400, "temperature"),
    (HEADERS, {**BODY, "messages": [user("a"), {"role": "assistant", "content": "x "}]}, 400,
     "trailing whitespace"),
    (HEADERS, {**BODY, "tools": [{"name": "bad name!", "input_schema": {"type": "object"}}]},
     400, "tools.0.name"),
])  # fmt: skip
async def test_rejects_malformed_requests(server: FakeAnthropic, headers: dict[str, str],
                                          body: Any, status: int, text: str) -> None:  # fmt: skip
    got, payload = await raw_post(server, body, headers)
    assert got == status, payload
    assert payload["type"] == "error" and text in payload["error"]["message"]
    expected = {400: "invalid_request_error", 401: "authentication_error"}[status]
    assert payload["error"]["type"] == expected and payload["request_id"].startswith("req_")


async def test_unknown_paths_are_anthropic_shaped_404s(server: FakeAnthropic) -> None:
    status, payload = await post(f"{server.base_url}/v1/complete", HEADERS, b"{}")
    assert status == 404 and payload["error"]["type"] == "not_found_error"


async def test_accepts_bearer_auth_and_records_requests(server: FakeAnthropic) -> None:
    status, payload = await raw_post(server, BODY, BEARER)
    assert status == 200 and payload["content"][0]["text"].startswith("Hello from fake Claude")
    assert server.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert server.requests[-1].body == BODY and server.requests[-1].usage == payload["usage"]


@pytest.mark.parametrize(("trigger", "status", "etype"), [
    ("fail 529", 529, "overloaded_error"), ("fail 429", 429, "rate_limit_error"),
    ("fail 500", 500, "api_error"), ("too long", 400, "invalid_request_error"),
])  # fmt: skip
async def test_scripted_failures(server: FakeAnthropic, trigger: str, status: int,
                                 etype: str) -> None:  # fmt: skip
    got, payload = await raw_post(server, {**BODY, "messages": [user(trigger)]}, HEADERS)
    assert (got, payload["error"]["type"]) == (status, etype)


# --- the official SDK against the fake ---------------------------------------------------------


def test_official_sdk_create_and_stream(server: FakeAnthropic) -> None:
    client = anthropic.Anthropic(api_key=KEY, base_url=server.base_url, max_retries=0)
    tool = {"name": "get_weather", "input_schema": CITY}
    msg = client.messages.create(model="claude-x", max_tokens=100, tools=[tool],
                                 messages=[user("please use tool")])  # fmt: skip
    assert msg.stop_reason == "tool_use" and msg.content[-1].type == "tool_use"
    assert msg.content[-1].input == {"city": "test"}
    with client.messages.stream(model="claude-x", max_tokens=100,
                                messages=[user("think first")]) as stream:  # fmt: skip
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.usage.output_tokens == server.requests[-1].usage["output_tokens"]
    with pytest.raises(anthropic.InternalServerError):
        client.messages.create(model="claude-x", max_tokens=10, messages=[user("fail 529")])


# --- round trips through AnthropicProvider ----------------------------------------------------


async def test_round_trip_multi_turn_tool_use(server: FakeAnthropic) -> None:
    messages = [{"role": "system", "content": "Be brief."}, user("use tool for Paris")]
    first = ChatCompletion.model_validate(await chat(server, {"messages": messages,
                                                              "tools": TOOLS}))  # fmt: skip
    assert server.requests[-1].headers["anthropic-version"] == "2023-06-01"
    assert server.requests[-1].headers["x-api-key"] == KEY
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"city": "test"}
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]  # fmt: skip
    second = ChatCompletion.model_validate(await chat(server, {"messages": messages,
                                                               "tools": TOOLS}))  # fmt: skip
    assert second.choices[0].message.content == "Got the tool result: sunny"
    usage = server.requests[-1].usage
    assert second.usage is not None and usage is not None
    assert second.usage.prompt_tokens == usage["input_tokens"]
    assert second.usage.completion_tokens == usage["output_tokens"]


async def test_round_trip_stream_with_parallel_tools(server: FakeAnthropic) -> None:
    chunks, translator = await chat_stream(server, {"messages": [user("use two tools")],
                                                    "tools": TOOLS})  # fmt: skip
    assert translator.done
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    final = state.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "test"}), ("get_weather", {"city": "test"})]  # fmt: skip
    assert len({c.id for c in calls}) == 2 and final.choices[0].finish_reason == "tool_calls"
    usage = server.requests[-1].usage or {}
    assert chunks[-1]["usage"]["completion_tokens"] == usage["output_tokens"]
    assert chunks[-1]["usage"]["prompt_tokens"] == usage["input_tokens"]


async def test_prompt_cache_usage_reconciles(server: FakeAnthropic) -> None:
    system = [{"type": "text", "text": "long policy " * 50, "cache_control": {"type": "ephemeral"}}]
    body = {"messages": [{"role": "system", "content": system}, user("hi")]}
    first, second = await chat(server, body), await chat(server, body)
    created = first["usage"]["prompt_tokens_details"]["cache_creation_tokens"]
    assert created > 0 and first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": created}
    assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"]


async def test_max_tokens_and_stop_sequences(server: FakeAnthropic) -> None:
    cut = await chat(server, {"messages": [user("hi")], "max_tokens": 3})
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["choices"][0]["message"]["content"] == "Hello from fake "
    stopped = await chat(server, {"messages": [user("hi")], "stop": ["fake"]})
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["message"]["content"] == "Hello from "


async def test_provider_maps_scripted_errors(server: FakeAnthropic) -> None:
    with pytest.raises(ProxyError) as overloaded:
        await chat(server, {"messages": [user("fail 529")]})
    assert (overloaded.value.status, overloaded.value.retryable) == (503, True)
    with pytest.raises(ProxyError) as too_long:
        await chat(server, {"messages": [user("too long")]})
    assert too_long.value.kind == "context_window"


async def test_stream_break_and_cut(server: FakeAnthropic) -> None:
    with pytest.raises(ProxyError) as broken:
        await chat_stream(server, {"messages": [user("break please")]})
    assert broken.value.status == 503 and broken.value.type == "overloaded_error"
    chunks, translator = await chat_stream(server, {"messages": [user("cut please")]})
    assert not translator.done and chunks and not chunks[-1].get("usage")


async def test_slow_stream_spaces_deltas(server: FakeAnthropic) -> None:
    call = PROVIDER.build(CHAT, {"model": "m", "messages": [user("slow")], "max_tokens": 2,
                                 "stream": True}, dep(server), drop_params=False)  # fmt: skip
    arrivals = []
    async with aiohttp.ClientSession() as session, session.post(
        call.url, headers=call.headers, data=call.body) as resp:  # fmt: skip
        async for line in resp.content:
            if line.startswith(b"event: content_block_delta"):
                arrivals.append(time.perf_counter())
    assert len(arrivals) == 2 and arrivals[1] - arrivals[0] >= 0.15


# --- as a process -----------------------------------------------------------------------------


async def test_runs_as_a_subprocess() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).parents[1] / "fakes" / "anthropic_server.py"
    proc = subprocess.Popen([sys.executable, str(script), "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"listening on http://127.0.0.1:{port}"
        status, payload = await post(f"http://127.0.0.1:{port}/v1/messages", HEADERS,
                                     json.dumps(BODY).encode())  # fmt: skip
        assert status == 200 and payload["type"] == "message"
    finally:
        proc.terminate()
        proc.wait(timeout=5)

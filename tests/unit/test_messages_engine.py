"""The Messages dialect through a real Engine and fake backends (no mitmproxy): native
passthrough to Anthropic, translation to OpenAI-compatible and Ollama backends, fallbacks,
count_tokens, and the spend-log record of each."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import pytest
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from pydantic import TypeAdapter

from mitmroute.config import parse_config
from mitmroute.engine import Engine
from mitmroute.exchange import Exchange
from mitmroute.inbound import inbound_for
from mitmroute.request import ClientRequest, Reply
from mitmroute.streaming.sse import SSEParser
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.openai_server import FakeBackend

EVENT = TypeAdapter(RawMessageStreamEvent)
BACKEND_KEY = "sk-ant-backend-0123456789"
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"name": "get_weather", "description": "Weather now", "input_schema": CITY}
HEADERS = {
    "x-api-key": "sk-ant-client-key-000",
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "context-management-2025-06-27,interleaved-thinking-2025-05-14",
}


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=BACKEND_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def openai_fake() -> Iterator[str]:
    fake = FakeBackend()
    yield fake.start()
    fake.stop()


def entry(name: str, model: str, base: str, **params: Any) -> dict[str, Any]:
    return {"model_name": name, "litellm_params": {"model": model, "api_base": base, **params}}


@pytest.fixture
async def engine(claude: FakeAnthropic, openai_fake: str) -> AsyncIterator[Engine]:
    prices = {
        "input_cost_per_token": 0.000003,
        "output_cost_per_token": 0.000015,
        "cache_read_input_token_cost": 0.0000003,
        "cache_creation_input_token_cost": 0.00000375,
    }
    config = parse_config(
        {
            "model_list": [
                entry(
                    "claude", "anthropic/claude-x", claude.base_url, api_key=BACKEND_KEY, **prices
                ),
                entry("gpt", "openai/gpt-4o", f"{openai_fake}/v1", api_key="sk-openai-0000000"),
                entry("strict", "openai/strict-gpt", f"{openai_fake}/v1", api_key="sk-o-0000000"),
                entry("llama", "ollama_chat/llama3", openai_fake),
                entry("thinker", "ollama_chat/think-qwen", openai_fake),
                entry("broken", "anthropic/claude-x", claude.base_url, api_key="sk-ant-wrong-key"),
                entry("mixed", "anthropic/claude-x", claude.base_url, api_key=BACKEND_KEY),
                entry("mixed", "openai/gpt-4o", f"{openai_fake}/v1", api_key="sk-openai-0000000"),
            ],
            "router_settings": {"num_retries": 0, "fallbacks": [{"broken": ["gpt"]}]},
            "general_settings": {"passthrough_unknown_models": False},
        }
    )
    engine = Engine(config)
    engine.records = []  # type: ignore[attr-defined]
    engine.listeners.append(engine.records.append)  # type: ignore[attr-defined]
    yield engine
    await engine.close()


def request(body: dict[str, Any], path: str = "/v1/messages", **headers: str) -> ClientRequest:
    return ClientRequest(
        "POST", path, {**HEADERS, **headers}, json.dumps(body).encode(), host="api.anthropic.com"
    )


async def send(engine: Engine, body: dict[str, Any], path: str = "/v1/messages") -> Reply:
    req = request(body, path)
    return await inbound_for(req.path).handle(engine, req)


async def read(reply: Reply) -> bytes:
    if reply.stream is None:
        return reply.body
    return b"".join([piece async for piece in reply.stream])


def events(data: bytes) -> list[dict[str, Any]]:
    out = [json.loads(e.data) for e in SSEParser().feed(data)]
    for e in out:
        if e["type"] == "error":
            ErrorResponse.model_validate(e, strict=True)
        elif e["type"] != "ping":
            EVENT.validate_python(e, strict=True)
    return out


def last(engine: Engine) -> Exchange:
    return engine.records[-1]  # type: ignore[attr-defined]


def ask(model: str, text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 200,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


# --- native -----------------------------------------------------------------------------------


NATIVE = ask(
    "claude",
    system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
    messages=[
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "Weather in Paris? use tool",
                    "cache_control": {"type": "ephemeral", "ttl": "5m"},
                }
            ],
        },
    ],
    tools=[{**WEATHER, "cache_control": {"type": "ephemeral"}}],
    tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    thinking={"type": "enabled", "budget_tokens": 1024},
    context_management={"edits": [{"type": "clear_tool_uses_20250919"}]},
    metadata={"user_id": "user-42"},
    service_tier="auto",
)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_native_request_arrives_with_every_field_and_header_unchanged(
    engine, claude, stream
):
    body = {**NATIVE, "stream": stream}
    reply = await send(engine, body, "/v1/messages?beta=true")
    data = await read(reply)
    got = claude.requests[-1]
    assert got.body == {**body, "model": "claude-x"}  # only the model swapped
    assert got.headers["anthropic-beta"] == HEADERS["anthropic-beta"]
    assert got.headers["anthropic-version"] == "2023-06-01"
    assert got.headers["x-api-key"] == BACKEND_KEY  # the client's key never went upstream
    assert got.query == "beta=true"
    assert reply.status == 200 and reply.native
    assert data == got.sent  # the answer came back byte for byte
    assert reply.headers["request-id"].startswith("req_fake_")
    if stream:
        assert [e["type"] for e in events(data)][:2] == ["message_start", "ping"]
    else:
        assert reply.headers["anthropic-ratelimit-requests-remaining"] == "99"
        Message.model_validate(json.loads(data), strict=True)


async def test_a_native_answer_is_logged_with_exact_tokens_and_cost(engine, claude):
    await read(await send(engine, {**NATIVE, "stream": True}))
    reported = claude.requests[-1].usage
    row = last(engine)
    assert (row.endpoint, row.deployment, row.provider) == (
        "messages",
        "anthropic/claude-x",
        "anthropic",
    )
    usage = row.usage
    assert usage is not None and usage.source == "upstream"
    assert usage.completion_tokens == reported["output_tokens"]
    assert usage.cached_tokens == reported["cache_read_input_tokens"]
    assert usage.cache_creation_tokens == reported["cache_creation_input_tokens"]
    assert usage.prompt_tokens == (
        reported["input_tokens"]
        + reported["cache_read_input_tokens"]
        + reported["cache_creation_input_tokens"]
    )
    expected = (
        Decimal(reported["input_tokens"]) * Decimal("0.000003")
        + Decimal(reported["cache_read_input_tokens"]) * Decimal("0.0000003")
        + Decimal(reported["cache_creation_input_tokens"]) * Decimal("0.00000375")
        + Decimal(reported["output_tokens"]) * Decimal("0.000015")
    )
    assert row.cost_usd == expected


async def test_a_native_stream_error_is_the_backends_own_error_event(engine, claude):
    reply = await send(engine, ask("claude", "break please", stream=True))
    data = await read(reply)
    assert data == claude.requests[-1].sent  # no error event of ours added
    assert events(data)[-1]["error"]["type"] == "overloaded_error"
    assert last(engine).status_code == 503


async def test_a_native_stream_cut_short_ends_with_an_anthropic_error_event(engine, claude):
    data = await read(await send(engine, ask("claude", "cut please", stream=True)))
    assert data.startswith(claude.requests[-1].sent)
    error = events(data)[-1]
    assert error["type"] == "error" and "ended the stream early" in error["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_backend_echoing_its_key_natively_is_redacted(engine, claude, stream):
    data = await read(await send(engine, ask("claude", "leak key", stream=stream)))
    assert BACKEND_KEY.encode() in claude.requests[-1].sent or not stream
    assert BACKEND_KEY.encode() not in data
    assert b"sk-ant-...6789" in data


async def test_a_keyless_claude_deployment_gets_the_clients_own_key_only_where_it_was_sent(
    claude,
):
    config = parse_config({"model_list": [entry("claude", "anthropic/claude-x", claude.base_url)]})
    engine = Engine(config)
    body = json.dumps(ask("claude", "my own key")).encode()
    headers = {**HEADERS, "x-api-key": BACKEND_KEY}
    try:
        at_origin = ClientRequest(
            "POST", "/v1/messages", headers, body, scheme="http", host="127.0.0.1", port=claude.port
        )
        reply = await inbound_for(at_origin.path).handle(engine, at_origin)
        assert reply.status == 200 and claude.requests[-1].headers["x-api-key"] == BACKEND_KEY
        elsewhere = ClientRequest("POST", "/v1/messages", headers, body, host="api.anthropic.com")
        reply = await inbound_for(elsewhere.path).handle(engine, elsewhere)
        assert reply.status == 401 and "x-api-key" not in claude.requests[-1].headers
        ErrorResponse.model_validate(json.loads(reply.body), strict=True)
    finally:
        await engine.close()


async def test_a_native_error_answer_is_anthropic_shaped(engine):
    reply = await send(engine, ask("claude", "fail 529"))
    assert reply.status == 503  # retried by the SDK like a 529
    error = ErrorResponse.model_validate(json.loads(reply.body), strict=True)
    assert error.error.type == "overloaded_error"


# --- translated -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt", "llama"])
@pytest.mark.parametrize("stream", [False, True])
async def test_multi_turn_tool_use_through_a_translating_backend(engine, model, stream):
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris? use tool"}]
    body = ask(model, tools=[WEATHER], stream=stream, messages=messages)
    first = await send(engine, body)
    assert first.status == 200 and not first.native
    data = await read(first)
    message = _message(data, stream)
    assert message.stop_reason == "tool_use"
    call = next(b for b in message.content if b.type == "tool_use")
    assert call.name == "get_weather" and call.input == {"city": "test"}
    messages += [
        {
            "role": "assistant",
            "content": [b.model_dump(exclude_none=True) for b in message.content],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": call.id,
                    "content": [{"type": "text", "text": "18 degrees"}],
                }
            ],
        },
    ]
    second = _message(await read(await send(engine, {**body, "messages": messages})), stream)
    assert second.stop_reason == "end_turn"
    assert second.content[0].text == "tool said: 18 degrees"
    row = last(engine)
    assert row.endpoint == "messages" and row.usage is not None
    assert second.usage.input_tokens == row.usage.prompt_tokens
    assert second.usage.output_tokens == row.usage.completion_tokens


def _message(data: bytes, stream: bool) -> Message:
    if not stream:
        return Message.model_validate(json.loads(data), strict=True)
    from anthropic.lib.streaming._messages import accumulate_event

    snapshot, bufs = None, {}
    for e in events(data):
        snapshot = accumulate_event(
            event=EVENT.validate_python(e), current_snapshot=snapshot, json_bufs=bufs
        )
    assert snapshot is not None
    return Message.model_validate(snapshot.model_dump(), strict=True)


async def test_a_backend_refusing_optional_parameters_is_asked_again_without_them(engine):
    thinking = {"type": "enabled", "budget_tokens": 2048}
    body = ask("strict", thinking=thinking, top_k=5, max_tokens=32000, metadata={"user_id": "u"})
    reply = await send(engine, body)
    assert reply.status == 200, reply.body
    row = last(engine)
    assert [a.status_code for a in row.attempts] == [400, 400, 400, 200]
    assert row.user == "u"  # still in the spend log


async def test_a_refusal_that_is_not_about_optional_parameters_comes_back(engine):
    body = ask(
        "gpt",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_nowhere", "content": "x"}
                ],
            }
        ],
    )
    reply = await send(engine, body)
    assert reply.status == 400
    assert "tool" in ErrorResponse.model_validate(json.loads(reply.body)).error.message


async def test_ollama_thinks_when_the_model_can_and_not_when_it_cannot(engine):
    thinking = {"type": "enabled", "budget_tokens": 2048}
    message = _message(await read(await send(engine, ask("thinker", thinking=thinking))), False)
    assert [b.type for b in message.content] == ["thinking", "text"]
    plain = await send(engine, ask("llama", thinking=thinking, stream=True))
    assert _message(await read(plain), True).content[0].type == "text"


async def test_a_failing_anthropic_deployment_falls_back_to_openai_through_translation(engine):
    for stream in (False, True):
        reply = await send(engine, {**NATIVE, "model": "broken", "stream": stream})
        assert reply.status == 200 and not reply.native
        message = _message(await read(reply), stream)
        assert message.content[-1].type == "tool_use"
        row = last(engine)
        assert row.fallback_used and row.deployment == "openai/gpt-4o"
        assert [a.status_code for a in row.attempts][-1] == 200


async def test_what_only_anthropic_can_serve_goes_to_anthropic_or_is_refused(engine, claude):
    server_tool = {"type": "web_search_20250305", "name": "web_search"}
    body = ask("mixed", tools=[server_tool])
    for _ in range(4):  # whichever deployment is picked first, anthropic serves it
        reply = await send(engine, body)
        assert reply.status == 200 and reply.native
    assert claude.requests[-1].body["tools"] == [server_tool]
    refused = await send(engine, {**body, "model": "gpt"})
    assert refused.status == 400
    error = ErrorResponse.model_validate(json.loads(refused.body), strict=True)
    assert "web_search" in error.error.message and error.error.type == "invalid_request_error"


# --- errors and the ledger ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status", "kind"),
    [
        (b"{not json", 400, "invalid_request_error"),
        (json.dumps(ask("gpt", max_tokens="many")).encode(), 400, "invalid_request_error"),
        (json.dumps(ask("nobody")).encode(), 404, "not_found_error"),
    ],
)
async def test_bad_requests_are_anthropic_errors_and_spend_rows(engine, raw, status, kind):
    req = ClientRequest("POST", "/v1/messages", HEADERS, raw, host="api.anthropic.com")
    reply = await inbound_for(req.path).handle(engine, req)
    assert reply.status == status
    error = ErrorResponse.model_validate(json.loads(reply.body), strict=True)
    assert error.error.type == kind
    assert last(engine).endpoint == "messages" and last(engine).status_code == status


async def test_a_cached_answer_is_a_message_too(claude, openai_fake):
    config = parse_config(
        {
            "model_list": [entry("gpt", "openai/gpt-4o", f"{openai_fake}/v1")],
            "litellm_settings": {"cache": True},
        }
    )
    engine = Engine(config)
    try:
        for stream in (False, True, False):
            reply = await send(engine, ask("gpt", "cache me", stream=stream))
            message = _message(await read(reply), stream)
            await asyncio.gather(*engine._tasks)  # the entry is written
            assert message.content[0].text == "echo: cache me"
        assert reply.headers["x-mitmroute-cache"] == "HIT"
    finally:
        await engine.close()


async def test_the_cache_keys_a_messages_request_by_what_the_client_sent(claude):
    config = parse_config(
        {
            "model_list": [
                entry("claude", "anthropic/claude-x", claude.base_url, api_key=BACKEND_KEY)
            ],
            "litellm_settings": {"cache": True},
        }
    )
    engine = Engine(config)
    editing = {"edits": [{"type": "clear_tool_uses_20250919"}]}
    try:
        first = await send(engine, ask("claude", "cache key"))
        await asyncio.gather(*engine._tasks)  # the entry is written
        again = await send(engine, ask("claude", "cache key", stream=True))
        other = await send(engine, ask("claude", "cache key", context_management=editing))
        assert first.headers["x-mitmroute-cache"] == "MISS"
        assert again.headers["x-mitmroute-cache"] == "HIT"  # streamed or not, one entry
        _message(await read(again), True)
        assert other.headers["x-mitmroute-cache"] == "MISS"  # lost in translation, not here
    finally:
        await engine.close()


async def test_a_request_nothing_of_which_translates_is_still_served_natively(engine, claude):
    pdf = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"},
    }
    reply = await send(engine, ask("mixed", messages=[{"role": "user", "content": [pdf]}]))
    assert reply.status == 200 and reply.native
    assert claude.requests[-1].body["messages"][0]["content"] == [pdf]


# --- count_tokens -----------------------------------------------------------------------------


async def test_count_tokens_asks_anthropic_when_the_group_has_it(engine, claude):
    body = {
        "model": "claude",
        "messages": [{"role": "user", "content": "count me"}],
        "tools": [WEATHER],
        "system": "be brief",
    }
    reply = await send(engine, body, "/v1/messages/count_tokens")
    assert reply.status == 200 and reply.headers["x-mitmroute-token-count"] == "anthropic"
    counted = MessageTokensCount.model_validate(json.loads(reply.body), strict=True)
    got = claude.requests[-1]
    assert got.path == "/v1/messages/count_tokens" and got.body == {**body, "model": "claude-x"}
    assert got.headers["x-api-key"] == BACKEND_KEY
    assert counted.input_tokens > 0
    row = last(engine)
    assert (row.endpoint, row.cost_usd, row.usage) == ("messages/count_tokens", 0, None)


async def test_count_tokens_counts_locally_without_anthropic(engine):
    body = {"model": "gpt", "messages": [{"role": "user", "content": "count me please"}]}
    reply = await send(engine, body, "/v1/messages/count_tokens")
    assert reply.headers["x-mitmroute-token-count"] == "estimated"
    assert MessageTokensCount.model_validate(json.loads(reply.body), strict=True).input_tokens > 3


async def test_count_tokens_falls_back_to_a_local_count_when_anthropic_fails(engine):
    body = {"model": "broken", "messages": [{"role": "user", "content": "x"}]}
    reply = await send(engine, body, "/v1/messages/count_tokens")
    assert reply.status == 200 and reply.headers["x-mitmroute-token-count"] == "estimated"
    assert last(engine).attempts[0].status_code == 401


async def test_count_tokens_returns_anthropics_complaint_about_the_request(engine):
    body = {"model": "claude", "messages": [{"role": "assistant", "content": "x"}]}
    reply = await send(engine, body, "/v1/messages/count_tokens")
    assert reply.status == 400
    ErrorResponse.model_validate(json.loads(reply.body), strict=True)

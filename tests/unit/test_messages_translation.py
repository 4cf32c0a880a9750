"""Anthropic Messages in, OpenAI chat to the engine and back: requests, answers, streams and
errors, with everything the proxy writes checked against the anthropic SDK's types (strict)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat.completion_create_params import (
    CompletionCreateParamsNonStreaming,
    CompletionCreateParamsStreaming,
)
from pydantic import TypeAdapter

from mitmroute.errors import ProxyError
from mitmroute.exchange import Usage
from mitmroute.inbound.anthropic.request import effort_for_budget, translate
from mitmroute.inbound.anthropic.response import render_error, to_message
from mitmroute.inbound.anthropic.stream import MessagesStream
from mitmroute.streaming.sse import DONE, SSEParser, encode, encode_error

EVENT = TypeAdapter(RawMessageStreamEvent)
CHAT = {
    False: TypeAdapter(CompletionCreateParamsNonStreaming),
    True: TypeAdapter(CompletionCreateParamsStreaming),
}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"name": "get_weather", "description": "Weather now", "input_schema": CITY}
PNG = "iVBORw0KGgo="


def base(**extra: Any) -> dict[str, Any]:
    return {
        "model": "claude",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


# --- requests ---------------------------------------------------------------------------------


CONVERSATION = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "<reminder>", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "What is in this picture, and the weather in Paris?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
        ],
    },
    {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "They want weather.", "signature": "sig"},
            {"type": "text", "text": "Let me check."},
            {
                "type": "tool_use",
                "id": "toolu_1",
                "name": "get_weather",
                "input": {"city": "Paris"},
            },
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Lyon"}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
            {
                "type": "tool_result",
                "tool_use_id": "toolu_2",
                "is_error": True,
                "content": [
                    {"type": "text", "text": "no station"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                ],
            },
            {"type": "text", "text": "Thanks!"},
        ],
    },
]


def test_a_full_conversation_becomes_a_chat_request_the_openai_sdk_accepts():
    body = base(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        messages=CONVERSATION,
        tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["END"],
        temperature=0.2,
        top_p=0.9,
        top_k=5,
        metadata={"user_id": "u-1"},
        thinking={"type": "enabled", "budget_tokens": 8000},
        stream=True,
        context_management={"edits": [{"type": "clear_tool_uses_20250919"}]},
    )
    t = translate(body)
    chat = t.chat
    CHAT[True].validate_python(chat)
    assert t.untranslatable == () and t.stream and t.stop_sequences == ("END",)
    assert set(t.optional) == {"reasoning_effort", "top_k", "max_completion_tokens", "user"}
    assert chat["messages"][0] == {"role": "system", "content": "Be brief.\n\nBe kind."}
    user = chat["messages"][1]
    assert user["content"][0] == {"type": "text", "text": "<reminder>"}
    assert user["content"][2]["image_url"]["url"] == f"data:image/png;base64,{PNG}"
    assert user["content"][3]["image_url"]["url"] == "https://example.com/a.jpg"
    assistant = chat["messages"][2]
    assert assistant["content"] == "Let me check."  # thinking dropped
    assert [json.loads(c["function"]["arguments"]) for c in assistant["tool_calls"]] == [
        {"city": "Paris"},
        {"city": "Lyon"},
    ]
    tool1, tool2, after = chat["messages"][3:6]
    assert tool1 == {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"}
    assert tool2 == {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no station"}
    assert after["role"] == "user" and after["content"][1]["type"] == "image_url"
    assert after["content"][-1] == {"type": "text", "text": "Thanks!"}
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False
    assert chat["tools"][0]["function"] == {
        "name": "get_weather",
        "description": "Weather now",
        "parameters": CITY,
    }
    assert (chat["stop"], chat["temperature"], chat["top_p"], chat["top_k"]) == (
        ["END"],
        0.2,
        0.9,
        5,
    )
    assert chat["user"] == "u-1" and chat["reasoning_effort"] == "medium"
    assert chat["max_completion_tokens"] == 100
    assert chat["stream_options"] == {"include_usage": True}
    assert "context_management" not in chat


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        (
            {"type": "tool", "name": "get_weather"},
            {"type": "function", "function": {"name": "get_weather"}},
        ),
    ],
)
def test_tool_choice_maps_to_openai(choice, expected):
    chat = translate(base(tools=[WEATHER], tool_choice=choice)).chat
    CHAT[False].validate_python(chat)
    assert chat["tool_choice"] == expected


def test_a_tool_choice_without_tools_is_not_sent():
    assert "tool_choice" not in translate(base(tool_choice={"type": "auto"})).chat


@pytest.mark.parametrize(("budget", "effort"), [(1024, "low"), (8000, "medium"), (32000, "high")])
def test_thinking_budget_becomes_reasoning_effort(budget, effort):
    assert effort_for_budget(budget) == effort
    thinking = {"type": "enabled", "budget_tokens": budget}
    assert translate(base(thinking=thinking)).chat["reasoning_effort"] == effort
    assert "reasoning_effort" not in translate(base(thinking={"type": "disabled"})).chat


def test_output_config_becomes_response_format_and_effort():
    config = {"effort": "high", "format": {"type": "json_schema", "schema": CITY}}
    chat = translate(base(output_config=config)).chat
    CHAT[False].validate_python(chat)
    assert chat["reasoning_effort"] == "high"
    assert chat["response_format"]["json_schema"]["schema"] == CITY


@pytest.mark.parametrize(
    ("extra", "what"),
    [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search"),
        ({"container": "container_1"}, "container"),
        ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "document",
                                "source": {
                                    "type": "base64",
                                    "media_type": "application/pdf",
                                    "data": "JVBE",
                                },
                            }
                        ],
                    }
                ]
            },
            "documents",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "search_result", "source": "s", "title": "t", "content": []}
                        ],
                    }
                ]
            },
            "search_result",
        ),
    ],
)
def test_what_only_messages_can_say_is_listed_not_refused(extra, what):
    t = translate(base(**extra))
    assert any(what in u for u in t.untranslatable), t.untranslatable


def test_a_text_document_becomes_text():
    doc = {
        "type": "document",
        "title": "Notes",
        "source": {"type": "text", "media_type": "text/plain", "data": "buy milk"},
    }
    chat = translate(base(messages=[{"role": "user", "content": [doc]}])).chat
    assert chat["messages"] == [{"role": "user", "content": "Notes\n\nbuy milk"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}, "model"),
        (base(max_tokens=None), "max_tokens"),
        (base(max_tokens="10"), "max_tokens"),
        (base(max_tokens=-1), "max_tokens"),
        (base(messages=[]), "messages"),
        (base(messages=[{"role": "tool", "content": "x"}]), "messages.0.role"),
        (base(messages=[{"role": "user", "content": 3}]), "messages.0.content"),
        (
            base(messages=[{"role": "user", "content": [{"text": "x"}]}]),
            "messages.0.content.0.type",
        ),
        (
            base(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]),
            "messages.0.content.0.text",
        ),
        (
            base(
                messages=[
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "x"}],
                    }
                ]
            ),
            "messages.0.content.0.input",
        ),
        (base(system=3), "system"),
        (base(system=[{"type": "image"}]), "system.0.type"),
        (base(temperature=1.5), "temperature"),
        (base(top_p="high"), "top_p"),
        (base(top_k=1.5), "top_k"),
        (base(stream="yes"), "stream"),
        (base(stop_sequences="END"), "stop_sequences"),
        (base(metadata={"user_id": 7}), "metadata.user_id"),
        (base(tools=[{"name": "f"}]), "tools.0.input_schema"),
        (base(tools=[WEATHER], tool_choice={"type": "sometimes"}), "tool_choice.type"),
        (base(tools=[WEATHER], tool_choice={"type": "tool"}), "tool_choice.name"),
        (base(thinking={"type": "enabled"}), "thinking.budget_tokens"),
        (base(thinking="on"), "thinking"),
    ],
)
def test_a_field_of_the_wrong_shape_is_a_400_naming_it(body, param):
    with pytest.raises(ProxyError) as info:
        translate(body)
    error = info.value
    assert (error.status, error.param) == (400, param)
    rendered = json.loads(render_error(error))
    ErrorResponse.model_validate(rendered, strict=True)
    assert rendered["error"]["type"] == "invalid_request_error"
    assert rendered["error"]["message"].startswith(param)


def test_count_tokens_needs_no_max_tokens():
    body = base()
    del body["max_tokens"]
    assert "max_completion_tokens" not in translate(body, count_only=True).chat


# --- answers ----------------------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str = "stop", **choice: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", **message},
                "finish_reason": finish,
                **choice,
            }
        ],
    }


def test_an_answer_with_reasoning_text_and_tool_calls_is_a_strict_message():
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    answer = completion(
        {"content": "Checking.", "reasoning_content": "hmm", "tool_calls": [call]}, "tool_calls"
    )
    usage = Usage(prompt_tokens=120, completion_tokens=30, cached_tokens=100)
    message = Message.model_validate(to_message(answer, usage, model="claude"), strict=True)
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[2].input == {"city": "Paris"}
    assert message.id == "msg_abc" and message.model == "gpt-4o"
    assert message.stop_reason == "tool_use"
    assert (
        message.usage.input_tokens,
        message.usage.cache_read_input_tokens,
        message.usage.output_tokens,
    ) == (20, 100, 30)


@pytest.mark.parametrize(
    ("finish", "reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
    ],
)
def test_finish_reasons_become_stop_reasons(finish, reason):
    message = to_message(completion({"content": "x"}, finish), None, model="m")
    assert Message.model_validate(message, strict=True).stop_reason == reason


def test_a_stop_sequence_the_backend_names_is_reported():
    answer = completion({"content": "one two"}, "stop", stop_reason="END")
    message = to_message(answer, None, model="m", stop_sequences=("END",))
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "END")


def test_tool_arguments_that_are_not_an_object_become_an_empty_input():
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1"}}
    message = to_message(completion({"content": None, "tool_calls": [call]}), None, model="m")
    assert Message.model_validate(message, strict=True).content[0].input == {}


# --- streams ----------------------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return encode(
        {
            "id": "chatcmpl-s1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o",
            "choices": choices,
            **extra,
        }
    )


def call_delta(arguments: str, **head: Any) -> dict[str, Any]:
    return {
        "tool_calls": [
            {
                "index": head.pop("index", 0),
                **head,
                "function": {"arguments": arguments, **head.pop("fn", {})},
            }
        ]
    }


USAGE = {
    "prompt_tokens": 50,
    "completion_tokens": 12,
    "total_tokens": 62,
    "prompt_tokens_details": {"cached_tokens": 40},
}
STREAM = b"".join(
    [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "Think"}),
        chunk({"reasoning_content": "ing."}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo."}),
        chunk(call_delta("", id="call_a", type="function", fn={"name": "get_weather"})),
        chunk(call_delta('{"ci')),
        chunk(call_delta('ty": "Pa')),
        chunk(call_delta('ris"}')),
        chunk(call_delta('{"city"', index=1, id="call_b", fn={"name": "get_weather"})),
        chunk(call_delta(': "Lyon"}', index=1)),
        chunk({}, "tool_calls"),
        chunk(None, usage=USAGE),
        DONE,
    ]
)


def translate_stream(data: bytes, pieces: list[bytes] | None = None, usage: Usage | None = None):
    """The Messages events for chat SSE `data` fed in `pieces`, each checked strictly."""
    stream = MessagesStream("claude")
    out = b"".join(stream.feed(p) for p in pieces or [data]) + stream.close(usage)
    events = [json.loads(e.data) for e in SSEParser().feed(out)]
    for raw in SSEParser().feed(out):
        assert raw.event == json.loads(raw.data)["type"]
    return events


def accumulate(events: list[dict[str, Any]]) -> Message:
    snapshot, bufs = None, {}
    for e in events:
        typed = EVENT.validate_python(e, strict=True)
        snapshot = accumulate_event(event=typed, current_snapshot=snapshot, json_bufs=bufs)
    assert snapshot is not None
    return Message.model_validate(snapshot.model_dump(), strict=True)


def splits(data: bytes, n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), n))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def test_a_stream_becomes_the_real_messages_event_sequence():
    events = translate_stream(STREAM)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use", "tool_use"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 4
    deltas = [e["delta"]["type"] for e in events if e["type"] == "content_block_delta"]
    assert deltas.count("input_json_delta") == 5 and deltas.count("thinking_delta") == 2
    message = accumulate(events)
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert message.content[0].thinking == "Thinking." and message.content[1].text == "Hello."
    assert [b.input for b in message.content[2:]] == [{"city": "Paris"}, {"city": "Lyon"}]
    assert message.stop_reason == "tool_use"
    assert (
        message.usage.input_tokens,
        message.usage.cache_read_input_tokens,
        message.usage.output_tokens,
    ) == (10, 40, 12)


@pytest.mark.parametrize("seed", range(20))
def test_any_split_of_the_stream_gives_the_same_events(seed):
    whole = translate_stream(STREAM)
    pieces = splits(STREAM, 1 + seed % 40, seed)
    assert translate_stream(STREAM, pieces) == whole


def test_every_event_is_written_as_soon_as_its_chunk_arrives():
    stream = MessagesStream("claude")
    first = stream.feed(chunk({"role": "assistant", "content": ""}))
    assert b"message_start" in first
    assert b"text_delta" in stream.feed(chunk({"content": "Hi"}))
    assert stream.feed(chunk({}, "stop")) == b""  # the stop reason waits for the usage


def test_the_final_usage_is_the_exchanges():
    usage = Usage(prompt_tokens=7, completion_tokens=3, source="estimated")
    data = chunk({"role": "assistant", "content": "x"}) + chunk({}, "stop") + DONE
    message = accumulate(translate_stream(data, usage=usage))
    assert (message.usage.input_tokens, message.usage.output_tokens) == (7, 3)


def test_a_stop_sequence_hit_in_a_stream():
    data = chunk({"role": "assistant", "content": "x"}) + chunk({}, "stop") + DONE
    stream = MessagesStream("claude", ("END",))
    vllm = encode(
        {
            "id": "c",
            "model": "m",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "END"}],
        }
    )
    out = stream.feed(chunk({"role": "assistant", "content": "x"}) + vllm + DONE)
    out += stream.close(None)
    message = accumulate([json.loads(e.data) for e in SSEParser().feed(out)])
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "END")
    assert accumulate(translate_stream(data)).stop_reason == "end_turn"


def test_an_error_mid_stream_becomes_an_anthropic_error_event():
    data = chunk({"role": "assistant", "content": "par"}) + encode_error(
        "gpt-4o stalled mid-stream", code="upstream_stream_stalled"
    )
    events = translate_stream(data)
    assert [e["type"] for e in events][-1] == "error"
    error = ErrorResponse.model_validate(events[-1], strict=True)
    assert error.error.type == "timeout_error" and "stalled" in error.error.message
    assert "message_stop" not in [e["type"] for e in events]


def test_a_stream_that_ends_without_done_ends_with_an_error():
    events = translate_stream(chunk({"role": "assistant", "content": "x"}))
    ErrorResponse.model_validate(events[-1], strict=True)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (ProxyError(400, "bad", "invalid_request_error"), 400, "invalid_request_error"),
        (ProxyError(401, "who", "invalid_request_error"), 401, "authentication_error"),
        (ProxyError(403, "no", "permission_error"), 403, "permission_error"),
        (ProxyError(404, "gone", "invalid_request_error"), 404, "not_found_error"),
        (ProxyError(413, "big", "invalid_request_error"), 413, "invalid_request_error"),
        (ProxyError(429, "slow down", "rate_limit_exceeded"), 429, "rate_limit_error"),
        (ProxyError(500, "oops", "server_error"), 500, "api_error"),
        (ProxyError(502, "bad gateway", "server_error"), 502, "api_error"),
        (ProxyError(503, "nobody", "server_error"), 503, "overloaded_error"),
        (ProxyError(502, "Overloaded", "overloaded_error"), 502, "overloaded_error"),
        (ProxyError(504, "late", "server_error"), 504, "timeout_error"),
    ],
)
def test_errors_keep_a_status_the_sdk_retries_sensibly(error, status, kind):
    assert error.status == status
    body = ErrorResponse.model_validate(json.loads(render_error(error)), strict=True)
    assert body.error.type == kind and body.error.message == error.message


# --- any body -----------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-2, 2) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)
KINDS = st.sampled_from(
    [
        "text",
        "image",
        "tool_use",
        "tool_result",
        "thinking",
        "document",
        "redacted_thinking",
        "server_tool_use",
        None,
    ]
)
BLOCK = st.fixed_dictionaries(
    {"type": KINDS},
    optional={
        "text": JSON,
        "source": JSON,
        "id": JSON,
        "name": JSON,
        "input": JSON,
        "tool_use_id": JSON,
        "content": JSON,
        "is_error": JSON,
        "thinking": JSON,
    },
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", 3]),
        "content": st.text(max_size=5) | st.lists(BLOCK, max_size=3) | JSON,
    }
)
BODY = st.fixed_dictionaries(
    {"model": st.just("m") | JSON, "messages": st.lists(MESSAGE, max_size=3) | JSON},
    optional={
        "max_tokens": st.integers(-1, 5) | JSON,
        "system": JSON | st.lists(BLOCK),
        "tools": JSON | st.lists(st.fixed_dictionaries({"name": JSON, "input_schema": JSON})),
        "tool_choice": JSON,
        "thinking": JSON,
        "stop_sequences": JSON,
        "metadata": JSON,
        "temperature": JSON,
        "top_k": JSON,
        "stream": JSON,
        "output_config": JSON,
    },
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(BODY)
def test_any_body_is_translated_or_a_400_naming_a_field(body):
    try:
        chat = translate(body).chat
    except ProxyError as e:
        assert e.status == 400 and e.param
        ErrorResponse.model_validate(json.loads(render_error(e)), strict=True)
        return
    assert chat["messages"] and isinstance(chat["model"], str)
    json.dumps(chat)


def test_a_system_turn_mid_conversation_becomes_a_system_message():
    """Claude Code sends `role: system` turns after the user's (checked with its 2.1.332)."""
    chat = translate(
        {
            "model": "m",
            "max_tokens": 10,
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
            ],
        }
    ).chat
    assert chat["messages"][-1] == {"role": "system", "content": "be brief"}

"""OpenAI chat <-> Anthropic Messages translation, checked against both official SDKs' types."""

from __future__ import annotations

import json
import random
from itertools import pairwise
from typing import Any

import pytest
from anthropic.types import (
    DocumentBlockParam,
    ImageBlockParam,
    Message,
    TextBlockParam,
    ToolChoiceParam,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlockParam,
)
from anthropic.types.message_create_params import (
    MessageCreateParamsBase,
    MessageCreateParamsNonStreaming,
    MessageCreateParamsStreaming,
)
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from mitmroute.config import Deployment
from mitmroute.errors import ProxyError
from mitmroute.providers.anthropic import (
    ANTHROPIC_VERSION,
    AnthropicProvider,
    default_max_tokens,
)
from mitmroute.providers.base import CHAT
from mitmroute.streaming.sse import ChunkAssembler

PROVIDER = AnthropicProvider()
# Adapters live at module level: pydantic validates `Iterable` fields lazily, through them.
ADAPTERS = {
    False: TypeAdapter(MessageCreateParamsNonStreaming),
    True: TypeAdapter(MessageCreateParamsStreaming),
}
BLOCKS = {
    "text": TextBlockParam, "image": ImageBlockParam, "document": DocumentBlockParam,
    "tool_use": ToolUseBlockParam, "tool_result": ToolResultBlockParam,
}  # fmt: skip
BLOCK_ADAPTERS = {kind: TypeAdapter(td) for kind, td in BLOCKS.items()}
TOOL_ADAPTER = TypeAdapter(ToolParam)
CHOICE_ADAPTER = TypeAdapter(ToolChoiceParam)
# The SDK models API version 2026-10-21, which dropped sampling; 2023-06-01 still takes them.
TOP_LEVEL = (
    MessageCreateParamsBase.__required_keys__
    | MessageCreateParamsBase.__optional_keys__
    | {"stream", "temperature", "top_p", "top_k"}
)
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"name": "get_weather", "description": "Weather", "parameters": CITY}
TOOLS = [{"type": "function", "function": WEATHER}]
PNG = "data:image/png;base64,iVBORw0KGgo="


def deployment(model: str = "claude-sonnet-4-20250514", **kw: Any) -> Deployment:
    return Deployment(model_name="claude", provider="anthropic", model=model,
                      litellm_model=f"anthropic/{model}", api_base="https://api.anthropic.com",
                      **kw)  # fmt: skip


def _force(value: Any) -> None:
    """Consume the lazily validated iterables pydantic returns, so every element is checked."""
    if isinstance(value, dict):
        for v in value.values():
            _force(v)
    elif isinstance(value, list | tuple):
        for v in value:
            _force(v)
    elif hasattr(value, "__next__"):
        _force(list(value))


def _keys(td: Any) -> set[str]:
    return set(td.__required_keys__ | td.__optional_keys__)


def _check_block(block: dict[str, Any]) -> None:
    assert set(block) <= _keys(BLOCKS[block["type"]]), block
    _force(BLOCK_ADAPTERS[block["type"]].validate_python(block))
    if block["type"] == "tool_result" and isinstance(block["content"], list):
        for inner in block["content"]:
            _check_block(inner)


def check_request(payload: dict[str, Any]) -> None:
    """`payload` is a valid Messages API request (no unknown keys anywhere we generate)."""
    assert set(payload) <= TOP_LEVEL, set(payload) - TOP_LEVEL
    _force(ADAPTERS[bool(payload.get("stream"))].validate_python(payload))
    roles = [m["role"] for m in payload["messages"]]
    assert roles[0] == "user" and all(a != b for a, b in pairwise(roles))
    for msg in payload["messages"]:
        assert set(msg) == {"role", "content"}
        for block in msg["content"]:
            _check_block(block)
    for block in payload["system"] if isinstance(payload.get("system"), list) else []:
        _check_block(block)
    for tool in payload.get("tools", []):
        assert set(tool) <= _keys(ToolParam)
        _force(TOOL_ADAPTER.validate_python(tool))
    if "tool_choice" in payload:
        CHOICE_ADAPTER.validate_python(payload["tool_choice"])


def build(body: dict[str, Any], *, drop: bool = False, **dep: Any) -> dict[str, Any]:
    body = {"model": "gpt-4o", **body}
    call = PROVIDER.build(CHAT, body, deployment(**dep), drop_params=drop)
    payload = json.loads(call.body)
    check_request(payload)
    return payload


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


# --- requests ---------------------------------------------------------------------------------


def test_call_url_headers_and_model() -> None:
    dep = deployment(api_key="sk-ant", extra_headers={"anthropic-beta": "x"})
    call = PROVIDER.build(CHAT, {"model": "gpt-4o", "messages": [user("hi")]}, dep,
                          drop_params=False)  # fmt: skip
    assert (call.method, call.url) == ("POST", "https://api.anthropic.com/v1/messages")
    assert call.headers == {"x-api-key": "sk-ant", "anthropic-version": ANTHROPIC_VERSION,
                            "content-type": "application/json", "anthropic-beta": "x"}  # fmt: skip
    payload = json.loads(call.body)
    assert payload["model"] == "claude-sonnet-4-20250514"
    assert payload["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    no_key = PROVIDER.build(CHAT, {"messages": [user("hi")]}, deployment(), drop_params=False)
    assert "x-api-key" not in no_key.headers


@pytest.mark.parametrize(("model", "expected"), [
    ("claude-opus-4-20250514", 32000), ("claude-opus-4-1", 32000), ("claude-sonnet-4-5", 64000),
    ("claude-3-5-haiku-latest", 8192), ("claude-opus-4-5-20251101", 64000), ("mystery", 4096),
])  # fmt: skip
def test_default_max_tokens(model: str, expected: int) -> None:
    assert default_max_tokens(model) == expected
    assert build({"messages": [user("hi")]}, model=model)["max_tokens"] == expected


def test_max_tokens_and_sampling_params() -> None:
    payload = build({"messages": [user("hi")], "max_completion_tokens": 10, "temperature": 1.7,
                     "top_p": 0.9, "stop": "END", "user": "u-1", "metadata": {"a": "b"},
                     "cache": {"no-cache": True}, "stream": True,
                     "stream_options": {"include_usage": True}})  # fmt: skip
    assert payload["max_tokens"] == 10 and payload["temperature"] == 1.0
    assert payload["top_p"] == 0.9 and payload["stop_sequences"] == ["END"]
    assert payload["metadata"] == {"user_id": "u-1"} and payload["stream"] is True
    assert "stream_options" not in payload and "cache" not in payload
    low = build({"messages": [user("hi")], "max_tokens": 7, "temperature": -1, "stop": ["a", " "]})
    assert low["max_tokens"] == 7 and low["temperature"] == 0.0 and low["stop_sequences"] == ["a"]


@pytest.mark.parametrize(("param", "value"), [
    ("temperature", "hot"), ("max_tokens", 0), ("max_completion_tokens", 1.5), ("stop", 3),
])  # fmt: skip
def test_bad_values_are_a_400(param: str, value: Any) -> None:
    with pytest.raises(ProxyError) as e:
        build({"messages": [user("hi")], param: value})
    assert (e.value.status, e.value.param) == (400, param)


def test_system_and_developer_messages_keep_order() -> None:
    two = [{"type": "text", "text": "two"}]
    payload = build({"messages": [{"role": "system", "content": "one"}, user("hi"),
                                  {"role": "developer", "content": two}]})  # fmt: skip
    assert payload["system"] == "one\n\ntwo"
    cached = build({"messages": [
        {"role": "system", "content": [{"type": "text", "text": "big",
                                        "cache_control": {"type": "ephemeral"}}]},
        {"role": "developer", "content": "small"}, user("hi")]})  # fmt: skip
    assert cached["system"] == [
        {"type": "text", "text": "big", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "small"},
    ]


def test_images_and_cache_control_on_parts() -> None:
    parts = [
        {"type": "text", "text": "what is this?", "cache_control": {"type": "ephemeral"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "image_url", "image_url": {"url": PNG, "detail": "high"}},
    ]
    content = build({"messages": [{"role": "user", "content": parts}]})["messages"][0]["content"]
    assert content == [
        {"type": "text", "text": "what is this?", "cache_control": {"type": "ephemeral"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}},
    ]  # fmt: skip
    for url in ("data:image/bmp;base64,AAAA", "data:image/png,plain", "ftp://x/y.png"):
        bad = [{"type": "image_url", "image_url": {"url": url}}]
        with pytest.raises(ProxyError) as e:
            build({"messages": [{"role": "user", "content": bad}]})
        assert e.value.status == 400


def test_multi_turn_tool_use() -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    call2 = {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}  # fmt: skip
    payload = build({"tools": TOOLS, "messages": [
        user("weather?"),
        {"role": "assistant", "content": "Checking.", "tool_calls": [call, call2]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2",
         "content": [{"type": "text", "text": "rain", "cache_control": {"type": "ephemeral"}}]},
        user("thanks"),
    ]})  # fmt: skip
    assistant, results = payload["messages"][1], payload["messages"][2]
    assert [m["role"] for m in payload["messages"]] == ["user", "assistant", "user"]
    assert assistant["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}},
    ]
    assert [b["type"] for b in results["content"]] == ["tool_result", "tool_result", "text"]
    assert results["content"][0] == {"type": "tool_result", "tool_use_id": "call_1",
                                     "content": "sunny"}  # fmt: skip
    assert results["content"][1]["content"][0]["cache_control"] == {"type": "ephemeral"}
    assert payload["tools"] == [{"name": "get_weather", "description": "Weather",
                                 "input_schema": TOOLS[0]["function"]["parameters"]}]  # fmt: skip


def test_tool_ids_are_made_valid_for_anthropic() -> None:
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"}}  # fmt: skip
    result = {"role": "tool", "tool_call_id": call["id"], "content": "ok"}
    payload = build({"messages": [user("x"), {"role": "assistant", "tool_calls": [call]}, result]})
    use, result = payload["messages"][1]["content"][0], payload["messages"][2]["content"][0]
    assert use["id"] == result["tool_use_id"] == "functions_get_weather_0"


def test_invalid_tool_arguments_are_a_400() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{nope"}}
    with pytest.raises(ProxyError) as e:
        build({"messages": [user("x"), {"role": "assistant", "tool_calls": [call]}]})
    assert e.value.status == 400 and "arguments" in (e.value.param or "")


def test_roles_are_merged_and_start_with_user() -> None:
    payload = build({"messages": [
        {"role": "assistant", "content": "Hi, how can I help?"}, user("a"), user("b"),
        {"role": "assistant", "content": "The answer is "},
    ]})  # fmt: skip
    msgs = payload["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert msgs[3]["content"] == [{"type": "text", "text": "The answer is"}]  # no trailing space
    only_system = build({"messages": [{"role": "system", "content": "s"}]})
    assert only_system["messages"][0]["role"] == "user"


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", {"type": "auto"}), ("required", {"type": "any"}), ("none", {"type": "none"}),
    ({"type": "function", "function": {"name": "get_weather"}},
     {"type": "tool", "name": "get_weather"}),
])  # fmt: skip
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    payload = build({"messages": [user("x")], "tools": TOOLS, "tool_choice": choice})
    assert payload["tool_choice"] == expected


def test_parallel_tool_calls_false() -> None:
    payload = build({"messages": [user("x")], "tools": TOOLS, "parallel_tool_calls": False})
    assert payload["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    forced = build({"messages": [user("x")], "tools": TOOLS, "tool_choice": "required",
                    "parallel_tool_calls": False})  # fmt: skip
    assert forced["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


def test_legacy_functions() -> None:
    fn = TOOLS[0]["function"]
    payload = build({"functions": [fn], "function_call": {"name": "get_weather"}, "messages": [
        user("x"),
        {"role": "assistant", "function_call": {"name": "get_weather", "arguments": "{}"}},
        {"role": "function", "name": "get_weather", "content": "sunny"},
    ]})  # fmt: skip
    assert payload["tools"][0]["name"] == "get_weather"
    assert payload["tool_choice"] == {"type": "tool", "name": "get_weather"}
    use, result = payload["messages"][1]["content"][0], payload["messages"][2]["content"][0]
    assert result["tool_use_id"] == use["id"] and result["content"] == "sunny"


def test_tool_cache_control_passes_through() -> None:
    tools = [{**TOOLS[0], "cache_control": {"type": "ephemeral"}}]
    payload = build({"messages": [user("x")], "tools": tools})
    assert payload["tools"][0]["cache_control"] == {"type": "ephemeral"}


@pytest.mark.parametrize(("param", "value"), [
    ("n", 2), ("logprobs", True), ("top_logprobs", 3), ("logit_bias", {"1": 5}),
    ("presence_penalty", 0.5), ("frequency_penalty", 1), ("seed", 7),
    ("response_format", {"type": "json_object"}), ("reasoning_effort", "low"),
    ("totally_unknown", 1),
])  # fmt: skip
def test_unsupported_params(param: str, value: Any) -> None:
    body = {"messages": [user("x")], param: value}
    with pytest.raises(ProxyError) as e:
        build(body)
    assert (e.value.status, e.value.param) == (400, param) and param in e.value.message
    assert param not in build(body, drop=True)


def test_neutral_values_are_accepted() -> None:
    payload = build({"messages": [user("x")], "n": 1, "logprobs": False, "presence_penalty": 0,
                     "frequency_penalty": 0, "seed": None,
                     "response_format": {"type": "text"}})  # fmt: skip
    assert set(payload) == {"model", "max_tokens", "messages"}


def test_json_schema_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "A", "schema": schema, "strict": True}}
    payload = build({"messages": [user("x")], "response_format": fmt})
    assert payload["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


# --- responses --------------------------------------------------------------------------------


def message(content: list[dict[str, Any]], stop: str = "end_turn", **usage: int) -> bytes:
    """A real-shaped Anthropic Message (validated by the SDK) as bytes."""
    body = {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x",
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5, **usage}}  # fmt: skip
    Message.model_validate(body)
    return json.dumps(body).encode()


def test_parse_text_tools_thinking_and_usage() -> None:
    raw = message([
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        {"type": "text", "text": "Let me check. "},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
        {"type": "text", "text": "Done."},
    ], "tool_use", cache_creation_input_tokens=100, cache_read_input_tokens=1000)  # fmt: skip
    body = PROVIDER.parse(CHAT, raw, deployment())
    completion = ChatCompletion.model_validate(body)
    msg = completion.choices[0].message
    assert msg.content == "Let me check. Done." and body["choices"][0]["message"][
        "reasoning_content"] == "hmm"  # fmt: skip
    assert msg.tool_calls and msg.tool_calls[0].id == "toolu_1"
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Oslo"}
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.model == "claude-x" and completion.id == "chatcmpl-msg_01"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (1110, 5)
    assert completion.usage.total_tokens == 1115
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 1000,
                                                      "cache_creation_tokens": 100}  # fmt: skip


def test_parse_only_tools_gives_null_content() -> None:
    raw = message([{"type": "tool_use", "id": "t", "name": "f", "input": {}}], "tool_use")
    completion = ChatCompletion.model_validate(PROVIDER.parse(CHAT, raw, deployment()))
    assert completion.choices[0].message.content is None


@pytest.mark.parametrize(("stop", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter"), ("pause_turn", "stop"),
])  # fmt: skip
def test_stop_reasons(stop: str, finish: str) -> None:
    raw = message([{"type": "text", "text": "x"}], stop)
    assert PROVIDER.parse(CHAT, raw, deployment())["choices"][0]["finish_reason"] == finish


def test_parse_garbage_is_a_retryable_502() -> None:
    with pytest.raises(ProxyError) as e:
        PROVIDER.parse(CHAT, b"<html>", deployment())
    assert e.value.status == 502 and e.value.retryable


# --- streams ----------------------------------------------------------------------------------


def sse(kind: str, **data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def tool_start(index: int, tool_id: str) -> bytes:
    block = {"type": "tool_use", "id": tool_id, "name": "get_weather", "input": {}}
    return sse("content_block_start", index=index, content_block=block)


def json_delta(index: int, part: str) -> bytes:
    return sse("content_block_delta", index=index,
               delta={"type": "input_json_delta", "partial_json": part})  # fmt: skip


START = {"id": "msg_s", "type": "message", "role": "assistant", "model": "claude-x",
         "content": [], "stop_reason": None, "stop_sequence": None,
         "usage": {"input_tokens": 20, "cache_read_input_tokens": 80,
                   "cache_creation_input_tokens": 0, "output_tokens": 1}}  # fmt: skip
STREAM = b"".join([
    sse("message_start", message=START), sse("ping"),
    sse("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
    sse("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "hm"}),
    sse("content_block_stop", index=0),
    sse("content_block_start", index=1, content_block={"type": "text", "text": ""}),
    sse("content_block_delta", index=1, delta={"type": "text_delta", "text": "Checking "}),
    sse("content_block_delta", index=1, delta={"type": "text_delta", "text": "both."}),
    sse("content_block_stop", index=1),
    tool_start(2, "toolu_a"), json_delta(2, ""), json_delta(2, '{"city": '),
    json_delta(2, '"Oslo"}'), sse("content_block_stop", index=2),
    tool_start(3, "toolu_b"), json_delta(3, '{"city": "Rome"}'),
    sse("content_block_stop", index=3),
    sse("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None},
        usage={"output_tokens": 42}),
    sse("message_stop"),
])  # fmt: skip


def run(data: bytes, splits: list[int]) -> tuple[list[dict[str, Any]], Any]:
    translator = PROVIDER.stream(CHAT, deployment())
    chunks, last = [], 0
    for cut in [*splits, len(data)]:
        chunks += translator.feed(data[last:cut])
        last = cut
    return chunks + translator.finish(), translator


def test_stream_translates_text_tools_and_usage() -> None:
    chunks, translator = run(STREAM, [])
    assert translator.done
    state = ChatCompletionStreamState()
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == "chatcmpl-msg_s"
        assert {"created", "model", "choices"} <= set(chunk) and chunk["model"] == "claude-x"
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert any(c["choices"] and c["choices"][0]["delta"].get("reasoning_content") == "hm"
               for c in chunks)  # fmt: skip
    final = state.get_final_completion()
    msg = final.choices[0].message
    assert msg.content == "Checking both." and final.choices[0].finish_reason == "tool_calls"
    assert [(t.id, json.loads(t.function.arguments)) for t in msg.tool_calls or []] == [
        ("toolu_a", {"city": "Oslo"}), ("toolu_b", {"city": "Rome"})]  # fmt: skip
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 100, "completion_tokens": 42, "total_tokens": 142,
        "prompt_tokens_details": {"cached_tokens": 80}}  # fmt: skip
    assembler = ChunkAssembler()
    for chunk in chunks:
        assembler.add(chunk)
    assert assembler.usage is not None and assembler.usage.cached_tokens == 80


def _strip(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in c.items() if k != "created"} for c in chunks]


def test_stream_survives_arbitrary_splits() -> None:
    whole = _strip(run(STREAM, [])[0])
    assert _strip(run(STREAM, list(range(1, len(STREAM))))[0]) == whole  # byte by byte
    rng = random.Random(7)
    for _ in range(20):
        splits = sorted(rng.sample(range(1, len(STREAM)), 12))
        assert _strip(run(STREAM, splits)[0]) == whole
    crlf = STREAM.replace(b"\n", b"\r\n")
    assert _strip(run(crlf, [5, 300, 301])[0]) == whole


def test_stream_not_done_before_message_stop() -> None:
    chunks, translator = run(STREAM[: STREAM.index(b"event: message_stop")], [])
    assert not translator.done and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_error_event_mid_stream() -> None:
    error = sse("error", error={"type": "overloaded_error", "message": "Overloaded"})
    head = sse("message_start", message=START) + sse(
        "content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi"})  # fmt: skip
    translator = PROVIDER.stream(CHAT, deployment())
    chunks = translator.feed(head + error)  # chunks before the error are not lost...
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["", "Hi"]
    with pytest.raises(ProxyError) as e:  # ...the error comes with the next call
        translator.finish()
    assert (e.value.status, e.value.type, e.value.retryable) == (503, "overloaded_error", True)
    alone = PROVIDER.stream(CHAT, deployment())
    with pytest.raises(ProxyError) as e2:
        alone.feed(sse("error", error={"type": "rate_limit_error", "message": "slow down"}))
    assert (e2.value.status, e2.value.kind) == (429, "rate_limit")
    assert not translator.done


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "etype", "expected", "retryable"), [
    (400, "invalid_request_error", 400, False), (401, "authentication_error", 401, False),
    (403, "permission_error", 403, False), (404, "not_found_error", 404, False),
    (413, "request_too_large", 413, False), (429, "rate_limit_error", 429, True),
    (500, "api_error", 500, True), (529, "overloaded_error", 503, True),
])  # fmt: skip
def test_errors(status: int, etype: str, expected: int, retryable: bool) -> None:
    payload = {"type": "error", "error": {"type": etype, "message": "boom"}}
    err = PROVIDER.error(status, payload)
    assert (err.status, err.retryable, err.message) == (expected, retryable, "boom")
    assert err.body()["error"]["type"] == etype


def test_prompt_too_long_is_a_context_window_error() -> None:
    payload = {"type": "error", "error": {"type": "invalid_request_error",
               "message": "prompt is too long: 250000 tokens > 200000 maximum"}}  # fmt: skip
    err = PROVIDER.error(400, payload)
    assert (err.kind, err.code, err.retryable) == ("context_window", "context_length_exceeded",
                                                   False)  # fmt: skip


def test_text_error_payload() -> None:
    err = PROVIDER.error(502, "Bad gateway")
    assert err.status == 502 and err.retryable and err.message == "Bad gateway"

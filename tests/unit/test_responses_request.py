"""A Responses API request becomes the chat completions body the engine routes: every field
translated, kept, ignored, or refused with a 400 that names it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mitmroute.errors import ProxyError
from mitmroute.inbound.responses.request import to_messages, translate

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def chat(**body: Any) -> dict[str, Any]:
    return translate({"model": "gpt-4o", **body}).chat


def refused(**body: Any) -> ProxyError:
    with pytest.raises(ProxyError) as info:
        translate({"model": "gpt-4o", "input": "hi", **body})
    assert info.value.status == 400
    return info.value


def test_a_string_input_is_one_user_message_and_instructions_a_system_message() -> None:
    body = chat(input="Hello", instructions="Be brief.")
    assert body == {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
        ],
    }


def test_message_items_with_text_and_image_parts() -> None:
    items = [
        {"role": "developer", "content": "Answer in French."},
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
            ],
        },
        {"role": "assistant", "content": [{"type": "output_text", "text": "Un chat."}]},
        {"role": "system", "content": [{"type": "input_text", "text": "Stay polite."}]},
    ]
    assert chat(input=items)["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
                },
            ],
        },
        {"role": "assistant", "content": "Un chat."},
        {"role": "system", "content": "Stay polite."},
    ]


def test_function_calls_fold_into_one_assistant_turn_followed_by_their_outputs() -> None:
    items = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
        {"role": "assistant", "content": "Checking."},
        {
            "type": "function_call",
            "call_id": "c1",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        },
        {
            "type": "function_call",
            "call_id": "c2",
            "name": "get_weather",
            "arguments": '{"city":"Oslo"}',
        },
        {"type": "function_call_output", "call_id": "c1", "output": "18C"},
        {
            "type": "function_call_output",
            "call_id": "c2",
            "output": [{"type": "input_text", "text": "9"}, {"type": "input_text", "text": "C"}],
        },
    ]
    messages = chat(input=items, tools=[WEATHER])["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            },
            {
                "id": "c2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
            },
        ],
    }
    assert messages[2:] == [
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "tool", "tool_call_id": "c2", "content": "9C"},
    ]
    assert len(messages) == 4  # the reasoning item is dropped


def test_tools_tool_choice_and_parallel_tool_calls() -> None:
    body = chat(
        input="x",
        tools=[{**WEATHER, "strict": True}],
        parallel_tool_calls=False,
        tool_choice={"type": "function", "name": "get_weather"},
    )
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather",
                "parameters": WEATHER["parameters"],
                "strict": True,
            },
        }
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert chat(input="x", tools=[WEATHER], tool_choice="required")["tool_choice"] == "required"
    # without tools, neither goes upstream (OpenAI refuses them alone)
    assert "parallel_tool_calls" not in chat(input="x", parallel_tool_calls=True)
    assert "tool_choice" not in chat(input="x", tool_choice="auto")


def test_allowed_tools_narrows_the_tools_the_model_sees() -> None:
    other = {**WEATHER, "name": "get_time"}
    choice = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "function", "name": "get_time"}],
    }
    body = chat(input="x", tools=[WEATHER, other], tool_choice=choice)
    assert [t["function"]["name"] for t in body["tools"]] == ["get_time"]
    assert body["tool_choice"] == "required"


def test_custom_and_namespaced_tools_become_functions() -> None:
    patch = {
        "type": "custom",
        "name": "apply_patch",
        "description": "Edit files",
        "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"},
    }
    namespace = {
        "type": "namespace",
        "name": "github",
        "description": "GitHub",
        "tools": [{**WEATHER, "name": "search"}],
    }
    translated = translate({"model": "m", "input": "x", "tools": [patch, namespace]})
    first, second = translated.chat["tools"]
    assert first["function"]["name"] == "apply_patch"
    assert first["function"]["parameters"]["required"] == ["input"]
    assert "start: /.+/" in first["function"]["description"]
    assert second["function"]["name"] == "github__search"
    assert translated.tools.spec("github__search").namespace == "github"
    assert translated.tools.spec("apply_patch").kind == "custom"
    history = [
        {"type": "custom_tool_call", "call_id": "p1", "name": "apply_patch", "input": "*** x"},
        {"type": "custom_tool_call_output", "call_id": "p1", "output": "done"},
        {
            "type": "function_call",
            "call_id": "s1",
            "name": "search",
            "namespace": "github",
            "arguments": "{}",
        },
    ]
    messages = translate({"model": "m", "input": history, "tools": [patch, namespace]}).chat[
        "messages"
    ]
    call = messages[0]["tool_calls"][0]["function"]
    assert json.loads(call["arguments"]) == {"input": "*** x"}
    assert messages[2]["tool_calls"][0]["function"]["name"] == "github__search"


@pytest.mark.parametrize(
    "tool",
    [
        "web_search",
        "web_search_preview",
        "file_search",
        "code_interpreter",
        "computer_use_preview",
        "image_generation",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
    ],
)
def test_hosted_tools_are_a_400_naming_the_tool(tool: str) -> None:
    error = refused(tools=[WEATHER, {"type": tool}])
    assert f"`{tool}`" in error.message and error.param == "tools[1]"
    assert error.code == "unsupported_tool"


def test_a_hosted_tool_choice_is_a_400_too() -> None:
    error = refused(tools=[WEATHER], tool_choice={"type": "web_search_preview"})
    assert "web_search_preview" in error.message


def test_sampling_limits_user_and_text_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = chat(
        input="x",
        temperature=0.2,
        top_p=0.9,
        max_output_tokens=64,
        user="u-1",
        text={"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}},
    )
    assert body["temperature"] == 0.2 and body["top_p"] == 0.9
    assert body["max_completion_tokens"] == 64 and body["user"] == "u-1"
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "A", "schema": schema, "strict": True},
    }
    assert chat(input="x", text={"format": {"type": "json_object"}})["response_format"] == {
        "type": "json_object"
    }
    assert "response_format" not in chat(input="x", text={"format": {"type": "text"}})


def test_streams_always_ask_for_usage() -> None:
    body = chat(input="x", stream=True, stream_options={"include_obfuscation": False})
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_openai_only_hints_go_upstream_only_when_allowed() -> None:
    body = {
        "model": "m",
        "input": "x",
        "reasoning": {"effort": "high", "summary": "auto"},
        "text": {"verbosity": "low"},
        "service_tier": "flex",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
    }
    hinted = translate(body, openai_only=True)
    assert hinted.chat["reasoning_effort"] == "high" and hinted.chat["verbosity"] == "low"
    assert hinted.chat["service_tier"] == "flex" and hinted.chat["prompt_cache_key"] == "k"
    plain = translate(body)
    assert not {
        "reasoning_effort",
        "verbosity",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "reasoning",
        "text",
    } & set(plain.chat)
    assert plain.echo["reasoning"] == {"effort": "high", "summary": "auto"}


def test_file_parts_go_only_to_openai_compatible_deployments() -> None:
    part = {
        "type": "input_file",
        "filename": "a.pdf",
        "file_data": "data:application/pdf;base64,AA",
    }
    body = {"model": "m", "input": [{"role": "user", "content": [part]}]}
    sent = translate(body, openai_only=True).chat["messages"][0]["content"]
    assert sent == [{"type": "file", "file": {"file_data": part["file_data"], "filename": "a.pdf"}}]
    with pytest.raises(ProxyError) as refused:
        translate(body)
    assert refused.value.status == 400 and "input_file" in refused.value.message


def test_kept_and_ignored_fields_never_go_upstream() -> None:
    translated = translate(
        {
            "model": "m",
            "input": "x",
            "metadata": {"team": "a"},
            "store": False,
            "truncation": "auto",
            "include": ["reasoning.encrypted_content"],
            "max_tool_calls": 3,
            "prompt_cache_retention": "24h",
            "client_metadata": {"a": "b"},
            "background": False,
            "top_logprobs": 0,
        }
    )
    assert set(translated.chat) == {"model", "messages"}
    assert translated.store is False
    assert translated.echo["metadata"] == {"team": "a"}
    assert translated.echo["truncation"] == "auto"


def test_the_mitmroute_cache_object_is_passed_to_the_engine() -> None:
    assert chat(input="x", cache={"no-cache": True})["cache"] == {"no-cache": True}


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("frobnicate", 1, "frobnicate"),
        ("background", True, "background"),
        ("conversation", "conv_1", "conversation"),
        ("prompt", {"id": "pmpt_1"}, "prompt"),
        ("top_logprobs", 5, "top_logprobs"),
        ("truncation", "sometimes", "truncation"),
        ("temperature", "hot", "temperature"),
        ("max_output_tokens", 0, "max_output_tokens"),
        ("stream", "yes", "stream"),
        ("metadata", {"a": 1}, "metadata"),
        ("text", {"format": {"type": "xml"}}, "text.format"),
        ("tool_choice", {"type": "function", "name": "nope"}, "tool_choice"),
    ],
)
def test_bad_or_unknown_fields_are_a_400_naming_them(field: str, value: Any, param: str) -> None:
    assert refused(**{field: value}).param == param


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"type": "item_reference", "id": "msg_1"}, "input[0]"),
        ({"type": "web_search_call", "id": "ws_1"}, "input[0]"),
        (
            {"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]},
            "input[0].content[0]",
        ),
        ({"role": "robot", "content": "x"}, "input[0]"),
        ({"type": "function_call", "name": "f"}, "input[0].call_id"),
    ],
)
def test_items_the_proxy_cannot_send_are_a_400(item: dict[str, Any], param: str) -> None:
    with pytest.raises(ProxyError) as info:
        translate({"model": "m", "input": [item]})
    assert info.value.status == 400 and info.value.param == param


def test_stored_items_get_ids_and_the_context_comes_first() -> None:
    context = translate({"model": "m", "input": "first"}).items
    translated = translate({"model": "m", "input": "second"}, context)
    assert [i["content"][0]["text"] for i in translated.items] == ["first", "second"]
    assert all(i["id"].startswith("msg_") and i["status"] == "completed" for i in translated.items)
    assert [m["content"] for m in translated.chat["messages"]] == ["first", "second"]


def test_to_messages_keeps_a_tool_call_after_a_user_turn_separate() -> None:
    items = [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "b"}]},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
    ]
    messages = to_messages(items, translate({"model": "m", "input": "x"}).tools)
    assert [m["role"] for m in messages] == ["assistant", "user", "assistant"]

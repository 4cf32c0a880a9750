"""An app written for OpenAI runs unchanged against a Claude deployment through the proxy."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import WEATHER_TOOL, deployment
from tests.fakes.anthropic_server import FakeAnthropic


@pytest.fixture(scope="module")
def claude():
    with FakeAnthropic(api_key="sk-ant-backend") as server:
        yield server


@pytest.fixture
def proxy(start_proxy, claude):
    return start_proxy(
        {
            "model_list": [
                deployment(
                    "gpt-4o",
                    "anthropic/claude-opus-4-20250514",
                    claude.base_url,
                    api_key="sk-ant-backend",
                )
            ],
            "router_settings": {"num_retries": 0},
        }
    )


def test_tool_using_streaming_multi_turn_conversation(proxy, claude):
    messages = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "What's the weather in Paris? use tool"},
    ]
    with proxy.client(api_key="sk-app") as client:
        with client.chat.completions.stream(
            model="gpt-4o", messages=messages, tools=[WEATHER_TOOL]
        ) as stream:
            for _ in stream:
                pass
            first = stream.get_final_completion()
        call = first.choices[0].message.tool_calls[0]
        assert first.choices[0].finish_reason == "tool_calls"
        assert call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments), dict)
        messages += [
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 18}'},
        ]
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o",
                messages=messages,
                tools=[WEATHER_TOOL],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Got the tool result" in text
    assert chunks[-1].usage.prompt_tokens > 0 and chunks[-1].usage.completion_tokens > 0
    sent = claude.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "sk-ant-backend"  # the app's key never went upstream
    assert sent.body["system"] and sent.body["max_tokens"]
    assert sent.body["messages"][-1]["content"][0]["type"] == "tool_result"
    assert chunks[-1].usage.completion_tokens == sent.usage["output_tokens"]


def test_plain_answer_and_usage_mapping(proxy, claude):
    with proxy.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hello claude"}]
        )
    completion = raw.parse()
    assert completion.choices[0].message.content.startswith("Hello from fake Claude")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model.startswith("claude-opus-4")
    assert raw.headers["x-mitmroute-deployment"] == "anthropic/claude-opus-4-20250514"
    reported = claude.requests[-1].usage
    assert completion.usage.prompt_tokens == reported["input_tokens"]
    assert completion.usage.completion_tokens == reported["output_tokens"]


@pytest.mark.parametrize(
    ("trigger", "exception", "status"),
    [
        ("fail 529", openai.InternalServerError, None),
        ("fail 401", openai.AuthenticationError, 401),
        ("too long", openai.BadRequestError, 400),
    ],
)
def test_anthropic_errors_become_openai_errors(proxy, trigger, exception, status):
    with proxy.client() as client, pytest.raises(exception) as info:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": trigger}]
        )
    if status:
        assert info.value.status_code == status
    assert info.value.body and "message" in info.value.body


def test_stream_error_mid_way_raises_in_the_sdk(proxy):
    with proxy.client() as client:
        stream = client.chat.completions.create(
            model="gpt-4o", stream=True, messages=[{"role": "user", "content": "break"}]
        )
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass

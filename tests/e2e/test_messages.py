"""Apps on the official anthropic SDK, unchanged, answered by the router through a real
mitmdump: a Claude deployment natively, an OpenAI-compatible one and Ollama through
translation, fallbacks between them, virtual keys sent as x-api-key, and the spend log."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import duckdb
import httpx2 as httpx
import pytest

from tests.conftest import Proxy, deployment
from tests.fakes.anthropic_server import FakeAnthropic

BACKEND_KEY = "sk-ant-backend-key-0001"
MASTER = "sk-master-messages-1234"
PRICES = {
    "input_cost_per_token": 0.000003,
    "output_cost_per_token": 0.000015,
    "cache_read_input_token_cost": 0.0000003,
    "cache_creation_input_token_cost": 0.00000375,
}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"name": "get_weather", "description": "Current weather in a city", "input_schema": CITY}
BETA = "context-management-2025-06-27"


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=BACKEND_KEY) as server:
        yield server


def config(claude: FakeAnthropic, base: str, **general: Any) -> dict[str, Any]:
    return {
        "model_list": [
            deployment(
                "claude-sonnet",
                "anthropic/claude-sonnet-4-5",
                claude.base_url,
                api_key=BACKEND_KEY,
                **PRICES,
            ),
            deployment("gpt", "openai/gpt-4o", f"{base}/v1", api_key="sk-openai-backend"),
            deployment("llama", "ollama_chat/llama3", base),
            deployment("refusing", "openai/fail-400", f"{base}/v1", api_key="sk-openai-backend"),
            *(
                deployment(
                    name,
                    "anthropic/claude-sonnet-4-5",
                    claude.base_url,
                    api_key="sk-ant-revoked-key-0002",
                )
                for name in ("broken-claude", "broken-claude-streamed")
            ),
        ],
        "router_settings": {
            "num_retries": 0,
            "fallbacks": [{"broken-claude": ["gpt"]}, {"broken-claude-streamed": ["gpt"]}],
        },
        "general_settings": {"passthrough_unknown_models": False, **general},
    }


@pytest.fixture(scope="module")
def proxy(claude, backend, confdir, tmp_path_factory) -> Iterator[Proxy]:
    proxy = Proxy(config(claude, backend.url), confdir, tmp_path_factory.mktemp("messages"))
    yield proxy
    proxy.stop()


def sdk(proxy: Proxy, api_key: str = "sk-ant-app-key", **kwargs: Any) -> anthropic.Anthropic:
    """The official anthropic SDK, pointed at api.anthropic.com through the proxy."""
    http = httpx.Client(proxy=proxy.url, verify=proxy.ssl_context(), timeout=30)
    return anthropic.Anthropic(api_key=api_key, max_retries=0, http_client=http, **kwargs)


def rows(proxy: Proxy, sql: str) -> list[tuple]:
    proxy.stop()
    with duckdb.connect(str(proxy.spend_db), read_only=True) as con:
        return con.execute(sql).fetchall()


# --- a conversation with tools, per backend kind ---------------------------------------------


@pytest.mark.parametrize("model", ["claude-sonnet", "gpt", "llama"])
def test_multi_turn_tool_use_with_create_and_stream(proxy, model):
    messages: list[Any] = [{"role": "user", "content": "What's the weather in Paris? use tool"}]
    with sdk(proxy) as client:
        first = client.messages.create(
            model=model,
            max_tokens=300,
            tools=[WEATHER],
            messages=messages,
            system="You are a weather bot.",
        )
        assert first.stop_reason == "tool_use"
        call = next(b for b in first.content if b.type == "tool_use")
        assert call.name == "get_weather" and isinstance(call.input, dict)
        messages += [
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": call.id,
                        "content": "18 degrees and sunny",
                    }
                ],
            },
        ]
        with client.messages.stream(
            model=model, max_tokens=300, tools=[WEATHER], messages=messages
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
    assert "18 degrees" in text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0


def test_a_claude_deployment_gets_the_request_natively(proxy, claude):
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    context = {"edits": [{"type": "clear_tool_uses_20250919"}]}
    with sdk(proxy) as client:
        raw = client.beta.messages.with_raw_response.create(
            model="claude-sonnet",
            max_tokens=100,
            system=system,
            betas=[BETA],
            messages=[{"role": "user", "content": "hello there"}],
            context_management=context,
            metadata={"user_id": "u-7"},
            extra_query={"beta": "true"},  # as Claude Code sends it
        )
        message = raw.parse()
    got = claude.requests[-1]
    assert got.query == "beta=true" and got.headers["anthropic-beta"] == BETA
    assert got.headers["x-api-key"] == BACKEND_KEY
    assert got.body["system"] == system and got.body["context_management"] == context
    assert got.body["metadata"] == {"user_id": "u-7"} and got.body["model"] == "claude-sonnet-4-5"
    assert raw.http_response.content == got.sent  # the answer, byte for byte
    assert raw.headers["x-mitmroute-deployment"] == "anthropic/claude-sonnet-4-5"
    assert message.usage.cache_creation_input_tokens or message.usage.cache_read_input_tokens


def test_a_native_stream_is_the_backends_own(proxy, claude):
    with (
        sdk(proxy) as client,
        client.messages.stream(
            model="claude-sonnet", max_tokens=100, messages=[{"role": "user", "content": "think"}]
        ) as stream,
    ):
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].signature == "fake-signature"  # a translation has none to give
    assert kinds.count("signature") == 1


@pytest.mark.parametrize(
    ("model", "stream"), [("broken-claude", False), ("broken-claude-streamed", True)]
)
def test_a_failing_claude_deployment_falls_back_to_openai(proxy, backend, model, stream):
    with sdk(proxy) as client:
        raw = client.messages.with_raw_response.create(
            model=model,
            max_tokens=50,
            messages=[{"role": "user", "content": "fall back please"}],
            stream=stream,
        )
        if stream:
            text = "".join(e.delta.text for e in raw.parse() if e.type == "content_block_delta")
        else:
            text = raw.parse().content[0].text
    assert raw.headers["x-mitmroute-deployment"] == "openai/gpt-4o"
    assert raw.headers["x-mitmroute-attempts"] == "2"
    assert text == "echo: fall back please"
    assert backend.state.requests[-1]["max_completion_tokens"] == 50


def test_count_tokens_natively_or_locally(proxy):
    messages = [{"role": "user", "content": "how many tokens is this?"}]
    with sdk(proxy) as client:
        native = client.messages.with_raw_response.count_tokens(
            model="claude-sonnet", messages=messages, tools=[WEATHER]
        )
        local = client.messages.with_raw_response.count_tokens(model="gpt", messages=messages)
    assert native.headers["x-mitmroute-token-count"] == "anthropic"
    assert local.headers["x-mitmroute-token-count"] == "estimated"
    assert native.parse().input_tokens > local.parse().input_tokens > 0


@pytest.mark.parametrize(
    ("kwargs", "exception"),
    [
        ({"model": "gpt", "max_tokens": -1}, anthropic.BadRequestError),
        ({"model": "nobody", "max_tokens": 5}, anthropic.NotFoundError),
        (
            {
                "model": "gpt",
                "max_tokens": 5,
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            anthropic.BadRequestError,
        ),
        ({"model": "refusing", "max_tokens": 5}, anthropic.BadRequestError),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_errors_are_the_sdks_own_exceptions(proxy, kwargs, exception, stream):
    """Streamed too: a backend's refusal comes after the flow was pointed at the relay."""
    with sdk(proxy) as client, pytest.raises(exception) as info:
        client.messages.create(messages=[{"role": "user", "content": "x"}], stream=stream, **kwargs)
    assert info.value.body["type"] == "error" and info.value.body["error"]["message"]


def test_spend_rows_say_messages_with_exact_tokens_and_cost(start_proxy, claude, backend):
    proxy = start_proxy(config(claude, backend.url))
    with sdk(proxy) as client:
        native = client.messages.create(
            model="claude-sonnet", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        )
        translated = client.messages.create(
            model="gpt", max_tokens=50, messages=[{"role": "user", "content": "hi you"}]
        )
    reported = claude.requests[-1].usage
    found = rows(
        proxy,
        "select model_group, prompt_tokens, completion_tokens, cached_tokens, "
        "cache_creation_tokens, cost_usd, usage_source from spend_log "
        "where endpoint = 'messages' order by started_at",
    )
    assert [r[0] for r in found] == ["claude-sonnet", "gpt"]
    claude_row, gpt_row = found
    prompt = sum(
        reported[k]
        for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    )
    assert claude_row[1:5] == (
        prompt,
        reported["output_tokens"],
        reported["cache_read_input_tokens"],
        reported["cache_creation_input_tokens"],
    )
    assert native.usage.input_tokens == reported["input_tokens"]
    cost = Decimal(reported["input_tokens"]) * Decimal("0.000003") + Decimal(
        reported["output_tokens"]
    ) * Decimal("0.000015")
    assert claude_row[5] == cost and claude_row[6] == "upstream"
    assert gpt_row[1:3] == (translated.usage.input_tokens, translated.usage.output_tokens)
    assert gpt_row[6] == "upstream"


# --- virtual keys as x-api-key -----------------------------------------------------------------


def test_virtual_keys_work_as_x_api_key(start_proxy, claude, backend):
    proxy = start_proxy(config(claude, backend.url, master_key=MASTER))
    with proxy.http() as http:
        made = http.post(
            "https://api.anthropic.com/key/generate",
            headers={"x-api-key": MASTER},
            json={"key_alias": "claude-code", "models": ["gpt"]},
        )
    assert made.status_code == 200, made.text
    key = made.json()["key"]
    with sdk(proxy, api_key=key) as client:
        answer = client.messages.create(
            model="gpt", max_tokens=20, messages=[{"role": "user", "content": "keyed"}]
        )
        with pytest.raises(anthropic.PermissionDeniedError):
            client.messages.create(
                model="claude-sonnet", max_tokens=20, messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(anthropic.PermissionDeniedError):
            client.messages.count_tokens(
                model="claude-sonnet", messages=[{"role": "user", "content": "x"}]
            )
    assert answer.content[0].text == "echo: keyed"
    assert "x-api-key" not in backend.state.headers[-1]  # a proxy key never goes upstream
    with sdk(proxy, api_key=MASTER) as client:
        client.messages.create(
            model="claude-sonnet", max_tokens=20, messages=[{"role": "user", "content": "master"}]
        )
    assert claude.requests[-1].headers["x-api-key"] == BACKEND_KEY
    with (
        sdk(proxy, api_key="sk-not-a-key") as client,
        pytest.raises(anthropic.AuthenticationError) as info,
    ):
        client.messages.create(
            model="gpt", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.body["error"]["type"] == "authentication_error"
    found = rows(
        proxy,
        "select key_alias, status_code from spend_log "
        "where endpoint = 'messages' order by started_at",
    )
    assert ("claude-code", 200) in found and ("claude-code", 403) in found
    assert json.dumps(found)  # every request, refused or not, is a row


def test_an_unlisted_model_passes_through_and_is_logged_with_its_usage(start_proxy, claude):
    # the fake stands in for the original host: intercepted, and unknown models go to it as sent
    cfg = {"model_list": [], "general_settings": {"intercept_hosts": ["127.0.0.1"]}}
    proxy = start_proxy(cfg)
    http = httpx.Client(proxy=proxy.url, timeout=30)
    client = anthropic.Anthropic(
        api_key=BACKEND_KEY, base_url=claude.base_url, max_retries=0, http_client=http
    )
    with client:
        plain = client.messages.create(
            model="claude-unlisted", max_tokens=20, messages=[{"role": "user", "content": "plain"}]
        )
        with client.messages.stream(
            model="claude-unlisted",
            max_tokens=20,
            messages=[{"role": "user", "content": "streamed"}],
        ) as s:
            streamed = s.get_final_message()
    found = rows(
        proxy,
        "select deployment, prompt_tokens, completion_tokens from spend_log "
        "where endpoint = 'messages' order by started_at",
    )
    assert found == [
        ("passthrough/claude-unlisted", plain.usage.input_tokens, plain.usage.output_tokens),
        ("passthrough/claude-unlisted", streamed.usage.input_tokens, streamed.usage.output_tokens),
    ]

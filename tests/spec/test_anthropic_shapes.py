"""Anthropic's shape, checked with the anthropic SDK's own types (tests/spec/anthropic.py).

Today the proxy writes only errors in Anthropic's shape (the Messages dialect answers 404
until it lands): those are checked through a real mitmdump. The helper itself is checked
against the fake Anthropic server, so it is ready for the dialect's answers and streams.
"""

from __future__ import annotations

import httpx2 as httpx
import pytest

from tests.conftest import Proxy, deployment
from tests.fakes.anthropic_server import FakeAnthropic
from tests.spec.anthropic import ShapeError, check_message_stream, parse_anthropic

API = "https://api.anthropic.com"
HEADERS = {"x-api-key": "sk-ant-client", "anthropic-version": "2023-06-01"}
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def fake():
    with FakeAnthropic() as server:
        yield server


def ask(text: str, **extra):
    return {
        "model": "claude-x",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


# --- the helper, on a server that speaks the real protocol ---


@pytest.mark.parametrize("text", ["hello", "use tool", "think"])
def test_the_fakes_messages_and_streams_parse(fake, text):
    with httpx.Client(base_url=fake.base_url, headers=HEADERS) as client:
        message = parse_anthropic(
            "Message", client.post("/v1/messages", json=ask(text, tools=[WEATHER])).json()
        )
        raw = client.post("/v1/messages", json=ask(text, tools=[WEATHER], stream=True)).content
    streamed = check_message_stream(raw)
    assert [b.type for b in streamed.content] == [b.type for b in message.content]
    assert streamed.stop_reason == message.stop_reason


def test_the_fakes_errors_parse(fake):
    with httpx.Client(base_url=fake.base_url, headers=HEADERS) as client:
        error = client.post("/v1/messages", json={"model": "x"})
    assert error.status_code == 400
    assert parse_anthropic("ErrorResponse", error.json()).error.type == "invalid_request_error"


def message(**changes):
    base = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    return {**base, **changes}


@pytest.mark.parametrize(
    "bad, complaint",
    [
        (message(extra=1), "Message.extra: a field the SDK doesn't know"),
        ({k: v for k, v in message().items() if k != "stop_sequence"}, "stop_sequence: missing"),
        (message(usage={"input_tokens": "1", "output_tokens": 1}), "valid integer"),
        (message(role="user"), "role"),
        (message(content=[{"type": "text"}]), "content.0"),
    ],
    ids=["unknown field", "missing key", "no coercion", "wrong literal", "bad block"],
)
def test_the_helper_refuses_what_the_api_would_not_send(bad, complaint):
    with pytest.raises(ShapeError, match=complaint):
        parse_anthropic("Message", bad)


def sse(*events):
    import json

    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)


START = {"type": "message_start", "message": message(content=[], stop_reason=None)}
BLOCK = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
DELTA = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}
STOP = {"type": "content_block_stop", "index": 0}
MDELTA = {
    "type": "message_delta",
    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
    "usage": {"output_tokens": 1},
}
END = {"type": "message_stop"}


def test_a_well_ordered_stream_gives_its_message():
    final = check_message_stream(sse(START, {"type": "ping"}, BLOCK, DELTA, STOP, MDELTA, END))
    assert final.content[0].text == "hi" and final.stop_reason == "end_turn"


@pytest.mark.parametrize(
    "events, complaint",
    [
        ((BLOCK, DELTA, STOP, MDELTA, END), "content_block_start while start"),
        ((START, DELTA, STOP, MDELTA, END), "delta for block 0"),
        ((START, BLOCK, DELTA, MDELTA, END), "message_delta while"),
        ((START, BLOCK, DELTA, STOP, MDELTA), "without message_stop"),
        ((START, {**BLOCK, "index": 1}, STOP, MDELTA, END), "expected 0"),
        (
            (
                START,
                BLOCK,
                {**DELTA, "delta": {"type": "input_json_delta", "partial_json": "{"}},
                STOP,
                MDELTA,
                END,
            ),
            "input_json_delta in a text block",
        ),
    ],
    ids=["no start", "delta before block", "unclosed block", "no stop", "index", "delta type"],
)
def test_a_stream_out_of_order_is_refused(events, complaint):
    with pytest.raises(ShapeError, match=complaint):
        check_message_stream(sse(*events))


def test_an_event_line_must_name_the_datas_type():
    raw = sse(START).replace("event: message_start", "event: message_delta")
    with pytest.raises(ShapeError, match="but data type"):
        check_message_stream(raw)


# --- what the proxy writes in Anthropic's shape today: its own errors ---


@pytest.fixture(scope="module")
def proxy(backend, confdir, tmp_path_factory):
    config = {
        "model_list": [deployment("claude-x", "openai/ok", f"{backend.url}/v1", api_key="k")],
        "general_settings": {"max_request_size_mb": 1},
    }
    running = Proxy(config, confdir, tmp_path_factory.mktemp("anthropic-shapes"))
    yield running
    running.stop()


ERRORS = {
    "a field of the wrong shape": (
        "POST",
        "/v1/messages",
        {"json": {**ask("hi"), "max_tokens": "x"}},
    ),
    "count_tokens without messages": (
        "POST",
        "/v1/messages/count_tokens",
        {"json": {"model": "m"}},
    ),
    "path outside the rule": ("GET", "/v2/anything", {}),
    "malformed path": ("POST", "/v1/mess%252Fages", {"json": ask("hi")}),
    "body too deep": (
        "POST",
        "/v1/messages",
        {"content": b'{"x": ' + b"[" * 200 + b"]" * 200 + b"}"},
    ),
    "body too large": ("POST", "/v1/messages", {"json": ask("x" * (2 << 20))}),
    "unknown encoding": (
        "POST",
        "/v1/messages",
        {"content": b"{}", "headers": {"content-encoding": "zz"}},
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_the_proxy_writes_on_api_anthropic_com_have_anthropics_shape(proxy, case):
    method, path, kwargs = ERRORS[case]
    with proxy.http(base_url=API, headers=HEADERS) as client:
        answer = client.request(method, path, **kwargs)
    assert answer.status_code >= 400, answer.text
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    parse_anthropic("ErrorResponse", answer.json())

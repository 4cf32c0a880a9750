"""Chat completions (whole, or streamed chunk by chunk) become Responses API objects and events
that the openai SDK's own types and stream helpers accept."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from mitmroute.exchange import Exchange, Usage
from mitmroute.inbound.responses.answer import Draft, output_of, status_of
from mitmroute.inbound.responses.events import EventWriter, encode, stream_events
from mitmroute.inbound.responses.request import translate
from mitmroute.request import now_utc

EVENTS = TypeAdapter(ResponseStreamEvent)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files"}


def request(**body: Any):
    return translate({"model": "gpt-4o", "input": "hi", **body})


def completion(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
        ],
    }


def respond(message: dict[str, Any], finish: str = "stop", usage: Usage | None = None, **body):
    translated = request(**body)
    output, reason = output_of(completion(message, finish), translated.tools)
    status, incomplete = status_of(reason)
    draft = Draft("gpt-4o", translated.echo)
    raw = draft.response(status, output, usage=usage, incomplete=incomplete)
    return raw, Response.model_validate(raw)


def test_a_text_answer_is_a_completed_response_with_exact_usage() -> None:
    usage = Usage(
        prompt_tokens=120,
        completion_tokens=30,
        cached_tokens=100,
        cache_creation_tokens=20,
        reasoning_tokens=12,
    )
    _, response = respond({"content": "Hello!"}, usage=usage, metadata={"a": "b"}, store=False)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.output_text == "Hello!"
    message = response.output[0]
    assert message.type == "message" and message.id.startswith("msg_")
    assert message.content[0].annotations == []
    assert response.usage is not None
    assert response.usage.input_tokens == 120 and response.usage.output_tokens == 30
    assert response.usage.total_tokens == 150
    assert response.usage.input_tokens_details.cached_tokens == 100
    assert response.usage.input_tokens_details.cache_write_tokens == 20
    assert response.usage.output_tokens_details.reasoning_tokens == 12
    assert response.metadata == {"a": "b"} and response.store is False
    assert response.tools == [] and response.tool_choice == "auto"


def test_tool_calls_reasoning_and_custom_tools_become_output_items() -> None:
    message = {
        "content": None,
        "reasoning_content": "The user wants weather.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "apply_patch", "arguments": '{"input":"*** Begin Patch"}'},
            },
        ],
    }
    _, response = respond(message, "tool_calls", tools=[WEATHER, PATCH])
    reasoning, call, custom = response.output
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "The user wants weather."
    assert call.type == "function_call" and call.call_id == "call_1"
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert custom.type == "custom_tool_call" and custom.input == "*** Begin Patch"
    assert response.status == "completed"


def test_a_refusal_and_a_cut_answer() -> None:
    _, refusal = respond({"content": None, "refusal": "I can't help with that."})
    assert refusal.output[0].content[0].type == "refusal"
    _, cut = respond({"content": "Once upon"}, "length")
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output[0].status == "incomplete"


# --- streams ------------------------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any):
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": choices,
        **extra,
    }


def tool_delta(index: int, arguments: str, **head: Any) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if head:
        call.update(id=head["id"], type="function")
        call["function"]["name"] = head["name"]
    return {"tool_calls": [call]}


def run(chunks: list[dict[str, Any]], usage: Usage | None = None, **body: Any):
    translated = request(**body)
    writer = EventWriter(Draft("gpt-4o", translated.echo), translated.tools)
    events = writer.start()
    for c in chunks:
        events += writer.feed(c)
    events += writer.complete(usage)
    for i, event in enumerate(events):
        EVENTS.validate_python(event)
        assert event["sequence_number"] == i
    return events


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def test_a_streamed_text_answer_is_the_real_event_sequence() -> None:
    events = run(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hel"}),
            chunk({"content": "lo"}),
            chunk({}, "stop"),
        ],
        Usage(prompt_tokens=3, completion_tokens=2),
    )
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0]["response"]["status"] == "in_progress"
    assert events[6]["text"] == "Hello"
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == "Hello" and final.usage is not None
    assert final.usage.total_tokens == 5
    assert final.id == events[0]["response"]["id"]


def test_tool_call_arguments_split_across_chunks_and_interleaved_calls() -> None:
    events = run(
        [
            chunk({"role": "assistant", "content": "Let me check."}),
            chunk(tool_delta(0, "", id="call_a", name="get_weather")),
            chunk(tool_delta(0, '{"ci')),
            chunk(tool_delta(1, '{"city"', id="call_b", name="get_weather")),
            chunk(tool_delta(0, 'ty":"Paris"}')),
            chunk(tool_delta(1, ':"Oslo"}')),
            chunk({}, "tool_calls"),
        ],
        tools=[WEATHER],
    )
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert [(e["output_index"], e["delta"]) for e in deltas] == [
        (1, '{"ci'),
        (2, '{"city"'),
        (1, 'ty":"Paris"}'),
        (2, ':"Oslo"}'),
    ]
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [json.loads(e["arguments"])["city"] for e in done] == ["Paris", "Oslo"]
    final = Response.model_validate(events[-1]["response"])
    assert [item.type for item in final.output] == ["message", "function_call", "function_call"]
    assert [item.call_id for item in final.output[1:]] == ["call_a", "call_b"]
    # the message closed before the first call began
    assert types(events).index("response.output_item.done") < types(events).index(
        "response.function_call_arguments.delta"
    )


def test_streamed_reasoning_then_text_and_a_custom_tool() -> None:
    events = run(
        [
            chunk({"reasoning_content": "Think", "reasoning": "Think"}),  # vLLM sends both
            chunk({"reasoning_content": "ing."}),
            chunk({"content": "Patching."}),
            chunk(tool_delta(0, '{"input": "*** Begin', id="c1", name="apply_patch")),
            chunk(tool_delta(0, ' Patch"}')),
            chunk({}, "tool_calls"),
        ],
        tools=[PATCH],
    )
    kinds = types(events)
    assert kinds.count("response.reasoning_text.delta") == 2
    assert "response.custom_tool_call_input.done" in kinds
    final = Response.model_validate(events[-1]["response"])
    reasoning, message, call = final.output
    assert reasoning.content is not None and reasoning.content[0].text == "Thinking."
    assert message.content[0].text == "Patching."
    assert call.type == "custom_tool_call" and call.input == "*** Begin Patch"


def test_a_cut_stream_ends_with_response_incomplete() -> None:
    events = run([chunk({"content": "Once"}), chunk({}, "length")])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_failure_mid_stream_is_an_error_event_then_response_failed() -> None:
    translated = request()
    writer = EventWriter(Draft("gpt-4o", translated.echo), translated.tools)
    events = writer.start() + writer.feed(chunk({"content": "Hel"}))
    events += writer.fail("upstream broke the stream", "upstream_stream_broken", None)
    for event in events:
        EVENTS.validate_python(event)
    error, failed = events[-2:]
    assert error["type"] == "error" and error["code"] == "upstream_stream_broken"
    assert failed["type"] == "response.failed"
    response = Response.model_validate(failed["response"])
    assert response.status == "failed" and response.error is not None
    assert response.error.code == "server_error"
    assert response.output[0].status == "incomplete"


# --- the openai SDK reading a whole stream ------------------------------------------------------


def sdk(sse: bytes) -> openai.OpenAI:
    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=sse)

    http = httpx2.Client(transport=httpx2.MockTransport(answer))
    return openai.OpenAI(api_key="sk-test", http_client=http, max_retries=0)


def test_the_sdk_stream_helpers_accumulate_our_events() -> None:
    events = run(
        [
            chunk({"reasoning_content": "Hm."}),
            chunk({"content": "Checking."}),
            chunk(tool_delta(0, '{"city":', id="call_1", name="get_weather")),
            chunk(tool_delta(0, '"Paris"}')),
            chunk({}, "tool_calls"),
        ],
        Usage(prompt_tokens=7, completion_tokens=9),
        tools=[WEATHER],
    )
    client = sdk(encode(events))
    with client.responses.stream(model="gpt-4o", input="hi", tools=[WEATHER]) as stream:
        seen = [event.type for event in stream]
        final = stream.get_final_response()
    assert seen[0] == "response.created" and seen[-1] == "response.completed"
    assert final.output_text == "Checking."
    assert final.output[-1].type == "function_call"
    assert final.usage is not None and final.usage.input_tokens == 7
    raw = list(client.responses.create(model="gpt-4o", input="hi", stream=True))
    assert [e.type for e in raw] == types(events)


# --- the driver over the engine's SSE bytes -----------------------------------------------------


def sse(*chunks: dict[str, Any] | str) -> bytes:
    return b"".join(
        b"data: " + (c if isinstance(c, str) else json.dumps(c)).encode() + b"\n\n" for c in chunks
    )


class Source:
    """The engine's stream: bytes in pieces, remembering how far it was read and closed."""

    def __init__(self, data: bytes, piece: int = 7) -> None:
        self.pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
        self.pulled = 0
        self.closed = False

    async def gen(self) -> AsyncIterator[bytes]:
        try:
            for p in self.pieces:
                self.pulled += 1
                yield p
        finally:
            self.closed = True


def exchange(usage: Usage | None = None) -> Exchange:
    return Exchange(request_id="mr-1", started_at=now_utc(), endpoint="responses", usage=usage)


async def collect(stream: AsyncIterator[bytes]) -> list[dict[str, Any]]:
    out = b""
    async for data in stream:
        out += data
    return [json.loads(b.split(b"data: ", 1)[1]) for b in out.split(b"\n\n") if b]


async def test_events_flow_as_chunks_arrive_and_the_last_carries_the_ledger_usage() -> None:
    data = sse(*[chunk({"content": f"w{i} "}) for i in range(20)], chunk({}, "stop"), "[DONE]")
    source = Source(data)
    translated = request()
    writer = EventWriter(Draft("gpt-4o", translated.echo), translated.tools)
    stored: list[dict[str, Any]] = []
    books = exchange()

    async def finished(response: dict[str, Any]) -> None:
        stored.append(response)

    stream = stream_events(source.gen(), writer, books, finished)
    first_text_at = None
    out = b""
    async for piece in stream:
        out += piece
        if first_text_at is None and b"output_text.delta" in piece:
            first_text_at = source.pulled
        if b'"w19 "' in piece:
            books.usage = Usage(prompt_tokens=4, completion_tokens=20)  # the engine's books
    assert first_text_at is not None and first_text_at < len(source.pieces) / 4
    events = [json.loads(b.split(b"data: ", 1)[1]) for b in out.split(b"\n\n") if b]
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["usage"]["total_tokens"] == 24
    assert stored == [events[-1]["response"]] and source.closed


async def test_an_error_event_from_the_engine_ends_the_stream_failed() -> None:
    error = {
        "error": {
            "message": "backend broke",
            "type": "server_error",
            "code": "upstream_stream_broken",
        }
    }
    source = Source(sse(chunk({"content": "Hi"}), error))
    translated = request()
    writer = EventWriter(Draft("gpt-4o", translated.echo), translated.tools)

    async def finished(response: dict[str, Any]) -> None:
        pass

    events = await collect(stream_events(source.gen(), writer, exchange(), finished))
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["message"] == "backend broke"


async def test_a_stream_without_its_end_is_failed_not_completed() -> None:
    source = Source(sse(chunk({"content": "Hi"})))
    translated = request()
    writer = EventWriter(Draft("gpt-4o", translated.echo), translated.tools)

    async def finished(response: dict[str, Any]) -> None:
        pass

    events = await collect(stream_events(source.gen(), writer, exchange(), finished))
    assert events[-1]["type"] == "response.failed"


async def test_a_client_that_goes_away_closes_the_engine_stream() -> None:
    source = Source(sse(*[chunk({"content": "x"}) for _ in range(50)], "[DONE]"))
    translated = request()
    writer = EventWriter(Draft("gpt-4o", translated.echo), translated.tools)

    async def finished(response: dict[str, Any]) -> None:
        raise AssertionError("an abandoned stream is not stored")

    stream = stream_events(source.gen(), writer, exchange(), finished)
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert source.closed


@pytest.mark.parametrize("piece", [1, 5, 64])
async def test_any_split_of_the_bytes_gives_the_same_events(piece: int) -> None:
    data = sse(chunk({"content": "Hello"}), chunk({}, "stop"), "[DONE]")
    translated = request()
    writer = EventWriter(
        Draft("gpt-4o", translated.echo, id="resp_1", created_at=1), translated.tools
    )

    async def finished(response: dict[str, Any]) -> None:
        pass

    events = await collect(stream_events(Source(data, piece).gen(), writer, exchange(), finished))
    assert [e["type"] for e in events][-1] == "response.completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hello"

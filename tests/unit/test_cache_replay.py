"""Replayed streams are well-formed and the official openai SDK reassembles them exactly."""

from __future__ import annotations

import json
import random

import httpx2
import openai
import pytest

from mitmroute.cache.replay import replay_stream, split_text
from mitmroute.streaming.sse import DONE, ChunkAssembler, SSEParser

USAGE = {"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33}
TEXT = "Hello there! Supercalifragilisticexpialidocious words\n\n  and  spaces: 1, 2, 3."
CALLS = [
    {"id": "call_a", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
    {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": "{}"}},
]  # fmt: skip


def completion(content: str | None = TEXT, tool_calls: list | None = None, **extra) -> dict:
    message: dict = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    finish = "tool_calls" if tool_calls else "stop"
    return {"id": "chatcmpl-abc", "object": "chat.completion", "created": 1700000000,
            "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_1",
            "choices": [{"index": 0, "message": message, "finish_reason": finish,
                         "logprobs": None}],
            "usage": USAGE, **extra}  # fmt: skip


def client(data: bytes) -> openai.AsyncOpenAI:
    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=data)

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(answer))
    return openai.AsyncOpenAI(
        api_key="sk-test", base_url="http://cache.test/v1", http_client=http, max_retries=0
    )


def events(data: bytes) -> list[dict]:
    parser = SSEParser()
    raw = parser.feed(data) + parser.finish()
    assert raw[-1].data == "[DONE]"
    return [json.loads(e.data) for e in raw[:-1]]


def test_shape_of_the_stream() -> None:
    body = completion()
    data = replay_stream(body, include_usage=True)
    assert data.endswith(DONE)
    chunks = events(data)
    assert len(chunks) > 8
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {
        ("chatcmpl-abc", 1700000000, "gpt-4o-2024-08-06")
    }
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert "".join(pieces) == TEXT and max(map(len, pieces)) <= 16
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1] == {**{k: chunks[0][k] for k in ("id", "object", "created", "model")},
                          "system_fingerprint": "fp_1", "choices": [], "usage": USAGE}  # fmt: skip
    assembler = ChunkAssembler()
    for c in chunks:
        assembler.add(c)
    assert assembler.completion()["choices"][0]["message"]["content"] == TEXT


def test_without_include_usage_there_is_no_usage_anywhere() -> None:
    chunks = events(replay_stream(completion(), include_usage=False))
    assert all("usage" not in c for c in chunks) and chunks[-1]["choices"]


async def test_sdk_raw_stream_reassembles_content_and_usage() -> None:
    body = completion()
    async with client(replay_stream(body, include_usage=True)) as c:
        stream = await c.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == TEXT
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 33


@pytest.mark.parametrize("content", [None, "Let me check."])
async def test_sdk_stream_helper_reassembles_tool_calls(content: str | None) -> None:
    body = completion(content, CALLS)
    c = client(replay_stream(body, include_usage=True))
    request = c.chat.completions.stream(
        model="gpt-4o", messages=[{"role": "user", "content": "weather?"}],
        stream_options={"include_usage": True},
    )  # fmt: skip
    async with c, request as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_completion()
    message = final.choices[0].message
    assert message.content == content
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(t.id, t.type, t.function.name, t.function.arguments) for t in message.tool_calls] == [
        (t["id"], t["type"], t["function"]["name"], t["function"]["arguments"]) for t in CALLS
    ]
    assert kinds.count("tool_calls.function.arguments.delta") > 3
    assert final.usage is not None and final.usage.prompt_tokens == 11
    assert final.id == "chatcmpl-abc" and final.model == "gpt-4o-2024-08-06"


def test_tool_call_deltas_look_like_a_model_sent_them() -> None:
    chunks = events(replay_stream(completion(None, CALLS), include_usage=False))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": None}
    heads = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert heads == [
        {"index": 0, "id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}},
        {"index": 1, "id": "call_b", "type": "function",
         "function": {"name": "now", "arguments": ""}},
    ]  # fmt: skip


async def test_several_choices_and_refusal() -> None:
    body = completion()
    body["choices"].append(
        {"index": 1, "message": {"role": "assistant", "content": None, "refusal": "I can't."},
         "finish_reason": "stop", "logprobs": None}
    )  # fmt: skip
    c = client(replay_stream(body, include_usage=False))
    request = c.chat.completions.stream(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], n=2
    )
    async with c, request as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == TEXT
    assert final.choices[1].message.refusal == "I can't."


async def test_text_completion_replay() -> None:
    body = {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "davinci-002",
            "choices": [{"index": 0, "text": " upon a time, there was", "logprobs": None,
                         "finish_reason": "length"}], "usage": USAGE}  # fmt: skip
    async with client(replay_stream(body, include_usage=True)) as c:
        stream = await c.completions.create(
            model="davinci-002", prompt="Once", stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == " upon a time, there was"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 22


def test_missing_usage_with_include_usage_sends_zeros() -> None:
    body = completion()
    del body["usage"]
    assert events(replay_stream(body, include_usage=True))[-1]["usage"]["total_tokens"] == 0
    override = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    chunks = events(replay_stream(body, include_usage=True, usage=override))
    assert chunks[-1]["usage"] == override


def test_split_text_round_trips() -> None:
    rng = random.Random(7)
    alphabet = "ab  \n\tçé漢字😀-"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        pieces = split_text(text)
        assert "".join(pieces) == text
        assert all(0 < len(p) <= 16 for p in pieces)


def test_long_answers_stay_around_max_pieces_chunks() -> None:
    text = "word " * 10_000 + "x" * 5000
    pieces = split_text(text, max_pieces=256)
    assert "".join(pieces) == text and len(pieces) <= 257
    body = completion(text, [{**CALLS[0], "function": {"name": "f", "arguments": "a" * 20_000}}])
    chunks = events(replay_stream(body, include_usage=False))
    assert len(chunks) < 2 * 256 + 5
    assembler = ChunkAssembler()
    for c in chunks:
        assembler.add(c)
    message = assembler.completion()["choices"][0]["message"]
    assert message["content"] == text
    assert message["tool_calls"][0]["function"]["arguments"] == "a" * 20_000

"""SSE parsing in arbitrary splits, chunk assembly, and provider stream translation."""

from __future__ import annotations

import json
import time

import pytest

from mitmroute.config import parse_config
from mitmroute.errors import ProxyError
from mitmroute.providers import provider_for
from mitmroute.streaming.sse import ChunkAssembler, SSEParser, encode

CHUNKS = [
    {
        "id": "c1",
        "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
    },
    {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
    {
        "id": "c1",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get", "arguments": '{"a"'},
                        }
                    ]
                },
            }
        ],
    },
    {
        "id": "c1",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                "finish_reason": "tool_calls",
            }
        ],
    },
    {
        "id": "c1",
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
    },
]
WIRE = b"".join(encode(c) for c in CHUNKS) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("size", [1, 7, 64, len(WIRE)])
def test_sse_parser_handles_any_split(size):
    parser = SSEParser()
    events = []
    for i in range(0, len(WIRE), size):
        events += parser.feed(WIRE[i : i + size])
    events += parser.finish()
    assert [e.data for e in events][-1] == "[DONE]"
    assert [json.loads(e.data) for e in events[:-1]] == CHUNKS


def test_sse_parser_reads_event_names_crlf_and_comments():
    events = SSEParser().feed(b": ping\r\nevent: message_start\r\ndata: {}\r\n\r\n")
    assert events[0].event == "message_start" and events[0].data == "{}"


def test_assembler_rebuilds_the_completion():
    assembler = ChunkAssembler()
    for chunk in CHUNKS:
        assembler.add(chunk)
    body = assembler.completion()
    message = body["choices"][0]["message"]
    assert message["content"] == "Hel"
    assert message["tool_calls"][0]["function"] == {"name": "get", "arguments": '{"a": 1}'}
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert assembler.usage.prompt_tokens == 3 and assembler.finished


def _deployment(model: str):
    config = parse_config(
        {
            "model_list": [
                {
                    "model_name": "g",
                    "litellm_params": {
                        "model": model,
                        "api_base": "http://127.0.0.1:1",
                        "api_key": "k",
                    },
                }
            ]
        },
        environ={},
    )
    return config.deployments[0]


def test_openai_stream_raises_on_an_error_event():
    translator = provider_for("openai").stream("chat/completions", _deployment("openai/x"))
    with pytest.raises(ProxyError) as info:
        translator.feed(b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')
    assert info.value.status == 500 and info.value.retryable


def test_openai_build_asks_streams_for_usage_and_uses_the_deployment_key():
    call = provider_for("openai").build(
        "chat/completions",
        {"model": "gpt-4o", "stream": True, "messages": []},
        _deployment("openai/real-name"),
        drop_params=False,
    )
    body = json.loads(call.body)
    assert body["model"] == "real-name"
    assert body["stream_options"] == {"include_usage": True}
    assert call.headers["authorization"] == "Bearer k"
    assert call.url == "http://127.0.0.1:1/chat/completions"


def test_ollama_ndjson_stream_becomes_chunks_with_usage():
    translator = provider_for("ollama").stream("chat/completions", _deployment("ollama/q"))
    wire = (
        b'{"model":"q","message":{"role":"assistant","content":"Hi"},"done":false}\n'
        b'{"model":"q","message":{"role":"assistant","content":""},"done":true,'
        b'"done_reason":"stop","prompt_eval_count":5,"eval_count":2}\n'
    )
    chunks = [c for i in range(0, len(wire), 10) for c in translator.feed(wire[i : i + 10])]
    assembler = ChunkAssembler()
    for chunk in chunks:
        assembler.add(chunk)
    assert assembler.completion()["choices"][0]["message"]["content"] == "Hi"
    assert assembler.usage.prompt_tokens == 5 and assembler.usage.completion_tokens == 2
    assert translator.done


def test_ollama_rejects_what_it_cannot_do_unless_drop_params():
    body = {"model": "x", "messages": [{"role": "user", "content": "x"}], "logprobs": True}
    provider = provider_for("ollama")
    with pytest.raises(ProxyError) as info:
        provider.build("chat/completions", body, _deployment("ollama/q"), drop_params=False)
    assert info.value.status == 400 and info.value.param == "logprobs"
    call = provider.build("chat/completions", body, _deployment("ollama/q"), drop_params=True)
    assert "logprobs" not in json.loads(call.body)


def test_a_200_carrying_an_error_object_is_an_error_not_an_answer():
    with pytest.raises(ProxyError) as info:
        provider_for("openai").parse(
            "chat/completions",
            b'{"error": {"message": "upstream overloaded"}}',
            _deployment("openai/x"),
        )
    assert info.value.retryable and "overloaded" in info.value.message


def test_assembler_keeps_reasoning_text():
    assembler = ChunkAssembler()
    assembler.add({"choices": [{"index": 0, "delta": {"reasoning_content": "think "}}]})
    assembler.add({"choices": [{"index": 0, "delta": {"reasoning_content": "hard"}}]})
    assembler.add({"choices": [{"index": 0, "delta": {"content": "42"}, "finish_reason": "stop"}]})
    message = assembler.completion()["choices"][0]["message"]
    assert message["reasoning_content"] == "think hard" and message["content"] == "42"


def test_assembler_joins_content_refusal_and_tool_calls_piece_by_piece():
    assembler = ChunkAssembler()
    call = {"index": 0, "id": "call_1", "function": {"name": "get_", "arguments": '{"ci'}}
    assembler.add({"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [call]}}]})
    more = {"index": 0, "function": {"name": "weather", "arguments": 'ty":"Oslo"}'}}
    assembler.add({"choices": [{"index": 0, "delta": {"tool_calls": [more]}}]})
    assembler.add({"choices": [{"index": 1, "delta": {"refusal": "I can"}}]})
    assembler.add({"choices": [{"index": 1, "delta": {"refusal": "not."}}]})
    assembler.add({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    assembler.add({"choices": [{"index": 1, "delta": {}, "finish_reason": "stop"}]})
    first, second = (c["message"] for c in assembler.completion()["choices"])
    assert first["content"] is None  # a tool-call-only answer has null content, not ""
    assert first["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
        }
    ]
    assert second["refusal"] == "I can" + "not." and second["content"] is None
    assert assembler.text() == 'get_weather{"city":"Oslo"}'
    assert assembler.finished


def test_assembler_time_per_chunk_does_not_grow_with_the_answer():
    """Pieces are joined once: 40,000 chunks cost about what 40 x 1,000 do (adding each piece
    to the text so far copied it whole, ~6x more per chunk at this length)."""

    def per_chunk(n: int) -> float:
        assembler = ChunkAssembler()
        chunk = {"choices": [{"index": 0, "delta": {"content": "token "}}]}
        start = time.process_time()
        for _ in range(n):
            assembler.add(chunk)
        assert len(assembler.completion()["choices"][0]["message"]["content"]) == 6 * n
        return (time.process_time() - start) / n

    small = min(per_chunk(1_000) for _ in range(3))
    assert min(per_chunk(40_000) for _ in range(2)) < 3 * small


@pytest.mark.parametrize(
    "block",
    [b"data: {}", b"data:  two spaces", b"data: ", b"data:{}", b"data: a\ndata: b", b"data: \xff"],
)
def test_sse_parser_one_data_line_reads_as_the_general_parser_does(block):
    from mitmroute.streaming.sse import _parse_block

    assert SSEParser().feed(block + b"\n\n") == [_parse_block(block.decode("utf-8", "replace"))]

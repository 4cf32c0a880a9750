"""Property: whatever a client sends to an intercepted host, the proxy answers it (a 4xx for bad
input) or routes it; it never answers 5xx on its own account and never lets a model request go
out unrouted.

Hypothesis generates methods, path spellings, content encodings and bodies that mix the
shapes real clients send with wrong types in every parameter the proxy or a provider's
translation reads. The engine runs in process against the fake OpenAI, Ollama and Anthropic
backends (each of which rejects what its real API rejects). The number of examples is bounded
for CI (`MITMROUTE_FUZZ_EXAMPLES`, default 400) and the run is derandomized so CI is repeatable;
raise the count and drop `derandomize` locally to search further.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mitmroute.bodies import decode_body
from mitmroute.config import parse_config
from mitmroute.engine import Engine
from mitmroute.errors import ProxyError
from mitmroute.gate import decide
from mitmroute.request import ClientRequest
from tests.conftest import deployment
from tests.fakes.anthropic_server import FakeAnthropic

EXAMPLES = int(os.environ.get("MITMROUTE_FUZZ_EXAMPLES", "400"))
MODELS = ["gpt-4o", "local", "chat-local", "claude", "embed", "missing-model"]
LIMIT = 1 << 20

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
roles = st.sampled_from(["user", "system", "assistant", "tool", "developer", "function"]) | st.text(
    max_size=6
)
content_parts = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio", "file"]) | st.text(max_size=5)},
    optional={"text": json_values, "image_url": json_values},
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles},
        optional={
            "content": st.text(max_size=30) | st.lists(content_parts, max_size=3) | json_values,
            "tool_calls": json_values,
            "tool_call_id": json_values,
            "name": json_values,
        },
    )
    | json_values,
    max_size=4,
)
valid_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=20)}
    ),
    min_size=1,
    max_size=3,
)
PARAMS = (
    "stream", "stream_options", "tools", "tool_choice", "max_tokens", "n", "user",
    "temperature", "stop", "response_format", "logprobs", "metadata", "cache",
    "max_completion_tokens", "seed", "parallel_tool_calls", "prompt", "input", "top_p",
    "frequency_penalty", "presence_penalty", "logit_bias", "top_logprobs", "modalities",
    "reasoning_effort", "thinking", "top_k", "encoding_format", "dimensions",
)  # fmt: skip
odd_params = st.dictionaries(st.sampled_from(PARAMS), json_values, max_size=3)
plausible_params = st.fixed_dictionaries(
    {},
    optional={
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        "max_tokens": st.integers(1, 50),
        "tools": st.just(
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        ),
        "tool_choice": st.sampled_from(["auto", "none", "required"]),
        "user": st.text(max_size=5),
        "input": st.text(max_size=10) | st.lists(st.text(max_size=5), max_size=2),
        "prompt": st.text(max_size=10),
    },
)
chat_bodies = st.builds(
    lambda model, msgs, plausible, odd: {"model": model, "messages": msgs, **plausible, **odd},
    st.sampled_from(MODELS) | json_values,
    valid_messages | messages,
    plausible_params,
    st.just({}) | odd_params,
)
bodies = (
    chat_bodies.map(lambda b: json.dumps(b).encode())
    | chat_bodies.map(lambda b: json.dumps(b).encode())
    | chat_bodies.map(lambda b: json.dumps(b).encode())
    | json_values.map(lambda b: json.dumps(b).encode())
    | st.binary(max_size=64)
    | st.integers(1, 3000).map(lambda n: b'{"model":"gpt-4o","x":' + b"[" * n + b"]" * n + b"}")
)
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
paths = (
    st.sampled_from(ROUTES * 6)
    | st.sampled_from(
        [
            "//v1/chat/completions", "/V1/chat/completions", "/v1/%2e/chat/completions",
            "/v1/chat%2Fcompletions", "/v1/models", "/v1/files", "/admin",
            "/v1/chat%252Fcompletions", "/v1/chat/completions?x=1", "/v1/../v1/embeddings",
        ]
    )
    | st.text(alphabet="/v1chatompleinsd%2eEF.?;\\", max_size=30).map(lambda p: "/" + p)
)  # fmt: skip
methods = st.sampled_from(["POST"] * 8 + ["GET", "PUT", "DELETE"])
encodings = st.sampled_from([""] * 6 + ["gzip", "identity", "br", "zstd"])


@pytest.fixture(scope="module")
def claude():
    server = FakeAnthropic()
    server.start()
    yield server
    server.stop()


def fuzz_config(backend_url: str, claude_url: str):
    return parse_config(
        {
            "model_list": [
                deployment("gpt-4o", "openai/ok-model", f"{backend_url}/v1", api_key="sk-b"),
                deployment("local", "ollama/qwen3:8b", backend_url),
                deployment("chat-local", "ollama_chat/qwen3:8b", backend_url),
                deployment("claude", "anthropic/claude-opus-4-20250514", claude_url, api_key="k"),
                deployment("embed", "openai/text-embedding-3-small", f"{backend_url}/v1",
                           api_key="k"),
            ],
            "router_settings": {"num_retries": 0, "timeout": 10},
            "general_settings": {"passthrough_unknown_models": False},
        }
    )  # fmt: skip


async def answer(engine: Engine, method: str, path: str, body: bytes, encoding: str) -> None:
    decision = decide(method, path, "api.openai.com")
    if decision.fate == "refuse":
        assert decision.error is not None and 400 <= decision.error.status < 500
        return
    if decision.path.startswith("/key/"):
        return  # the key API belongs to the auth addon
    if encoding:
        packed = gzip.compress(body) if encoding == "gzip" else body
        try:
            body = decode_body(packed, encoding, LIMIT)
        except ProxyError as e:
            assert 400 <= e.status < 500
            return
    request = ClientRequest(method, decision.path, {"content-type": "application/json"}, body)
    reply = await engine.handle(request)
    if reply.stream is not None:
        async for _ in reply.stream:
            pass
    if decision.fate == "route":
        assert not reply.passthrough, "a model request went out unrouted"
    assert reply.status < 500, (reply.status, reply.body[:300])
    assert reply.exchange is not None  # every exchange is a spend row


def test_fuzzed_requests_are_answered_4xx_or_routed_never_5xx_never_leaked(backend, claude):
    engine = Engine(fuzz_config(backend.url, claude.base_url))
    loop = asyncio.new_event_loop()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=os.environ.get("MITMROUTE_FUZZ_RANDOM") is None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(method=methods, path=paths, body=bodies, encoding=encodings)
    def check(method: str, path: str, body: bytes, encoding: str) -> None:
        loop.run_until_complete(answer(engine, method, path, body, encoding))

    try:
        check()
    finally:
        loop.run_until_complete(engine.close())
        loop.close()

"""What the proxy writes in OpenAI's dialect has OpenAI's published shape (tests/spec/openai.py).

Every answer is read raw (bytes through a real mitmdump), not through the openai SDK, which
forgives missing fields: chat completions and their stream chunks from each kind of backend
(OpenAI-compatible passed on, Anthropic and Ollama translated, cache replays), legacy
completions, embeddings, the models list, and the errors the proxy writes itself.

OpenAI-compatible deployments point at tests/fakes/openai_spec_server.py, whose answers have
the spec's shape (checked first, below): a shape error seen through the proxy is the proxy's.
The loose fake (tests/fakes/openai_server.py) serves only what needs its scripted faults.
"""

from __future__ import annotations

import gzip
import json
import uuid
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import WEATHER_TOOL, Proxy, deployment
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.openai_spec_server import FakeSpecBackend
from tests.spec.openai import validate_openai, validate_openai_all
from tests.spec.sse import openai_chunks

API = "https://api.openai.com"


@pytest.fixture(scope="module")
def claude():
    with FakeAnthropic(api_key="sk-ant-backend") as server:
        yield server


@pytest.fixture(scope="module")
def spec_backend():
    with FakeSpecBackend() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(backend, spec_backend, claude, confdir, tmp_path_factory):
    base, spec = f"{backend.url}/v1", f"{spec_backend.url}/v1"
    config = {
        "model_list": [
            deployment("gpt-4o", "openai/ok-model", spec, api_key="sk-b"),
            deployment("quiet", "openai/no-usage", base, api_key="sk-b"),
            deployment(
                "claude",
                "anthropic/claude-opus-4-20250514",
                claude.base_url,
                api_key="sk-ant-backend",
            ),
            deployment("local-qwen", "ollama/qwen3:32b", backend.url),
            deployment("chat-qwen", "ollama_chat/qwen3:8b", backend.url),
            deployment("embed", "openai/text-embedding-3-small", spec, api_key="sk-b"),
            deployment("broken", "openai/fail-500", base, api_key="sk-b"),
            deployment("limited", "openai/ratelimit-7", base, api_key="sk-b"),
            deployment("breaking", "openai/break", base, api_key="sk-b"),
            deployment("cached", "openai/cache-model", spec, api_key="sk-b"),
        ],
        "router_settings": {"num_retries": 0},
        "litellm_settings": {"cache": True, "cache_params": {"type": "local"}},
        "general_settings": {"passthrough_unknown_models": False, "max_request_size_mb": 1},
    }
    running = Proxy(config, confdir, tmp_path_factory.mktemp("shapes"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(proxy):
    with proxy.http(base_url=API, headers={"authorization": "Bearer sk-client"}) as client:
        yield client


def ask(text: str = "", **extra: Any) -> dict[str, Any]:
    """A chat body with a prompt no earlier request sent (the cache is on)."""
    prompt = f"{text or 'hello there'} {uuid.uuid4().hex[:8]}"
    return {"messages": [{"role": "user", "content": prompt}], **extra}


CHAT_GROUPS = ["gpt-4o", "claude", "local-qwen", "chat-qwen"]
"""OpenAI-compatible (passed on), Anthropic, Ollama /api/generate and /api/chat (translated)."""


def test_the_spec_fake_answers_in_openais_shape(spec_backend):
    """So that what fails below is the proxy's doing."""
    with httpx.Client(base_url=f"{spec_backend.url}/v1") as client:
        chat = client.post("/chat/completions", json=ask(model="m"))
        validate_openai("CreateChatCompletionResponse", chat.json())
        stream = client.post(
            "/chat/completions",
            json=ask(model="m", stream=True, stream_options={"include_usage": True}),
        )
        validate_openai_all("CreateChatCompletionStreamResponse", openai_chunks(stream.text)[0])
        text = client.post("/completions", json={"model": "m", "prompt": "a b"})
        validate_openai("CreateCompletionResponse", text.json())
        text_stream = client.post(
            "/completions", json={"model": "m", "prompt": "a", "stream": True}
        )
        validate_openai_all("CreateCompletionResponse", completion_chunks(text_stream.text))
        vectors = client.post("/embeddings", json={"model": "m", "input": "a"})
        validate_openai("CreateEmbeddingResponse", vectors.json())


@pytest.mark.parametrize("group", CHAT_GROUPS)
def test_chat_completion_has_openais_shape(http, group):
    answer = http.post("/v1/chat/completions", json=ask(model=group))
    assert answer.status_code == 200, answer.text
    validate_openai("CreateChatCompletionResponse", answer.json())


@pytest.mark.parametrize("group", CHAT_GROUPS)
@pytest.mark.parametrize("usage", [False, True], ids=["plain", "include_usage"])
def test_chat_stream_chunks_have_openais_shape(http, group, usage):
    body = ask(model=group, stream=True)
    if usage:
        body["stream_options"] = {"include_usage": True}
    answer = http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    chunks, done = openai_chunks(answer.content)
    assert done, answer.text
    assert validate_openai_all("CreateChatCompletionStreamResponse", chunks) >= 2
    assert len({c["id"] for c in chunks}) == 1, "every chunk of a stream carries its id"
    if usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"], chunks[-1]


@pytest.mark.parametrize("group", ["quiet"])
def test_a_stream_asked_for_usage_ends_with_a_usage_chunk(http, group):
    """OpenAI always ends such a stream with `choices: []` and `usage`; clients that asked
    (openai SDK users counting tokens) read it there. `quiet` is a backend that reports no
    usage (llama.cpp's server ignores include_usage): the proxy counts the tokens for its
    spend log all the same."""
    body = ask(model=group, stream=True, stream_options={"include_usage": True})
    answer = http.post("/v1/chat/completions", json=body)
    chunks, done = openai_chunks(answer.content)
    assert done
    validate_openai_all("CreateChatCompletionStreamResponse", chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1].get("usage"), chunks[-1]


def test_translated_tool_calls_have_openais_shape(http):
    body = ask("What's the weather in Paris? use tool", model="claude", tools=[WEATHER_TOOL])
    answer = http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    validate_openai("CreateChatCompletionResponse", answer.json())
    assert answer.json()["choices"][0]["message"]["tool_calls"]
    streamed = http.post("/v1/chat/completions", json={**body, "stream": True})
    chunks, done = openai_chunks(streamed.content)
    assert done
    validate_openai_all("CreateChatCompletionStreamResponse", chunks)
    assert any(c["choices"] and c["choices"][0]["delta"].get("tool_calls") for c in chunks)


def test_cache_replays_have_openais_shape(http):
    body = ask(model="cached")
    first = http.post("/v1/chat/completions", json=body)
    again = http.post("/v1/chat/completions", json=body)
    assert again.headers.get("x-mitmroute-cache") == "HIT", again.headers
    validate_openai("CreateChatCompletionResponse", first.json())
    validate_openai("CreateChatCompletionResponse", again.json())
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    http.post("/v1/chat/completions", json=stream)
    replay = http.post("/v1/chat/completions", json=stream)
    assert replay.headers.get("x-mitmroute-cache") == "HIT", replay.headers
    chunks, done = openai_chunks(replay.content)
    assert done
    validate_openai_all("CreateChatCompletionStreamResponse", chunks)


@pytest.mark.parametrize("group", ["gpt-4o", "local-qwen"])
def test_legacy_completion_has_openais_shape(http, group):
    body = {"model": group, "prompt": f"say it {uuid.uuid4().hex[:8]}"}
    answer = http.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    validate_openai("CreateCompletionResponse", answer.json())
    streamed = http.post("/v1/completions", json={**body, "stream": True})
    validate_openai_all("CreateCompletionResponse", completion_chunks(streamed.content))


@pytest.mark.parametrize("group", ["embed", "local-qwen"])
def test_embeddings_have_openais_shape(http, group):
    answer = http.post("/v1/embeddings", json={"model": group, "input": ["a b", "c"]})
    assert answer.status_code == 200, answer.text
    validate_openai("CreateEmbeddingResponse", answer.json())


def test_models_list_has_openais_shape(http):
    answer = http.get("/v1/models")
    assert answer.status_code == 200, answer.text
    validate_openai("ListModelsResponse", answer.json())


def completion_chunks(raw: bytes | str) -> list[Any]:
    """A legacy completions stream's chunks, ready for CreateCompletionResponse. The spec has
    no chunk schema for them: the API streams CreateCompletionResponse objects whose
    `finish_reason` is null until the last; that null is allowed here, nothing else."""
    chunks, done = openai_chunks(raw)
    assert done, raw
    for chunk in chunks:
        for choice in chunk.get("choices", []):
            if isinstance(choice, dict) and choice.get("finish_reason", "") is None:
                choice["finish_reason"] = "stop"
    return chunks


def _deep(levels: int) -> bytes:
    return b'{"model": "gpt-4o", "x": ' + b"[" * levels + b"]" * levels + b"}"


ERRORS = {
    "unknown model": ("POST", "/v1/chat/completions", {"json": ask(model="nope")}, 404),
    "body not JSON": ("POST", "/v1/chat/completions", {"content": b"{not json"}, 400),
    "model not a string": ("POST", "/v1/chat/completions", {"json": ask(model=3)}, 400),
    "messages missing": ("POST", "/v1/chat/completions", {"json": {"model": "gpt-4o"}}, 400),
    "body too deep": ("POST", "/v1/chat/completions", {"content": _deep(200)}, 400),
    "body too large": (
        "POST",
        "/v1/embeddings",
        {"json": {"model": "embed", "input": "x" * (2 << 20)}},
        413,
    ),
    "unknown encoding": (
        "POST",
        "/v1/chat/completions",
        {"content": b"{}", "headers": {"content-encoding": "zz"}},
        415,
    ),
    "path outside the rule": ("GET", "/v2/anything", {}, 404),
    "malformed path": ("POST", "/v1/chat%252Fcompletions", {"json": ask(model="gpt-4o")}, 400),
    "backend failed": ("POST", "/v1/chat/completions", {"json": ask(model="broken")}, 503),
    "backend rate limit": ("POST", "/v1/chat/completions", {"json": ask(model="limited")}, 429),
    "responses with a hosted tool": (
        "POST",
        "/v1/responses",
        {"json": {"model": "gpt-4o", "input": "hi", "tools": [{"type": "web_search"}]}},
        400,
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_the_proxy_writes_have_openais_shape(http, case):
    method, path, kwargs, status = ERRORS[case]
    answer = http.request(method, path, **kwargs)
    assert answer.status_code >= 400, answer.text
    if status is not None:
        assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    validate_openai("ErrorResponse", answer.json())


def test_a_gzipped_request_is_answered_in_openais_shape(http):
    body = gzip.compress(json.dumps(ask(model="gpt-4o")).encode())
    answer = http.post(
        "/v1/chat/completions",
        content=body,
        headers={"content-encoding": "gzip", "content-type": "application/json"},
    )
    assert answer.status_code == 200, answer.text
    validate_openai("CreateChatCompletionResponse", answer.json())


def test_a_stream_broken_midway_ends_with_an_openai_error_event(http):
    answer = http.post("/v1/chat/completions", json=ask(model="breaking", stream=True))
    assert answer.status_code == 200
    chunks, _ = openai_chunks(answer.content)
    errors = [c for c in chunks if "error" in c]
    assert errors, chunks
    validate_openai_all(
        "CreateChatCompletionStreamResponse", [c for c in chunks if "error" not in c]
    )
    validate_openai("ErrorResponse", errors[-1])


def test_websocket_upgrade_refusal_has_openais_shape(proxy):
    headers = {
        "connection": "Upgrade",
        "upgrade": "websocket",
        "sec-websocket-version": "13",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    with proxy.http(base_url=API) as client:
        answer = client.get("/v1/responses", headers=headers)
    assert answer.status_code == 426, answer.text
    validate_openai("ErrorResponse", answer.json())


def test_key_api_and_auth_errors_have_openais_shape(start_proxy, backend):
    keyed = start_proxy(
        {
            "model_list": [deployment("gpt-4o", "openai/ok", f"{backend.url}/v1", api_key="k")],
            "general_settings": {"master_key": "sk-master-yardstick"},
        }
    )
    with keyed.http(base_url=API) as client:
        no_key = client.post("/v1/chat/completions", json=ask(model="gpt-4o"))
        bad_key = client.post(
            "/v1/chat/completions",
            json=ask(model="gpt-4o"),
            headers={"authorization": "Bearer sk-not-a-key"},
        )
    for answer in (no_key, bad_key):
        assert answer.status_code in (401, 403), answer.text
        validate_openai("ErrorResponse", answer.json())

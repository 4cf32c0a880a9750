"""The Responses dialect over a real Engine and fake backends (no mitmproxy): conversations
continued with previous_response_id, stored responses read and deleted, spend rows, refusals."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from openai.types.responses import Response

from mitmroute.config import parse_config
from mitmroute.engine import Engine
from mitmroute.exchange import Exchange
from mitmroute.inbound.responses import ResponsesInbound, openai_only
from mitmroute.inbound.responses.store import ResponseStore, local_store
from mitmroute.request import ClientRequest, Reply
from tests.fakes.openai_server import FakeBackend
from tests.fakes.tool_chat_server import ToolChatServer

pytestmark = pytest.mark.timeout(30)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def fake() -> Iterator[ToolChatServer]:
    with ToolChatServer() as server:
        yield server


@pytest.fixture(scope="module")
def breaking() -> Iterator[FakeBackend]:
    backend = FakeBackend()
    url = backend.start()
    backend.url = url  # type: ignore[attr-defined]
    yield backend
    backend.stop()


def config(fake: ToolChatServer, breaking: FakeBackend, cache: bool = False, **general: Any):
    def entry(name: str, model: str, base: str) -> dict[str, Any]:
        params = {
            "model": model,
            "api_base": base,
            "api_key": "sk-backend",
            "input_cost_per_token": 0.000001,
            "output_cost_per_token": 0.000002,
        }
        return {"model_name": name, "litellm_params": params}

    return parse_config(
        {
            "model_list": [
                entry("gpt-4o", "openai/fake-gpt", f"{fake.url}/v1"),
                entry("local", "ollama_chat/qwen3", fake.url),
                entry("claude", "anthropic/claude-x", "http://127.0.0.1:9"),
                entry("broken", "openai/break", f"{breaking.url}/v1"),  # type: ignore[attr-defined]
            ],
            "router_settings": {"num_retries": 0, "fallbacks": [{"gpt-4o": ["local"]}]},
            "general_settings": general,
            "litellm_settings": {"cache": cache},
        },
        environ={},
    )


class Harness:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inbound = ResponsesInbound(ResponseStore(local_store()))
        self.rows: list[Exchange] = []
        engine.listeners.append(self.rows.append)

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, key: str = "sk-app"
    ) -> Reply:
        raw = json.dumps(body).encode() if body is not None else b""
        request = ClientRequest(
            method, path, {"authorization": f"Bearer {key}"}, raw, host="api.openai.com"
        )
        return await self.inbound.handle(self.engine, request)

    async def create(self, key: str = "sk-app", **body: Any) -> Response:
        reply = await self.call("POST", "/v1/responses", {"model": "gpt-4o", **body}, key)
        assert reply.status == 200, reply.body
        return Response.model_validate_json(reply.body)

    async def stream(self, **body: Any) -> list[dict[str, Any]]:
        reply = await self.call(
            "POST", "/v1/responses", {"model": "gpt-4o", "stream": True, **body}
        )
        assert reply.status == 200 and reply.stream is not None, reply.body
        data = b""
        async for piece in reply.stream:
            data += piece
        return [json.loads(b.split(b"data: ", 1)[1]) for b in data.split(b"\n\n") if b]


@pytest.fixture
async def harness(fake, breaking) -> AsyncIterator[Harness]:
    engine = Engine(config(fake, breaking))
    yield Harness(engine)
    await engine.close()


async def test_previous_response_id_continues_the_conversation(harness, fake) -> None:
    first = await harness.create(input="My name is Ada", instructions="Be brief.")
    second = await harness.create(input="What is my name?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    sent = fake.requests[-1]["messages"]
    assert sent == [
        {"role": "user", "content": "My name is Ada"},
        {"role": "assistant", "content": "echo: My name is Ada"},
        {"role": "user", "content": "What is my name?"},
    ]  # the first turn's instructions are not carried over, as OpenAI does


async def test_two_tool_turns_through_previous_response_id(harness, fake) -> None:
    first = await harness.create(input="Weather in Paris? use tool", tools=[WEATHER])
    call = first.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "18C"}
    events = await harness.stream(input=[output], previous_response_id=first.id, tools=[WEATHER])
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == "Got the tool result: 18C"
    roles = [m["role"] for m in fake.requests[-1]["messages"]]
    assert roles == ["user", "assistant", "tool"]
    assert fake.requests[-1]["messages"][1]["tool_calls"][0]["id"] == call.call_id


async def test_get_input_items_and_delete_a_stored_response(harness) -> None:
    first = await harness.create(input="one")
    second = await harness.create(input="two", previous_response_id=first.id, metadata={"k": "v"})
    got = await harness.call("GET", f"/v1/responses/{second.id}")
    assert got.status == 200
    assert Response.model_validate_json(got.body) == second
    items = await harness.call("GET", f"/v1/responses/{second.id}/input_items?order=asc&limit=2")
    page = json.loads(items.body)
    texts = [i["content"][0]["text"] for i in page["data"]]
    assert texts == ["one", "echo: one"] and page["has_more"] is True
    rest = await harness.call(
        "GET", f"/v1/responses/{second.id}/input_items?order=asc&after={page['last_id']}"
    )
    assert [i["content"][0]["text"] for i in json.loads(rest.body)["data"]] == ["two"]
    newest = json.loads((await harness.call("GET", f"/v1/responses/{second.id}/input_items")).body)
    assert newest["data"][0]["content"][0]["text"] == "two"  # desc by default
    deleted = await harness.call("DELETE", f"/v1/responses/{second.id}")
    assert json.loads(deleted.body) == {"id": second.id, "object": "response", "deleted": True}
    gone = await harness.call("GET", f"/v1/responses/{second.id}")
    assert gone.status == 404
    assert json.loads(gone.body) == {
        "error": {
            "message": f"Response with id '{second.id}' not found.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    again = await harness.call(
        "POST",
        "/v1/responses",
        {"model": "gpt-4o", "input": "x", "previous_response_id": second.id},
    )
    assert again.status == 404
    assert json.loads(again.body)["error"]["code"] == "previous_response_not_found"
    endpoints = [row.endpoint for row in harness.rows]
    assert "responses/{id}" in endpoints and "responses/{id}/input_items" in endpoints


async def test_a_response_is_only_visible_to_the_key_that_created_it(harness) -> None:
    mine = await harness.create(input="secret", key="sk-alice")
    assert (await harness.call("GET", f"/v1/responses/{mine.id}", key="sk-bob")).status == 404
    theirs = await harness.call(
        "POST",
        "/v1/responses",
        {"model": "gpt-4o", "input": "x", "previous_response_id": mine.id},
        key="sk-bob",
    )
    assert theirs.status == 404


async def test_store_false_keeps_nothing(harness) -> None:
    response = await harness.create(input="forget me", store=False)
    assert response.store is False
    assert (await harness.call("GET", f"/v1/responses/{response.id}")).status == 404


async def test_the_spend_row_is_endpoint_responses_with_the_answers_exact_usage(harness) -> None:
    response = await harness.create(input="count these four")
    events = await harness.stream(input="and these")
    rows = [r for r in harness.rows if r.endpoint == "responses"]
    assert len(rows) == 2 and all(r.deployment == "openai/fake-gpt" for r in rows)
    assert response.usage is not None and rows[0].usage is not None
    assert response.usage.input_tokens == rows[0].usage.prompt_tokens == 3
    assert response.usage.output_tokens == rows[0].usage.completion_tokens == 4
    streamed = events[-1]["response"]["usage"]
    assert rows[1].usage is not None and rows[1].stream
    assert (streamed["input_tokens"], streamed["output_tokens"]) == (
        rows[1].usage.prompt_tokens,
        rows[1].usage.completion_tokens,
    )
    assert rows[0].cost_usd is not None and rows[0].cost_usd > 0


async def test_a_cached_answer_is_replayed_as_a_responses_stream(fake, breaking) -> None:
    engine = Engine(config(fake, breaking, cache=True))
    harness = Harness(engine)
    first = await harness.create(input="cache me please")
    assert engine.cache is not None
    for _ in range(100):  # the engine writes the cache in a task of its own
        if engine.cache.stats.stores:
            break
        await asyncio.sleep(0.01)
    seen = len(fake.requests)
    events = await harness.stream(input="cache me please")
    assert len(fake.requests) == seen  # answered from the cache
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == first.output_text and final.id != first.id
    assert final.usage == first.usage
    assert harness.rows[-1].cache_hit and harness.rows[-1].endpoint == "responses"
    await engine.close()


async def test_a_stream_broken_mid_way_ends_with_response_failed(harness) -> None:
    events = await harness.stream(model="broken", input="one two three four")
    assert events[0]["type"] == "response.created"
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1]["response"]["status"] == "failed"
    row = next(r for r in harness.rows if r.model_group == "broken")
    assert row.endpoint == "responses" and row.error_type is not None


async def test_hosted_tools_are_refused_before_any_backend_call(harness, fake) -> None:
    seen = len(fake.requests)
    reply = await harness.call(
        "POST",
        "/v1/responses",
        {"model": "gpt-4o", "input": "x", "tools": [{"type": "web_search"}]},
    )
    assert reply.status == 400 and len(fake.requests) == seen
    error = json.loads(reply.body)["error"]
    assert "`web_search`" in error["message"] and error["param"] == "tools[0]"
    assert harness.rows[-1].endpoint == "responses" and harness.rows[-1].status_code == 400


async def test_an_unknown_model_passes_through_or_is_a_404(fake, breaking) -> None:
    engine = Engine(config(fake, breaking))
    passing = await Harness(engine).call(
        "POST", "/v1/responses", {"model": "gpt-5", "input": "x", "tools": [{"type": "web_search"}]}
    )
    assert passing.passthrough and passing.exchange is not None
    assert passing.exchange.endpoint == "responses"
    strict = Engine(config(fake, breaking, passthrough_unknown_models=False))
    refused = await Harness(strict).call("POST", "/v1/responses", {"model": "gpt-5", "input": "x"})
    assert refused.status == 404
    assert json.loads(refused.body)["error"]["code"] == "model_not_found"
    await engine.close()
    await strict.close()


async def test_reasoning_effort_goes_only_where_every_backend_takes_it(
    harness, fake, breaking
) -> None:
    cfg = harness.engine.config
    assert not openai_only(cfg, "gpt-4o")  # its fallback is an Ollama deployment
    assert openai_only(cfg, "broken") and not openai_only(cfg, "claude")
    await harness.create(input="x", reasoning={"effort": "low"})
    assert "reasoning_effort" not in fake.requests[-1]
    reply = await harness.call(
        "POST", "/v1/responses", {"model": "broken", "input": "x", "reasoning": {"effort": "low"}}
    )
    assert reply.status == 200
    assert breaking.state.requests[-1]["reasoning_effort"] == "low"


async def test_paths_and_queries_the_store_does_not_answer(harness) -> None:
    response = await harness.create(input="x")
    bad = await harness.call("DELETE", f"/v1/responses/{response.id}/input_items")
    assert bad.status == 404 and json.loads(bad.body)["error"]["code"] == "unknown_url"
    streamed = await harness.call("GET", f"/v1/responses/{response.id}?stream=true")
    assert streamed.status == 400
    weird = await harness.call("GET", "/v1/responses/..%2f")
    assert weird.status == 404


async def test_stored_responses_go_to_redis_when_the_cache_is_redis(fake, breaking) -> None:
    plain = Engine(config(fake, breaking))
    inbound = ResponsesInbound()
    assert inbound.store_for(plain).remote is None
    raw = {
        "model_list": [
            {
                "model_name": "m",
                "litellm_params": {"model": "openai/x", "api_base": "http://127.0.0.1:9"},
            }
        ],
        "litellm_settings": {
            "cache": True,
            "cache_params": {
                "type": "redis",
                "url": "redis://127.0.0.1:6379/9",
                "namespace": "team-a",
            },
        },
    }
    shared = Engine(parse_config(raw, environ={}))
    store = inbound.store_for(shared)
    assert shared.cache is not None and store.remote is shared.cache.store
    assert store.prefix == "team-a:response:"
    assert store.local is inbound.store_for(plain).local  # one LRU across config reloads
    await plain.close()
    await shared.close()

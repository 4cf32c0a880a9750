"""Apps written for OpenAI's Responses API (the openai SDK's `responses.*`) are answered through
a real mitmdump by any kind of deployment: OpenAI-compatible, Ollama, Anthropic."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import duckdb
import openai
import pytest

from tests.conftest import Proxy, deployment
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.openai_server import FakeBackend
from tests.fakes.tool_chat_server import ToolChatServer

IN_PRICE, OUT_PRICE = Decimal("0.000003"), Decimal("0.000015")
PRICES = {"input_cost_per_token": float(IN_PRICE), "output_cost_per_token": float(OUT_PRICE)}
BACKENDS = ["gpt-4o", "local", "claude"]
"""Model groups: an OpenAI-compatible server, Ollama (`ollama_chat/`), Anthropic."""
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def proxy(
    confdir: Path, tmp_path_factory: pytest.TempPathFactory, backend: FakeBackend
) -> Iterator[Proxy]:
    with ToolChatServer() as chat, FakeAnthropic(api_key="sk-ant-backend") as claude:
        config = {
            "model_list": [
                deployment("gpt-4o", "openai/fake-gpt", f"{chat.url}/v1", api_key="sk-b", **PRICES),
                deployment("local", "ollama_chat/qwen3:8b", chat.url, **PRICES),
                deployment(
                    "claude",
                    "anthropic/claude-opus-4-20250514",
                    claude.base_url,
                    api_key="sk-ant-backend",
                    **PRICES,
                ),
                deployment("breaks", "openai/break", f"{backend.url}/v1", api_key="sk-b"),
            ],
            "router_settings": {"num_retries": 0},
            "general_settings": {"passthrough_unknown_models": False},
        }
        running = Proxy(config, confdir, tmp_path_factory.mktemp("responses"))
        yield running
        running.stop()


@pytest.mark.parametrize("model", BACKENDS)
def test_plain_and_streamed_answers(proxy: Proxy, model: str) -> None:
    with proxy.client() as client:
        plain = client.responses.create(model=model, input="Hello there", instructions="Be nice.")
        assert plain.status == "completed" and plain.output_text
        assert plain.id.startswith("resp_") and plain.usage is not None
        assert plain.usage.total_tokens == plain.usage.input_tokens + plain.usage.output_tokens
        events = list(client.responses.create(model=model, input="Hello again", stream=True))
        assert events[0].type == "response.created"
        assert events[-1].type == "response.completed"
        assert [e.sequence_number for e in events] == list(range(len(events)))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text and text == events[-1].response.output_text
        with client.responses.stream(model=model, input="Stream helper") as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()
        assert "".join(deltas) == final.output_text and final.usage is not None


@pytest.mark.parametrize("model", BACKENDS)
def test_function_tools_over_two_turns_with_previous_response_id(proxy: Proxy, model: str) -> None:
    with proxy.client() as client:
        with client.responses.stream(
            model=model, input="What's the weather in Paris? use tool", tools=[WEATHER]
        ) as stream:
            first = stream.get_final_response()
        call = first.output[-1]
        assert call.type == "function_call" and call.name == "get_weather"
        assert call.call_id and '"city"' in call.arguments
        second = client.responses.create(
            model=model,
            previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}],
            tools=[WEATHER],
        )
        assert "Got the tool result" in second.output_text
        assert "18C" in second.output_text


@pytest.mark.parametrize("model", BACKENDS)
def test_a_stateless_tool_round_trip_resending_every_item(proxy: Proxy, model: str) -> None:
    """As the Codex CLI does: store false, the whole history in `input` every time."""
    history: list = [{"role": "user", "content": "Weather in Paris? use tool"}]
    with proxy.client() as client:
        first = client.responses.create(model=model, input=history, tools=[WEATHER], store=False)
        history += [item.model_dump(exclude_none=True) for item in first.output]
        call = first.output[-1]
        history.append({"type": "function_call_output", "call_id": call.call_id, "output": "9C"})
        events = list(
            client.responses.create(
                model=model, input=history, tools=[WEATHER], store=False, stream=True
            )
        )
        assert "Got the tool result: 9C" in events[-1].response.output_text
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(first.id)  # store: false


@pytest.mark.parametrize("model", BACKENDS)
def test_get_and_delete_a_stored_response(proxy: Proxy, model: str) -> None:
    with proxy.client() as client:
        created = client.responses.create(model=model, input="Remember me", metadata={"a": "b"})
        fetched = client.responses.retrieve(created.id)
        assert fetched.id == created.id and fetched.output_text == created.output_text
        assert fetched.metadata == {"a": "b"}
        items = list(client.responses.input_items.list(created.id))
        assert [i.type for i in items] == ["message"] and items[0].role == "user"
        client.responses.delete(created.id)
        with pytest.raises(openai.NotFoundError) as gone:
            client.responses.retrieve(created.id)
        assert gone.value.status_code == 404
        with pytest.raises(openai.NotFoundError) as missing:
            client.responses.create(model=model, input="x", previous_response_id=created.id)
        assert missing.value.code == "previous_response_not_found"


def test_a_stored_response_is_private_to_its_key(proxy: Proxy) -> None:
    with proxy.client(api_key="sk-alice") as alice, proxy.client(api_key="sk-bob") as bob:
        created = alice.responses.create(model="gpt-4o", input="mine")
        with pytest.raises(openai.NotFoundError):
            bob.responses.retrieve(created.id)


@pytest.mark.parametrize(
    "tool", [{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}]
)
def test_a_hosted_tool_is_refused_with_a_400_naming_it(proxy: Proxy, tool: dict) -> None:
    with proxy.client() as client, pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="claude", input="search the web", tools=[tool])
    assert refused.value.status_code == 400
    assert f"`{tool['type']}`" in str(refused.value)


def test_a_stream_broken_mid_way_ends_with_response_failed(proxy: Proxy) -> None:
    with proxy.client() as client:
        events = list(client.responses.create(model="breaks", input="a b c d e", stream=True))
        assert events[0].type == "response.created"
        assert any(e.type == "response.output_text.delta" for e in events)
        error, failed = events[-2:]
        assert error.type == "error" and failed.type == "response.failed"
        assert failed.response.status == "failed" and failed.response.error is not None
        with (
            client.responses.stream(model="breaks", input="a b c d e") as stream,
            pytest.raises(RuntimeError, match=r"response\.completed"),
        ):
            stream.get_final_response()


def spend_rows(proxy: Proxy, ids: list[str]) -> dict[str, tuple]:
    """The spend rows of these request ids, once the writer has flushed them."""
    marks = ",".join("?" for _ in ids)
    sql = (
        "select request_id, endpoint, model_group, prompt_tokens, completion_tokens, cost_usd,"
        f" stream, usage_source from spend_log where request_id in ({marks})"
    )
    deadline = time.monotonic() + 15
    while True:
        try:
            with duckdb.connect(str(proxy.spend_db), read_only=True) as con:
                found = {row[0]: row for row in con.execute(sql, ids).fetchall()}
        except duckdb.Error:
            found = {}
        if len(found) == len(ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


@pytest.mark.parametrize("model", BACKENDS)
def test_spend_rows_say_responses_with_exact_tokens_and_cost(proxy: Proxy, model: str) -> None:
    with proxy.client() as client:
        raw = client.responses.with_raw_response.create(model=model, input="count these words")
        plain = raw.parse()
        streamed_raw = client.responses.with_raw_response.create(
            model=model, input="and these, streamed", stream=True
        )
        events = list(streamed_raw.parse())
    streamed = events[-1].response
    ids = [raw.headers["x-mitmroute-request-id"], streamed_raw.headers["x-mitmroute-request-id"]]
    rows = spend_rows(proxy, ids)
    assert len(rows) == 2, rows
    for request_id, response, stream in ((ids[0], plain, False), (ids[1], streamed, True)):
        _, endpoint, group, prompt, completion, cost, is_stream, source = rows[request_id]
        assert (endpoint, group, is_stream, source) == ("responses", model, stream, "upstream")
        assert response.usage is not None
        assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt, completion)
        assert prompt > 0 and completion > 0
        assert cost == prompt * IN_PRICE + completion * OUT_PRICE

"""Dev on a free local model: the example config's `local-gemma` group, served by a real
llama.cpp server (llama-cpp-python, Gemma 3 270M), answers the official openai SDK through a real
mitmdump, and the spend log has exact tokens for a plain answer, honest tokens for a streamed one
and a cost of 0.

Run by `make test-local-model` (and CI); plain `make test` leaves this directory out."""

from __future__ import annotations

import json
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml

from tests.conftest import ROOT

GROUP = "local-gemma"
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
PARAMS: dict[str, Any] = {"max_tokens": 24, "temperature": 0}

# the session's first test waits for the install (cold: llama.cpp compiles) and the start
pytestmark = pytest.mark.timeout(1800)


def example_group() -> dict[str, Any]:
    """The example config's deployment for the local model, as a user would copy it."""
    config = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    [entry] = [e for e in config["model_list"] if e["model_name"] == GROUP]
    return entry


def direct(base_url: str, body: dict[str, Any]) -> bytes:
    """A request straight to the server (no proxy), for what it really reports."""
    request = urllib.request.Request(
        f"{base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=120) as resp:
        return resp.read()


def ledger(db: Path) -> list[dict[str, Any]]:
    with duckdb.connect(str(db), read_only=True) as con:
        cur = con.execute(
            "select requested_model, model_group, deployment, provider, api_base, stream,"
            " status_code, prompt_tokens, completion_tokens, total_tokens, usage_source, cost_usd"
            " from spend_log order by started_at"
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


@pytest.fixture
def proxy(start_proxy, local_model):
    entry = example_group()
    entry["litellm_params"]["api_base"] = local_model.base_url  # this session's port
    return start_proxy({"model_list": [entry]})


def test_example_group_points_at_the_script_default_port():
    params = example_group()["litellm_params"]
    assert params["api_base"] == "http://127.0.0.1:8090/v1"
    assert params["input_cost_per_token"] == params["output_cost_per_token"] == 0


def test_plain_and_streamed_answers_through_the_proxy_are_logged(proxy, local_model):
    client = proxy.client()

    plain = client.chat.completions.create(model=GROUP, messages=MESSAGES, **PARAMS)
    plain_text = plain.choices[0].message.content or ""
    print(f"plain answer: {plain_text!r}, usage {plain.usage}")
    assert plain_text.strip(), plain
    assert plain.usage is not None and plain.usage.prompt_tokens > 0

    stream = client.chat.completions.create(
        model=GROUP,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        **PARAMS,
    )
    parts, stream_usage = [], None
    for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
        stream_usage = chunk.usage or stream_usage
    streamed_text = "".join(parts)
    print(f"streamed answer: {streamed_text!r}, usage {stream_usage}")
    assert streamed_text.strip()
    assert stream_usage is not None  # asked for: the proxy gives it even if the server doesn't

    # what the server itself reports for the same requests
    raw = {"model": "gemma3-270m", "messages": MESSAGES, **PARAMS}
    server_plain = json.loads(direct(local_model.base_url, raw))["usage"]
    sse = direct(
        local_model.base_url, {**raw, "stream": True, "stream_options": {"include_usage": True}}
    ).decode()
    server_streams_usage = any(
        json.loads(line[6:]).get("usage") for line in sse.splitlines() if line.startswith("data: {")
    )
    print(f"server: plain usage {server_plain}, streamed usage reported: {server_streams_usage}")

    assert proxy.stop() == 0  # SIGTERM flushes the spend log
    rows = ledger(proxy.spend_db)
    assert len(rows) == 2, rows
    for row in rows:
        assert row["requested_model"] == row["model_group"] == GROUP, row
        assert row["deployment"] == "openai/gemma3-270m", row
        assert row["api_base"] == local_model.base_url, row
        assert row["status_code"] == 200, row
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0, row
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"], row
        assert row["cost_usd"] == Decimal(0), row  # a local model is free, and says so (not NULL)

    logged_plain, logged_stream = rows
    assert logged_plain["stream"] is False and logged_stream["stream"] is True
    # plain: the server's own usage, exactly
    assert logged_plain["usage_source"] == "upstream"
    assert logged_plain["prompt_tokens"] == plain.usage.prompt_tokens
    assert logged_plain["completion_tokens"] == plain.usage.completion_tokens
    assert logged_plain["prompt_tokens"] == server_plain["prompt_tokens"]
    # streamed: llama-cpp-python ignores stream_options.include_usage, so the proxy counts
    assert logged_stream["usage_source"] == ("upstream" if server_streams_usage else "estimated")
    assert logged_stream["prompt_tokens"] == stream_usage.prompt_tokens
    assert logged_stream["completion_tokens"] == stream_usage.completion_tokens


def test_an_unchanged_app_asking_for_gpt_4o_gets_the_local_model(start_proxy, local_model):
    """The dev path: the app still says gpt-4o; the example config's commented alias line sends
    it to the free local model."""
    config = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    [alias_line] = [
        line.replace("# ", "", 1)  # uncommented, as a user would
        for line in (ROOT / "config.example.yaml").read_text().splitlines()
        if "model_group_alias:" in line
    ]
    entry = example_group()
    entry["litellm_params"]["api_base"] = local_model.base_url
    gpt4o = next(e for e in config["model_list"] if e["model_name"] == "gpt-4o")
    proxy = start_proxy(
        {"model_list": [gpt4o, entry], "router_settings": yaml.safe_load(alias_line)}
    )
    answer = proxy.client().chat.completions.create(model="gpt-4o", messages=MESSAGES, **PARAMS)
    print(f"gpt-4o answered by the local model: {answer.choices[0].message.content!r}")
    assert (answer.choices[0].message.content or "").strip()
    assert proxy.stop() == 0
    [row] = ledger(proxy.spend_db)
    assert row["requested_model"] == "gpt-4o" and row["deployment"] == "openai/gemma3-270m", row
    assert row["usage_source"] == "upstream" and row["prompt_tokens"] > 0, row
    assert row["cost_usd"] == Decimal(0), row

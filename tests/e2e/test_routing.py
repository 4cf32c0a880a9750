"""Foundation: an app that only knows api.openai.com is answered by the configured backends."""

from __future__ import annotations

import json
import subprocess
import time

import httpx2 as httpx
import openai
import pytest

from tests.conftest import deployment


@pytest.fixture(scope="module")
def routed(backend, confdir, tmp_path_factory):
    """One proxy for the module: OpenAI-compatible, Ollama, a backend that refuses and an
    unrouted passthrough."""
    from tests.conftest import Proxy

    base = backend.url
    config = {
        "model_list": [
            deployment("gpt-4o", "openai/ok-model", f"{base}/v1", api_key="sk-backend-secret"),
            deployment("local-qwen", "ollama/qwen3:32b", base),
            deployment("chat-qwen", "ollama_chat/qwen3:8b", base),
            deployment("slow", "openai/slow-200", f"{base}/v1", api_key="sk-b"),
            deployment("no-key", "openai/ok-model", f"{base}/v1"),
            deployment("embed", "openai/text-embedding-3-small", f"{base}/v1", api_key="sk-b"),
            deployment("refusing", "openai/policy", f"{base}/v1", api_key="sk-b"),
        ],
        "router_settings": {"model_group_alias": {"gpt-4o-alias": "gpt-4o"}},
        "general_settings": {"passthrough_unknown_models": False},
    }
    proxy = Proxy(config, confdir, tmp_path_factory.mktemp("routed"))
    yield proxy
    proxy.stop()


def test_chat_completion_is_answered_by_the_configured_backend(routed, backend):
    with routed.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hello world"}]
        )
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hello world"
    assert completion.model == "ok-model"  # the model that answered
    assert raw.headers["x-mitmroute-deployment"] == "openai/ok-model"
    assert raw.headers["x-mitmroute-request-id"].startswith("mr-")
    sent = backend.state.requests[-1]
    assert sent["model"] == "ok-model"
    # the deployment's key replaced the client's, which never went upstream
    assert backend.state.headers[-1]["authorization"] == "Bearer sk-backend-secret"


def test_client_key_never_reaches_a_backend_it_was_not_meant_for(routed, backend):
    """A keyless deployment on another host gets no key: the app's key was for OpenAI."""
    with routed.client(api_key="sk-client-own") as client:
        client.chat.completions.create(model="no-key", messages=[{"role": "user", "content": "x"}])
    assert "authorization" not in backend.state.headers[-1]


def test_client_key_goes_to_the_host_it_addressed_when_the_deployment_has_none(
    start_proxy, backend
):
    """The app addressed the backend itself (same scheme, host and port): its key goes there."""
    proxy = start_proxy(
        {
            "model_list": [deployment("gpt-4o", "openai/ok-model", f"{backend.url}/v1")],
            "general_settings": {"intercept_hosts": ["api.openai.com", "127.0.0.1"]},
        }
    )
    with proxy.client(api_key="sk-client-own", base_url=f"{backend.url}/v1") as client:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert backend.state.headers[-1]["authorization"] == "Bearer sk-client-own"


def test_async_client_and_model_group_alias(routed):
    import asyncio

    async def run():
        async with routed.async_client() as client:
            return await asyncio.gather(
                *[
                    client.chat.completions.create(
                        model="gpt-4o-alias", messages=[{"role": "user", "content": f"n {i}"}]
                    )
                    for i in range(5)
                ]
            )

    results = asyncio.run(run())
    assert sorted(r.choices[0].message.content for r in results) == [
        f"echo: n {i}" for i in range(5)
    ]


def test_streamed_chat_arrives_incrementally(routed):
    """A backend sending words 200 ms apart: the first chunk arrives long before the last."""
    with routed.client() as client:
        t0 = time.perf_counter()
        stream = client.chat.completions.create(
            model="slow",
            stream=True,
            messages=[{"role": "user", "content": "one two three four five"}],
        )
        arrivals, text = [], ""
        for chunk in stream:
            arrivals.append(time.perf_counter() - t0)
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    assert text == "echo: one two three four five"
    assert arrivals[-1] - arrivals[0] > 0.8  # 6 words, 200 ms apart
    assert arrivals[0] < 0.6


def test_http2_clients_get_streams_and_streamed_errors(routed):
    """Over HTTP/2 (several streams on one connection) the relay's answers arrive as over
    HTTP/1.1: a stream chunk by chunk, an error whole with its status."""
    ask = {"stream": True, "messages": [{"role": "user", "content": "over h2"}]}
    url = "https://api.openai.com/v1/chat/completions"
    with routed.http(http2=True) as http:
        with http.stream("POST", url, json={"model": "gpt-4o", **ask}) as resp:
            assert resp.http_version == "HTTP/2"
            events = [line for line in resp.iter_lines() if line.startswith("data: ")]
        refused = http.post(url, json={"model": "refusing", **ask})
        missing = http.post(url, json={"model": "nope", **ask})
    assert events[-1] == "data: [DONE]"
    text = "".join(
        json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1]
    )
    assert text == "echo: over h2"
    assert refused.http_version == "HTTP/2" and refused.status_code == 400
    assert refused.json()["error"]["code"] == "content_policy_violation"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_stream_usage_chunk_only_when_asked(routed):
    with routed.client() as client:
        plain = list(
            client.chat.completions.create(
                model="gpt-4o", stream=True, messages=[{"role": "user", "content": "a b"}]
            )
        )
        asked = list(
            client.chat.completions.create(
                model="gpt-4o",
                stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "a b"}],
            )
        )
    assert all(c.usage is None for c in plain)
    assert asked[-1].usage is not None and asked[-1].usage.completion_tokens == 3


@pytest.mark.parametrize("group", ["local-qwen", "chat-qwen"])
def test_ollama_native_api_becomes_openai(routed, backend, group):
    with routed.client() as client:
        done = client.chat.completions.create(
            model=group, messages=[{"role": "user", "content": "hi ollama"}]
        )
        chunks = list(
            client.chat.completions.create(
                model=group,
                stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "hi ollama"}],
            )
        )
    assert done.choices[0].message.content == "echo: hi ollama"
    assert done.usage.prompt_tokens == 2 and done.usage.completion_tokens == 3
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hi ollama"
    assert chunks[-1].usage.total_tokens == 5
    assert backend.state.requests[-1]["stream"] is True


def test_legacy_completions_and_embeddings(routed):
    with routed.client() as client:
        text = client.completions.create(model="gpt-4o", prompt="say this")
        vectors = client.embeddings.create(model="embed", input=["a b", "c"])
        ollama_vectors = client.embeddings.create(model="local-qwen", input="x y z")
    assert text.choices[0].text == "echo: say this"
    assert len(vectors.data) == 2 and vectors.usage.prompt_tokens == 3
    assert ollama_vectors.data[0].embedding == [0.5, 0.5]


def test_models_lists_configured_groups(routed):
    with routed.client() as client:
        ids = {m.id for m in client.models.list()}
    assert {"gpt-4o", "local-qwen", "gpt-4o-alias"} <= ids


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404_when_passthrough_is_off(routed, stream):
    with routed.client() as client, pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}], stream=stream
        )
    assert info.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b'["a list"]', None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "gpt-4o", "messages": "hello"}', "messages"),
        (b'{"model": "gpt-4o", "stream": "yes", "messages": [{"role": "user"}]}', "stream"),
    ],
)
def test_bad_input_gets_an_openai_shaped_400(routed, body, param):
    with routed.http() as http:
        resp = http.post(
            "https://api.openai.com/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
        )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert resp.headers["x-mitmroute-request-id"]


@pytest.mark.parametrize("stream", [False, True])
def test_unreachable_backend_fails_closed_with_a_5xx(start_proxy, stream):
    """Streamed, the flow already waits at the relay when the backend fails: the error still
    comes as OpenAI's, status and all."""
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    proxy = start_proxy(
        {
            "model_list": [deployment("gpt-4o", "openai/x", dead, api_key="k")],
            "router_settings": {"num_retries": 0},
        }
    )
    with proxy.client() as client, pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=stream
        )
    assert info.value.status_code == 503
    assert info.value.response.reason_phrase == "Service Unavailable"
    assert "unreachable" in info.value.message
    assert info.value.response.headers["x-mitmroute-request-id"].startswith("mr-")


def test_a_body_that_only_mentions_stream_true_gets_its_whole_answer(routed):
    """`"stream": true` nested in the body (a tool's schema) is not a stream: the answer is
    the whole JSON completion, with its length."""
    tool = {
        "type": "function",
        "function": {
            "name": "play",
            "parameters": {"type": "object", "properties": {"stream": True}},
        },
    }
    body = {
        "model": "gpt-4o",
        "stream": False,
        "tools": [tool],
        "messages": [{"role": "user", "content": "not a stream"}],
    }
    raw = json.dumps(body, separators=(",", ":")).encode()
    assert b'"stream":true' in raw
    with routed.http() as http:
        resp = http.post(
            "https://api.openai.com/v1/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
        )
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert int(resp.headers["content-length"]) == len(resp.content)
    completion = resp.json()
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "echo: not a stream"


def test_curl_through_the_proxy(routed):
    out = subprocess.run(
        [
            "curl",
            "-s",
            "--proxy",
            routed.url,
            "--cacert",
            routed.ca_bundle,
            "https://api.openai.com/v1/chat/completions",
            "-H",
            "content-type: application/json",
            "-d",
            json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "curl"}]}),
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert json.loads(out.stdout)["choices"][0]["message"]["content"] == "echo: curl"


def test_other_hosts_pass_through_untouched(routed, backend):
    """A host outside intercept_hosts goes where it was going, unrouted."""
    with httpx.Client(proxy=routed.url, timeout=10) as http:
        resp = http.get(f"{backend.url}/_stats")
    assert resp.status_code == 200 and "requests" in resp.json()
    assert "x-mitmroute-request-id" not in resp.headers


def test_terminal_shows_one_line_per_exchange(routed):
    with routed.client() as client:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "log me"}]
        )
    time.sleep(0.2)
    lines = [line for line in routed.logs().splitlines() if "gpt-4o -> openai/ok-model 200" in line]
    assert lines
    assert "sk-backend-secret" not in routed.logs()


def _closed_port() -> int:
    from tests.conftest import free_port

    return free_port()


def test_reverse_mode_for_clients_that_can_set_a_base_url(start_proxy, backend):
    proxy = start_proxy(
        {"model_list": [deployment("gpt-4o", "openai/ok-model", f"{backend.url}/v1", api_key="k")]},
        extra_args=["--mode", "reverse:https://api.openai.com"],
    )
    client = openai.OpenAI(api_key="sk-x", base_url=f"{proxy.url}/v1", max_retries=0)
    with client:
        completion = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "reverse"}]
        )
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o", stream=True, messages=[{"role": "user", "content": "reverse"}]
            )
        )
    assert completion.choices[0].message.content == "echo: reverse"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: reverse"


def test_allow_hosts_decrypts_only_intercepted_hosts(start_proxy, backend):
    proxy = start_proxy(
        {"model_list": [deployment("gpt-4o", "openai/ok-model", f"{backend.url}/v1", api_key="k")]},
        extra_args=["--allow-hosts", r"^api\.openai\.com:443$"],
    )
    with proxy.client() as client:
        completion = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "allowed"}]
        )
    assert completion.choices[0].message.content == "echo: allowed"


def test_config_error_stops_start_up_naming_the_key(tmp_path, confdir):
    from tests.conftest import MITMDUMP, ROOT, free_port

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model_list:\n  - model_name: a\n    litellm_params:\n      model: openai/x\n"
        "      api_base: nope\n"
    )
    out = subprocess.run(
        [
            MITMDUMP,
            "-p",
            str(free_port()),
            "--set",
            f"confdir={confdir}",
            "-s",
            str(ROOT / "addons" / "router.py"),
            "--set",
            f"router_config={bad}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "model_list[0].litellm_params.api_base: not a URL" in out.stderr + out.stdout

"""Redaction of backend secrets and the rule for where a client's key may go, without a proxy."""

from __future__ import annotations

import base64
import json

import aiohttp
import pytest

from mitmroute.config import parse_config
from mitmroute.errors import ProxyError
from mitmroute.providers import provider_for
from mitmroute.request import ClientRequest, new_exchange
from mitmroute.secrets import LineRedactor, Redactor, deployment_secrets, mask, same_origin
from mitmroute.upstream import RedactedStream, Upstream
from tests.fakes.openai_server import FakeBackend

KEY = "sk-proj-backendSECRET0123456789abcdefWXYZ"
CLIENT_KEY = "sk-client-SECRET-4242424242424242"


def config(*entries: dict):
    return parse_config({"model_list": list(entries)}, environ={})


def entry(model: str, api_base: str, **params) -> dict:
    return {"model_name": "m", "litellm_params": {"model": model, "api_base": api_base, **params}}


# --- the redactor --------------------------------------------------------------------------------


def test_a_long_key_keeps_its_vendor_prefix_and_last_four_a_short_one_nothing():
    assert mask(KEY) == "sk-proj-...WXYZ"
    assert mask("sk-ant-api03-abcdefghijklmnop") == "sk-ant-...mnop"
    assert mask("gsk_0123456789abcdefghijklmnop") == "gsk_...mnop"
    assert mask("secret-0123456789abcdefghijklmnop") == "...mnop"
    assert mask("short-secret") == "[redacted]"


def test_every_occurrence_is_replaced_in_text_and_bytes():
    redactor = Redactor([KEY])
    text = f"Incorrect API key provided: Bearer {KEY}. Again: {KEY}"
    assert redactor.text(text) == (
        "Incorrect API key provided: Bearer sk-proj-...WXYZ. Again: sk-proj-...WXYZ"
    )
    assert redactor.bytes(text.encode()) == redactor.text(text).encode()


def test_text_without_a_secret_comes_back_as_the_same_object():
    redactor = Redactor([KEY, "another-secret-value"])
    body = b'{"choices": [{"message": {"content": "hello"}}]}'
    assert redactor.bytes(body) is body
    assert redactor.text("hello") == "hello"


def test_a_longer_secret_containing_a_shorter_one_is_replaced_whole():
    redactor = Redactor(["secret-12345", "secret-12345-and-more-characters"])
    assert redactor.text("x secret-12345-and-more-characters y") == "x ...ters y"
    assert redactor.text("x secret-12345 y") == "x [redacted] y"


def test_json_escaped_and_percent_encoded_forms_are_redacted():
    secret = 'pa"ss/word+with=odd chars'
    redactor = Redactor([secret])
    assert redactor.bytes(json.dumps({"m": secret}).encode()) == b'{"m": "...hars"}'
    assert redactor.text("url?k=pa%22ss%2Fword%2Bwith%3Dodd%20chars") == "url?k=...hars"


def test_placeholder_keys_are_not_secrets_and_do_not_corrupt_answers():
    redactor = Redactor(["EMPTY", "ollama", "none", None, ""])
    assert not redactor
    assert redactor.text("ollama says EMPTY") == "ollama says EMPTY"


def test_an_error_is_redacted_in_place():
    error = ProxyError(401, f"bad key {KEY}", "invalid_request_error", code=KEY, param=KEY)
    assert Redactor([KEY]).error(error) is error
    assert KEY not in f"{error.message} {error.code} {error.param}"


def test_a_forwarded_client_key_is_added_for_one_attempt_only():
    base = Redactor([KEY])
    attempt = base.adding(CLIENT_KEY)
    assert attempt.text(f"{KEY} {CLIENT_KEY}") == "sk-proj-...WXYZ sk-...4242"
    assert base.text(CLIENT_KEY) == CLIENT_KEY
    assert base.adding(None) is base and base.adding(KEY) is base and base.adding("k") is base


def test_deployment_secrets_are_its_key_and_the_credentials_in_its_api_base_and_headers():
    cfg = config(
        entry("openai/a", "https://api.example.com/v1", api_key=KEY),
        entry("openai/b", "https://user:p%40ssword-123@host.example/v1?api-version=2024-10-21"),
        entry("openai/c", "https://host.example/v1?key=query-key-123&token=query-token-123"),
        entry(
            "openai/d",
            "https://host.example/v1",
            extra_headers={
                "Authorization": "Bearer header-token-123",
                "api-key": "azure-key-12345",
                "anthropic-beta": "not-a-secret-value",
            },
        ),
    )
    found = {s for d in cfg.deployments for s in deployment_secrets(d)}
    basic = base64.b64encode(b"user:p@ssword-123").decode()
    for secret in (KEY, "p%40ssword-123", "p@ssword-123", basic, "query-key-123"):
        assert secret in found
    for secret in ("query-token-123", "header-token-123", "azure-key-12345"):
        assert secret in found
    assert "2024-10-21" not in found and "not-a-secret-value" not in found


# --- streams -------------------------------------------------------------------------------------


def test_a_secret_split_across_reads_is_still_redacted():
    wire = f'data: {{"error": {{"message": "bad key {KEY}"}}}}\n\n'.encode()
    for cut in range(1, len(wire)):
        lines = LineRedactor(Redactor([KEY]))
        out = lines.feed(wire[:cut]) + lines.feed(wire[cut:]) + lines.finish()
        assert KEY.encode() not in out and b"sk-proj-...WXYZ" in out


def test_whole_lines_are_passed_on_at_once():
    lines = LineRedactor(Redactor([KEY]))
    assert lines.feed(b"data: {}\n\ndata: {") == b"data: {}\n\n"
    assert lines.feed(b"}\n\n") == b"data: {}\n\n"
    assert lines.finish() == b""


def test_a_stream_translator_sees_only_redacted_chunks_and_errors():
    chunk = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": KEY}}]}
    wire = f"data: {json.dumps(chunk)}\n\n".encode()
    error = f'data: {{"error": {{"message": "key {KEY}"}}}}\n\n'.encode()
    deployment = config(entry("openai/x", "http://127.0.0.1:1")).deployments[0]
    translator = RedactedStream(provider_for("openai").stream("chat", deployment), Redactor([KEY]))
    chunks = [c for i in range(0, len(wire), 7) for c in translator.feed(wire[i : i + 7])]
    assert chunks[0]["choices"][0]["delta"]["content"] == "sk-proj-...WXYZ"
    with pytest.raises(ProxyError) as info:
        translator.feed(error)
    assert info.value.message == "key sk-proj-...WXYZ"


# --- where a client's key may go -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("api_base", "client", "expected"),
    [
        ("https://api.openai.com/v1", ("https", "api.openai.com", 443), True),
        ("https://API.openai.com:443/v1", ("https", "api.openai.com", 443), True),
        ("http://127.0.0.1:8000/v1", ("http", "127.0.0.1", 8000), True),
        ("http://127.0.0.1:8000/v1", ("http", "127.0.0.1", 8001), False),
        ("http://127.0.0.1:8000/v1", ("https", "127.0.0.1", 8000), False),
        ("http://api.openai.com/v1", ("https", "api.openai.com", 443), False),
        ("https://api.openai.com:8443/v1", ("https", "api.openai.com", 443), False),
        ("https://api.anthropic.com", ("https", "api.openai.com", 443), False),
        ("https://api.openai.com/v1", ("https", "", 443), False),
    ],
)
def test_same_origin_means_scheme_host_and_port(api_base, client, expected):
    assert same_origin(api_base, *client) is expected


def test_client_key_goes_only_to_a_deployment_without_credentials_of_its_own():
    cfg = config(
        entry("openai/keyless", "https://api.openai.com/v1"),
        entry("openai/keyed", "https://api.openai.com/v1", api_key=KEY),
        entry("openai/userinfo", "https://u:password-123@api.openai.com/v1"),
    )
    upstream = Upstream(cfg)
    client = ClientRequest("POST", "/v1/chat/completions", {}, b"", host="api.openai.com")
    goes = [upstream._client_key_goes_to(d, client) for d in cfg.deployments]
    assert goes == [True, False, False]


# --- one attempt, driven directly ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fake():
    backend = FakeBackend()
    url = backend.start()
    yield url
    backend.stop()


async def attempt(cfg, client: ClientRequest, body: dict):
    upstream = Upstream(cfg)
    await upstream.start()
    exchange = new_exchange(client, "chat/completions")
    try:
        return await upstream.attempt(
            client, "chat/completions", body, cfg.deployments[0], exchange, 10.0
        ), exchange
    finally:
        await upstream.close()


BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def test_an_attempt_answers_with_the_backend_key_redacted(fake):
    cfg = config(entry("openai/leaky-echo", f"{fake}/v1", api_key=KEY))
    client = ClientRequest("POST", "/v1/chat/completions", {}, b"")
    answer, _ = await attempt(cfg, client, BODY)
    assert answer.body["choices"][0]["message"]["content"] == "echo: sk-proj-...WXYZ"
    assert KEY.encode() not in answer.raw


async def test_an_attempt_fails_with_the_forwarded_client_key_redacted(fake):
    host, port = fake.removeprefix("http://").split(":")
    cfg = config(entry("openai/leaky-401", f"{fake}/v1"))
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    client = ClientRequest(
        "POST", "/v1/chat/completions", headers, b"", scheme="http", host=host, port=int(port)
    )
    with pytest.raises(ProxyError) as info:
        await attempt(cfg, client, BODY)
    assert info.value.message == "Incorrect API key provided: Bearer sk-...4242"


async def test_a_client_error_naming_the_api_base_is_redacted(monkeypatch):
    api_base = "https://svc:url-password-123@llm.example/v1?token=query-token-123"
    cfg = config(entry("openai/x", api_base))
    upstream = Upstream(cfg)
    await upstream.start()

    async def post(url, *args, **kwargs):
        raise aiohttp.InvalidURL(api_base)

    monkeypatch.setattr(upstream.http, "post", post)
    client = ClientRequest("POST", "/v1/chat/completions", {}, b"")
    exchange = new_exchange(client, "chat/completions")
    try:
        with pytest.raises(ProxyError) as info:
            deployment = cfg.deployments[0]
            await upstream.attempt(client, "chat/completions", BODY, deployment, exchange, 10.0)
    finally:
        await upstream.close()
    assert info.value.code == "upstream_unreachable"
    assert "url-password-123" not in info.value.message
    assert "query-token-123" not in info.value.message

"""The yardsticks' own harness: capture.py records requests as clients sent them and keeps the
proxy on loopback. No CLI needed: the openai SDK plays the client."""

from __future__ import annotations

import httpx2 as httpx
import pytest

from tests.clients.capture import is_loopback, masked
from tests.clients.conftest import CapturingProxy, echo_config


@pytest.fixture
def capturing(backend, confdir, tmp_path):
    proxy = CapturingProxy(echo_config(backend, ("gpt-4o",)), confdir, tmp_path / "proxy")
    yield proxy
    proxy.stop()


def test_capture_sees_requests_before_the_router(capturing):
    """A streamed answer makes the router point the flow at its loopback relay and empty the
    body: the capture still holds the request as the SDK sent it."""
    with capturing.proxy.client() as client:
        stream = client.chat.completions.create(
            model="gpt-4o", stream=True, messages=[{"role": "user", "content": "hi there"}]
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "echo: hi there"
    (record,) = capturing.requests("api.openai.com", "/v1/chat/completions")
    assert record["method"] == "POST" and record["status"] == 200 and record["fate"] == "route"
    assert record["body"]["messages"] == [{"role": "user", "content": "hi there"}]
    headers = dict((k.lower(), v) for k, v in record["headers"])
    assert headers["authorization"] == "Bearer sk-cl..."  # credentials are masked


def test_capture_refuses_to_dial_anything_but_loopback(capturing):
    with httpx.Client(proxy=capturing.url, timeout=10) as http:
        answer = http.get("http://example.invalid/anything")
    assert answer.status_code == 502
    refused = [r for r in capturing.records() if r["event"] == "refused_dial"]
    assert [r["host"] for r in refused] == ["example.invalid"]


def test_loopback_and_masking_rules():
    assert is_loopback("127.0.0.1") and is_loopback("127.9.9.9") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("api.openai.com") and not is_loopback("10.0.0.1")
    assert not is_loopback(None)
    assert masked("X-Api-Key", "sk-ant-api03-secret-value") == "sk-ant-api03..."
    assert masked("content-type", "application/json") == "application/json"

"""The Router addon with mitmproxy's test helpers: config handling and failing closed."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from mitmroute.addons.flows import GATE_KEY, header_dict
from mitmroute.addons.router import Router
from mitmroute.gate import decide


def write_config(path, base: str) -> str:
    path.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {"model_name": "gpt-4o", "litellm_params": {"model": "openai/m",
                                                                "api_base": base}}
                ],
                "general_settings": {"passthrough_unknown_models": False},
            }
        )
    )  # fmt: skip
    return str(path)


def chat_flow(model: str = "gpt-4o"):
    request = tutils.treq(
        host="api.openai.com",
        port=443,
        scheme=b"https",
        method=b"POST",
        path=b"/v1/chat/completions",
        content=json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "x"}]}
        ).encode(),
    )
    flow = tflow.tflow(req=request)
    flow.metadata[GATE_KEY] = decide("POST", "/v1/chat/completions", "api.openai.com")
    return flow


async def test_reload_keeps_the_old_engine_for_requests_in_flight(tmp_path):
    router = Router()
    with taddons.context(router) as tctx:
        tctx.configure(router, router_config=write_config(tmp_path / "a.yaml", "http://a.test/v1"))
        first = router.engine
        router.is_running = True
        tctx.configure(router, router_config=write_config(tmp_path / "b.yaml", "http://b.test/v1"))
        await asyncio.sleep(0.05)
        assert router.engine is not first
        assert first in router.retired  # still open for what it is serving
        await router.done()
        assert not router.retired


async def test_unknown_model_is_answered_not_forwarded(tmp_path):
    router = Router()
    with taddons.context(router) as tctx:
        tctx.configure(router, router_config=write_config(tmp_path / "a.yaml", "http://a.test/v1"))
        flow = chat_flow("not-configured")
        await router.request(flow)
        assert flow.response is not None and flow.response.status_code == 404
        assert json.loads(flow.response.content)["error"]["code"] == "model_not_found"
        await router.done()


async def test_an_internal_failure_fails_closed(tmp_path, monkeypatch):
    router = Router()
    with taddons.context(router) as tctx:
        tctx.configure(router, router_config=write_config(tmp_path / "a.yaml", "http://a.test/v1"))

        async def boom(request):
            raise RuntimeError("bug")

        monkeypatch.setattr(router.engine, "handle", boom)
        flow = chat_flow()
        await router.request(flow)
        assert flow.response is not None and flow.response.status_code == 500
        assert flow.request.host == "api.openai.com"  # and nothing was sent anywhere
        await router.done()


@pytest.mark.parametrize("host", ["example.com", "api.anthropic.com"])
async def test_other_hosts_are_left_alone(tmp_path, host):
    router = Router()
    with taddons.context(router) as tctx:
        tctx.configure(router, router_config=write_config(tmp_path / "a.yaml", "http://a.test/v1"))
        flow = chat_flow()
        flow.request.host = host
        del flow.metadata[GATE_KEY]  # the Gate decides nothing for hosts it doesn't intercept
        await router.request(flow)
        assert flow.response is None
        await router.done()


@pytest.mark.parametrize(
    "fields",
    [
        [
            (b"Host", b"api.openai.com"),
            (b"Authorization", b"Bearer sk-x"),
            (b"Content-Length", b"2"),
        ],
        [(b"Accept", b"text/html"), (b"X-Tag", b"a"), (b"accept", b"application/json")],
        [(b"X-Caf\xc3\xa9", b"cr\xc3\xa8me"), (b"X-Bad", b"\xff\xfe"), (b"x-bad", b"ok")],
        [],
    ],
)
def test_header_dict_is_what_headers_items_folds_to(fields):
    """The engine's headers: lower-cased names, repeats folded with ", ", undecodable bytes
    kept (surrogateescape), exactly as `{k.lower(): v for k, v in headers.items()}`."""
    headers = http.Headers(fields)
    assert header_dict(headers) == {k.lower(): v for k, v in headers.items()}

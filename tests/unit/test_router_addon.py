"""The Router addon with mitmproxy's test helpers: config handling and failing closed."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from mitmroute.addons.flows import GATE_KEY, RECORDED_KEY, RELAY_KEY, header_dict
from mitmroute.addons.router import Router
from mitmroute.addons.shared import Shared
from mitmroute.exchange import Exchange
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


@pytest.mark.parametrize(
    ("host", "path", "shape"),
    [
        ("api.openai.com", "/v1/chat/completions", "openai"),
        ("api.anthropic.com", "/v1/messages", "anthropic"),
    ],
)
async def test_a_failure_after_the_flow_went_to_the_relay_is_answered_there(
    tmp_path, host, path, shape
):
    """A streamed request is pointed at the relay before the engine answers: a bug that
    strikes after that is answered by the relay, 500 in the client's own shape, and logged as
    one spend row; the request goes nowhere else."""
    shared = Shared()
    logged: list[Exchange] = []
    shared.listeners.append(logged.append)
    router = Router(shared)
    with taddons.context(router) as tctx:
        tctx.configure(router, router_config=write_config(tmp_path / "a.yaml", "http://a.test/v1"))
        await router.relay.start()

        async def boom(request):
            await asyncio.sleep(0.01)  # the backend was being called
            raise RuntimeError("bug")

        router.engine.handle = boom  # type: ignore[method-assign]
        body = {"model": "gpt-4o", "max_tokens": 5, "stream": True,
                "messages": [{"role": "user", "content": "x"}]}  # fmt: skip
        flow = chat_flow()
        flow.request.host, flow.request.path = host, path
        flow.request.content = json.dumps(body).encode()
        flow.metadata[GATE_KEY] = decide("POST", path, host)
        await router.request(flow)
        assert flow.response is None and flow.metadata.get(RELAY_KEY)
        assert (flow.request.host, flow.request.port) == ("127.0.0.1", router.relay.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", router.relay.port)
        writer.write(f"POST {flow.request.path} HTTP/1.1\r\ncontent-length: 0\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        length = int(head.partition(b"content-length: ")[2].split(b"\r\n")[0])
        answer = json.loads(await reader.readexactly(length))
        writer.close()
        await router.done()
    assert head.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    if shape == "anthropic":
        assert answer["type"] == "error" and answer["error"]["type"] == "api_error"
    else:
        assert answer["error"]["code"] == "internal_error"
    assert [(e.status_code, e.error_type, e.stream) for e in logged] == [
        (500, "internal_error", True)
    ]
    assert flow.metadata[RECORDED_KEY]


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

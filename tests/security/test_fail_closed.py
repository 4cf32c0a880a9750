"""Threat: an exception in a hook lets the flow go on to its original host.

mitmproxy only logs an exception raised in an addon's hook, skips the rest of that script's
addons and lets the flow continue. On the old code, a deep body made the auth addon raise and
the request went to api.openai.com with no model check, no budget and no spend row. Here a
fault is injected into each hook of each addon of the chain, in process and in a real mitmdump.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from mitmproxy import hooks
from mitmproxy.test import tflow, tutils

from mitmroute.addons import flows
from mitmroute.gate import decide
from tests.conftest import ROOT, deployment
from tests.fakes.origin import Origin

INJECTOR = str(Path(__file__).with_name("inject_fault.py"))


def chain() -> list:
    """A fresh instance of the addon chain, exactly as `addons/router.py` builds it."""
    spec = importlib.util.spec_from_file_location("mitmroute_chain", ROOT / "addons" / "router.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.addons


def hooks_of(addon) -> list[str]:
    return [name for name in vars(type(addon)) if name in hooks.all_hooks]


def test_every_hook_of_every_addon_in_the_chain_is_guarded():
    unguarded = [
        f"{type(a).__name__}.{name}"
        for a in chain()
        for name in hooks_of(a)
        if name != "load" and not getattr(getattr(type(a), name), "mitmroute_guarded", False)
    ]
    assert unguarded == []


def intercepted_flow(stage: str):
    request = tutils.treq(
        host="api.openai.com", port=443, scheme=b"https", method=b"POST",
        path=b"/v1/chat/completions",
        content=json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode(),
    )  # fmt: skip
    flow = tflow.tflow(req=request, resp=stage in ("responseheaders", "response"))
    flow.metadata[flows.GATE_KEY] = decide("POST", "/v1/chat/completions", "api.openai.com")
    return flow


FLOW_HOOKS = ("requestheaders", "request", "responseheaders", "response", "error")
CASES = [(type(a).__name__, name) for a in chain() for name in hooks_of(a) if name in FLOW_HOOKS]


@pytest.mark.parametrize(("addon_name", "hook"), CASES, ids=[f"{a}.{h}" for a, h in CASES])
async def test_a_fault_in_any_flow_hook_answers_or_kills_never_continues(
    addon_name, hook, monkeypatch
):
    addon = next(a for a in chain() if type(a).__name__ == addon_name)
    guarded = getattr(type(addon), hook)

    def failing(self, *args):
        raise RuntimeError("injected")

    async def failing_async(self, *args):
        raise RuntimeError("injected")

    is_async = inspect.iscoroutinefunction(guarded.__wrapped__)
    monkeypatch.setattr(guarded, "__wrapped__", failing_async if is_async else failing)
    flow = intercepted_flow(hook)
    result = getattr(addon, hook)(flow)
    if inspect.isawaitable(result):
        await result
    if hook in ("requestheaders", "request", "response"):
        assert flow.response is not None and flow.response.status_code == 500
        error = json.loads(flow.response.content)["error"]
        assert error["code"] == "internal_error" and addon_name in error["message"]
    elif hook == "responseheaders":
        assert flow.error is not None  # killed: its head may already be on its way
    # `error`: the flow has already failed; the guard only has to keep the exception in


CONFIGURED = sorted(type(a).__name__ for a in chain() if "configure" in vars(type(a)))


@pytest.mark.parametrize("addon_name", CONFIGURED)
def test_a_fault_in_configure_is_an_options_error_not_a_silent_half_configured_addon(
    addon_name, monkeypatch
):
    from mitmproxy import exceptions

    addon = next(a for a in chain() if type(a).__name__ == addon_name)
    guarded = type(addon).configure

    def failing(self, updated):
        raise RuntimeError("injected")

    monkeypatch.setattr(guarded, "__wrapped__", failing)
    with pytest.raises(exceptions.OptionsError, match="injected"):
        addon.configure(set())


# --- in a real mitmdump ---------------------------------------------------------------------


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    server.start()
    yield server
    server.stop()


def faulty_proxy(start_proxy, backend, fault: str, **general):
    return start_proxy(
        {
            "model_list": [
                deployment("gpt-4o", "openai/ok-model", f"{backend.url}/v1", api_key="sk-b"),
                deployment("slow", "openai/slow-50", f"{backend.url}/v1", api_key="sk-b"),
            ],
            "general_settings": {"intercept_hosts": ["127.0.0.1"], **general},
        },
        extra_args=["-s", INJECTOR],
        env={"MITMROUTE_INJECT_FAULT": fault},
    )


BEFORE_ROUTING = [
    "Gate.requestheaders",
    "Gate.request",
    "KeyAuth.request",
    "Router.request",
    "Seal.request",
]


@pytest.mark.parametrize("fault", BEFORE_ROUTING)
def test_a_fault_before_routing_is_a_500_in_openai_shape_and_a_spend_row(
    start_proxy, backend, origin, fault
):
    proxy = faulty_proxy(start_proxy, backend, fault, master_key="sk-master")
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    with proxy.http() as http:
        resp = http.post(
            f"{origin.url}/v1/chat/completions",
            json=body,
            headers={"authorization": "Bearer sk-master"},
        )
    if fault == "Seal.request":
        assert resp.status_code == 200  # routed before the Seal: its fault changes nothing
    else:
        assert resp.status_code == 500, resp.text
        assert resp.json()["error"]["code"] == "internal_error"
    assert origin.seen == [], Origin.describe(origin.seen)
    proxy.stop()
    assert f"{fault} failed" in proxy.logs() or fault == "Seal.request"
    with duckdb.connect(str(proxy.spend_db), read_only=True) as con:
        logged = con.execute("select status_code from spend_log").fetchall()
    assert logged == [(resp.status_code,)]


def test_a_fault_in_responseheaders_cuts_the_stream_and_never_reaches_the_origin(
    start_proxy, backend, origin
):
    proxy = faulty_proxy(start_proxy, backend, "Router.responseheaders")
    body = {"model": "slow", "messages": [{"role": "user", "content": "a b c"}], "stream": True}
    url = f"{origin.url}/v1/chat/completions"
    with (
        proxy.http() as http,
        pytest.raises(Exception),  # noqa: B017 (the connection is cut: any transport error)
        http.stream("POST", url, json=body) as resp,
    ):
        resp.read()
    assert origin.seen == []

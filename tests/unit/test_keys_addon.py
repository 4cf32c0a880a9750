"""The KeyAuth addon on mitmproxy test flows: who gets through, what goes on, what it costs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from mitmroute.addons.auth import RESERVATION_KEY, KeyAuth
from mitmroute.addons.flows import GATE_KEY
from mitmroute.addons.router import EXCHANGE_KEY, IDENTITY_KEY
from mitmroute.addons.shared import Shared
from mitmroute.auth.keys import hash_key
from mitmroute.config import parse_config
from mitmroute.exchange import Exchange, Usage
from mitmroute.gate import decide

MASTER = "sk-master"


def make_flow(key: str | None, body: dict | None = None, host: str = "api.openai.com",
              path: str = "/v1/chat/completions") -> http.HTTPFlow:  # fmt: skip
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    content = json.dumps(body or {"model": "gpt-4o", "messages": [{"role": "user",
                                                                   "content": "hi"}]})  # fmt: skip
    request = http.Request.make("POST", f"https://{host}{path}", content, headers)
    flow = tflow.tflow(req=request)
    if host == "api.openai.com":  # what the Gate decides before KeyAuth sees the flow
        flow.metadata[GATE_KEY] = decide("POST", path, host)
    return flow


def setup(master: str | None = MASTER) -> tuple[Shared, KeyAuth]:
    shared = Shared()
    auth = KeyAuth(shared)
    general = {"spend_db": ":memory:", **({"master_key": master} if master else {})}
    shared.publish_config(parse_config({
        "model_list": [{"model_name": "gpt-4o", "litellm_params": {
            "model": "openai/gpt-4o", "api_base": "http://b/v1", "api_key": "k",
            "input_cost_per_token": 0.001, "output_cost_per_token": 0.001}}],
        "general_settings": general}))  # fmt: skip
    return shared, auth


async def make_key(auth: KeyAuth, **fields) -> str:
    flow = make_flow(MASTER, fields, path="/key/generate")
    await auth.request(flow)
    assert flow.response.status_code == 200, flow.response.text
    return json.loads(flow.response.content)["key"]


async def test_without_a_master_key_everything_passes_untouched():
    _, auth = setup(master=None)
    flow = make_flow("sk-anything")
    await auth.request(flow)
    assert flow.response is None and IDENTITY_KEY not in flow.metadata
    assert flow.request.headers["authorization"] == "Bearer sk-anything"
    keys = make_flow(MASTER, {}, path="/key/generate")
    await auth.request(keys)
    assert keys.response.status_code == 403


async def test_only_intercepted_hosts_are_checked():
    _, auth = setup()
    flow = make_flow(None, host="example.com")
    await auth.request(flow)
    assert flow.response is None


@pytest.mark.parametrize("key", [None, "sk-wrong", "Basic abc"])
async def test_unknown_keys_get_openai_shaped_401s(key):
    _, auth = setup()
    flow = make_flow(key)
    await auth.request(flow)
    assert flow.response.status_code == 401
    error = json.loads(flow.response.content)["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


async def test_master_key_passes_without_its_header():
    _, auth = setup()
    flow = make_flow(MASTER)
    await auth.request(flow)
    assert flow.response is None and "authorization" not in flow.request.headers
    assert flow.metadata[IDENTITY_KEY]["api_key_hash"] == hash_key(MASTER)


async def test_virtual_key_identity_and_settlement():
    shared, auth = setup()
    updates = []
    shared.budget_listeners.append(updates.append)
    key = await make_key(auth, key_alias="app", metadata={"team": "t1"}, max_budget=1)
    flow = make_flow(key)
    await auth.request(flow)
    assert flow.response is None and "authorization" not in flow.request.headers
    identity = flow.metadata[IDENTITY_KEY]
    assert (identity["key_alias"], identity["team"]) == ("app", "t1")
    assert identity["api_key_hash"] == hash_key(key)
    assert flow.metadata[RESERVATION_KEY].nanos > 0

    exchange = Exchange("mr-1", datetime.now(UTC), "chat/completions", ended_at=datetime.now(UTC),
                        cost_usd=Decimal("0.25"), usage=Usage(3, 4))  # fmt: skip
    flow.metadata[EXCHANGE_KEY] = exchange
    auth.response(flow)
    await asyncio.sleep(0)
    assert [(u.before, u.after, u.key_alias, u.team) for u in updates] == [
        (0, 250_000_000, "app", "t1")]  # fmt: skip


async def test_a_stream_still_running_is_settled_when_its_exchange_finishes():
    shared, auth = setup()
    updates = []
    shared.budget_listeners.append(updates.append)
    flow = make_flow(await make_key(auth, max_budget=1))
    await auth.request(flow)
    exchange = Exchange("mr-2", datetime.now(UTC), "chat/completions")
    flow.metadata[EXCHANGE_KEY] = exchange
    auth.error(flow)  # e.g. the client went away mid-stream
    await asyncio.sleep(0)
    assert updates == [] and "mr-2" in auth.pending
    exchange.ended_at, exchange.cost_usd = datetime.now(UTC), Decimal("0.5")
    shared.publish_exchange(exchange)
    await asyncio.sleep(0)
    assert [u.after for u in updates] == [500_000_000] and not auth.pending


async def test_a_passed_through_request_is_settled_when_the_router_finishes_it():
    shared, auth = setup()
    updates = []
    shared.budget_listeners.append(updates.append)
    flow = make_flow(await make_key(auth, max_budget=1))
    await auth.request(flow)
    exchange = Exchange("mr-3", datetime.now(UTC), "chat/completions")
    flow.metadata[EXCHANGE_KEY] = exchange  # passed through: still streaming from the relay
    auth.response(flow)
    exchange.ended_at, exchange.cost_usd = datetime.now(UTC), Decimal("0.125")
    shared.publish_exchange(exchange)
    await asyncio.sleep(0)
    assert [u.after for u in updates] == [125_000_000]


async def test_model_access_and_limits_are_answered_before_the_router():
    _, auth = setup()
    key = await make_key(auth, models=["gpt-4o"], rpm_limit=1)
    denied = make_flow(key, {"model": "gpt-5", "messages": []})
    await auth.request(denied)
    assert denied.response.status_code == 403
    assert json.loads(denied.response.content)["error"]["code"] == "key_model_access_denied"
    first, second = make_flow(key), make_flow(key)
    await auth.request(first)
    await auth.request(second)
    assert first.response is None and second.response.status_code == 429
    assert second.response.headers["x-ratelimit-limit-requests"] == "1"


async def test_auth_overhead_per_request():
    """In-process store, budget + rpm + tpm on the key: well under a millisecond a request."""
    _, auth = setup()
    key = await make_key(auth, models=["gpt-4o"], max_budget=1000, rpm_limit=10**9,
                         tpm_limit=10**9)  # fmt: skip
    flows = [make_flow(key) for _ in range(2000)]
    t0 = time.perf_counter()
    for flow in flows:
        await auth.request(flow)
        auth.response(flow)
        await asyncio.sleep(0)  # lets the settlement run
    per_request = (time.perf_counter() - t0) / len(flows)
    assert all(f.response is None for f in flows)
    print(f"\nauth overhead: {per_request * 1e6:.1f} us per request (in-process)")
    assert per_request < 0.001


async def test_a_master_key_dropped_and_restored_before_the_old_store_closed_keeps_the_keys(
    tmp_path,
):
    """The old backend closes in a task of its own: the restored one opens the keys file while
    the old one still holds it (one process: shared, not "busy")."""
    shared = Shared()
    auth = KeyAuth(shared)

    def publish(master: str | None) -> None:
        general = {"spend_db": str(tmp_path / "spend.duckdb")}
        shared.publish_config(parse_config({
            "model_list": [{"model_name": "gpt-4o", "litellm_params": {
                "model": "openai/gpt-4o", "api_base": "http://b/v1", "api_key": "k"}}],
            "general_settings": general | ({"master_key": master} if master else {})}))  # fmt: skip

    publish(MASTER)
    key = await make_key(auth, key_alias="app")
    publish(None)
    publish(MASTER)  # before the loop has run the old backend's close
    flow = make_flow(key)
    await auth.request(flow)
    assert flow.response is None, flow.response.text
    assert flow.metadata[IDENTITY_KEY]["key_alias"] == "app"
    await auth.done()
    await asyncio.sleep(0.05)  # the old backend's close task
    # every holder closed: another process may take the file now
    probe = "import sys; from mitmroute.auth.keys import KeysDB; KeysDB(sys.argv[1]).close()"
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "spend.duckdb.keys.sqlite")],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr

"""LiteLLM's /key/* API as plain handlers over an in-process store."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from mitmroute.auth.key_api import Caller, KeyAdmin, handle, key_route
from mitmroute.auth.keys import MemoryKeyStore, hash_key
from mitmroute.auth.limits import MemoryLimiter, Policy
from mitmroute.config import GeneralSettings

MASTER = Caller(is_master=True)
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.fixture
def admin():
    return KeyAdmin(MemoryKeyStore(), MemoryLimiter(), GeneralSettings(), clock=lambda: NOW)


async def call(admin, method, path, body=None, caller=MASTER):
    raw = json.dumps(body).encode() if body is not None else b""
    return await handle(admin, method, path, raw, caller)


def test_routes():
    assert key_route("/key/generate") == "generate"
    assert key_route("/v1/key/info?key=x") == "info"
    assert key_route("/key/list/") == "list"
    assert key_route("/v1/chat/completions") is None
    assert key_route("/keys") is None


async def test_generate_returns_the_key_once_with_litellm_fields(admin):
    status, body = await call(admin, "POST", "/key/generate", {
        "key_alias": "app", "team_id": "team-a", "models": ["gpt-4o"], "max_budget": 50,
        "budget_duration": "30d", "rpm_limit": 5, "tpm_limit": 500, "duration": "1d",
        "metadata": {"env": "prod"}, "unknown_litellm_field": 1})  # fmt: skip
    assert status == 200
    key = body["key"]
    assert body["token"] == hash_key(key) and body["key_name"] == f"sk-...{key[-4:]}"
    assert body["expires"] == (NOW + timedelta(days=1)).isoformat()
    assert body["budget_reset_at"] == (NOW + timedelta(days=30)).isoformat()
    assert (body["spend"], body["max_budget"], body["rpm_limit"]) == (0, 50, 5)
    record = await admin.store.get(hash_key(key))
    assert record.key_alias == "app" and record.team == "team-a"


async def test_generate_with_a_chosen_key(admin):
    status, body = await call(admin, "POST", "/key/generate", {"key": "sk-my-own-key"})
    assert status == 200 and body["key"] == "sk-my-own-key"
    status, body = await call(admin, "POST", "/key/generate", {"key": "sk-my-own-key"})
    assert status == 400 and body["error"]["code"] == "key_exists"
    status, body = await call(admin, "POST", "/key/generate", {"key": "no-prefix"})
    assert status == 400 and body["error"]["param"] == "key"


async def test_info_shows_spend(admin):
    _, made = await call(admin, "POST", "/key/generate", {"max_budget": 1})
    record = await admin.store.get(made["token"])
    verdict = await admin.limiter.admit(Policy.of(record), 0)
    await admin.limiter.settle(verdict.reservation, 250_000_000, 0)
    status, body = await call(admin, "GET", f"/key/info?key={made['key']}")
    assert status == 200 and body["key"] == made["key"]
    assert body["info"]["spend"] == 0.25 and "key" not in body["info"]
    assert (await call(admin, "GET", "/key/info?key=sk-nope"))[0] == 404
    assert (await call(admin, "GET", "/key/info"))[0] == 400


async def test_a_virtual_key_reads_only_itself(admin):
    _, mine = await call(admin, "POST", "/key/generate", {"key_alias": "me"})
    _, other = await call(admin, "POST", "/key/generate", {"key_alias": "other"})
    me = Caller(record=await admin.store.get(mine["token"]))
    status, body = await call(admin, "GET", "/key/info", caller=me)
    assert status == 200 and body["info"]["key_alias"] == "me"
    assert (await call(admin, "GET", f"/key/info?key={other['key']}", caller=me))[0] == 403
    for method, path in [("POST", "/key/generate"), ("GET", "/key/list"),
                         ("POST", "/key/delete"), ("POST", "/key/update")]:  # fmt: skip
        status, body = await call(admin, method, path, {}, caller=me)
        assert status == 403 and body["error"]["code"] == "permission_denied"


async def test_update_changes_only_the_given_fields(admin):
    _, made = await call(admin, "POST", "/key/generate",
                         {"key_alias": "a", "models": ["x"], "max_budget": 5})  # fmt: skip
    status, body = await call(admin, "POST", "/key/update",
                              {"key": made["key"], "models": ["y"], "key_alias": "b"})  # fmt: skip
    assert status == 200 and body["models"] == ["y"] and body["max_budget"] == 5
    assert body["key_alias"] == "b" and body["created_at"] == made["created_at"]
    _, other = await call(admin, "POST", "/key/generate", {"key_alias": "a"})  # "a" is free again
    status, body = await call(admin, "POST", "/key/update", {"key": other["key"], "key_alias": "b"})
    assert status == 400 and body["error"]["code"] == "key_alias_exists"
    assert (await call(admin, "POST", "/key/update", {"key": "sk-gone"}))[0] == 404


async def test_delete_by_key_token_or_alias_all_or_nothing(admin):
    keys = [(await call(admin, "POST", "/key/generate", {"key_alias": f"k{i}"}))[1]
            for i in range(3)]  # fmt: skip
    status, body = await call(admin, "POST", "/key/delete", {"keys": [keys[0]["key"], "sk-gone"]})
    assert status == 404 and "sk-gone" in body["error"]["message"]
    assert await admin.store.get(keys[0]["token"]) is not None
    both = {"keys": [keys[0]["key"], keys[1]["token"]], "key_aliases": ["k2"]}
    status, body = await call(admin, "POST", "/key/delete", both)
    assert status == 200 and body == {"deleted_keys": [keys[0]["key"], keys[1]["token"], "k2"]}
    assert await admin.store.all() == []
    assert (await call(admin, "POST", "/key/delete", {}))[0] == 400


async def test_list_pages_and_filters(admin):
    for i in range(5):
        await call(admin, "POST", "/key/generate",
                   {"key_alias": f"k{i}", "team_id": "even" if i % 2 == 0 else "odd"})  # fmt: skip
    status, body = await call(admin, "GET", "/key/list?size=2&page=2")
    assert status == 200 and len(body["keys"]) == 2 and len(body["keys"][0]) == 64
    assert (body["total_count"], body["current_page"], body["total_pages"]) == (5, 2, 3)
    _, body = await call(admin, "GET", "/key/list?team_id=even&return_full_object=true")
    assert sorted(k["key_alias"] for k in body["keys"]) == ["k0", "k2", "k4"]
    assert (await call(admin, "GET", "/key/list?page=0"))[0] == 400


async def test_bad_requests(admin):
    assert (await call(admin, "GET", "/key/generate"))[0] == 405
    assert (await call(admin, "POST", "/key/rotate", {}))[0] == 404
    status, body = await handle(admin, "POST", "/key/generate", b"{nope", MASTER)
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = await call(admin, "POST", "/key/generate", {"max_budget": -1})
    assert status == 400 and body["error"]["param"] == "max_budget"

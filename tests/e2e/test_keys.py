"""Virtual keys through a real mitmdump: master key, LiteLLM's key API, model access, budgets
and rate limits, as the openai SDK sees them; shared limits across two proxies on one Redis;
keys and spend surviving a restart; the keys CLI.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

import openai
import pytest
import redis
import yaml

from tests.conftest import ROOT, Proxy, deployment

MASTER = "sk-master-test-1234"
IN_PRICE, OUT_PRICE = Decimal("0.001"), Decimal("0.002")
REDIS_URL = "redis://127.0.0.1:6379/12"


def cost(prompt: int, completion: int) -> float:
    return float(prompt * IN_PRICE + completion * OUT_PRICE)


HELLO = [{"role": "user", "content": "hello world"}]
HELLO_COST = cost(2, 3)  # the fake answers "echo: hello world": 2 prompt, 3 completion tokens


def config(base: str, **general) -> dict:
    priced = {"input_cost_per_token": float(IN_PRICE), "output_cost_per_token": float(OUT_PRICE)}
    return {
        "model_list": [
            deployment("gpt-4o", "openai/ok-model", f"{base}/v1", api_key="sk-backend", **priced),
            deployment("gpt-4o-mini", "openai/mini", f"{base}/v1", api_key="sk-backend", **priced),
            deployment("claude-opus", "openai/opus", f"{base}/v1", api_key="sk-backend", **priced),
            deployment("no-key", "openai/ok-model", f"{base}/v1", **priced),
        ],
        "general_settings": {"master_key": MASTER, "passthrough_unknown_models": False,
                             **general},
    }  # fmt: skip


def admin(proxy: Proxy, method: str, path: str, key: str = MASTER, **kwargs) -> tuple[int, dict]:
    with proxy.http() as http:
        resp = http.request(method, f"https://api.openai.com{path}",
                            headers={"authorization": f"Bearer {key}"}, **kwargs)  # fmt: skip
    return resp.status_code, resp.json()


def generate(proxy: Proxy, **fields) -> str:
    status, body = admin(proxy, "POST", "/key/generate", json=fields)
    assert status == 200, body
    return body["key"]


def spend(proxy: Proxy, key: str, expected: float | None = None) -> float:
    """The key's spend; with `expected`, waits (briefly) for settlements still in flight."""
    deadline = time.monotonic() + 3
    while True:
        status, body = admin(proxy, "GET", "/key/info", params={"key": key})
        assert status == 200, body
        spent = body["info"]["spend"]
        if expected is None or spent == pytest.approx(expected) or time.monotonic() > deadline:
            return spent
        time.sleep(0.05)


def avoid_minute_edge(margin: float = 4.0) -> None:
    """Rate limits count per clock minute: don't start a limit test about to straddle one."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)


@pytest.fixture(scope="module")
def keyed(backend, confdir, tmp_path_factory):
    proxy = Proxy(config(backend.url), confdir, tmp_path_factory.mktemp("keyed"))
    yield proxy
    proxy.stop()


# --- master key ------------------------------------------------------------------------------


def test_requests_without_a_valid_key_are_refused_openai_style(keyed, backend):
    sent = len(backend.state.requests)
    with (
        keyed.client(api_key="sk-not-a-key") as client,
        pytest.raises(openai.AuthenticationError) as e,
    ):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.code == "invalid_api_key"
    with keyed.http() as http:
        resp = http.post("https://api.openai.com/v1/chat/completions",
                         json={"model": "gpt-4o", "messages": HELLO})  # fmt: skip
        models = http.get("https://api.openai.com/v1/models")
    assert resp.status_code == 401 and models.status_code == 401
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert error["code"] == "invalid_api_key" and "message" in error
    assert len(backend.state.requests) == sent  # nothing went upstream


def test_master_key_is_accepted_and_never_goes_upstream(keyed, backend):
    with keyed.client(api_key=MASTER) as client:
        client.chat.completions.create(model="no-key", messages=HELLO)
        assert "authorization" not in backend.state.headers[-1]
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert backend.state.headers[-1]["authorization"] == "Bearer sk-backend"


# --- the seed's workflow ---------------------------------------------------------------------


def test_virtual_key_workflow_team_budget_and_models(keyed, backend):
    fields = {"key_alias": "checkout-app", "metadata": {"team": "team-a"},
              "models": ["gpt-4o", "gpt-4o-mini"], "max_budget": 50,
              "budget_duration": "30d"}  # fmt: skip
    status, made = admin(keyed, "POST", "/key/generate", json=fields)
    assert status == 200, made
    key = made["key"]
    assert key.startswith("sk-") and made["key_alias"] == "checkout-app"
    assert made["max_budget"] == 50 and made["budget_duration"] == "30d"
    assert made["budget_reset_at"] is not None and made["spend"] == 0

    with keyed.client(api_key=key) as app:
        done = app.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert done.choices[0].message.content == "echo: hello world"
        assert backend.state.headers[-1]["authorization"] == "Bearer sk-backend"
        app.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        with pytest.raises(openai.PermissionDeniedError) as e:
            app.chat.completions.create(model="claude-opus", messages=HELLO)
        assert e.value.code == "key_model_access_denied"
        assert "claude-opus" in e.value.message

    status, info = admin(keyed, "GET", "/key/info", params={"key": key})
    assert status == 200
    assert info["info"]["spend"] == pytest.approx(2 * HELLO_COST)
    assert info["info"]["metadata"] == {"team": "team-a"}
    assert key not in json.dumps(info["info"])  # only the hash is kept
    # the token (sha256) works wherever a key does
    assert admin(keyed, "GET", "/key/info", params={"key": info["info"]["token"]})[0] == 200


def test_virtual_key_never_goes_upstream(keyed, backend):
    key = generate(keyed, key_alias="no-leak")
    with keyed.client(api_key=key) as client:
        client.chat.completions.create(model="no-key", messages=HELLO)
    assert "authorization" not in backend.state.headers[-1]
    assert key not in json.dumps(backend.state.headers[-1])


def test_key_api_update_list_delete(keyed):
    key = generate(keyed, key_alias="to-edit", models=["gpt-4o"])
    change = {"key": key, "models": ["claude-opus"], "rpm_limit": 100}
    status, body = admin(keyed, "POST", "/key/update", json=change)
    assert status == 200 and body["models"] == ["claude-opus"] and body["rpm_limit"] == 100
    with keyed.client(api_key=key) as client:
        client.chat.completions.create(model="claude-opus", messages=HELLO)
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="gpt-4o", messages=HELLO)

    status, listed = admin(keyed, "GET", "/key/list", params={"key_alias": "to-edit"})
    assert status == 200 and listed["total_count"] == 1 and len(listed["keys"][0]) == 64
    status, full = admin(keyed, "GET", "/key/list", params={"return_full_object": "true",
                                                            "size": 100})  # fmt: skip
    assert "to-edit" in [k["key_alias"] for k in full["keys"]]

    # a virtual key reads itself, but manages nothing
    assert admin(keyed, "GET", "/key/info", key=key)[1]["info"]["key_alias"] == "to-edit"
    assert admin(keyed, "POST", "/key/generate", key=key, json={})[0] == 403
    assert admin(keyed, "POST", "/key/generate", json={"key_alias": "to-edit"})[0] == 400

    status, deleted = admin(keyed, "POST", "/key/delete", json={"keys": [key]})
    assert status == 200 and deleted == {"deleted_keys": [key]}
    with keyed.client(api_key=key) as client, pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="claude-opus", messages=HELLO)
    assert admin(keyed, "GET", "/key/info", params={"key": key})[0] == 404


def test_expired_key_is_refused(keyed):
    key = generate(keyed, duration="1s")
    time.sleep(1.1)
    with keyed.client(api_key=key) as client, pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert "expired" in e.value.message


# --- budgets and rate limits -----------------------------------------------------------------


def test_budget_exceeded_is_a_429_not_worth_retrying(keyed):
    key = generate(keyed, max_budget=HELLO_COST * 1.5)
    with keyed.client(api_key=key) as client:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
        client.chat.completions.create(model="gpt-4o", messages=HELLO)  # admitted: under budget
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.code == "insufficient_quota"
    assert e.value.type == "budget_exceeded"
    assert e.value.response.headers["x-should-retry"] == "false"
    assert spend(keyed, key) == pytest.approx(2 * HELLO_COST)


def test_rpm_limit(keyed):
    avoid_minute_edge()
    key = generate(keyed, rpm_limit=2)
    with keyed.client(api_key=key) as client:
        for _ in range(2):
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.code == "rate_limit_exceeded"
    headers = e.value.response.headers
    assert 0 < int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")


def test_tpm_limit(keyed):
    avoid_minute_edge()
    key = generate(keyed, tpm_limit=5)
    with keyed.client(api_key=key) as client:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)  # 5 tokens
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.code == "rate_limit_exceeded"
    assert e.value.response.headers["x-ratelimit-limit-tokens"] == "5"
    assert e.value.response.headers["x-ratelimit-remaining-tokens"] == "0"


async def _race(proxies: list[Proxy], key: str, n: int) -> tuple[int, int]:
    """`n` concurrent requests spread over `proxies`: (answered, refused for budget)."""
    clients = [p.async_client(api_key=key) for p in proxies]

    async def one(i: int) -> str:
        try:
            await clients[i % len(clients)].chat.completions.create(
                model="gpt-4o", messages=HELLO, max_tokens=3
            )
            return "ok"
        except openai.RateLimitError as e:
            return e.code or "?"

    try:
        results = await asyncio.gather(*[one(i) for i in range(n)])
    finally:
        for c in clients:
            await c.close()
    assert set(results) <= {"ok", "insufficient_quota"}, results
    return results.count("ok"), results.count("insufficient_quota")


def test_budget_holds_under_20_concurrent_requests(keyed):
    budget = 0.05  # 6 requests' worth: without reservations all 20 would be answered
    key = generate(keyed, max_budget=budget)
    answered, refused = asyncio.run(_race([keyed], key, 20))
    spent = spend(keyed, key, expected=answered * HELLO_COST)
    assert answered >= 1 and refused >= 1
    assert spent == pytest.approx(answered * HELLO_COST)
    assert spent <= budget + HELLO_COST


def test_reverse_mode_needs_the_key_too(start_proxy, backend):
    proxy = start_proxy(
        config(backend.url), extra_args=["--mode", "reverse:https://api.openai.com"]
    )
    base = f"{proxy.url}/v1"
    with (
        openai.OpenAI(api_key="sk-wrong", base_url=base, max_retries=0) as client,
        pytest.raises(openai.AuthenticationError),
    ):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    with openai.OpenAI(api_key=MASTER, base_url=base, max_retries=0) as client:
        done = client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert done.choices[0].message.content == "echo: hello world"


# --- shared state ----------------------------------------------------------------------------


@pytest.fixture
def redis_namespace():
    namespace = f"mrtest-{uuid.uuid4().hex[:8]}"
    yield namespace
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=500))
    if keys:
        client.delete(*keys)
    client.close()


def on_redis(cfg: dict, namespace: str) -> None:
    """Keys, limits and the cache shared through Redis (db 12), under `namespace`."""
    cfg["litellm_settings"] = {"cache_params": {"type": "redis", "url": REDIS_URL,
                                                "namespace": namespace}}  # fmt: skip


def test_two_proxies_on_one_redis_enforce_one_limit(redis_namespace, start_proxy, backend):
    # redis_namespace first: it is cleaned after the proxies stop (they write to it until then)
    cfg = config(backend.url)
    on_redis(cfg, redis_namespace)
    other = json.loads(json.dumps(cfg))  # before `a` names its spend_db: one per proxy
    a, b = start_proxy(cfg), start_proxy(other)
    avoid_minute_edge()
    key = generate(a, key_alias="shared", rpm_limit=4)
    with a.client(api_key=key) as on_a, b.client(api_key=key) as on_b:
        for client in (on_a, on_b, on_a, on_b):  # the key made on A works on B at once
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
        for client in (on_a, on_b):
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model="gpt-4o", messages=HELLO)
            assert e.value.code == "rate_limit_exceeded"
            assert e.value.response.headers["x-ratelimit-limit-requests"] == "4"

    # one budget, raced from both proxies at once
    budget_key = generate(b, max_budget=0.05)
    answered, refused = asyncio.run(_race([a, b], budget_key, 20))
    assert answered >= 1 and refused >= 1
    spent = spend(a, budget_key, expected=answered * HELLO_COST)
    assert spent == pytest.approx(answered * HELLO_COST)
    assert spent <= 0.05 + HELLO_COST
    assert admin(b, "POST", "/key/delete", json={"keys": [key, budget_key]})[0] == 200
    with a.client(api_key=key) as on_a, pytest.raises(openai.AuthenticationError):
        on_a.chat.completions.create(model="gpt-4o", messages=HELLO)


def test_keys_cli_and_restart_keep_keys_and_spend(start_proxy, backend, tmp_path):
    cfg = config(backend.url, spend_db=str(tmp_path / "spend.duckdb"))
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    def cli(*args: str) -> dict:
        command = [sys.executable, str(ROOT / "scripts" / "keys.py"), "--config", str(cfg_path)]
        out = subprocess.run([*command, *args], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    made = cli("generate", "--alias", "from-cli", "--team", "team-b", "--models", "gpt-4o",
               "--max-budget", "1", "--budget-duration", "30d")  # fmt: skip
    key = made["key"]
    assert (tmp_path / "spend.keys.sqlite").exists()

    first = start_proxy(cfg)
    with first.client(api_key=key) as client:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    first.stop()
    info = cli("info", key)["info"]
    assert info["key_alias"] == "from-cli" and info["team_id"] == "team-b"
    assert info["spend"] == pytest.approx(HELLO_COST)

    second = start_proxy(cfg)
    with second.client(api_key=key) as client:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert spend(second, key) == pytest.approx(2 * HELLO_COST)
    second.stop()
    assert [k["key_alias"] for k in cli("list")["keys"]] == ["from-cli"]
    assert cli("delete", key) == {"deleted_keys": [key]}


def test_budget_spent_before_a_restart_and_a_redis_loss_is_read_back_from_the_spend_log(
    redis_namespace, start_proxy, backend, tmp_path
):
    """Redis holds the live counters; after it lost them and the proxy restarted, what the key
    spent comes back from the spend log, read through the spend writer's child process."""
    cfg = config(backend.url, spend_db=str(tmp_path / "spend.duckdb"))
    on_redis(cfg, redis_namespace)
    first = start_proxy(cfg)
    key = generate(first, max_budget=HELLO_COST * 1.5)
    with first.client(api_key=key) as client:
        for _ in range(2):
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert e.value.code == "insufficient_quota"
    assert first.stop() == 0  # SIGTERM: every row in the spend log

    client = redis.Redis.from_url(REDIS_URL)  # Redis loses this proxy's counters
    client.delete(*client.scan_iter(match=f"{redis_namespace}:*", count=500))
    client.close()

    second = start_proxy(cfg)
    with second.client(api_key=key) as client:
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert e.value.code == "insufficient_quota"
    assert spend(second, key) == pytest.approx(2 * HELLO_COST)
    assert "cannot read key spend" not in second.logs()
    # keys in the SQLite keys file, spend read through the writer's process: no DuckDB in here
    assert "duckdb" not in Path(f"/proc/{second.proc.pid}/maps").read_text()

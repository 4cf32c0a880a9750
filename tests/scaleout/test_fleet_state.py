"""Three proxies behind HAProxy sharing what they must: one proxy's cooldown rests the
deployment on all of them, and Redis losing every key mid-run (FLUSHDB) loses no virtual key,
resurrects no deleted one, and forgets no spend (PostgreSQL is the store of record)."""

from __future__ import annotations

import threading
import time
import uuid

import openai
import pytest
import redis

from tests.conftest import deployment
from tests.scaleout.conftest import REDIS_URL
from tests.scaleout.test_fleet import HELLO, HELLO_COST, MASTER, key_api, settled_spend

PRICED = {"input_cost_per_token": 0.001, "output_cost_per_token": 0.002}


def ask(proxy, model: str) -> tuple[str, int]:
    """(the deployment that answered, attempts) of one request through `proxy`."""
    with proxy.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "are you there"}]
        )
    return raw.headers["x-mitmroute-deployment"], int(raw.headers["x-mitmroute-attempts"])


def calls(backend, model: str) -> int:
    return sum(1 for r in backend.state.requests if r.get("model") == model)


def test_a_cooldown_decided_by_one_proxy_rests_the_deployment_on_every_proxy(start_fleet, backend):
    flaky = f"flaky-1-{uuid.uuid4().hex[:8]}"  # 503 once, then it would answer
    fleet = start_fleet(
        [
            deployment("primary", f"openai/{flaky}", f"{backend.url}/v1", api_key="k"),
            deployment("backup", "openai/backup-answer", f"{backend.url}/v1", api_key="k"),
        ],
        router_settings={
            "fallbacks": [{"primary": ["backup"]}],
            "allowed_fails": 0,
            "cooldown_time": 60,
        },
    )
    for instance in fleet.instances:
        assert ask(instance, "backup") == ("openai/backup-answer", 1)  # up and subscribed
    time.sleep(0.3)

    assert ask(fleet.instances[0], "primary") == ("openai/backup-answer", 2)  # 503: cooled
    assert calls(backend, flaky) == 1
    # the two others (addressed directly) and the balancer never try it again
    for proxy in [*fleet.instances[1:], fleet, fleet, fleet]:
        assert ask(proxy, "primary") == ("openai/backup-answer", 1)
    assert calls(backend, flaky) == 1


def test_redis_flushed_mid_run_loses_no_key_and_no_spend(start_fleet, backend):
    model = deployment("gpt-4o", "openai/gpt-4o", f"{backend.url}/v1", api_key="k", **PRICED)
    fleet = start_fleet([model], master_key=MASTER)
    one, two, three = fleet.instances

    def generate(proxy, **fields) -> str:
        status, body = key_api(proxy, "POST", "/key/generate", json=fields)
        assert status == 200, body
        return body["key"]

    good = generate(one)  # each key issued on another proxy
    spent = generate(two, max_budget=0.01)
    deleted = generate(three)
    status, body = key_api(one, "POST", "/key/delete", json={"keys": [deleted]})
    assert status == 200, body
    with fleet.client(api_key=spent) as client:
        for _ in range(2):  # 2 x 0.008 = 0.016 of 0.01
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert settled_spend(fleet, spent, 2 * HELLO_COST) == pytest.approx(2 * HELLO_COST)

    answered: list[float] = []
    failed: list[str] = []
    stop = threading.Event()

    def load() -> None:
        client = fleet.client(api_key=good)
        n = 0
        while not stop.is_set():
            n += 1
            try:
                client.chat.completions.create(model="gpt-4o", messages=HELLO)
                answered.append(time.monotonic())
            except Exception as e:
                failed.append(f"{type(e).__name__}: {e}")
            if n % 10 == 0:  # a new connection: HAProxy spreads it over the proxies
                client.close()
                client = fleet.client(api_key=good)
        client.close()

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        flushed_at = time.monotonic()
        flushed = redis.Redis.from_url(REDIS_URL)
        assert flushed.flushdb()
        flushed.close()
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    after = [at for at in answered if at > flushed_at]
    print(f"answered {len(answered)} ({len(after)} after the flush), failed {len(failed)}")
    assert failed == [], failed[:5]
    assert len(after) > 20

    total = len(answered) * HELLO_COST
    for proxy in [fleet, *fleet.instances]:
        # the good key still works everywhere and its spend is whole
        assert settled_spend(proxy, good, total) == pytest.approx(total)
        with proxy.client(api_key=good) as client:
            assert client.chat.completions.create(model="gpt-4o", messages=HELLO).choices
        total += HELLO_COST
        # the spent key stays over its budget, the deleted one stays deleted
        with proxy.client(api_key=spent) as client, pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert e.value.code == "insufficient_quota"
        with proxy.client(api_key=deleted) as client, pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="gpt-4o", messages=HELLO)

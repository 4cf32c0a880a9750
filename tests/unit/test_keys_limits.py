"""Budgets (reserve on start, settle on finish) and rpm/tpm windows, in-process and on Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import redis.asyncio as aioredis

from mitmroute.auth.keys import KeyRecord, KeysDB
from mitmroute.auth.limits import (
    NANOS,
    CostEstimator,
    MemoryLimiter,
    Policy,
    RedisLimiter,
    Reservation,
    usd_to_nanos,
)
from mitmroute.config import GeneralSettings, parse_config
from mitmroute.exchange import Exchange, Usage

REDIS_URL = "redis://127.0.0.1:6379/12"
T0 = (time.time() // 60) * 60 + 1  # one second into a clock minute


@pytest.fixture
async def redis_limiter():
    client = aioredis.Redis.from_url(REDIS_URL)
    namespace = f"mrunit-{uuid.uuid4().hex[:8]}"
    yield RedisLimiter(client, namespace, reservation_ttl=30)
    keys = [k async for k in client.scan_iter(match=f"{namespace}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def memory_limiter():
    return MemoryLimiter(reservation_ttl=30)


@pytest.fixture(params=["memory", "redis"])
def limiter(request):
    return request.getfixturevalue(f"{request.param}_limiter")


def policy(**kw) -> Policy:
    return Policy(token=uuid.uuid4().hex, anchor=T0, **kw)


def test_usd_to_nanos_rounds_up_exactly():
    assert usd_to_nanos(Decimal("0.000000001")) == 1
    assert usd_to_nanos(Decimal("0.0000000011")) == 2
    assert usd_to_nanos(1.5) == 1_500_000_000
    assert usd_to_nanos(None) == 0


def test_policy_takes_general_defaults_only_for_keys_without_a_budget():
    general = GeneralSettings(max_budget=10, budget_duration="1d")
    created = datetime.fromtimestamp(T0, UTC)
    own = Policy.of(KeyRecord("t", "n", max_budget=2, created_at=created), general)
    assert own.max_budget == 2 * NANOS and own.budget_seconds is None
    default = Policy.of(KeyRecord("t", "n", created_at=created), general)
    assert default.max_budget == 10 * NANOS and default.budget_seconds == 86400
    assert default.reset_at(T0 + 5) == T0 + 86400


async def test_rpm_counts_admitted_requests_per_clock_minute(limiter):
    p = policy(rpm=2)
    assert (await limiter.admit(p, 0, T0)).ok
    assert (await limiter.admit(p, 0, T0 + 1)).ok
    refused = await limiter.admit(p, 0, T0 + 2)
    assert refused.reason == "rpm"
    headers = refused.headers()
    assert headers["retry-after"] == "57" and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "57s"
    assert (await limiter.admit(p, 0, T0 + 60)).ok  # the next minute


async def test_tpm_counts_settled_tokens(limiter):
    p = policy(tpm=100)
    first = await limiter.admit(p, 0, T0)
    await limiter.settle(first.reservation, 0, 100, T0 + 1)
    refused = await limiter.admit(p, 0, T0 + 2)
    assert refused.reason == "tpm" and refused.headers()["x-ratelimit-remaining-tokens"] == "0"
    assert (await limiter.admit(p, 0, T0 + 61)).ok


async def test_budget_reserves_then_settles_with_the_real_cost(limiter):
    p = policy(max_budget=100)
    a = await limiter.admit(p, 60, T0)
    b = await limiter.admit(p, 60, T0)  # 0 spent + 60 held < 100
    assert a.ok and b.ok and b.reserved == 60
    held = await limiter.admit(p, 60, T0)  # 120 held
    assert held.reason == "budget" and held.reserved == 120
    update = await limiter.settle(a.reservation, 30, 0, T0)
    assert (update.before, update.after) == (0, 30)
    assert (await limiter.admit(p, 10, T0)).ok  # 30 spent + 60 held
    assert await limiter.spent(p, T0) == 30


async def test_overshoot_is_bounded_under_concurrency(limiter):
    """50 racing requests costing 7 each, estimated at 10, against a budget of 100."""
    p = policy(max_budget=100)

    async def one() -> int:
        verdict = await limiter.admit(p, 10, T0)
        if not verdict.ok:
            return 0
        await asyncio.sleep(0.01)
        await limiter.settle(verdict.reservation, 7, 0, T0)
        return 1

    answered = sum(await asyncio.gather(*[one() for _ in range(50)]))
    spent = await limiter.spent(p, T0)
    assert spent == 7 * answered
    assert 0 < spent <= 100 + 10
    assert answered < 50


async def test_budget_window_resets_on_schedule(limiter):
    p = policy(max_budget=100, budget_seconds=3600)
    v = await limiter.admit(p, 0, T0)
    await limiter.settle(v.reservation, 100, 0, T0)
    assert (await limiter.admit(p, 0, T0 + 3599)).reason == "budget"
    assert (await limiter.admit(p, 0, T0 + 3600)).ok
    assert await limiter.spent(p, T0 + 3600) == 0


async def test_reservations_of_lost_requests_expire(limiter):
    p = policy(max_budget=100)
    assert (await limiter.admit(p, 100, T0)).ok  # never settled
    assert (await limiter.admit(p, 1, T0 + 1)).reason == "budget"
    assert (await limiter.admit(p, 1, T0 + 31)).ok  # reservation_ttl = 30 s


async def test_crossings_are_seen_by_exactly_one_settle(limiter):
    p = policy(max_budget=100)
    updates = []
    for _ in range(4):
        v = await limiter.admit(p, 0, T0)
        updates.append(await limiter.settle(v.reservation, 30, 0, T0))
    assert [u.crossed(0.85) for u in updates] == [False, False, True, False]
    assert [u.crossed(1.0) for u in updates] == [False, False, False, True]
    assert updates[-1].remaining_usd == pytest.approx(-20 / NANOS)


async def test_forget_drops_a_keys_state(limiter):
    p = policy(max_budget=10, rpm=1)
    v = await limiter.admit(p, 0, T0)
    await limiter.settle(v.reservation, 10, 0, T0)
    await limiter.forget(p.token)
    assert (await limiter.admit(p, 0, T0)).ok


async def test_memory_spend_is_persisted(tmp_path):
    db = KeysDB(str(tmp_path / "k.keys.sqlite"))
    limiter = MemoryLimiter(db)
    p = policy(max_budget=100)
    v = await limiter.admit(p, 0, T0)
    await limiter.settle(v.reservation, 42, 0, T0)
    await limiter.close()
    assert await MemoryLimiter(db).spent(p, T0) == 42
    db.close()


async def test_settle_without_reservation_entry_is_harmless(limiter):
    p = policy()
    update = await limiter.settle(Reservation(p, 0), 5, 0, T0)
    assert (update.before, update.after, update.max_budget) == (0, 5, None)


# --- estimating and pricing ------------------------------------------------------------------


def _config():
    return parse_config({
        "model_list": [
            {"model_name": "g", "litellm_params": {"model": "openai/a", "api_base": "http://x/v1",
             "input_cost_per_token": 0.001, "output_cost_per_token": 0.002}},
            {"model_name": "g", "litellm_params": {"model": "openai/b", "api_base": "http://y/v1",
             "input_cost_per_token": 0.003, "output_cost_per_token": 0.001}},
            {"model_name": "big", "litellm_params": {"model": "openai/c", "api_base": "http://z/v1",
             "input_cost_per_token": 0.01, "output_cost_per_token": 0.02}},
            {"model_name": "free", "litellm_params": {"model": "openai/d",
             "api_base": "http://w/v1", "input_cost_per_token": 0, "output_cost_per_token": 0}},
        ],
        "router_settings": {"fallbacks": [{"g": ["big"]}], "model_group_alias": {"al": "g"}},
    })  # fmt: skip


def test_estimate_uses_the_highest_prices_reachable_from_the_group():
    est = CostEstimator(_config())
    # g falls back to big: 0.01 in, 0.02 out; 400 bytes -> 101 tokens; max_tokens 10
    assert est.estimate("g", {"max_tokens": 10}, 400) == usd_to_nanos(
        Decimal("101") * Decimal("0.01") + 10 * Decimal("0.02"))  # fmt: skip
    assert est.estimate("al", {"max_tokens": 10}, 400) == est.estimate("g", {"max_tokens": 10}, 400)
    no_limit = est.estimate("big", {"n": 2}, 0)
    assert no_limit == usd_to_nanos(Decimal("0.01") + 2 * 1024 * Decimal("0.02"))
    assert est.estimate("big", {}, 40, embeddings=True) == usd_to_nanos(11 * Decimal("0.01"))
    assert est.estimate("free", {}, 1000) == 0
    assert est.estimate("unknown", {}, 1000) == 0


def test_budgets_settle_at_the_cost_the_engine_set_and_price_nothing_themselves():
    est = CostEstimator(_config())
    ex = Exchange("r", datetime.now(UTC), "chat/completions", deployment="openai/b",
                  api_base="http://y/v1", usage=Usage(10, 5))  # fmt: skip
    assert est.cost(ex) == 0  # unpriced by the engine: nothing to settle
    ex.cost_usd = Decimal("1.5")
    assert est.cost(ex) == Decimal("1.5")
    assert est.cost(Exchange("r", datetime.now(UTC), "chat/completions")) == 0

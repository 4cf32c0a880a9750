"""Keys and spend outlive Redis: the keys file is the store of record, spend comes back from the
spend log, and a dead or hung Redis costs a key decision at most ~100 ms. Driven on the stores,
limiters and the Redis link directly, against a redis-server of the test's own."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import duckdb
import pytest
from mitmproxy.test import tflow

from mitmroute.addons.auth import KeyAuth
from mitmroute.addons.flows import GATE_KEY
from mitmroute.addons.router import IDENTITY_KEY
from mitmroute.addons.shared import Shared
from mitmroute.auth import open_backend
from mitmroute.auth.key_api import Caller, handle
from mitmroute.auth.keys import KeysDB, MemoryKeyStore, RedisKeyStore, make_record, new_key
from mitmroute.auth.ledger import Ledger
from mitmroute.auth.limits import NANOS, Policy, RedisLimiter, usd_to_nanos
from mitmroute.auth.link import RedisDown, RedisLink
from mitmroute.config import ConfigError, parse_config
from mitmroute.exchange import Exchange
from mitmroute.gate import decide
from mitmroute.redis_client import connect
from mitmroute.spend import SpendLog
from tests.redis_process import RedisProcess

pytestmark = pytest.mark.timeout(60)

NOW = datetime.now(UTC)
BOUND = 0.5
"""A key decision with Redis dead or hung must end well within this (the target is ~100 ms)."""


@pytest.fixture
def own_redis():
    server = RedisProcess()
    yield server
    server.stop()


@pytest.fixture
async def link(own_redis):
    client = connect(url=own_redis.url, retries=1)
    link = RedisLink(client, "t", label=own_redis.url, interval=0.05)
    yield link
    await link.close()
    await client.aclose()


@pytest.fixture
def keys_db(tmp_path):
    db = KeysDB(str(tmp_path / "spend.keys.sqlite"))
    yield db
    db.close()


def record(**fields):
    return make_record(new_key(), fields, NOW - timedelta(seconds=5))


async def eventually(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def timed(coro) -> tuple[float, object]:
    t0 = time.perf_counter()
    try:
        result = await coro
    except Exception as e:
        result = e
    return time.perf_counter() - t0, result


# --- keys ------------------------------------------------------------------------------------


async def test_a_key_redis_lost_is_read_from_the_keys_file_and_put_back(link, keys_db, own_redis):
    store = RedisKeyStore(link.client, "t", MemoryKeyStore(keys_db), link)
    made = record(key_alias="kept", models=["gpt-4o"])
    assert await store.put(made)
    assert [r.token for r in keys_db.load_keys()] == [made.token]  # on disk

    own_redis.restart_empty()
    assert await store.get(made.token) == made
    assert await link.client.hget(store.keys_key, made.token) is not None  # put back
    assert (await store.by_alias("kept")).token == made.token


async def test_keys_read_through_another_proxy_are_kept_on_disk_too(link, keys_db, tmp_path):
    other = RedisKeyStore(link.client, "t", MemoryKeyStore(), link)  # a proxy elsewhere
    made = record()
    assert await other.put(made)
    here = RedisKeyStore(link.client, "t", MemoryKeyStore(keys_db), link)
    assert await here.get(made.token) == made
    assert made.token in {r.token for r in keys_db.load_keys()}


async def test_a_key_deleted_through_another_proxy_is_not_brought_back(link, keys_db):
    here = RedisKeyStore(link.client, "t", MemoryKeyStore(keys_db), link)
    there = RedisKeyStore(link.client, "t", MemoryKeyStore(), link)
    made = record(key_alias="gone")
    assert await here.put(made)
    assert await there.get(made.token) == made
    await there.delete([made.token])
    assert await here.get(made.token) is None  # not put back from the keys file...
    assert keys_db.load_keys() == []  # ...which forgets it too
    await here.push_all()
    assert await there.get(made.token) is None


async def test_resync_pushes_every_key_back_without_overwriting_newer_ones(link, keys_db):
    here = RedisKeyStore(link.client, "t", MemoryKeyStore(keys_db), link)
    kept, changed = record(key_alias="a"), record(key_alias="b")
    assert await here.put(kept) and await here.put(changed)
    newer = make_record(new_key(), {"key_alias": "b", "rpm_limit": 5}, NOW)
    newer.token = changed.token
    await link.client.delete(here.keys_key, here.aliases_key)
    await link.client.hset(here.keys_key, changed.token, newer.to_json())  # another proxy's
    await here.push_all()
    assert await here.get(kept.token) == kept
    assert (await here.get(changed.token)).rpm_limit == 5


async def test_writes_need_redis_and_reads_follow_the_policy_when_it_is_dead(
    link, keys_db, own_redis
):
    store = RedisKeyStore(link.client, "t", MemoryKeyStore(keys_db), link)
    made = record()
    assert await store.put(made)
    own_redis.kill()
    with pytest.raises(RedisDown):
        await store.get(made.token)
    store.serve_local_when_down = True
    assert await store.get(made.token) == made
    assert [r.token for r in await store.all()] == [made.token]
    with pytest.raises(RedisDown):
        await store.put(record())


# --- the link: dead, hung, busy --------------------------------------------------------------


async def test_dead_redis_fails_a_call_at_once_and_the_breaker_skips_it_after(link, own_redis):
    await link.call(link.client.ping)
    own_redis.kill()
    first, error = await timed(link.call(link.client.ping))
    assert isinstance(error, RedisDown) and first < BOUND
    later, error = await timed(link.call(link.client.ping))
    assert isinstance(error, RedisDown) and later < 0.005
    print(f"\nredis dead: first call {first * 1000:.1f} ms, then {later * 1000:.2f} ms")


async def test_hung_redis_fails_a_call_in_about_100ms_and_the_breaker_skips_it_after(
    link, own_redis
):
    await link.call(link.client.ping)
    own_redis.pause()
    calls = [link.call(link.client.ping) for _ in range(5)]  # in flight together
    t0 = time.perf_counter()
    results = await asyncio.gather(*calls, return_exceptions=True)
    first = time.perf_counter() - t0
    assert all(isinstance(r, RedisDown) for r in results) and first < BOUND
    later, error = await timed(link.call(link.client.ping))
    assert isinstance(error, RedisDown) and later < 0.005
    print(f"\nredis hung: first calls {first * 1000:.1f} ms, then {later * 1000:.2f} ms")

    own_redis.resume()
    await eventually(lambda: link.up)  # the watcher sees it back
    assert await link.call(link.client.ping)


async def test_a_busy_pool_is_not_mistaken_for_a_dead_redis(link):
    """200 calls at once on a cold pool take longer than the 40 ms budget: none fails, and the
    breaker stays closed. (The allowance is raised here so that a CI machine busy with other
    tests can't make the pool's own slowness look like a dead Redis.)"""
    link.probe_timeout = 5.0
    results = await asyncio.gather(*[link.call(link.client.ping) for _ in range(200)])
    assert all(results) and link.up


async def test_a_stalled_event_loop_is_not_mistaken_for_a_dead_redis(link, own_redis):
    """On a machine under load both the proxy's loop and Redis run late: the PING that decides
    "down" gets the time the loop lost. (Redis answers at 250 ms; the loop, stalled until
    200 ms, would otherwise give up at once for its 40 ms budget being long spent.)"""
    assert await link.call(link.client.ping)
    own_redis.pause()
    threading.Timer(0.25, own_redis.resume).start()
    asyncio.get_running_loop().call_later(0.001, time.sleep, 0.2)  # the loop stalls
    try:
        assert await link._alive()
    finally:
        own_redis.resume()


async def test_redis_that_lost_its_data_gets_the_epoch_and_the_state_back(link, own_redis):
    pushed = []

    async def hook() -> None:
        pushed.append(link.epoch)

    link.resync_hooks.append(hook)
    link.start()
    await eventually(lambda: link.epoch is not None)
    first = link.epoch
    own_redis.restart_empty()
    await eventually(lambda: link.epoch not in (None, first))
    assert len(pushed) >= 2


# --- spend -----------------------------------------------------------------------------------


def exchange(token: str | None, usd: str, started: datetime) -> Exchange:
    return Exchange(
        request_id=uuid.uuid4().hex,
        started_at=started,
        endpoint="chat/completions",
        ended_at=started,
        api_key_hash=token,
        status_code=200,
        cost_usd=Decimal(usd),
    )


def write_ledger(path: str, rows: list[Exchange]) -> None:
    log = SpendLog(path).start()
    for row in rows:
        log.record(row)
    assert log.close()


async def test_the_ledger_sums_each_keys_spend_in_its_window(tmp_path):
    path = str(tmp_path / "spend.duckdb")
    a, b = "a" * 64, "b" * 64
    t = datetime(2026, 5, 1, 12, tzinfo=UTC)
    rows = [exchange(a, "0.25", t), exchange(a, "0.5", t + timedelta(hours=2))]
    write_ledger(path, [*rows, exchange(b, "0.125", t), exchange(None, "9", t)])
    ledger = Ledger(path)
    try:
        since = {a: (t + timedelta(hours=1)).timestamp(), b: 0.0, "c" * 64: 0.0}
        assert await ledger.spend_since(since) == {a: NANOS // 2, b: NANOS // 8}
        assert await Ledger(str(tmp_path / "none.duckdb")).spend_since({a: 0.0}) == {}
    finally:
        ledger.close()


async def test_the_ledger_waits_while_the_writer_holds_the_file(tmp_path):
    path = str(tmp_path / "spend.duckdb")
    write_ledger(path, [exchange("a" * 64, "1", NOW)])
    writer = duckdb.connect(path)  # the spend log writer, mid-flush
    threading.Timer(0.2, writer.close).start()
    ledger = Ledger(path)
    try:
        assert await ledger.spend_since({"a" * 64: 0.0}) == {"a" * 64: NANOS}
    finally:
        ledger.close()


async def test_spend_comes_back_from_the_ledger_after_redis_and_the_proxy_restart(
    link, own_redis, tmp_path
):
    path = str(tmp_path / "spend.duckdb")
    made = record(max_budget=0.5)
    policy = Policy.of(made)
    write_ledger(path, [exchange(made.token, "0.75", NOW)])
    own_redis.restart_empty()
    ledger = Ledger(path)
    try:
        limiter = RedisLimiter(link.client, "t", link=link, ledger=ledger, ledger_id="me")
        assert await limiter.spent(policy) == usd_to_nanos(0.75)
        verdict = await limiter.admit(policy, 0)
        assert verdict.reason == "budget" and verdict.spent == usd_to_nanos(0.75)
    finally:
        ledger.close()


async def test_a_ledger_that_cannot_be_read_is_read_again_not_taken_as_zero(
    link, own_redis, tmp_path
):
    """The spend writer restarting, say: the key's spend counts as 0 for that request only."""
    path = str(tmp_path / "spend.duckdb")
    made = record(max_budget=0.5)
    write_ledger(path, [exchange(made.token, "0.75", NOW)])
    own_redis.restart_empty()
    ledger = Ledger(path)
    reads = [RuntimeError("the spend sidecar exited")]  # the first read fails, then the file

    def read(since):
        if reads:
            raise reads.pop()
        return Ledger.read(ledger, since)

    ledger.read = read
    try:
        limiter = RedisLimiter(link.client, "t", link=link, ledger=ledger, ledger_id="me")
        policy = Policy.of(made)
        assert (await limiter.admit(policy, 0)).reason is None  # not read: let through once
        verdict = await limiter.admit(policy, 0)
        assert verdict.reason == "budget" and verdict.spent == usd_to_nanos(0.75)
    finally:
        ledger.close()


async def test_each_ledgers_share_is_counted_once(link):
    """Two proxies (two spend logs) share a key: spend is the sum of their shares, and a
    restarted proxy replaces its share rather than adding it again."""
    p = Policy(token=uuid.uuid4().hex, max_budget=55)
    a = RedisLimiter(link.client, "t", link=link, ledger_id="a")
    b = RedisLimiter(link.client, "t", link=link, ledger_id="b")
    for limiter, cost in ((a, 30), (b, 20), (a, 5)):
        v = await limiter.admit(p, 0)
        await limiter.settle(v.reservation, cost, 0)
    assert await a.spent(p) == await b.spent(p) == 55
    again = RedisLimiter(link.client, "t", link=link, ledger_id="a")  # `a` restarted
    assert await again.spent(p) == 55
    assert (await again.admit(p, 0)).reason == "budget"


async def test_redis_restarted_empty_gets_this_proxys_spend_on_the_next_request(link, own_redis):
    p = Policy(token=uuid.uuid4().hex, max_budget=90)
    limiter = RedisLimiter(link.client, "t", link=link, ledger_id="me")
    v = await limiter.admit(p, 0)
    await limiter.settle(v.reservation, 90, 0)
    own_redis.restart_empty()
    refused = await limiter.admit(p, 0)
    assert refused.reason == "budget" and refused.spent == 90


async def test_settlements_while_redis_is_down_are_queued_and_applied_when_it_is_back(
    link, own_redis
):
    p = Policy(token=uuid.uuid4().hex, max_budget=10**6, tpm=10**6)
    t = time.time()  # one clock minute for the whole test
    limiter = RedisLimiter(link.client, "t", link=link, ledger_id="me", clock=lambda: t)
    link.tick_hooks.append(limiter.drain)
    verdicts = [await limiter.admit(p, 100) for _ in range(13)]
    assert (await limiter.admit(p, 0)).reserved == 1300
    own_redis.pause()
    t0 = time.perf_counter()
    updates = [await limiter.settle(v.reservation, 10, 7) for v in verdicts]
    assert time.perf_counter() - t0 < 13 * BOUND
    assert [u.after for u in updates][-1] == 130 and limiter.pending

    own_redis.resume()
    link.start()

    await eventually(lambda: link.up and not limiter.pending)
    check = await limiter.admit(p, 0)
    assert check.spent == 130 and check.reserved == 0  # 13 costs in, 13 reservations out
    assert check.tokens == 13 * 7


async def test_the_queue_is_bounded_but_spend_is_never_dropped(link, own_redis):
    p = Policy(token=uuid.uuid4().hex, max_budget=10**6)
    limiter = RedisLimiter(link.client, "t", link=link, ledger_id="me", queue_limit=3)
    verdicts = [await limiter.admit(p, 1) for _ in range(10)]
    own_redis.kill()
    for v in verdicts:
        await limiter.settle(v.reservation, 10, 0)
    assert len(limiter._queue) == 3
    own_redis.start()  # empty, too
    link.breaker.close()
    await limiter.drain()
    assert await limiter.spent(p) == 100


async def test_allowed_requests_while_redis_is_down_use_limits_in_this_process(link, own_redis):
    p = Policy(token=uuid.uuid4().hex, max_budget=100, rpm=2)
    limiter = RedisLimiter(link.client, "t", link=link, ledger_id="me")
    v = await limiter.admit(p, 0)
    await limiter.settle(v.reservation, 60, 0)
    own_redis.kill()
    with pytest.raises(RedisDown):
        await limiter.admit(p, 0)
    limiter.serve_local_when_down = True
    elapsed, first = await timed(limiter.admit(p, 40))
    assert first.ok and first.reservation.local and first.spent == 60 and elapsed < BOUND
    assert (await limiter.admit(p, 40)).reason == "budget"  # 60 spent + 40 held
    await limiter.settle(first.reservation, 30, 0)
    assert await limiter.spent(p) == 90
    assert (await limiter.admit(p, 0)).ok  # counted here: rpm of this process only
    assert (await limiter.admit(p, 0)).reason == "rpm"


# --- the backend as the proxy opens it -------------------------------------------------------


def test_allow_requests_on_db_unavailable_is_a_checked_boolean_off_by_default(caplog):
    assert not parse_config({}).general.allow_requests_on_db_unavailable
    on = parse_config({"general_settings": {"allow_requests_on_db_unavailable": "true"}})
    assert on.general.allow_requests_on_db_unavailable
    assert "unknown key" not in caplog.text
    with pytest.raises(ConfigError, match=r"general_settings\.allow_requests_on_db_unavailable"):
        parse_config({"general_settings": {"allow_requests_on_db_unavailable": "maybe"}})


def _config(tmp_path, redis_url: str, **general) -> object:
    spend_db = str(tmp_path / "spend.duckdb")
    return parse_config(
        {
            "general_settings": {"master_key": "sk-m", "spend_db": spend_db, **general},
            "litellm_settings": {"cache_params": {"type": "redis", "url": redis_url}},
        }
    )


async def test_the_backend_keeps_keys_on_disk_and_follows_the_policy(tmp_path, own_redis):
    config = _config(tmp_path, own_redis.url, allow_requests_on_db_unavailable=True)
    assert config.general.allow_requests_on_db_unavailable
    backend = open_backend(config)
    try:
        made = record()
        assert await backend.store.put(made)
        own_redis.kill()
        assert await backend.store.get(made.token) == made
        backend.set_policy(_config(tmp_path, own_redis.url).general)  # a reload: fail closed
        with pytest.raises(RedisDown):
            await backend.store.get(made.token)
    finally:
        await backend.close()
    db = KeysDB(str(tmp_path / "spend.keys.sqlite"))
    try:
        assert [r.token for r in db.load_keys()] == [made.token]
    finally:
        db.close()


async def test_a_reload_that_moves_limits_to_redis_keeps_the_keys(tmp_path, own_redis):
    shared = Shared()
    auth = KeyAuth(shared)
    spend_db = str(tmp_path / "spend.duckdb")
    general = {"master_key": "sk-m", "spend_db": spend_db}
    shared.publish_config(parse_config({"general_settings": general}))
    status, made = await handle(auth.state.admin, "POST", "/key/generate", b"{}", Caller(True))
    assert status == 200

    cache = {"type": "redis", "url": own_redis.url}
    shared.publish_config(
        parse_config({"general_settings": general, "litellm_settings": {"cache_params": cache}})
    )
    request = tflow.tflow().request
    request.host, request.path = "api.openai.com", "/v1/models"
    request.headers["authorization"] = f"Bearer {made['key']}"
    flow = tflow.tflow(req=request)
    flow.metadata[GATE_KEY] = decide("GET", "/v1/models", "api.openai.com")
    await auth.request(flow)
    assert flow.response is None and IDENTITY_KEY in flow.metadata
    await auth.done()


async def test_an_error_redis_answers_is_not_an_outage(link):
    """WRONGTYPE and the like are Redis's answer: the call fails, the breaker stays closed."""
    await link.client.set("t:not-a-hash", "x")
    for _ in range(link.breaker.threshold + 2):
        with pytest.raises(RedisDown, match="WRONGTYPE"):
            await link.call(lambda: link.client.hget("t:not-a-hash", "f"))
    assert link.up
    assert await link.call(lambda: link.client.get("t:not-a-hash")) == b"x"

"""Keys and budget spend in PostgreSQL (general_settings.database_url): the store on a database
of the test's own (tests/pg.py), the stores and limiters against it with a redis-server of the
test's own (flushed and killed freely; the machine's Redis is never flushed)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from mitmroute.addons.auth import KeyAuth
from mitmroute.addons.shared import Shared
from mitmroute.auth import KeyStoreUnavailable, open_backend
from mitmroute.auth.keys import make_record, new_key
from mitmroute.auth.limits import NANOS, Policy
from mitmroute.auth.pg import SCHEMA, PgKeysDB, PgKeyStore
from mitmroute.config import parse_config
from tests import pg
from tests.conftest import free_port
from tests.redis_process import RedisProcess

pytestmark = pytest.mark.timeout(90)

NOW = datetime.now(UTC)


@pytest.fixture
def pg_url():
    yield from pg.database()


@pytest.fixture
def db(pg_url):
    store = PgKeysDB(pg_url)
    yield store
    store.close()


@pytest.fixture
def own_redis():
    server = RedisProcess()
    yield server
    server.stop()


def record(**fields):
    return make_record(new_key(), fields, NOW - timedelta(seconds=5))


def terminate_connections(url: str) -> int:
    """pg_terminate_backend on every mitmroute keys connection (what a restart does to them)."""
    name = url.rsplit("/", 1)[1]
    sql = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        f"WHERE application_name = 'mitmroute-keys' AND datname = '{name}'"
    )
    return int(pg.psql(sql))


async def eventually(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# --- PgKeysDB ------------------------------------------------------------------------------


def test_schema_is_our_own_and_made_once_by_proxies_starting_together(pg_url):
    stores: list[PgKeysDB] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            stores.append(PgKeysDB(pg_url))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for store in stores:
        store.close()
    assert not errors and len(stores) == 4
    tables = pg.psql(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
        pg_url.rsplit("/", 1)[1],
    ).split()
    assert tables == [f"{SCHEMA}.key_spend", f"{SCHEMA}.keys"]


def test_keys_are_stored_read_by_token_and_alias_and_aliases_are_unique(db, pg_url):
    made = record(key_alias="app-a", team_id="team-a", models=["gpt-4o"], max_budget=5.0)
    assert db.put_key(made)
    assert db.get_key(made.token) == made
    assert db.key_by_alias("app-a") == made
    assert not db.put_key(record(key_alias="app-a"))  # another key's alias: nothing written
    assert len(db.load_keys()) == 1
    changed = replace(made, key_alias="app-b", updated_at=NOW)
    assert db.put_key(changed)
    assert db.key_by_alias("app-a") is None and db.key_by_alias("app-b") == changed
    assert db.put_key(record(key_alias="app-a"))  # free again
    # any PostgreSQL client can read them
    row = pg.psql(f"SELECT record->>'team_id' FROM {SCHEMA}.keys WHERE key_alias = 'app-b'",
                  pg_url.rsplit("/", 1)[1])  # fmt: skip
    assert row.strip() == "team-a"


def test_shares_only_ever_rise_and_a_deleted_key_takes_its_spend_along(db, pg_url):
    made = record()
    db.put_key(made)
    other = PgKeysDB(pg_url)
    try:
        db.save_shares([(made.token, 3, 500)])
        db.save_shares([(made.token, 3, 200)])  # an older batch written late: no effect
        other.save_shares([(made.token, 3, 70)])
        assert db.shares({made.token: 3}) == {made.token: {db.instance: 500, other.instance: 70}}
        assert db.shares({made.token: 4}) == {}
        assert other.load_spend() == {made.token: (3, 570)}
    finally:
        other.close()
    db.delete_keys([made.token])
    assert db.get_key(made.token) is None and db.shares({made.token: 3}) == {}


def test_the_in_process_limiter_writes_only_this_instances_part(db, pg_url):
    made = record()
    db.put_key(made)
    db.save_shares([(made.token, 0, 1000)])  # a proxy that ran before
    restarted = PgKeysDB(pg_url)
    try:
        assert restarted.load_spend() == {made.token: (0, 1000)}
        restarted.save_spend([(made.token, 0, 1300)])  # its total: 1000 seen at start + 300
        assert restarted.shares({made.token: 0})[made.token] == {
            db.instance: 1000,
            restarted.instance: 300,
        }
    finally:
        restarted.close()


def test_old_windows_and_orphans_are_pruned(db, pg_url):
    made = record()
    db.put_key(made)
    db.save_shares([(made.token, 1, 10), (made.token, 2, 20), ("f" * 64, 0, 5)])
    db._do(db._prune)
    rows = pg.psql(f"SELECT token, budget_window FROM {SCHEMA}.key_spend",
                   pg_url.rsplit("/", 1)[1]).split()  # fmt: skip
    assert rows == [f"{made.token}|2"]


def test_a_dropped_connection_is_replaced_once(db, pg_url):
    made = record()
    assert db.put_key(made)
    assert terminate_connections(pg_url) == 1
    assert db.get_key(made.token) == made  # reconnected
    assert terminate_connections(pg_url) == 1
    db.save_shares([(made.token, 0, 7)])
    assert db.shares({made.token: 0}) == {made.token: {db.instance: 7}}


def test_postgresql_down_is_a_clear_error_without_the_password():
    started = time.monotonic()
    url = f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(KeyStoreUnavailable) as e:
        PgKeysDB(url)
    assert time.monotonic() - started < 5
    assert "127.0.0.1" in str(e.value) and "s3cret" not in str(e.value)


def test_a_statement_waits_at_most_the_statement_timeout(db, pg_url):
    made = record()
    db.put_key(made)
    import psycopg

    with psycopg.connect(pg_url) as holder:  # holds the key's row lock
        holder.execute(f"SELECT 1 FROM {SCHEMA}.keys WHERE token = %s FOR UPDATE", [made.token])
        started = time.monotonic()
        with pytest.raises(KeyStoreUnavailable):
            db.put_key(made)
        waited = time.monotonic() - started
    assert 2.5 < waited < 5
    assert db.put_key(made)  # the connection is still usable


# --- PgKeyStore (no Redis) -----------------------------------------------------------------


class Counting(PgKeysDB):
    lookups = 0

    def get_key(self, token):
        self.lookups += 1
        return super().get_key(token)


async def test_a_key_made_elsewhere_is_read_through_and_unknown_ones_are_cached(pg_url):
    here, there = Counting(pg_url), PgKeysDB(pg_url)
    try:
        store = PgKeyStore(here)
        made = record()
        assert await PgKeyStore(there).put(made)
        assert await store.get(made.token) == made  # not loaded at start: read through
        assert await store.get(made.token) == made and here.lookups == 1
        bad = "0" * 64
        for _ in range(50):
            assert await store.get(bad) is None
        assert here.lookups == 2  # one read, then the negative cache
        await asyncio.gather(*[store.get("1" * 64) for _ in range(20)])
        assert here.lookups == 3  # concurrent misses share one read
    finally:
        here.close()
        there.close()


async def test_a_flood_of_bad_keys_is_bounded(db):
    store = PgKeyStore(db, lookups_per_second=10)
    refused = 0
    for i in range(40):
        try:
            await store.get(f"{i:064x}")
        except KeyStoreUnavailable:
            refused += 1
    assert refused >= 25  # ~10 lookups allowed, the rest answered 503 without PostgreSQL


async def test_a_key_deleted_elsewhere_stops_working_within_the_cache_ttl(pg_url):
    here, there = PgKeysDB(pg_url), PgKeysDB(pg_url)
    try:
        made = record()
        assert await PgKeyStore(there).put(made)
        store = PgKeyStore(here, ttl=0.2)
        assert await store.get(made.token) == made
        await PgKeyStore(there).delete([made.token])

        async def gone() -> bool:
            return await store.get(made.token) is None

        await eventually(gone, 3)
        await store.close()
    finally:
        here.close()
        there.close()


# --- the backend: PostgreSQL with Redis in front -------------------------------------------


def _config(pg_url: str, redis_url: str | None, **general):
    settings = {"general_settings": {"master_key": "sk-m", "database_url": pg_url, **general}}
    if redis_url:
        settings["litellm_settings"] = {
            "cache_params": {"type": "redis", "url": redis_url, "namespace": "t"}
        }
    return parse_config(settings)


async def test_keys_survive_a_flush_and_a_deleted_key_is_not_resurrected(pg_url, own_redis):
    a = open_backend(_config(pg_url, own_redis.url))
    b = open_backend(_config(pg_url, own_redis.url))
    try:
        kept, doomed = record(key_alias="kept"), record(key_alias="doomed")
        assert await a.store.put(kept) and await a.store.put(doomed)
        assert await b.store.get(kept.token) == kept
        assert await b.store.get(doomed.token) == doomed  # B's memory holds both now

        await a.store.delete([doomed.token])
        own_redis.restart_empty()  # Redis loses everything, the deleted set included
        client = b.link.client

        async def pushed_back() -> bool:  # by B's watcher: what PostgreSQL holds, not its memory
            await b.link.resync()
            return await client.hget(b.store.keys_key, kept.token) is not None

        await eventually(pushed_back)
        assert await client.hget(b.store.keys_key, doomed.token) is None
        assert await a.store.get(doomed.token) is None and await b.store.get(doomed.token) is None
        assert (await a.store.by_alias("kept")).token == kept.token
    finally:
        await a.close()
        await b.close()


async def test_a_resync_racing_a_delete_does_not_bring_the_key_back(pg_url, own_redis):
    a = open_backend(_config(pg_url, own_redis.url))
    b = open_backend(_config(pg_url, own_redis.url))
    try:
        made = record()
        assert await a.store.put(made)
        stale = await b.store.pg.all()  # B read PostgreSQL before the delete...
        await a.store.delete([made.token])
        await b.store.fill(stale)  # ...and pushes after it
        assert await b.store.get(made.token) is None
    finally:
        await a.close()
        await b.close()


async def test_a_crossed_budget_stays_crossed_on_another_proxy_after_a_flush(pg_url, own_redis):
    a = open_backend(_config(pg_url, own_redis.url))
    b = open_backend(_config(pg_url, own_redis.url))
    try:
        made = record(max_budget=1.0, budget_duration="30d")
        assert await a.store.put(made)
        policy = Policy.of(made)
        verdict = await a.limiter.admit(policy, 0)
        await a.limiter.settle(verdict.reservation, 2 * NANOS, 10)  # $2 of a $1 budget
        assert not (await b.limiter.admit(policy, 0)).ok

        await a.limiter.flush_shares()  # the batch (normally within SHARE_FLUSH_DELAY)
        own_redis.restart_empty()

        async def restored() -> bool:  # B had never settled anything for this key
            await b.link.resync()
            return await b.limiter.spent(policy) == 2 * NANOS

        await eventually(restored)
        verdict = await b.limiter.admit(policy, 0)
        assert verdict.reason == "budget" and verdict.spent == 2 * NANOS
        # every proxy restoring the same shares at once counts them once
        await a.link.resync()
        await b.link.resync()
        assert await b.limiter.spent(policy) == 2 * NANOS
    finally:
        await a.close()
        await b.close()


async def test_shares_are_written_in_batches_and_at_close(pg_url, own_redis):
    a = open_backend(_config(pg_url, own_redis.url))
    made = record(max_budget=10.0)
    try:
        assert await a.store.put(made)
        policy = Policy.of(made)
        for _ in range(3):
            verdict = await a.limiter.admit(policy, 0)
            await a.limiter.settle(verdict.reservation, NANOS, 1)
        assert a.db.shares({made.token: 0}) == {}  # not yet: one batch a second

        async def written() -> bool:
            return a.db.shares({made.token: 0}) == {made.token: {a.db.instance: 3 * NANOS}}

        await eventually(written, 3)
        verdict = await a.limiter.admit(policy, 0)
        await a.limiter.settle(verdict.reservation, NANOS, 1)
    finally:
        await a.close()  # writes the last share
    db = PgKeysDB(pg_url)
    try:
        assert sum(db.shares({made.token: 0})[made.token].values()) == 4 * NANOS
    finally:
        db.close()


async def test_spend_persists_without_redis_across_a_restart(pg_url):
    made = record(max_budget=1.5)
    first = open_backend(_config(pg_url, None))
    try:
        assert await first.store.put(made)
        verdict = await first.limiter.admit(Policy.of(made), 0)
        await first.limiter.settle(verdict.reservation, NANOS, 1)
    finally:
        await first.close()
    second = open_backend(_config(pg_url, None))
    try:
        assert await second.store.get(made.token) == made
        verdict = await second.limiter.admit(Policy.of(made), 0)
        assert verdict.spent == NANOS
        await second.limiter.settle(verdict.reservation, NANOS, 1)
        assert not (await second.limiter.admit(Policy.of(made), 0)).ok
    finally:
        await second.close()


async def test_postgresql_restarted_under_a_running_backend(pg_url, own_redis):
    backend = open_backend(_config(pg_url, own_redis.url))
    try:
        made = record()
        assert await backend.store.put(made)
        assert terminate_connections(pg_url) == 1
        again = record()
        assert await backend.store.put(again)  # reconnected
        assert {r.token for r in await backend.store.all()} == {made.token, again.token}
    finally:
        await backend.close()


def test_a_proxy_whose_postgresql_is_down_does_not_start(tmp_path):
    auth = KeyAuth(Shared())
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(SystemExit) as exited:
        auth.configured(_config(url, None, spend_db=str(tmp_path / "s.duckdb")))
    assert exited.value.code == 2


async def test_postgresql_down_keys_in_redis_work_and_spend_is_written_when_it_is_back(
    pg_url, own_redis
):
    backend = open_backend(_config(pg_url, own_redis.url))
    made = record(max_budget=10.0)
    policy = Policy.of(made)
    try:
        assert await backend.store.put(made)
        backend.db.url = f"postgresql://postgres@127.0.0.1:{free_port()}/down"
        assert terminate_connections(pg_url) == 1  # and it cannot reconnect
        assert await backend.store.get(made.token) == made  # Redis answers
        with pytest.raises(KeyStoreUnavailable):  # an unknown token: 503, not 401
            await backend.store.get("2" * 64)
        verdict = await backend.limiter.admit(policy, 0)
        await backend.limiter.settle(verdict.reservation, NANOS, 1)
        await backend.limiter.flush_shares()  # fails: kept for the next batch
        backend.db.url = pg_url

        async def written() -> bool:
            try:
                shares = backend.db.shares({made.token: 0})
            except KeyStoreUnavailable:  # within RECONNECT_DELAY of the failed attempt
                return False
            return shares == {made.token: {backend.db.instance: NANOS}}

        await eventually(written, 5)
    finally:
        await backend.close()


async def test_without_redis_spend_that_failed_to_be_written_is_written_later(pg_url):
    backend = open_backend(_config(pg_url, None))
    made = record(max_budget=10.0)
    try:
        assert await backend.store.put(made)
        backend.db.url = f"postgresql://postgres@127.0.0.1:{free_port()}/down"
        assert terminate_connections(pg_url) == 1
        verdict = await backend.limiter.admit(Policy.of(made), 0)
        await backend.limiter.settle(verdict.reservation, NANOS, 1)
        await asyncio.sleep(1.5)  # the first flush failed
        backend.db.url = pg_url

        async def written() -> bool:
            try:
                shares = backend.db.shares({made.token: 0})
            except KeyStoreUnavailable:  # within RECONNECT_DELAY of the failed attempt
                return False
            return shares == {made.token: {backend.db.instance: NANOS}}

        await eventually(written, 5)
    finally:
        await backend.close()


def test_a_postgresql_that_drops_packets_costs_one_connect_timeout_then_fails_fast(db):
    import socket

    listener = socket.socket()  # a port whose one-slot backlog is full: connecting hangs
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    try:
        db.url = f"postgresql://postgres@127.0.0.1:{port}/hung"
        db._conn.close()
        started = time.monotonic()
        with pytest.raises(KeyStoreUnavailable):
            db.get_key("3" * 64)
        first = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(KeyStoreUnavailable):
            db.get_key("3" * 64)
        second = time.monotonic() - started
    finally:
        filler.close()
        listener.close()
    assert 2 < first < 6 and second < 0.1, (first, second)

"""Virtual keys with general_settings.database_url: two real proxies on one config (PostgreSQL
as the store of record, a redis-server of the test's own in front), a Redis FLUSHDB mid-run,
PostgreSQL dropping every connection, and the keys CLI while the proxies run."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time

import openai
import pytest
import redis

from mitmroute.auth.limits import SHARE_FLUSH_DELAY, usd_to_nanos
from mitmroute.auth.pg import SCHEMA
from mitmroute.request import hash_key
from tests import pg
from tests.conftest import MITMDUMP, ROOT, free_port
from tests.e2e.test_keys import HELLO, HELLO_COST, admin, config, generate, spend
from tests.redis_process import RedisProcess

pytestmark = pytest.mark.timeout(240)
NAMESPACE = "pgkeys"


@pytest.fixture
def pg_url():
    yield from pg.database()


@pytest.fixture
def own_redis():
    server = RedisProcess()
    yield server
    server.stop()


def chat(proxy, key: str) -> str:
    """'ok', or the error code the proxy answered with."""
    with proxy.client(api_key=key) as client:
        try:
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
        except openai.APIStatusError as e:
            return e.code or str(e.status_code)
    return "ok"


def wait_for(check, timeout: float = 10.0, what: str = "condition") -> float:
    """Seconds until `check()` held."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what}: not met in {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_two_proxies_one_postgresql_keys_and_budgets_outlive_a_redis_flush(
    own_redis, pg_url, start_proxy, backend, tmp_path
):
    cfg = config(backend.url, database_url=pg_url, spend_data_path=str(tmp_path / "data"))
    cfg["litellm_settings"] = {
        "cache_params": {"type": "redis", "url": own_redis.url, "namespace": NAMESPACE}
    }
    a, b = start_proxy(copy.deepcopy(cfg)), start_proxy(copy.deepcopy(cfg))
    database = pg_url.rsplit("/", 1)[1]
    cache = redis.Redis(port=own_redis.port)

    # a key generated through A works on B at once
    key = generate(a, key_alias="pg-shared")
    assert chat(b, key) == "ok" and chat(a, key) == "ok"

    # a budget spent on B is refused on A
    budget_key = generate(a, max_budget=HELLO_COST * 1.5)
    assert chat(b, budget_key) == "ok" and chat(b, budget_key) == "ok"
    assert chat(a, budget_key) == "insufficient_quota"
    token = hash_key(budget_key)
    spent_nanos = 2 * usd_to_nanos(HELLO_COST)

    def in_postgresql() -> bool:
        total = pg.psql(f"SELECT sum(nanos) FROM {SCHEMA}.key_spend WHERE token = '{token}'",
                        database).strip()  # fmt: skip
        return bool(total) and int(total) >= spent_nanos

    print(f"share in PostgreSQL after {wait_for(in_postgresql, 5, 'share written'):.2f} s")

    # a key B has in memory, deleted through A
    doomed = generate(a, key_alias="doomed")
    assert chat(b, doomed) == "ok"
    assert admin(a, "POST", "/key/delete", json={"keys": [doomed]})[0] == 200

    cache.flushdb()
    flushed_at = time.monotonic()

    def restored() -> bool:
        values = cache.hvals(f"{NAMESPACE}:auth:{{{token}}}:spent:0")
        return sum(int(v) for v in values) >= spent_nanos

    wait_for(restored, 10, "budget shares restored")
    print(f"budget shares back in Redis {time.monotonic() - flushed_at:.2f} s after FLUSHDB")
    for proxy in (a, b):
        assert chat(proxy, key) == "ok"
        assert chat(proxy, budget_key) == "insufficient_quota"  # not reset by the flush
        assert chat(proxy, doomed) == "invalid_api_key"  # not resurrected by a resync
    assert spend(b, budget_key) == pytest.approx(2 * HELLO_COST)
    assert not cache.hexists(f"{NAMESPACE}:auth:keys", hash_key(doomed))

    # PostgreSQL drops every connection (what a restart does): the proxies reconnect
    killed = pg.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        f"WHERE application_name = 'mitmroute-keys' AND datname = '{database}'"
    )
    assert int(killed) >= 2
    after = generate(b, key_alias="after-restart")
    assert chat(a, after) == "ok"
    cache.flushdb()  # a key Redis lacks is read through from PostgreSQL (reconnected too)
    assert chat(a, key) == "ok"

    # the keys CLI works against PostgreSQL while the proxies run
    def cli(*args: str) -> dict:
        command = [sys.executable, "-m", "mitmroute.cli", "keys", "--config", str(a.config_path)]
        out = subprocess.run([*command, *args], capture_output=True, text=True, cwd=ROOT,
                             timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    from_cli = cli("generate", "--alias", "from-cli", "--models", "gpt-4o")["key"]
    assert chat(b, from_cli) == "ok"
    aliases = {k["key_alias"] for k in cli("list")["keys"]}
    assert aliases == {"pg-shared", None, "after-restart", "from-cli"}
    assert cli("delete", from_cli) == {"deleted_keys": [from_cli]}
    assert chat(a, from_cli) == "invalid_api_key" and chat(b, from_cli) == "invalid_api_key"
    for proxy in (a, b):
        assert proxy.stop() == 0


def test_a_sigkilled_proxy_loses_at_most_its_last_batch_of_budget_spend(
    own_redis, pg_url, start_proxy, backend, tmp_path
):
    cfg = config(backend.url, database_url=pg_url, spend_data_path=str(tmp_path / "data"))
    cfg["litellm_settings"] = {
        "cache_params": {"type": "redis", "url": own_redis.url, "namespace": NAMESPACE}
    }
    proxy = start_proxy(cfg)
    key = generate(proxy, max_budget=1000)
    answered: list[float] = []
    with proxy.client(api_key=key) as client:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
            answered.append(time.time())
    killed_at = time.time()
    proxy.stop(signal.SIGKILL)
    total = pg.psql(
        f"SELECT coalesce(sum(nanos), 0) FROM {SCHEMA}.key_spend WHERE token = '{hash_key(key)}'",
        pg_url.rsplit("/", 1)[1],
    )
    each = usd_to_nanos(HELLO_COST)
    stored = int(total) // each
    lost_window = [t for t in answered if t >= killed_at - SHARE_FLUSH_DELAY - 0.5]
    print(
        f"answered {len(answered)}, in PostgreSQL {stored}, lost {len(answered) - stored}; "
        f"{len(lost_window)} answered in the last {SHARE_FLUSH_DELAY + 0.5:.1f} s"
    )
    assert len(answered) > 10
    assert len(answered) - len(lost_window) <= stored <= len(answered)


def test_a_proxy_whose_postgresql_is_down_exits_2(confdir, tmp_path):
    cfg = {
        "general_settings": {
            "master_key": "sk-master",
            "database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/nothing",
            "spend_db": str(tmp_path / "spend.duckdb"),
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg))
    done = subprocess.run(
        [MITMDUMP, "-p", str(free_port()), "--set", f"confdir={confdir}",
         "-s", str(ROOT / "addons" / "router.py"), "--set", f"router_config={path}"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "key store" in done.stderr and "PostgreSQL at" in done.stderr

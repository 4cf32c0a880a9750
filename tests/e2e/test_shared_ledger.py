"""Three real proxies on one config with database_url: one ledger, every answered request in
it exactly once, a SIGKILLed proxy costing at most its last flush interval."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mitmroute.spend import lake
from tests import pg
from tests.conftest import ROOT, deployment
from tests.fakes.openai_server import FakeBackend

FLUSH_INTERVAL = 0.9  # the writer's default


@pytest.fixture
def pg_url():
    yield from pg.database()


@pytest.fixture
def fake():
    backend = FakeBackend()
    backend.url = backend.start()
    yield backend
    backend.stop()


def test_three_proxies_one_ledger_each_answer_once_through_a_sigkill(
    start_proxy, fake, pg_url, tmp_path: Path
):
    config = {
        "model_list": [deployment("gpt-4o", "openai/gpt-4o", f"{fake.url}/v1", api_key="k")],
        "general_settings": {"database_url": pg_url, "spend_data_path": str(tmp_path / "data")},
    }
    proxies = [start_proxy(copy.deepcopy(config)) for _ in range(3)]
    answered: dict[str, tuple[int, float]] = {}  # user -> (proxy generation, answered at)
    stop = threading.Event()
    lock = threading.Lock()

    def load(slot: int, worker: int) -> None:
        n = 0
        while not stop.is_set():
            proxy = proxies[slot]
            user = f"s{slot}-w{worker}-{n}"
            n += 1
            try:
                with proxy.client() as client:
                    client.chat.completions.create(
                        model="gpt-4o", user=user, messages=[{"role": "user", "content": user}]
                    )
            except Exception:  # the killed proxy's requests in flight: never answered
                time.sleep(0.05)
                continue
            with lock:
                answered[user] = (id(proxy), time.time())

    threads = [threading.Thread(target=load, args=(s, w)) for s in range(3) for w in range(2)]
    for t in threads:
        t.start()
    victim = proxies[1]
    # mid-run: a proxy's port opens seconds before it serves (on a busy machine), so wait for
    # answers rather than a fixed time
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with lock:
            by_victim = sum(1 for gen, _ in answered.values() if gen == id(victim))
            if by_victim > 15 and len(answered) > 100:
                break
        time.sleep(0.1)
    killed_at = time.time()
    victim.stop(signal.SIGKILL)
    # restarted on the same config (a new port): it adopts the spill files the victim left
    again = copy.deepcopy(config)
    again["general_settings"]["spend_db"] = str(victim.spend_db)
    proxies[1] = start_proxy(again)
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(30)
    for proxy in proxies:  # DuckDB (~50 MB) lives in each proxy's writer process, not in it
        assert "duckdb" not in Path(f"/proc/{proxy.proc.pid}/maps").read_text()
    for proxy in proxies:
        assert proxy.stop() == 0  # SIGTERM: flushed

    con = lake.connect_readonly(lake.SharedLedger.parse(pg_url, str(tmp_path / "data")))
    try:
        stored = dict(con.execute('SELECT "user", count(*) FROM spend_log GROUP BY 1').fetchall())
    finally:
        con.close()
    assert max(stored.values()) == 1  # nothing doubled
    missing = {u: at for u, (gen, at) in answered.items() if u not in stored}
    victims = {u for u, (gen, _) in answered.items() if gen == id(victim)}
    print(f"answered {len(answered)}, by the killed proxy {len(victims)}, lost {len(missing)}")
    assert len(answered) > 100 and len(victims) > 10, victim.logs()[-3000:]
    assert set(missing) <= victims  # the survivors and the restarted proxy: every answer
    # the victim's lost rows were answered within its last flush interval (+ the flush)
    late = [at >= killed_at - FLUSH_INTERVAL - 0.5 for at in missing.values()]
    assert all(late), (killed_at, missing, victim.logs()[-3000:])

    # `mitmroute spend --config` reads the same shared ledger
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mitmroute.cli",
            "spend",
            "--config",
            str(proxies[0].config_path),
            "--sql",
            "select count(*) as n, count(distinct request_id) as ids from spend_log",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    total = sum(stored.values())
    assert out.stdout.split()[-2:] == [f"{total:,}", f"{total:,}"], out.stdout

"""Three proxies behind HAProxy as one HTTPS_PROXY address, on one shared ledger and one Redis:
what a client sees when one of them is SIGKILLed under load and restarted, and a virtual key
issued through the balancer and budgeted across every proxy."""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from mitmroute.spend import lake
from mitmroute.spend.writer import SpendLog
from tests.conftest import deployment
from tests.fleet import Fleet

FLUSH_INTERVAL: float = inspect.signature(SpendLog).parameters["flush_interval"].default
"""The writer's flush interval: what the README says a SIGKILL can cost (plus one flush)."""
FLUSH_TIME = 1.0
"""What one flush to the shared ledger may take on a 2-core machine shared with other work
(tens of ms when quiet; 0.3-0.6 s measured at a load average of 18): a row recorded just after
a flush began waits for the next one."""
JITTER = 0.5
"""How far apart the proxy's order of recording and the clients' order of receiving answers
may be on such a machine."""


@dataclass
class Answer:
    user: str
    request_id: str
    client_port: int
    at: float  # when the client had the whole answer


@dataclass
class Failure:
    user: str
    sent_at: float
    error: str


class Load:
    """`workers` threads, each an openai SDK client through the balancer sending chat requests
    back to back (a `user` of its own on each), opening a new connection every
    `reconnect_every` requests, so HAProxy can move it to another proxy; a failed request
    costs its connection (the next one is new)."""

    def __init__(self, fleet: Fleet, workers: int = 6, reconnect_every: int = 15) -> None:
        self.fleet = fleet
        self.reconnect_every = reconnect_every
        self.answers: list[Answer] = []
        self.failures: list[Failure] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,)) for w in range(workers)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def answered_between(self, start: float, end: float) -> list[Answer]:
        return [a for a in list(self.answers) if start <= a.at <= end]

    def _run(self, worker: int) -> None:
        client = self.fleet.client()
        n = 0
        while not self._stop.is_set():
            user = f"w{worker}-{n}"
            n += 1
            sent = time.time()
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-4o", user=user, messages=[{"role": "user", "content": user}]
                )
                stream = raw.http_response.extensions["network_stream"]
                port = stream.get_extra_info("client_addr")[1]
                assert raw.parse().choices[0].message.content == f"echo: {user}"
                self.answers.append(
                    Answer(user, raw.headers["x-mitmroute-request-id"], port, time.time())
                )
            except Exception as e:  # a request in flight on the killed proxy
                self.failures.append(Failure(user, sent, f"{type(e).__name__}: {e}"))
                client.close()
                client = self.fleet.client()
                continue
            if n % self.reconnect_every == 0:
                client.close()
                client = self.fleet.client()
        client.close()


def served_by(fleet: Fleet, answers: list[Answer]) -> dict[str, str]:
    """Which proxy (HAProxy's server name) answered each request, from HAProxy's log: the
    connection its client port had when it was answered."""
    connections = fleet.served_by()
    found = {}
    for a in answers:
        before = [c for c in connections.get(a.client_port, []) if c.accepted_at <= a.at + 0.01]
        assert before, f"no HAProxy log line for client port {a.client_port}"
        found[a.user] = before[-1].server
    return found


def ledger_rows(pg_url: str, data_path: Path) -> dict[str, list[str]]:
    """The shared ledger's request ids, by `user`."""
    con = lake.connect_readonly(lake.SharedLedger.parse(pg_url, str(data_path)))
    try:
        rows = con.execute('SELECT "user", request_id FROM spend_log').fetchall()
    finally:
        con.close()
    stored: dict[str, list[str]] = {}
    for user, request_id in rows:
        stored.setdefault(user, []).append(request_id)
    return stored


def test_a_proxy_killed_under_load_costs_only_its_last_flush_and_the_others_carry_on(
    start_fleet, backend, pg_url, tmp_path: Path
):
    fleet = start_fleet([deployment("gpt-4o", "openai/gpt-4o", f"{backend.url}/v1", api_key="k")])
    victim = fleet.instances[1]
    with Load(fleet) as load:
        # mid-run: the victim has been answering for a few flush intervals
        deadline = time.monotonic() + 60
        while served(fleet, load, victim.name) < 60 and time.monotonic() < deadline:
            time.sleep(0.2)
        # ... and its writer has committed some of them (its first flush, which attaches the
        # ledger, can take seconds on a loaded machine)
        while time.monotonic() < deadline and not committed(
            fleet, load, victim.name, pg_url, tmp_path / "spend-data"
        ):
            time.sleep(0.3)
        killed_at = time.time()
        fleet.kill(1)
        taken_out = fleet.wait_state(1, "DOWN", timeout=5)  # a dead proxy leaves the pool fast
        down_at = time.time()
        time.sleep(2)  # the load goes on through the other two
        restarted_at = time.time()
        fleet.restart(1)
        fleet.wait_state(1, "UP", timeout=10)
        back_at = time.time()
        time.sleep(3)
    codes = fleet.stop()  # SIGTERM: every proxy running now flushes everything
    assert codes == [0, 0, 0], victim.logs()[-3000:]

    by = served_by(fleet, load.answers)
    stored = ledger_rows(pg_url, tmp_path / "spend-data")
    answered = {a.user: a for a in load.answers}
    # (an answer on its way when the signal went counts as the killed proxy's)
    killed = {u for u, a in answered.items() if by[u] == victim.name and a.at < restarted_at}
    lost = {u: a.at for u, a in answered.items() if u not in stored}
    window = killed_at - min(lost.values(), default=killed_at)
    print(
        f"answered {len(answered)}, failed {len(load.failures)}; the killed proxy answered "
        f"{len(killed)}, lost {len(lost)}, answered in the {window:.2f}s before the kill; "
        f"out of the pool {taken_out:.2f}s after the kill"
    )
    assert len(killed) >= 60, len(killed)

    # nothing doubled, and each stored row is the answer the client saw
    assert all(len(ids) == 1 for ids in stored.values())
    assert all(stored[u] == [a.request_id] for u, a in answered.items() if u in stored)
    # only the killed proxy lost rows: its latest answers, those its writer had not committed
    # (the last flush interval, the flush under way and the one before it)
    assert set(lost) <= killed, {u: (by[u], at - killed_at) for u, at in lost.items()}
    assert window <= FLUSH_INTERVAL + 2 * FLUSH_TIME, sorted(killed_at - at for at in lost.values())
    kept = [answered[u].at for u in killed if u in stored]
    assert max(kept) <= min(lost.values(), default=max(kept)) + JITTER

    # HAProxy took it out within ~2 health checks; meanwhile the other two answered everything
    assert taken_out < 3
    while_down = load.answered_between(down_at, restarted_at)
    assert len(while_down) > 20
    assert {by[a.user] for a in while_down} <= {"mitmroute1", "mitmroute3"}
    assert all(f.sent_at < down_at for f in load.failures), load.failures[:5]
    # restarted, it is back in the pool, and its answers are in the ledger
    again = [a for a in load.answered_between(back_at, time.time()) if by[a.user] == victim.name]
    assert again and all(a.user in stored for a in again)


def committed(fleet: Fleet, load: Load, server: str, pg_url: str, data_path: Path) -> bool:
    """Are some of `server`'s answers in the shared ledger already?"""
    mine = {u for u, s in served_by(fleet, list(load.answers)).items() if s == server}
    return bool(mine & set(ledger_rows(pg_url, data_path)))


def served(fleet: Fleet, load: Load, server: str) -> int:
    """How many of the answers so far came from `server`."""
    return sum(1 for s in served_by(fleet, list(load.answers)).values() if s == server)


MASTER = "sk-master-fleet-1234"
HELLO = [{"role": "user", "content": "hello world"}]
HELLO_COST = 2 * 0.001 + 3 * 0.002  # the fake's "echo: hello world": 2 + 3 tokens


def key_api(proxy, method: str, path: str, **kwargs) -> tuple[int, dict]:
    """The key API as an admin calls it, through `proxy` (the balancer or one instance)."""
    with proxy.http() as http:
        resp = http.request(
            method,
            f"https://api.openai.com{path}",
            headers={"authorization": f"Bearer {MASTER}"},
            **kwargs,
        )
    return resp.status_code, resp.json()


def settled_spend(proxy, key: str, expected: float) -> float:
    """The key's spend as `proxy` reports it, once the settlements in flight have landed."""
    deadline = time.monotonic() + 5
    while True:
        status, body = key_api(proxy, "GET", "/key/info", params={"key": key})
        assert status == 200, body
        spent = body["info"]["spend"]
        if spent == pytest.approx(expected) or time.monotonic() > deadline:
            return spent
        time.sleep(0.05)


def test_a_key_issued_through_the_balancer_works_and_is_budgeted_on_every_proxy(
    start_fleet, backend
):
    priced = {"input_cost_per_token": 0.001, "output_cost_per_token": 0.002}
    model = deployment("gpt-4o", "openai/gpt-4o", f"{backend.url}/v1", api_key="k", **priced)
    fleet = start_fleet([model], master_key=MASTER)
    status, body = key_api(fleet, "POST", "/key/generate", json={"max_budget": 0.03})
    assert status == 200, body
    key = body["key"]

    # through the balancer, then through each proxy addressed directly: one key, one spend
    proxies = [fleet, *fleet.instances]
    for n, proxy in enumerate(proxies, 1):
        with proxy.client(api_key=key) as client:
            done = client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert done.choices[0].message.content == "echo: hello world"
        assert settled_spend(fleet, key, n * HELLO_COST) == pytest.approx(n * HELLO_COST)
    # 4 x 0.008 = 0.032 spent of 0.03: refused by every proxy, whichever the client reaches
    for proxy in proxies:
        with proxy.client(api_key=key) as client, pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert e.value.code == "insufficient_quota"
    for instance in fleet.instances:
        assert settled_spend(instance, key, 4 * HELLO_COST) == pytest.approx(4 * HELLO_COST)

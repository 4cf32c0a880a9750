"""The spend log through the real proxy: every exchange, exact tokens and cost, in DuckDB."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from decimal import Decimal

import duckdb
import httpx2 as httpx
import openai
import pytest

from tests.conftest import child_pids, deployment, wait_gone
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.openai_server import FakeBackend

IN_PRICE, OUT_PRICE = "0.000002", "0.00001"


@pytest.fixture
def fake():
    """A backend of this test's own, so its token counters are this test's alone."""
    backend = FakeBackend()
    backend.url = backend.start()
    yield backend
    backend.stop()


def config(fake, **extra) -> dict:
    base = f"{fake.url}/v1"
    prices = {"input_cost_per_token": float(IN_PRICE), "output_cost_per_token": float(OUT_PRICE)}
    return {
        "model_list": [
            deployment("gpt-4o", "openai/gpt-4o", base, api_key="k", **prices),
            deployment("broken", "openai/fail-500", base, api_key="k"),
            deployment("backup", "openai/gpt-4o-mini", base, api_key="k"),
            deployment("quiet", "openai/no-usage", base, api_key="k"),
            deployment("local", "ollama/qwen3:8b", fake.url),
        ],
        "router_settings": {"fallbacks": [{"broken": ["backup"]}], "num_retries": 0},
        **extra,
    }


def wait_rows(db, n: int, timeout: float = 20.0) -> None:
    """Until `n` rows are readable (the sidecar's first flush can take a while under load)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if rows(db, "select count(*) from spend_log")[0][0] >= n:
                return
        except (duckdb.Error, OSError):
            pass
        assert time.monotonic() < deadline, f"fewer than {n} rows in {db}"
        time.sleep(0.1)


def rows(db, sql: str) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_concurrent_mixed_run_reconciles_exactly_with_the_backend(start_proxy, fake):
    proxy = start_proxy(config(fake))
    n = 20

    async def run():
        async with proxy.async_client() as client:

            async def plain(i):
                await client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": f"plain {i} a b"}]
                )

            async def streamed(i):
                stream = await client.chat.completions.create(
                    model="gpt-4o",
                    stream=True,
                    messages=[{"role": "user", "content": f"streamed {i} c"}],
                )
                async for _ in stream:
                    pass

            await asyncio.gather(*[plain(i) for i in range(n)], *[streamed(i) for i in range(n)])

    asyncio.run(run())
    assert proxy.stop() == 0  # SIGTERM: everything flushed on the way out
    (count, prompt, completion, cost, streams, estimated) = rows(
        proxy.spend_db,
        "select count(*), sum(prompt_tokens), sum(completion_tokens), sum(cost_usd),"
        " count(*) filter (where stream), count(*) filter (where usage_source <> 'upstream')"
        " from spend_log",
    )[0]
    assert count == 2 * n and streams == n and estimated == 0
    assert prompt == fake.state.prompt_tokens and completion == fake.state.completion_tokens
    expected = prompt * Decimal(IN_PRICE) + completion * Decimal(OUT_PRICE)
    assert cost == expected  # exact, not a float approximation


def test_errors_fallbacks_and_attempts_are_logged(start_proxy, fake):
    proxy = start_proxy(config(fake))
    with proxy.client() as client:
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="gpt-4o", messages="not a list")  # type: ignore[arg-type]
    proxy.stop()
    logged = rows(
        proxy.spend_db,
        "select requested_model, deployment, status_code, fallback_used, attempts, error_type"
        " from spend_log order by started_at",
    )
    assert logged[0][:5] == ("broken", "openai/gpt-4o-mini", 200, True, 2)
    assert logged[1][2] == 400 and logged[1][5]
    attempts = rows(
        proxy.spend_db,
        "select attempt, deployment, status_code from spend_attempts order by started_at",
    )
    assert attempts == [(1, "openai/fail-500", 500), (2, "openai/gpt-4o-mini", 200)]


def test_backend_without_usage_is_estimated_never_zero(start_proxy, fake):
    proxy = start_proxy(config(fake))
    with proxy.client() as client:
        client.chat.completions.create(
            model="quiet", messages=[{"role": "user", "content": "count these words please"}]
        )
        list(
            client.chat.completions.create(
                model="quiet", stream=True, messages=[{"role": "user", "content": "and these"}]
            )
        )
    proxy.stop()
    logged = rows(
        proxy.spend_db, "select prompt_tokens, completion_tokens, usage_source from spend_log"
    )
    assert len(logged) == 2
    assert all(p > 0 and c > 0 and source == "estimated" for p, c, source in logged)


def test_ollama_is_free_and_unknown_prices_are_null(start_proxy, fake):
    proxy = start_proxy(config(fake))
    with proxy.client() as client:
        client.chat.completions.create(model="local", messages=[{"role": "user", "content": "x"}])
        client.chat.completions.create(model="quiet", messages=[{"role": "user", "content": "x"}])
    proxy.stop()
    costs = dict(rows(proxy.spend_db, "select model_group, cost_usd from spend_log"))
    assert costs["local"] == 0
    assert costs["quiet"] is None  # `no-usage` is no known model: NULL, not a silent 0
    assert proxy.logs().count("no-usage") >= 1


def test_cache_hit_costs_nothing_and_records_the_saving(start_proxy, fake):
    proxy = start_proxy(config(fake, litellm_settings={"cache": True}))
    with proxy.client() as client:
        for _ in range(2):
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "same question"}]
            )
    proxy.stop()
    logged = rows(
        proxy.spend_db, "select cache_hit, cost_usd, saved_usd from spend_log order by started_at"
    )
    (miss_hit, miss_cost, _), (hit, hit_cost, saved) = logged
    assert not miss_hit and hit and hit_cost == 0 and saved == miss_cost > 0


def test_a_reader_holding_the_file_costs_no_rows(start_proxy, fake):
    proxy = start_proxy(config(fake))
    with proxy.client() as client:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        wait_rows(proxy.spend_db, 1)  # the first flush creates the file
        reader = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import duckdb, sys, time; con = duckdb.connect(sys.argv[1], read_only=True);"
                "print(con.execute('select count(*) from spend_log').fetchone()[0], flush=True);"
                "time.sleep(2)",
                str(proxy.spend_db),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        first_line = reader.stdout.readline()
        for i in range(10):
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": f"while read {i}"}]
            )
        reader.wait(10)
    assert int(first_line) >= 1  # readable while the proxy runs
    proxy.stop()
    assert rows(proxy.spend_db, "select count(*) from spend_log")[0][0] == 11


def test_sigkill_loses_no_answered_row(start_proxy, fake):
    """The writer runs in the spend sidecar: a SIGKILLed proxy closes its pipe, and the sidecar
    writes every row it got before it exits (it had them within a few ms of each answer)."""
    proxy = start_proxy(config(fake))
    n = 12
    with proxy.client() as client:
        for i in range(n):
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": f"before the kill {i}"}]
            )
    sidecars = child_pids(proxy.proc.pid)
    assert len(sidecars) == 1
    time.sleep(0.1)  # far less than a flush interval (0.9 s): nothing was flushed on time
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait(10)
    assert wait_gone(sidecars, 30) == []  # it saw EOF, wrote, and ended by itself
    got = rows(proxy.spend_db, "select count(*), count(distinct request_id) from spend_log")
    assert got == [(n, n)]
    assert "spend log closed" not in proxy.logs()


def test_passthrough_of_unknown_models_is_logged(start_proxy, fake):
    """An unlisted model goes to its original host unchanged, and is logged all the same."""
    port = fake.url.rsplit(":", 1)[1]
    proxy = start_proxy(config(fake, general_settings={"intercept_hosts": ["127.0.0.1"]}))
    with proxy.http() as http:
        resp = http.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "unlisted-model", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert resp.status_code == 200 and resp.json()["model"] == "unlisted-model"
    proxy.stop()
    logged = rows(
        proxy.spend_db, "select requested_model, deployment, prompt_tokens from spend_log"
    )
    assert logged == [("unlisted-model", "passthrough/unlisted-model", 1)]


def test_claude_usage_is_priced_at_claudes_rates(start_proxy):
    with FakeAnthropic() as claude:
        proxy = start_proxy(
            {
                "model_list": [
                    deployment(
                        "gpt-4o", "anthropic/claude-opus-4-20250514", claude.base_url, api_key="k"
                    )
                ]
            }
        )
        with proxy.client() as client:
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "price me"}]
            )
        proxy.stop()
        reported = claude.requests[-1].usage
    ((prompt, completion, cost),) = rows(
        proxy.spend_db, "select prompt_tokens, completion_tokens, cost_usd from spend_log"
    )
    assert (prompt, completion) == (reported["input_tokens"], reported["output_tokens"])
    # claude-opus-4: $15 / M input, $75 / M output
    assert cost == (prompt * Decimal(15) + completion * Decimal(75)) / 10**6


def test_refused_requests_are_logged_too(start_proxy, fake):
    proxy = start_proxy(config(fake, general_settings={"master_key": "sk-master"}))
    with proxy.client(api_key="sk-wrong") as client, pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    proxy.stop()
    logged = rows(proxy.spend_db, "select requested_model, status_code, error_type from spend_log")
    assert logged == [("gpt-4o", 401, "invalid_api_key")]


def test_client_leaving_mid_stream_is_logged_and_stops_the_upstream(start_proxy, fake):
    proxy = start_proxy(
        {
            "model_list": [
                deployment("slow", "openai/slow-200", f"{fake.url}/v1", api_key="k"),
            ]
        }
    )
    words = " ".join(f"w{i}" for i in range(15))
    with proxy.client() as client:
        stream = client.chat.completions.create(
            model="slow", stream=True, messages=[{"role": "user", "content": words}]
        )
        next(iter(stream))
        stream.close()  # the user pressed "stop"
    time.sleep(1.0)
    proxy.stop()
    ((error_type, completion),) = rows(
        proxy.spend_db, "select error_type, completion_tokens from spend_log"
    )
    assert error_type == "client_disconnected"
    assert completion < 16  # the rest of the answer was never read from the backend


class SilentBackend:
    """Takes one request and never answers it; notes when the caller hangs up."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.asked, self.hung_up = threading.Event(), threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(30)
            conn.recv(65536)
            self.asked.set()
            with contextlib.suppress(OSError):
                while conn.recv(65536):  # until the caller hangs up
                    pass
            self.hung_up.set()
        self.sock.close()


def h2_stream_reset(proxy, body: dict) -> None:
    """Over HTTP/2: send a streamed request, wait a second for its answer, then cancel the
    stream (RST_STREAM) and keep the connection open for another second."""
    import h2.connection
    import h2.events

    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\r\nhost: api.openai.com:443\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    context = proxy.ssl_context()
    context.set_alpn_protocols(["h2"])
    with context.wrap_socket(sock, server_hostname="api.openai.com") as tls:
        assert tls.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        payload = json.dumps(body).encode()
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "api.openai.com"),
            (":path", "/v1/chat/completions"),
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-client-key"),
            ("content-length", str(len(payload))),
        ]
        conn.send_headers(1, headers)
        conn.send_data(1, payload, end_stream=True)
        tls.sendall(conn.data_to_send())
        tls.settimeout(1.0)
        with contextlib.suppress(TimeoutError):
            while data := tls.recv(65536):  # settings and acks only: no answer yet
                events = conn.receive_data(data)
                assert not any(isinstance(e, h2.events.ResponseReceived) for e in events)
                tls.sendall(conn.data_to_send())
        conn.reset_stream(1)
        tls.sendall(conn.data_to_send())
        time.sleep(1.0)


@pytest.mark.parametrize("http2", [False, True])
def test_client_leaving_before_the_first_chunk_stops_the_backend_call_and_is_logged_once(
    start_proxy, http2
):
    """The flow waits at the relay while the backend thinks: a client that gives up then
    ends the backend call at once, and its one spend row says why. Over HTTP/2 the client
    cancels its stream and keeps the connection a while."""
    silent = SilentBackend()
    proxy = start_proxy(
        {"model_list": [deployment("gpt-4o", "openai/gpt-4o", f"{silent.url}/v1", api_key="k")]}
    )
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    if http2:
        h2_stream_reset(proxy, body)
        assert silent.hung_up.is_set(), "the backend call went on after the stream's reset"
    else:
        with proxy.http() as http, pytest.raises(httpx.ReadTimeout):
            http.post("https://api.openai.com/v1/chat/completions", json=body, timeout=1.0)
    assert silent.asked.is_set()
    assert silent.hung_up.wait(5), "the backend call went on after the client left"
    proxy.stop()
    ((error_type, status, latency),) = rows(
        proxy.spend_db, "select error_type, status_code, latency_ms from spend_log"
    )
    assert (error_type, status) == ("client_disconnected", 499)
    assert latency < 5000

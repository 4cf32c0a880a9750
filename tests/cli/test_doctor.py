"""`mitmroute doctor` checks a set-up and names what is broken: a dead deployment, a refused key,
a missing model, a proxy that isn't there, Redis, the ledger."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import yaml
from aiohttp import web

from tests.cli.conftest import mitmroute
from tests.conftest import deployment, free_port

GOOD_KEY = "sk-doctor-good-key-0123456789"
BAD_KEY = "sk-doctor-bad-key-9876543210"


class ListingBackend:
    """An OpenAI-compatible backend that checks keys and lists one model, `real-model`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        def authorized(request: web.Request) -> bool:
            return request.headers.get("authorization") == f"Bearer {GOOD_KEY}"

        def refused(request: web.Request) -> web.Response:
            key = request.headers.get("authorization", "")  # quoted back, as OpenAI does
            error = {"message": f"Incorrect API key provided: {key}", "code": "invalid_api_key"}
            return web.json_response({"error": error}, status=401)

        async def models(request: web.Request) -> web.Response:
            if not authorized(request):
                return refused(request)
            return web.json_response({"object": "list", "data": [{"id": "real-model"}]})

        async def chat(request: web.Request) -> web.Response:
            if not authorized(request):
                return refused(request)
            model = (await request.json())["model"]
            if model != "real-model":
                error = {
                    "message": f"The model `{model}` does not exist",
                    "code": "model_not_found",
                }
                return web.json_response({"error": error}, status=404)
            return web.json_response({"choices": [{"message": {"content": "pong"}}]})

        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", chat)
        return app

    def start(self) -> None:
        async def start() -> None:
            self.runner = web.AppRunner(self.app(), access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"  # type: ignore[union-attr]

        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def listing() -> Iterator[ListingBackend]:
    backend = ListingBackend()
    backend.start()
    yield backend
    backend.stop()


def write(path, config) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def rows(stdout: str) -> dict[str, list[str]]:
    """The deployments table, by group: [deployment, reachable, key, model, latency, status]."""
    table = stdout.split("\n\n")[1].splitlines()
    return {line.split()[0]: line.split(None, 1)[1].split("  ") for line in table[2:]}


def cells(row: list[str]) -> list[str]:
    return [c.strip() for c in row if c.strip()]


def test_doctor_names_a_dead_deployment_a_refused_key_and_a_missing_model(
    listing, backend, tmp_path, confdir
):
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    config = {
        "model_list": [
            deployment("live", "openai/real-model", listing.url, api_key=GOOD_KEY),
            deployment("dead", "openai/real-model", dead, api_key=GOOD_KEY),
            deployment("wrong-key", "openai/real-model", listing.url, api_key=BAD_KEY),
            deployment("gone", "openai/no-such-model", listing.url, api_key=GOOD_KEY),
            deployment("unlisted", "openai/ok-model", f"{backend.url}/v1", api_key=GOOD_KEY),
            deployment("ollama", "ollama_chat/qwen3:8b", backend.url),
        ],
        "general_settings": {"spend_db": str(tmp_path / "spend.duckdb")},
    }
    config_path = write(tmp_path / "c.yaml", config)
    out = mitmroute("doctor", "--config", config_path, "--no-proxy", "--confdir", str(confdir))
    assert out.returncode == 1, out.stdout + out.stderr
    table = rows(out.stdout)
    live = cells(table["live"])
    assert live[1:4] == ["yes", "ok", "listed"] and live[4].endswith("ms") and live[5] == "ok"
    dead_row = cells(table["dead"])
    assert dead_row[1:4] == ["no", "-", "-"]
    assert dead_row[5] == "FAIL: cannot connect: connection refused"
    wrong = cells(table["wrong-key"])
    assert wrong[1:4] == ["yes", "rejected", "-"] and wrong[5].startswith(
        "FAIL: key rejected (401): Incorrect API key"
    )
    assert BAD_KEY not in out.stdout and "sk-...3210" in out.stdout  # the key stays secret
    gone = cells(table["gone"])
    assert gone[1:4] == ["yes", "ok", "missing"] and gone[5].startswith("FAIL: model missing (404)")
    # no listing (404): a 1-token chat answered
    assert cells(table["unlisted"])[1:4] == ["yes", "ok", "answers"]
    # the fake has no /api/tags: a 1-token chat on Ollama's API answered
    assert cells(table["ollama"])[1:4] == ["yes", "none", "answers"]
    broken = out.stderr.splitlines()[-1]
    assert broken.startswith("mitmroute doctor: broken: dead (openai/real-model @ 127.0.0.1:")
    for name in ("dead", "wrong-key", "gone"):
        assert f" {name} (" in broken
    for name in ("live (", "unlisted (", "ollama ("):
        assert name not in broken


def test_doctor_passes_a_working_set_up_with_its_running_proxy(
    listing, start_proxy, confdir, tmp_path
):
    config = {
        "model_list": [deployment("live", "openai/real-model", listing.url, api_key=GOOD_KEY)],
        "router_settings": {"redis_url": "redis://127.0.0.1:6379/14"},
    }
    proxy = start_proxy(config)  # writes its config (spend_db in its workdir) to config_path
    args = ["--config", str(proxy.config_path), "--proxy", proxy.url, "--confdir", str(confdir)]
    out = mitmroute("doctor", *args)
    assert out.returncode == 0, out.stdout + out.stderr
    checks = {line.split()[0]: line.split(None, 2)[1:] for line in out.stdout.splitlines()[2:7]}
    assert (
        checks["proxy"][0] == "ok"
        and "mitmroute answered GET https://api.openai.com" in checks["proxy"][1]
    )
    assert checks["redis"][0] == "ok" and "PONG" in checks["redis"][1]
    assert checks["ca"][0] == "ok"
    assert out.stdout.rstrip().endswith("all good")
    # the proxy's answer to the doctor is a ledger row, readable while the proxy runs
    deadline = time.monotonic() + 10
    while not proxy.spend_db.exists() and time.monotonic() < deadline:  # the first flush
        time.sleep(0.1)
    again = mitmroute("doctor", *args)
    ledger = next(ln for ln in again.stdout.splitlines() if ln.startswith("ledger"))
    assert "writable, readable: " in ledger and " 0 rows" not in ledger, ledger


def test_doctor_names_a_missing_proxy_redis_and_an_unwritable_ledger(tmp_path, confdir):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = {
        "model_list": [],
        "router_settings": {"redis_url": f"redis://127.0.0.1:{free_port()}/0"},
        "general_settings": {"spend_db": str(blocker / "spend.duckdb")},  # under a file
    }
    port = free_port()
    args = ["--config", write(tmp_path / "c.yaml", config), "--proxy", f"http://127.0.0.1:{port}"]
    out = mitmroute("doctor", *args, "--confdir", str(confdir))
    assert out.returncode == 1
    assert f"nothing listening at http://127.0.0.1:{port}" in out.stdout
    assert out.stderr.splitlines()[-1] == "mitmroute doctor: broken: proxy; redis; ledger"


def test_doctor_names_a_missing_ca(tmp_path):
    out = mitmroute("doctor", "--no-proxy", "--confdir", str(tmp_path / "empty"), cwd=tmp_path)
    assert "ca      FAIL" in out.stdout and "mitmroute ca" in out.stdout
    assert "broken: ca" in out.stderr

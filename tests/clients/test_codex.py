"""The Codex CLI, unchanged, through the proxy: `codex exec "<prompt>"` answered by an
OpenAI-compatible backend behind a config whose group is the model Codex asks for.

EXPECTS THE RESPONSES DIALECT (mitmroute/inbound/responses.py). Until it lands, `/v1/responses`
answers 404 and the tests marked `needs_responses_dialect` below fail: they are its yardstick.
The others pass today: they pin what the pinned Codex sends (tests/clients/README.md).

Codex runs once for the module (see conftest.py); each test reads that run.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.clients.conftest import CapturingProxy, CliRun, base_env, echo_config, run_cli
from tests.fakes.openai_server import FakeBackend

pytestmark = pytest.mark.timeout(600)

HOST = "api.openai.com"
PROMPT_TOKEN = "yardstick-codex-2b9e"
MODELS = ("gpt-6.2-sol",)
"""What the pinned Codex asks for by default. A version bump that changes it fails
test_every_model_codex_asked_for_is_a_configured_group with the new name."""

CODEX_CONFIG = """\
# tests/clients: no update check, no analytics, no model catalog fetched from chatgpt.com
# (with an API key Codex asks chatgpt.com/backend-api/codex/models, a host the proxy doesn't
# intercept; offline that only costs retries)
check_for_update_on_startup = false

[analytics]
enabled = false

[features]
api_key_model_discovery = false
"""

needs_responses_dialect = pytest.mark.needs_responses_dialect


def codex_env(home: Path, proxy_url: str, ca_bundle: Path) -> dict[str, str]:
    env = base_env(home, proxy_url)
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(CODEX_CONFIG)
    env.update(
        {
            # `codex exec` reads CODEX_API_KEY (it sends no key at all with OPENAI_API_KEY alone)
            "CODEX_API_KEY": "sk-proj-yardstick-client-key-0000",
            "CODEX_HOME": str(codex_home),
            # both replace the roots: the combined bundle (certifi + the mitmproxy CA)
            "SSL_CERT_FILE": str(ca_bundle),
            "CODEX_CA_CERTIFICATE": str(ca_bundle),
        }
    )
    return env


@dataclass
class CodexSession:
    run: CliRun
    proxy: CapturingProxy
    backend_requests: list[dict[str, Any]]

    def explain(self) -> str:
        return self.run.explain(self.proxy)

    def responses_posts(self) -> list[dict[str, Any]]:
        return [r for r in self.proxy.requests(HOST, "/v1/responses") if r["method"] == "POST"]


@pytest.fixture(scope="module")
def codex(clients, confdir, tmp_path_factory) -> CodexSession:
    root = tmp_path_factory.mktemp("codex")
    backend = FakeBackend()
    backend.url = backend.start()  # type: ignore[attr-defined]
    try:
        proxy = CapturingProxy(echo_config(backend, MODELS), confdir, root / "proxy")
        try:
            project = root / "project"
            project.mkdir()
            # a git repository, so `codex exec` runs as typed (no --skip-git-repo-check)
            subprocess.run(["git", "init", "-q", str(project)], check=True)
            env = codex_env(root / "home", proxy.url, confdir / "bundle.pem")
            args = [str(clients.codex), "exec", "--strict-config", f"Say {PROMPT_TOKEN}"]
            run = run_cli(args, env, project)
        finally:
            proxy.stop()
        return CodexSession(run, proxy, list(backend.state.requests))
    finally:
        backend.stop()


# --- what the pinned Codex sends (passes today; the spec in tests/clients/README.md) ---


def test_codex_tries_a_websocket_first_and_falls_back_to_http_on_426(codex):
    upgrades = [r for r in codex.proxy.requests(HOST, "/v1/responses") if r["method"] == "GET"]
    for r in upgrades:
        headers = {k.lower(): v for k, v in r["headers"]}
        assert headers.get("upgrade") == "websocket"
        assert r["status"] == 426, codex.explain()
    assert codex.responses_posts(), codex.explain()


def test_codex_streams_a_responses_request_with_its_tools_inside_input(codex):
    posts = codex.responses_posts()
    assert posts, codex.explain()
    first = posts[0]
    headers = {k.lower(): v for k, v in first["headers"]}
    assert headers["authorization"].startswith("Bearer sk-")  # masked by capture.py
    assert headers["accept"] == "text/event-stream"
    assert headers.get("content-encoding") in (None, "identity"), headers
    body = first["body"]
    assert body["stream"] is True and body["store"] is False
    assert body["model"] in MODELS
    assert {"model", "input", "stream", "tool_choice", "reasoning", "include"} <= set(body)
    kinds = [(item.get("type"), item.get("role")) for item in body["input"]]
    assert ("message", "developer") in kinds and ("message", "user") in kinds, kinds
    last = body["input"][-1]
    assert last["role"] == "user"
    assert last["content"] == [{"type": "input_text", "text": f"Say {PROMPT_TOKEN}"}]


def test_every_model_codex_asked_for_is_a_configured_group(codex):
    asked = {r["body"]["model"] for r in codex.responses_posts()}
    assert asked, codex.explain()
    assert asked <= set(MODELS), f"Codex asked for {asked}; configure them in MODELS"


def test_no_model_call_left_the_machine_or_went_out_unrouted(codex):
    for r in codex.proxy.requests(HOST):
        if r["method"] == "POST":
            assert r["fate"] == "route", codex.explain()
        else:
            assert r["fate"] in ("refuse", "answer"), codex.explain()  # websocket 426, models


# --- what only a working Responses dialect gives (fail until mitmroute/inbound/responses.py) ---


@needs_responses_dialect
def test_codex_exec_exits_0_and_prints_the_backends_answer(codex):
    assert codex.run.returncode == 0, codex.explain()
    assert "echo:" in codex.run.stdout, codex.explain()
    assert PROMPT_TOKEN in codex.run.stdout, codex.explain()


@needs_responses_dialect
def test_each_responses_call_is_answered_200_by_the_proxy(codex):
    posts = codex.responses_posts()
    assert posts and all(r.get("status") == 200 for r in posts), codex.explain()


@needs_responses_dialect
def test_the_backend_received_the_prompt_as_a_chat_completion(codex):
    chats = [r for r in codex.backend_requests if r.get("model") == f"echo-{MODELS[0]}"]
    assert chats, f"the backend received nothing\n{codex.explain()}"
    for body in chats:
        assert isinstance(body["messages"], list) and body["messages"], body
    last_user = [m for m in chats[0]["messages"] if m.get("role") == "user"][-1]
    assert PROMPT_TOKEN in str(last_user["content"])


@needs_responses_dialect
def test_the_spend_log_has_responses_rows_with_tokens(codex):
    rows = codex.proxy.spend_rows("endpoint = 'responses'")
    ok = [r for r in rows if r["status_code"] == 200]
    assert ok, rows or codex.explain()
    for row in ok:
        assert row["model_group"] in MODELS, row
        assert row["deployment"] == f"openai/echo-{row['model_group']}", row
        assert row["stream"] is True, row
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0, row

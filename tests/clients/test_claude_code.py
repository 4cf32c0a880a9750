"""Claude Code, unchanged, through the proxy: `claude -p "<prompt>"` answered by an
OpenAI-compatible backend behind a config whose groups are the models Claude Code asks for.

EXPECTS THE MESSAGES DIALECT (mitmroute/inbound/anthropic.py). Until it lands, `/v1/messages`
answers 404 and the tests marked `needs_messages_dialect` below fail: they are its yardstick.
The others pass today: they pin what the pinned Claude Code sends (tests/clients/README.md).

Claude Code runs once for the module (see conftest.py); each test reads that run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.clients.conftest import CapturingProxy, CliRun, base_env, echo_config, run_cli
from tests.fakes.openai_server import FakeBackend

pytestmark = pytest.mark.timeout(600)

HOST = "api.anthropic.com"
PROMPT_TOKEN = "yardstick-claude-7f3a"
MODELS = ("claude-opus-5-5",)
"""What the pinned Claude Code asks for by default in print mode (its main model; it made no
small/fast-model call in `-p` mode). A version bump that changes this fails
test_every_model_claude_code_asked_for_is_a_configured_group with the new name."""

needs_messages_dialect = pytest.mark.needs_messages_dialect


def claude_env(home: Path, proxy_url: str, ca_cert: Path) -> dict[str, str]:
    env = base_env(home, proxy_url)
    env.update(
        {
            "ANTHROPIC_API_KEY": "sk-ant-api03-yardstick-client-key-0000",
            "NODE_EXTRA_CA_CERTS": str(ca_cert),  # adds the mitmproxy CA to the built-in roots
            "CLAUDE_CONFIG_DIR": str(home / ".claude"),
            # no telemetry, error reports, update checks or other non-essential traffic
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_BUG_COMMAND": "1",
            # bounded: a failing proxy shows in seconds, not after ten backed-off retries
            "CLAUDE_CODE_MAX_RETRIES": "1",
            "API_TIMEOUT_MS": "60000",
        }
    )
    return env


@dataclass
class ClaudeSession:
    run: CliRun
    proxy: CapturingProxy
    backend_requests: list[dict[str, Any]]

    def explain(self) -> str:
        return self.run.explain(self.proxy)

    def messages_requests(self) -> list[dict[str, Any]]:
        return self.proxy.requests(HOST, "/v1/messages")


@pytest.fixture(scope="module")
def claude(clients, confdir, tmp_path_factory) -> ClaudeSession:
    root = tmp_path_factory.mktemp("claude-code")
    backend = FakeBackend()
    backend.url = backend.start()  # type: ignore[attr-defined]
    try:
        proxy = CapturingProxy(echo_config(backend, MODELS), confdir, root / "proxy")
        try:
            project = root / "project"
            project.mkdir()
            env = claude_env(root / "home", proxy.url, confdir / "mitmproxy-ca-cert.pem")
            run = run_cli([str(clients.claude), "-p", f"Say {PROMPT_TOKEN}"], env, project)
        finally:
            proxy.stop()
        return ClaudeSession(run, proxy, list(backend.state.requests))
    finally:
        backend.stop()


# --- what the pinned Claude Code sends (passes today; the spec in tests/clients/README.md) ---


def test_claude_code_calls_messages_on_api_anthropic_com_through_the_proxy(claude):
    calls = claude.messages_requests()
    assert calls, claude.explain()
    first = calls[0]
    headers = {k.lower(): v for k, v in first["headers"]}
    assert first["method"] == "POST"
    assert first["path"] == "/v1/messages?beta=true"
    assert headers["x-api-key"].startswith("sk-ant-api03")  # masked by capture.py
    assert "authorization" not in headers
    assert headers["anthropic-version"] == "2023-06-01"
    assert "claude-code-20250219" in headers["anthropic-beta"].split(",")
    assert headers["content-type"] == "application/json"
    body = first["body"]
    assert body["stream"] is True
    assert body["model"] in MODELS
    assert {"model", "messages", "system", "tools", "max_tokens", "stream"} <= set(body)
    # fields beyond the public Messages API that the dialect must accept (or drop), not refuse
    assert {"context_management", "thinking", "output_config", "metadata"} <= set(body)


def test_claude_code_puts_a_system_turn_inside_messages(claude):
    """Beta `mid-conversation-system-*`: `messages` holds a `system` role turn after the
    user's; the user's turn is a list of text blocks ending with the prompt."""
    body = claude.messages_requests()[0]["body"]
    roles = [m["role"] for m in body["messages"]]
    assert roles[0] == "user", roles
    assert "system" in roles, roles
    user = body["messages"][0]["content"]
    assert isinstance(user, list) and user[-1] == {"type": "text", "text": f"Say {PROMPT_TOKEN}"}
    assert isinstance(body["system"], list) and all(b["type"] == "text" for b in body["system"])


def test_every_model_claude_code_asked_for_is_a_configured_group(claude):
    asked = {r["body"]["model"] for r in claude.messages_requests()}
    assert asked, claude.explain()
    assert asked <= set(MODELS), f"Claude Code asked for {asked}; configure them in MODELS"


def test_no_model_call_left_the_machine_or_went_out_unrouted(claude):
    """Every /v1/messages call met the gate's `route` fate; Claude Code's own /api/... calls
    are refused at once by the default passthrough rule (`/v1/*` only): nothing leaves."""
    for r in claude.proxy.requests(HOST):
        path = r["path"].split("?", 1)[0]
        if path.startswith("/v1/messages"):
            assert r["fate"] == "route", claude.explain()
        else:
            assert path.startswith("/api/"), claude.explain()
            assert r["fate"] == "refuse" and r["status"] == 404, claude.explain()


# --- what only a working Messages dialect gives (fail until mitmroute/inbound/anthropic.py) ---


@needs_messages_dialect
def test_claude_code_exits_0_and_prints_the_backends_answer(claude):
    assert claude.run.returncode == 0, claude.explain()
    assert "echo:" in claude.run.stdout, claude.explain()
    assert PROMPT_TOKEN in claude.run.stdout, claude.explain()


@needs_messages_dialect
def test_each_messages_call_is_answered_200_by_the_proxy(claude):
    calls = claude.messages_requests()
    assert calls and all(r.get("status") == 200 for r in calls), claude.explain()


@needs_messages_dialect
def test_the_backend_received_the_prompt_as_a_chat_completion(claude):
    chats = [r for r in claude.backend_requests if r.get("model") == f"echo-{MODELS[0]}"]
    assert chats, f"the backend received nothing\n{claude.explain()}"
    for body in chats:
        assert isinstance(body["messages"], list) and body["messages"], body
        roles = {m.get("role") for m in body["messages"]}
        assert roles <= {"system", "developer", "user", "assistant", "tool"}, roles
    assert any(PROMPT_TOKEN in str(body["messages"]) for body in chats)


@needs_messages_dialect
def test_the_spend_log_has_messages_rows_with_tokens(claude):
    rows = claude.proxy.spend_rows("endpoint = 'messages'")
    assert rows, claude.explain()
    ok = [r for r in rows if r["status_code"] == 200]
    assert ok, rows
    for row in ok:
        assert row["model_group"] in MODELS, row
        assert row["deployment"] == f"openai/echo-{row['model_group']}", row
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0, row

"""What the client yardsticks share: the pinned CLIs, a capturing mitmdump, one isolated CLI run.

Everything stays on loopback: the CLIs reach the network only through HTTPS_PROXY (their
telemetry, error reports and update checks are switched off), and the proxy's capture script
refuses every server connection that is not loopback (see capture.py). Each test module runs
its CLI once (a module-scoped fixture: the proxy, a fake backend of its own, the run, then the
proxy stopped so the spend log is flushed); its tests read that one run from different angles.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest

from tests.clients import npm_clients
from tests.conftest import Proxy, deployment
from tests.fakes.openai_server import FakeBackend

CAPTURE_SCRIPT = Path(__file__).resolve().parent / "capture.py"

CLI_TIMEOUT = 180
"""Seconds one CLI run may take; then it is killed with its process group and the test fails.
Offline, Claude Code spends ~18 s retrying its own /api/claude_code/* calls before the first
model call, and Codex a few seconds on the websocket and plugin probes."""


def pytest_configure(config: pytest.Config) -> None:
    for dialect, module in (("messages", "anthropic"), ("responses", "responses")):
        config.addinivalue_line(
            "markers",
            f"needs_{dialect}_dialect: fails until mitmroute/inbound/{module}.py translates "
            "(a yardstick, deliberately neither skipped nor xfail)",
        )


@pytest.fixture(scope="session")
def clients() -> npm_clients.Clients:
    return npm_clients.install()


class CapturingProxy:
    """A real `mitmdump -s addons/router.py -s tests/clients/capture.py` and what it saw."""

    def __init__(self, config: dict[str, Any], confdir: Path, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.capture_file = workdir / "requests.jsonl"
        args = ["-s", str(CAPTURE_SCRIPT), "--set", f"capture_file={self.capture_file}"]
        self.proxy = Proxy(config, confdir, workdir, extra_args=args)

    @property
    def url(self) -> str:
        return self.proxy.url

    def stop(self) -> int | None:
        """SIGTERM: the spend log is flushed on the way out."""
        return self.proxy.stop()

    def records(self) -> list[dict[str, Any]]:
        if not self.capture_file.exists():
            return []
        lines = self.capture_file.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def requests(self, host: str | None = None, path: str | None = None) -> list[dict[str, Any]]:
        """Requests as the client sent them; `path` matches the path without its query."""
        return [
            r
            for r in self.records()
            if r["event"] == "request"
            and (host is None or r["host"] == host)
            and (path is None or r["path"].split("?", 1)[0] == path)
        ]

    def spend_rows(self, where: str = "true") -> list[dict[str, Any]]:
        sql = (
            "select endpoint, requested_model, model_group, deployment, status_code, "
            "error_type, stream, prompt_tokens, completion_tokens, usage_source "
            f"from spend_log where {where} order by started_at"
        )
        with duckdb.connect(str(self.proxy.spend_db), read_only=True) as con:
            cursor = con.execute(sql)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def summary(self) -> str:
        """One line per thing the proxy saw, for assertion messages."""
        out = []
        for r in self.records():
            if r["event"] != "request":
                out.append(f"{r['event']} {r.get('host') or r.get('sni')}")
                continue
            outcome = r.get("status") or r.get("error")
            line = f"{r['method']} {r['host']}{r['path']} -> {outcome} ({r.get('fate')})"
            if r.get("answer"):
                line += f" {r['answer'][:300]}"
            out.append(line)
        return "\n".join(out)


def echo_config(backend: FakeBackend, groups: tuple[str, ...]) -> dict[str, Any]:
    """Every group answered by the fake OpenAI-compatible backend ("echo: <last user text>")."""
    base = f"{backend.url}/v1"
    return {
        "model_list": [
            deployment(group, f"openai/echo-{group}", base, api_key="sk-backend-yardstick")
            for group in groups
        ],
        "router_settings": {"num_retries": 0},
    }


@dataclass
class CliRun:
    args: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool

    def explain(self, proxy: CapturingProxy | None = None) -> str:
        text = (
            f"$ {' '.join(self.args)}\nexit {self.returncode} after {self.seconds:.1f}s"
            f"{' (killed: timed out)' if self.timed_out else ''}\n"
            f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"
        )
        if proxy is not None:
            text += f"\n--- what the proxy saw\n{proxy.summary()}"
        return text


def base_env(home: Path, proxy_url: str) -> dict[str, str]:
    """A clean environment: none of the developer's own keys, base URLs or config leak in."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
        "HTTPS_PROXY": proxy_url,
        "HTTP_PROXY": proxy_url,
        "https_proxy": proxy_url,
        "http_proxy": proxy_url,
    }


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = CLI_TIMEOUT
) -> CliRun:
    """Run a CLI with no stdin; kill it with its process group after `timeout` seconds."""
    started = time.monotonic()
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, 9)
        stdout, stderr = proc.communicate(timeout=10)
    return CliRun(args, proc.returncode, stdout, stderr, time.monotonic() - started, timed_out)

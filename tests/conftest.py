"""Shared fixtures: a fake backend on loopback, and real `mitmdump -s addons/router.py` processes.

Every process a test starts is stopped by its fixture.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import yaml

from tests.fakes.openai_server import FakeBackend

ROOT = Path(__file__).resolve().parent.parent
MITMDUMP = str(Path(sys.executable).parent / "mitmdump")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started that still run (the proxy's spend sidecar)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait for `pids` to end (a sidecar writes what it holds, then exits); those that did not."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


@pytest.fixture(scope="session")
def backend() -> Iterator[FakeBackend]:
    """One fake OpenAI + Ollama backend for the whole session."""
    fake = FakeBackend()
    fake.url = fake.start()  # type: ignore[attr-defined]
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mitmproxy confdir (CA) shared by every proxy of the session, and a client bundle."""
    path = tmp_path_factory.mktemp("mitmconf")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "ca_bundle.py"),
            "--confdir",
            str(path),
            "--out",
            str(path / "bundle.pem"),
        ],
        check=True,
    )
    return path


class ProxyClients:
    """Clients through a proxy address (`url`) that intercepts with the CA in `confdir`."""

    confdir: Path

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def ca_bundle(self) -> str:
        return str(self.confdir / "bundle.pem")

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_bundle)

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(proxy=self.url, verify=self.ssl_context(), timeout=30, **kwargs)

    def client(self, api_key: str = "sk-client-key", **kwargs: Any) -> openai.OpenAI:
        """The official openai SDK, pointed at api.openai.com through this proxy."""
        return openai.OpenAI(api_key=api_key, max_retries=0, http_client=self.http(), **kwargs)

    def async_client(self, api_key: str = "sk-client-key", **kwargs: Any) -> openai.AsyncOpenAI:
        http = httpx.AsyncClient(proxy=self.url, verify=self.ssl_context(), timeout=30)
        return openai.AsyncOpenAI(api_key=api_key, max_retries=0, http_client=http, **kwargs)


class Proxy(ProxyClients):
    """A running `mitmdump -s addons/router.py` with its own config file."""

    def __init__(
        self,
        config: dict[str, Any] | None,
        confdir: Path,
        workdir: Path,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.confdir = confdir
        self.workdir = workdir
        self.config_path = workdir / "config.yaml"
        if config is not None:
            config.setdefault("general_settings", {}).setdefault(
                "spend_db", str(workdir / "spend.duckdb")
            )
            self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "mitmdump.log"
        args = [
            MITMDUMP,
            "--listen-host",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--set",
            f"confdir={confdir}",
            "-s",
            str(ROOT / "addons" / "router.py"),
        ]
        if config is not None:
            args += ["--set", f"router_config={self.config_path}"]
        args += extra_args or []
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            args,
            cwd=workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        try:
            wait_for_port(self.port, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"mitmdump failed to start:\n{self.logs()}") from None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def spend_db(self) -> Path:
        return self.workdir / "spend.duckdb"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int | None = None, sidecar_timeout: float = 30.0) -> int | None:
        """Stop mitmdump, then wait for its spend sidecar to end (after a SIGKILL it still
        writes the rows it got); one that does not end in `sidecar_timeout` is killed."""
        children = child_pids(self.proc.pid) if self.proc.poll() is None else []
        self._stop(sig)
        for pid in wait_gone(children, sidecar_timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        return self.proc.returncode

    def _stop(self, sig: int | None) -> None:
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture
def start_proxy(confdir: Path, tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Start proxies for one test; all are stopped afterwards."""
    started: list[Proxy] = []

    def start(config: dict[str, Any] | None, **kwargs: Any) -> Proxy:
        workdir = tmp_path / f"proxy{len(started)}"
        workdir.mkdir()
        proxy = Proxy(config, confdir, workdir, **kwargs)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def deployment(name: str, model: str, api_base: str, **params: Any) -> dict[str, Any]:
    """A model_list entry."""
    return {"model_name": name, "litellm_params": {"model": model, "api_base": api_base, **params}}


# a function tool in chat completions' shape, as the SDK tests send it
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

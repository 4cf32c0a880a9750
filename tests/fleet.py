"""A fleet: N real mitmroute proxies on one config and one CA, behind one HAProxy.

The HAProxy configuration is the shipped `deploy/haproxy.cfg` with this run's ports (see
`haproxy_config`), so the tests exercise the file the README tells people to run. Every
process is started here and stopped by its pid.

    fleet = Fleet(config, size=3, confdir=confdir, workdir=tmp_path).start()
    with fleet.client() as client:          # the openai SDK, HTTPS_PROXY = the balancer
        client.chat.completions.create(...)
    fleet.kill(1)                           # SIGKILL instance 1; HAProxy takes it out
    fleet.wait_state(1, "DOWN")
    fleet.restart(1)                        # same port, same spend_db directory
    fleet.stop()

Each instance runs in its own directory (`instance-<i>/`), so the config's relative
`spend_db` (default `./spend.duckdb`) gives each its own spill and keys files, as the README's
one-host set-up does; the shared ledger (`database_url`, `spend_data_path`) and Redis are
whatever the config names (`fleet_config` builds one).
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import MITMDUMP, ROOT, Proxy, ProxyClients, free_port, wait_for_port

HAPROXY_TEMPLATE = ROOT / "deploy" / "haproxy.cfg"
BACKEND = "mitmroute"
"""The backend section of the template whose `server` lines the fleet replaces."""
QUIET = ["--set", "flow_detail=0", "--set", "termlog_verbosity=warn"]


def fleet_config(
    model_list: list[dict[str, Any]],
    *,
    database_url: str | None = None,
    data_path: Path | None = None,
    redis_url: str | None = None,
    redis_namespace: str | None = None,
    router_settings: dict[str, Any] | None = None,
    **general: Any,
) -> dict[str, Any]:
    """One config for every instance: the shared ledger and Redis the fleet uses."""
    settings: dict[str, Any] = dict(general)
    if database_url is not None:
        settings["database_url"] = database_url
        settings["spend_data_path"] = str(data_path)
    config: dict[str, Any] = {"model_list": model_list, "general_settings": settings}
    if redis_url is not None:
        cache_params = {"type": "redis", "url": redis_url, "namespace": redis_namespace}
        config["litellm_settings"] = {"cache_params": cache_params}
    if router_settings is not None:
        config["router_settings"] = router_settings
    return config


def haproxy_config(template: str, listen_port: int, servers: list[int], stats_socket: Path) -> str:
    """`template` (deploy/haproxy.cfg) listening on `listen_port`, its admin socket at
    `stats_socket`, and one `server` line per port of `servers` (with the options of the
    template's first server line) in place of the template's."""
    lines = template.splitlines()
    server_lines = [i for i, line in enumerate(lines) if line.strip().startswith("server ")]
    binds = [i for i, line in enumerate(lines) if line.strip().startswith("bind ")]
    sockets = [i for i, line in enumerate(lines) if line.strip().startswith("stats socket ")]
    if not server_lines or len(binds) != 1 or len(sockets) != 1:
        raise ValueError("haproxy template: expected server lines, one bind, one stats socket")
    indent, first = re.match(r"(\s*)(.*)", lines[server_lines[0]]).groups()  # type: ignore[union-attr]
    options = first.split()[3:]  # server <name> <address> <options...>
    lines[binds[0]] = re.sub(r"bind\s+\S+", f"bind 127.0.0.1:{listen_port}", lines[binds[0]])
    lines[sockets[0]] = re.sub(
        r"stats socket\s+\S+", f"stats socket {stats_socket}", lines[sockets[0]]
    )
    ours = [
        indent + " ".join(["server", f"{BACKEND}{i + 1}", f"127.0.0.1:{port}", *options])
        for i, port in enumerate(servers)
    ]
    kept = [line for i, line in enumerate(lines) if i not in server_lines[1:]]
    at = kept.index(lines[server_lines[0]])
    return "\n".join([*kept[:at], *ours, *kept[at + 1 :]]) + "\n"


HEALTH_CHECK = b"GET /mitmroute-health HTTP/1.0\r\n\r\n"
"""What the template's `http-check send` sends; mitmproxy answers it 400 itself."""


def health_check(port: int, timeout: float = 2.0) -> bool:
    """Whether the proxy on `port` passes the template's health check now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout) as s:
            s.sendall(HEALTH_CHECK)
            return s.recv(12) == b"HTTP/1.1 400"
    except OSError:
        return False


class Instance(Proxy):
    """One `mitmdump -s addons/router.py` of the fleet: a fixed port (kept across restarts),
    the fleet's config file and CA, and a working directory of its own."""

    def __init__(
        self,
        index: int,
        config_path: Path,
        confdir: Path,
        workdir: Path,
        *,
        quiet: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.index = index
        self.port = free_port()
        self.confdir = confdir
        self.workdir = workdir
        self.config_path = config_path
        self.log_path = workdir / "mitmdump.log"
        self.quiet = quiet
        self.env = env or {}
        self.proc: subprocess.Popen | None = None  # type: ignore[assignment]
        self.started = 0  # how many times started: 2 after one restart

    @property
    def name(self) -> str:
        """Its server name in HAProxy."""
        return f"{BACKEND}{self.index + 1}"

    def start(self) -> Instance:
        args = [
            MITMDUMP,
            "--listen-host",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--set",
            f"confdir={self.confdir}",
            "-s",
            str(ROOT / "addons" / "router.py"),
            "--set",
            f"router_config={self.config_path}",
            *(QUIET if self.quiet else []),
        ]
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            args,
            cwd=self.workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        self.started += 1
        try:
            wait_for_port(self.port, timeout=60, proc=self.proc)
            self.wait_ready()
        except Exception:
            self.stop()
            raise RuntimeError(f"{self.name} failed to start:\n{self.logs()[-3000:]}") from None
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until it answers HAProxy's health check: its port is open seconds before that,
        while it loads its addons."""
        deadline = time.monotonic() + timeout
        while not health_check(self.port):
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not answering after {timeout}s")
            time.sleep(0.05)

    def stop(self, sig: int | None = None) -> int | None:
        if self.proc is None:
            return None
        return super().stop(sig)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Connection:
    """One client connection as HAProxy logged it: who it came from, which proxy took it."""

    client_port: int
    accepted_at: float  # unix time
    server: str  # `mitmroute2`, or `<NOSRV>` when no proxy could take it


# `127.0.0.1:43122 [01/Dec/2026:10:11:12.345] mitmroute mitmroute/mitmroute2 1/0/+1 ...`
_TCPLOG = re.compile(r"^\S+:(\d+) \[([^\]]+)\] \S+ [^/\s]+/(\S+) ")


class HAProxy:
    """`haproxy -db -f <config>`: the balancer in the foreground, its log in a file, its
    runtime API on a unix socket."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.socket_path = workdir / "haproxy.sock"
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    def start(self, servers: list[int]) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            raise RuntimeError("haproxy is not installed: run scripts/bootstrap.sh (make test)")
        self.config_path.write_text(
            haproxy_config(HAPROXY_TEMPLATE.read_text(), self.port, servers, self.socket_path)
        )
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [binary, "-db", "-f", str(self.config_path)],
            cwd=self.workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while not self._answers():  # its admin socket answers once it has bound everything
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"haproxy failed to start:\n{self.log()}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return "Name: HAProxy" in self.command("show info")
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def command(self, line: str) -> str:
        """One command of HAProxy's runtime API (`show stat`, `set server b/s state maint`)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket_path))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[str, str]:
        """Each server's status as HAProxy sees it: UP, DOWN, `UP 1/2` (going down), MAINT."""
        rows = csv.DictReader(self.command("show stat").lstrip("# ").splitlines())
        return {
            r["svname"]: r["status"]
            for r in rows
            if r["pxname"] == BACKEND and r["svname"] not in ("FRONTEND", "BACKEND")
        }

    def connections(self) -> list[Connection]:
        """Every client connection logged so far (the template logs each one as soon as a
        proxy takes it: `option logasap`)."""
        found = []
        for line in self.log().splitlines():
            if m := _TCPLOG.match(line):
                at = datetime.strptime(m[2], "%d/%b/%Y:%H:%M:%S.%f").timestamp()
                found.append(Connection(int(m[1]), at, m[3]))
        return found

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


class Fleet(ProxyClients):
    """`size` instances on one config file and one confdir (CA), behind one HAProxy."""

    def __init__(
        self,
        config: dict[str, Any],
        size: int,
        confdir: Path,
        workdir: Path,
        *,
        quiet: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.confdir = confdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.instances: list[Instance] = []
        for i in range(size):
            home = workdir / f"instance-{i}"
            home.mkdir(parents=True, exist_ok=True)
            self.instances.append(
                Instance(i, self.config_path, confdir, home, quiet=quiet, env=env)
            )
        self.balancer = HAProxy(workdir)

    def start(self, timeout: float = 20.0) -> Fleet:
        """Every instance (in parallel: each loads its extensions), then HAProxy; returns when
        HAProxy sees them all UP."""
        try:
            self._start_instances(self.instances)
            self.balancer.start([i.port for i in self.instances])
            for i in range(len(self.instances)):
                self.wait_state(i, "UP", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_instances(self, instances: list[Instance]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(instances)) as pool:
            for done in [pool.submit(i.start) for i in instances]:
                done.result()

    # --- the client's view: one proxy address -------------------------------------------

    @property
    def url(self) -> str:
        """The balancer's address: what apps get as HTTPS_PROXY."""
        return f"http://127.0.0.1:{self.balancer.port}"

    # --- one instance ---------------------------------------------------------------------

    def kill(self, index: int) -> None:
        """SIGKILL: no flush, no goodbye (its last flush interval of rows is lost)."""
        self.instances[index].stop(signal.SIGKILL)

    def restart(self, index: int) -> None:
        """Start it again on its port, in its directory (it adopts the spill files it left)."""
        instance = self.instances[index]
        instance.stop()
        instance.start()

    def state(self, index: int) -> str:
        return self.balancer.states()[self.instances[index].name]

    def wait_state(self, index: int, status: str, timeout: float = 10.0) -> float:
        """Wait until HAProxy reports instance `index` as `status` (UP, DOWN, MAINT);
        returns the seconds it took."""
        t0 = time.monotonic()
        while (seen := self.state(index)) != status:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{self.instances[index].name} is {seen!r}, not {status}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def set_serving(self, count: int) -> None:
        """Only the first `count` instances take new connections (the others: MAINT)."""
        for i, instance in enumerate(self.instances):
            state = "ready" if i < count else "maint"
            self.balancer.command(f"set server {BACKEND}/{instance.name} state {state}")
        for i in range(len(self.instances)):
            self.wait_state(i, "UP" if i < count else "MAINT")

    def served_by(self) -> dict[int, list[Connection]]:
        """HAProxy's log: the connections it passed, by client port."""
        by_port: dict[int, list[Connection]] = {}
        for c in self.balancer.connections():
            by_port.setdefault(c.client_port, []).append(c)
        return by_port

    def index_of(self, server: str) -> int | None:
        return next((i.index for i in self.instances if i.name == server), None)

    def stop(self) -> list[int | None]:
        """SIGTERM every instance (each flushes its rows), then HAProxy; their exit codes."""
        codes = []
        for instance in self.instances:
            with contextlib.suppress(Exception):
                codes.append(instance.stop())
        self.balancer.stop()
        return codes

"""Network namespaces for tests: commands that need a port of their own (the README's :8080) or
their own routing (transparent mode). Root and iproute2 are part of this machine kind; every
namespace, veth pair, hosts file and iptables rule made here is removed on exit."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def require_root_and_ip() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    assert shutil.which("ip"), "iproute2 (ip netns) is part of this machine kind"


class Namespace:
    """`ip netns add` with loopback up; `argv()` prefixes a command to run inside it."""

    def __init__(self, prefix: str) -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        ip("netns", "add", self.name)
        ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def argv(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def shell(self, script: str, **kwargs) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("timeout", 120)
        return subprocess.run(
            self.argv("bash", "-c", script), capture_output=True, text=True, **kwargs
        )

    def wait_for_port(self, port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        probe = f"exec 3<>/dev/tcp/127.0.0.1/{port}"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode} before listening on {port}")
            if self.shell(probe, timeout=5).returncode == 0:
                return
            time.sleep(0.2)
        raise TimeoutError(f"nothing listening on {port} in {self.name} after {timeout}s")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("netns", "del", self.name)
        hosts = Path("/etc/netns") / self.name
        if hosts.exists():
            shutil.rmtree(hosts)


@contextlib.contextmanager
def namespace(prefix: str) -> Iterator[Namespace]:
    require_root_and_ip()
    ns = Namespace(prefix)
    try:
        yield ns
    finally:
        ns.remove()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def ensure_iptables() -> None:
    """Install iptables (Debian) when missing: bounded, as root."""
    if shutil.which("iptables"):
        return
    install = ["apt-get", "install", "-y", "-q", "iptables"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, capture_output=True, timeout=300, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300, env=env)
        subprocess.run(install, capture_output=True, timeout=300, env=env, check=True)
    assert shutil.which("iptables"), "apt-get installed iptables, yet it is not on PATH"

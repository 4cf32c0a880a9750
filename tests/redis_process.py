"""A `redis-server` of a test's own, to kill, hang (SIGSTOP) and restart empty.

The shared Redis on 6379 is never stopped or flushed by tests: outage tests use one of these.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time

from tests.conftest import free_port


class RedisProcess:
    def __init__(self) -> None:
        assert shutil.which("redis-server"), "redis-server is part of this machine kind"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self._hole: list[socket.socket] = []
        self.start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again) with no data: no RDB, no AOF."""
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(self.address, 0.1):
                return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """Dead: connections are refused."""
        self.resume()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def restart_empty(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        """Hung: connections are accepted by the kernel, nothing is ever answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused and self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.paused = False

    def unreachable(self) -> None:
        """Like a host that drops packets: connecting hangs until the client's timeout (its
        port is held by a listener whose one-slot backlog is already full)."""
        self.kill()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(self.address)
        listener.listen(0)
        # Non-blocking: if a client's reconnect took the one slot first, this SYN is the one
        # left hanging, and a blocking connect here would hang the test with it.
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(self.address)
        self._hole = [listener, filler]

    def stop(self) -> None:
        for s in self._hole:
            s.close()
        self._hole = []
        self.kill()

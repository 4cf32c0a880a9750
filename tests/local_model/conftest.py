"""A real local model for these tests: llama.cpp's OpenAI-compatible server (llama-cpp-python)
with Gemma 3 270M, installed and started by `scripts/local_model.sh` on a free loopback port.

Nothing is skipped: if the install or the start fails, the tests fail with its output.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

SCRIPT = ROOT / "scripts" / "local_model.sh"


class LocalModel:
    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.env = {
            **os.environ,
            "LOCAL_MODEL_PORT": str(port),
            "LOCAL_MODEL_PIDFILE": str(workdir / "server.pid"),
            "LOCAL_MODEL_LOG": str(workdir / "server.log"),
        }
        self.log = workdir / "server.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def run(self, command: str) -> None:
        out = subprocess.run(
            [str(SCRIPT), command], env=self.env, capture_output=True, text=True, timeout=1800
        )
        assert out.returncode == 0, f"local_model.sh {command} failed:\n{out.stdout}{out.stderr}"


@pytest.fixture(scope="session")
def local_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalModel]:
    """The server, started for this session (a dev's own `make local-model` is left alone)."""
    model = LocalModel(free_port(), tmp_path_factory.mktemp("local-model"))
    model.run("install")  # fast once installed (`make test-local-model` installs first)
    model.run("start")
    yield model
    model.run("stop")

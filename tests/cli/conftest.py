"""The `mitmroute` command as users run it: the console script beside this test's Python (the
project's `.venv/bin/mitmroute` after `make test`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MITMROUTE = str(Path(sys.executable).parent / "mitmroute")
# Variables `mitmroute env` sets, or that would change what a command finds: never inherited.
SCRUBBED = {
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "NODE_USE_ENV_PROXY",
    "NODE_OPTIONS",
    "MITMROUTE_CONFIG",
    "MITMROUTE_DEBUG",
}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    return {**env, **extra}


def mitmroute(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `mitmroute ARGS` and return what it did (never raises on a non-zero exit)."""
    return subprocess.run(
        [MITMROUTE, *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(out: subprocess.CompletedProcess[str], command: str) -> str:
    """The error line of a failed command, asserting it is one line and no traceback."""
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    errors = [
        ln for ln in out.stderr.splitlines() if not ln.startswith(f"mitmroute {command}: config ")
    ]
    assert len(errors) == 1, out.stderr
    assert errors[0].startswith(f"mitmroute {command}: "), errors[0]
    return errors[0]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty directory to run commands in (no ./config.yaml)."""
    path = tmp_path / "work"
    path.mkdir()
    return path


ROOT = Path(__file__).resolve().parents[2]
NODE_CACHE = ROOT / ".cache" / "node"  # gitignored; reused across runs
OPENAI_NPM = "6.49.0"  # the openai npm package: v5+ calls Node's built-in fetch


@pytest.fixture(scope="session")
def node_openai() -> Path:
    """A directory whose node_modules holds the openai npm package (installed once)."""
    import json
    import shutil

    assert shutil.which("node") and shutil.which("npm"), (
        "Node and npm are part of this machine kind"
    )
    package = NODE_CACHE / "node_modules" / "openai" / "package.json"
    if not package.is_file() or json.loads(package.read_text())["version"] != OPENAI_NPM:
        NODE_CACHE.mkdir(parents=True, exist_ok=True)
        npm = ["npm", "install", "--prefix", str(NODE_CACHE), "--no-audit", "--no-fund"]
        npm += ["--save-exact", f"openai@{OPENAI_NPM}"]
        subprocess.run(npm, check=True, capture_output=True, timeout=300)
    return NODE_CACHE

"""Installs the real CLIs the yardstick tests run (versions pinned in package.json and
package-lock.json beside this file) into `.cache/npm-clients/` at the repository root.

The install is reused across runs while package.json and package-lock.json are unchanged (a
stamp holds their hash) and redone with `npm ci` otherwise. A failed install raises: the tests
fail, they never skip. `python -m tests.clients.npm_clients` installs and prints the versions.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = ROOT / ".cache" / "npm-clients"
MANIFESTS = ("package.json", "package-lock.json")
INSTALL_TIMEOUT = 900


class InstallError(RuntimeError):
    """npm could not install the pinned CLIs."""


@dataclass(frozen=True)
class Clients:
    claude: Path
    codex: Path
    install_seconds: float
    """0 when an earlier run's install was reused."""


def _fingerprint() -> str:
    h = hashlib.sha256()
    for name in MANIFESTS:
        h.update((HERE / name).read_bytes())
    return h.hexdigest()


def _bins() -> tuple[Path, Path]:
    bin_dir = CACHE / "node_modules" / ".bin"
    return bin_dir / "claude", bin_dir / "codex"


def _version(binary: Path) -> str:
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    if out.returncode != 0:
        raise InstallError(f"{binary} --version exited {out.returncode}: {out.stderr[-2000:]}")
    return out.stdout.strip()


def _check(claude: Path, codex: Path) -> None:
    pins = json.loads((HERE / "package.json").read_text())["dependencies"]
    for binary, package in ((claude, "@anthropic-ai/claude-code"), (codex, "@openai/codex")):
        if pins[package] not in _version(binary):
            raise InstallError(f"{binary} is not {package}@{pins[package]}")


def install() -> Clients:
    """The pinned CLIs, installed if they are not yet (or are stale)."""
    npm = shutil.which("npm")
    if npm is None:
        raise InstallError("npm is not on PATH: the client yardsticks need Node.js and npm")
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp = CACHE / ".installed"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time across processes
        claude, codex = _bins()
        if stamp.exists() and stamp.read_text() == _fingerprint():
            _check(claude, codex)
            return Clients(claude, codex, 0.0)
        stamp.unlink(missing_ok=True)
        for name in MANIFESTS:
            shutil.copyfile(HERE / name, CACHE / name)
        started = time.monotonic()
        env = {
            **os.environ,
            "npm_config_engine_strict": "false",
            "npm_config_update_notifier": "false",
        }
        try:
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=CACHE,
                env=env,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise InstallError(f"npm ci took longer than {INSTALL_TIMEOUT}s") from e
        if done.returncode != 0:
            raise InstallError(f"npm ci exited {done.returncode}:\n{done.stderr[-4000:]}")
        seconds = time.monotonic() - started
        _check(claude, codex)
        stamp.write_text(_fingerprint())
        return Clients(claude, codex, seconds)


if __name__ == "__main__":
    clients = install()
    print(f"claude: {_version(clients.claude)}\ncodex: {_version(clients.codex)}")
    print(f"install: {clients.install_seconds:.1f}s (0 = reused)")

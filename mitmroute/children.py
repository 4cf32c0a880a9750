"""How the proxy starts its helper processes (the spend writer, the keys move, the DuckDB
extension install): this mitmroute's own modules, whatever the working directory holds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])


def child_argv(module: str, *args: str) -> list[str]:
    """`python -P -m module args`: -P keeps the working directory off the path, which `-m`
    would otherwise put first (a directory holding another mitmroute would run that one)."""
    return [sys.executable, "-P", "-m", module, *args]


def child_env() -> dict[str, str]:
    """The proxy's environment, with this mitmroute first on the path: the child runs the same
    code as the proxy, however the proxy found it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env

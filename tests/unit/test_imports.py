"""What the proxy process loads at start: only what its config uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LOAD_THE_ADDON_CHAIN = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("router", "addons/router.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(" ".join(sorted(m for m in sys.modules if "." not in m)))
"""


def test_the_addon_chain_loads_no_redis_duckdb_psycopg_or_tokenizer_until_a_config_asks():
    out = subprocess.run(
        [sys.executable, "-c", LOAD_THE_ADDON_CHAIN],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    loaded = set(out.stdout.split())
    assert "mitmproxy" in loaded and "aiohttp" in loaded  # it did load the chain
    assert not loaded & {"redis", "duckdb", "psycopg", "tiktoken"}

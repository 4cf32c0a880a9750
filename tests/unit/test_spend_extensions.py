"""The shared ledger's extensions are installed by a process of their own: the proxy that asks
never loads DuckDB."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mitmroute.spend import extensions

CHECK = """
import sys
from mitmroute.spend import extensions
extensions.install_apart()
print("duckdb" in sys.modules)
"""


def test_install_apart_installs_without_loading_duckdb_here():
    done = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert list(extensions.default_directory().glob("v*/*/ducklake.duckdb_extension"))


def test_a_failed_install_is_one_extension_error():
    with pytest.raises(extensions.ExtensionError, match="installing the DuckDB extensions"):
        extensions.install_apart(timeout=0.001)

"""The DuckDB extensions of the shared spend log (``ducklake``, ``postgres_scanner``), offline.

DuckDB would download an extension the first time it is loaded; mitmroute never lets it. The
binaries come from the pinned wheels ``duckdb-extension-ducklake`` and
``duckdb-extension-postgres-scanner`` (built for exactly the pinned ``duckdb``, 1.5.5) and are
copied into an extension directory the project controls, laid out as DuckDB expects
(``<dir>/v1.5.5/linux_amd64/ducklake.duckdb_extension``): ``<venv>/share/mitmroute/duckdb``,
or ``~/.cache/mitmroute/duckdb`` when the venv is read-only. ``scripts/bootstrap.sh`` (``make
run``, ``make test``) does it at set-up (``python -m mitmroute.spend.extensions``), and
:func:`connect` does it again if the copies are missing. Any DuckDB of the same version then
loads them by name: ``duckdb.connect(config={"extension_directory": DIR})`` and ``LOAD
ducklake``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

NAMES = ("ducklake", "postgres_scanner")
"""Loaded by these names (the postgres extension's file must be named postgres_scanner)."""


class ExtensionError(RuntimeError):
    """An extension of the shared spend log is missing or built for another DuckDB."""


def _wheel_file(name: str) -> Path:
    """The extension binary shipped by the `duckdb-extension-<name>` wheel."""
    import duckdb  # here: the proxy process imports this module, never DuckDB

    spec = importlib.util.find_spec(f"duckdb_extension_{name}")
    if spec is None or spec.origin is None:
        raise ExtensionError(
            f"the DuckDB extension {name!r} is not installed (pip install "
            f"duckdb-extension-{name.replace('_', '-')}=={duckdb.__version__}); "
            "reinstall mitmroute to get it"
        )
    version = f"v{duckdb.__version__}"
    path = Path(spec.origin).parent / "extensions" / version / f"{name}.duckdb_extension"
    if not path.is_file():
        found = sorted(p.name for p in (Path(spec.origin).parent / "extensions").glob("v*"))
        raise ExtensionError(
            f"duckdb-extension-{name.replace('_', '-')} is built for DuckDB "
            f"{', '.join(found) or '?'}, not the installed {version}: reinstall mitmroute "
            "(it pins both)"
        )
    return path


def _platform() -> str:
    import duckdb  # here: the proxy process imports this module, never DuckDB

    con = duckdb.connect(":memory:")
    try:
        row = con.execute("SELECT platform FROM pragma_platform()").fetchone()
    finally:
        con.close()
    assert row is not None
    return str(row[0])


def default_directory() -> Path:
    """`<venv>/share/mitmroute/duckdb` if writable (or creatable), else ~/.cache/mitmroute."""
    venv = Path(sys.prefix) / "share" / "mitmroute" / "duckdb"
    probe = venv
    while not probe.exists():
        probe = probe.parent
    if os.access(probe, os.W_OK):
        return venv
    return Path.home() / ".cache" / "mitmroute" / "duckdb"


def install(directory: Path | None = None) -> Path:
    """Copy the extensions into `directory` (default: :func:`default_directory`) unless the
    same files are there already; returns the directory. Safe with several processes at once
    (each file is written under a temporary name and renamed into place)."""
    import duckdb

    directory = directory or default_directory()
    target = directory / f"v{duckdb.__version__}" / _platform()
    for name in NAMES:
        source = _wheel_file(name)
        dest = target / f"{name}.duckdb_extension"
        if dest.is_file() and dest.stat().st_size == source.stat().st_size:
            continue
        target.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}")
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return directory


def connect(threads: int = 1, directory: Path | None = None) -> Any:
    """An in-memory DuckDB with ducklake and postgres_scanner loaded, never from the network.

    Loading takes ~0.5 s (per connection: keep it open)."""
    import duckdb

    directory = install(directory)
    con = duckdb.connect(
        ":memory:",
        config={
            "extension_directory": str(directory),
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": True,
            "threads": threads,
        },
    )
    try:
        for name in NAMES:
            con.execute(f"LOAD {name}")
    except duckdb.Error as e:
        con.close()
        raise ExtensionError(f"cannot load the DuckDB extensions from {directory}: {e}") from e
    return con


def install_apart(timeout: float = 120.0) -> None:
    """:func:`install` in a short-lived process of its own, so the calling process (the proxy)
    never loads DuckDB (~50 MB). Raises ExtensionError with that process's error."""
    from mitmroute.children import child_argv, child_env

    try:
        done = subprocess.run(
            child_argv("mitmroute.spend.extensions"),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(),
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ExtensionError(f"installing the DuckDB extensions: {e}") from None
    if done.returncode:
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        raise ExtensionError(lines[-1].split(": ", 1)[-1] if "Error" in lines[-1] else lines[-1])


if __name__ == "__main__":  # python -m mitmroute.spend.extensions: install at set-up
    print(f"DuckDB extensions {', '.join(NAMES)} in {install()}")

"""`mitmroute run`: the proxy, i.e. `mitmdump -s addons/router.py` with the config found as every
command finds it (`--config`, `$MITMROUTE_CONFIG`, `./config.yaml`, `config.example.yaml`).

Every other argument goes to mitmdump unchanged (see `mitmdump --help`):

    mitmroute run                                   # :8080
    mitmroute run --config prod.yaml -p 9090 --set confdir=/etc/mitmroute
    mitmroute run --mode transparent -p 8443        # apps that ignore proxy settings (README)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from mitmroute.cli import configs
from mitmroute.cli.errors import CliError

ADDON = configs.PROJECT_ROOT / "addons" / "router.py"


def mitmdump() -> str:
    """The mitmdump beside this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "mitmdump"
    if beside.is_file():
        return str(beside)
    found = shutil.which("mitmdump")
    if found is None:
        raise CliError("mitmdump not found (install mitmroute with pip: it depends on mitmproxy)")
    return found


def command(config: Path | None, passed: list[str]) -> list[str]:
    """The mitmdump command line."""
    if any(a.startswith("router_config=") for a in passed):
        raise CliError("give the config with --config, not --set router_config", code=2)
    if not ADDON.is_file():
        raise CliError(f"{ADDON} not found: run mitmroute from a clone (pip install -e .)")
    args = [mitmdump(), "-s", str(ADDON)]
    if config is not None:
        args += ["--set", f"router_config={config.resolve()}"]
    return args + passed


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "run",
        help="run the proxy (mitmdump with the router addons); other arguments go to mitmdump",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    configs.add_option(p)
    p.set_defaults(run=run, passthrough=True)


def run(args: argparse.Namespace) -> int:
    choice, _ = configs.load(args.config, "run")  # a bad config stops here, in one line
    passed = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    argv = command(choice.path, passed)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
    return 0  # not reached

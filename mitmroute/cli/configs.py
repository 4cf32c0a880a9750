"""Which config a command uses, found the same way by every command, and said on stderr.

In order: `--config PATH`, `$MITMROUTE_CONFIG`, `./config.yaml`, the project's
`config.example.yaml` (what `make run` starts with), else the built-in defaults (no backends:
everything passes through).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import mitmroute
from mitmroute.config import RouterConfig, load_config

ENV_VAR = "MITMROUTE_CONFIG"
PROJECT_ROOT = Path(mitmroute.__file__).resolve().parent.parent
EXAMPLE = PROJECT_ROOT / "config.example.yaml"


@dataclass(frozen=True, slots=True)
class ConfigChoice:
    """A config file (None: the built-in defaults) and why it was chosen."""

    path: Path | None
    reason: str

    def describe(self) -> str:
        if self.path is None:
            return f"built-in defaults ({self.reason})"
        return f"{self.path} ({self.reason})"


def find_config(explicit: str | None, cwd: Path | None = None) -> ConfigChoice:
    """The config a command uses: see the module docstring for the order."""
    if explicit:
        return ConfigChoice(Path(explicit), "--config")
    if os.environ.get(ENV_VAR):
        return ConfigChoice(Path(os.environ[ENV_VAR]), f"${ENV_VAR}")
    local = (cwd or Path()) / "config.yaml"
    if local.is_file():
        return ConfigChoice(local, "./config.yaml")
    if EXAMPLE.is_file():
        return ConfigChoice(EXAMPLE, "the example, as there is no ./config.yaml")
    return ConfigChoice(None, "no config file found")


def load(explicit: str | None, command: str) -> tuple[ConfigChoice, RouterConfig]:
    """Find the config, say which on stderr, and load it (ConfigError names a bad key)."""
    choice = find_config(explicit)
    print(f"mitmroute {command}: config {choice.describe()}", file=sys.stderr)
    return choice, load_config(choice.path)


def add_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"config.yaml (default: ${ENV_VAR}, else ./config.yaml, else config.example.yaml)",
    )

"""Shell syntax: how a variable is set in sh, fish and PowerShell, and how we were invoked."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

SHELLS = ("sh", "fish", "powershell")


def assignment(shell: str, name: str, value: str) -> str:
    """One line that sets and exports `name` to `value` in `shell`."""
    if shell == "fish":
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        return f"set -gx {name} '{quoted}'"
    if shell == "powershell":
        return f"$env:{name} = '{value.replace(chr(39), chr(39) * 2)}'"
    return f"export {name}={shlex.quote(value)}"


def invoked_as() -> str:
    """How to call mitmroute again in a hint: the path used now when it was a path."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name == "mitmroute" and ("/" in argv0):
        return shlex.quote(argv0)
    return "mitmroute"

"""The one error a command raises to stop: its message is the one line the user sees."""

from __future__ import annotations


class CliError(Exception):
    """Stop the command: print `mitmroute <command>: <message>` and exit with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code

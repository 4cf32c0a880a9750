"""When a client connection that waits for its next request has waited too long.

A connection waits from when it opens, and again from the end of each exchange, until the
headers of its next request are complete. Two limits apply while it waits (0 turns one off):

- idle: this long without any activity on the connection (a byte from the client, mostly);
- header: this long in all, however the bytes trickle in (slow headers, slow TLS handshakes).

While an exchange is in flight neither applies, so a stream may pause for minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Reason = Literal["idle", "header"]
DEFAULT_IDLE = 60
"""Seconds: well above what HTTP client pools keep idle connections (httpx 5 s, Node 4 s)."""
DEFAULT_HEADER = 120
"""Seconds: generous for a slow link; a header trickle is bounded to two minutes."""


@dataclass(frozen=True, slots=True)
class Limits:
    idle: float = DEFAULT_IDLE
    header: float = DEFAULT_HEADER

    def of(self, reason: Reason) -> float:
        return self.idle if reason == "idle" else self.header


def overdue(
    limits: Limits, waiting_since: float, last_activity: float | None, now: float
) -> tuple[Reason | None, float | None]:
    """(reason, None) once a limit has passed; else (None, when to look again), or
    (None, None) when both limits are off. Times are seconds on one clock."""
    deadlines: list[tuple[float, Reason]] = []
    if limits.header > 0:
        deadlines.append((waiting_since + limits.header, "header"))
    if limits.idle > 0:
        active = max(waiting_since, last_activity or waiting_since)
        deadlines.append((active + limits.idle, "idle"))
    if not deadlines:
        return None, None
    when, reason = min(deadlines)
    return (reason, None) if now >= when else (None, when)

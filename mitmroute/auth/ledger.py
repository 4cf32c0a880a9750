"""What each virtual key has spent, read back from the spend log (the ledger of record).

The proxy's spend writer runs in a child process (:mod:`mitmroute.spend.sidecar`), and the
query goes to it: it runs on the writer's own connection, after the rows the child has received,
and the proxy never loads DuckDB. Without a running writer for the file (the spend log was not
started), the file is opened read-only for one query and closed, retried while another process
holds it. Either way the read runs on a worker thread of its own: the event loop never waits.
Rows the proxy has not handed to the writer yet (the last ~50 ms) are not seen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

from mitmroute.auth.limits import usd_to_nanos

log = logging.getLogger("mitmroute.auth")

SpendQuery = Callable[[str, Any], list[tuple[Any, ...]]]
"""Runs a read query on the spend log's writer (`SpendSidecar.query`): blocking."""

SPEND_SINCE = """
SELECT w.token, sum(s.cost_usd)
FROM (SELECT unnest($tokens::VARCHAR[]) AS token, unnest($since::DOUBLE[]) AS since) AS w
JOIN spend_log AS s ON s.api_key_hash = w.token AND s.started_at >= to_timestamp(w.since)
WHERE s.cost_usd IS NOT NULL
GROUP BY w.token
"""


class LedgerBusy(RuntimeError):
    """The spend log stayed locked for every attempt."""


class Ledger:
    """Reads of what keys spent in the spend log at `path`: through its running writer when
    there is one, else from the file itself (read-only)."""

    def __init__(
        self,
        path: str,
        attempts: int = 40,
        delay: float = 0.025,
        writer: Callable[[], SpendQuery | None] | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        self.attempts = attempts
        self.delay = delay
        self.writer = writer
        """The running spend writer's query, if any (looked up at each read: the spend log
        addon starts and replaces its writer on its own)."""
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mitmroute-ledger")

    async def spend_since(self, since: dict[str, float]) -> dict[str, int]:
        """Nano-dollars per token over rows started at or after `since[token]` (epoch s)."""
        if not since:
            return {}
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self.read, since)

    def read(self, since: dict[str, float]) -> dict[str, int]:
        """Blocking: the query behind :meth:`spend_since`."""
        params = {"tokens": list(since), "since": [float(s) for s in since.values()]}
        query = self.writer() if self.writer is not None else None
        rows = query(SPEND_SINCE, params) if query is not None else self._read_file(params)
        return {token: usd_to_nanos(Decimal(str(total))) for token, total in rows}

    def _read_file(self, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """The query on the file itself, read-only, retried while another process holds it."""
        import duckdb

        if not self.path.exists():
            return []
        error: Exception | None = None
        for _ in range(self.attempts):
            try:
                con = duckdb.connect(str(self.path), read_only=True)
            except (duckdb.Error, OSError) as e:  # the writer holds it (or it is being made)
                error = e
                time.sleep(self.delay)
                continue
            try:
                return con.execute(SPEND_SINCE, params).fetchall()
            except duckdb.CatalogException:  # no spend_log table yet
                return []
            finally:
                con.close()
        raise LedgerBusy(f"{self.path}: still locked after {self.attempts} attempts: {error}")

    def close(self) -> None:
        self._thread.shutdown(wait=True)

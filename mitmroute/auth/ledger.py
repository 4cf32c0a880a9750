"""What each virtual key has spent, read back from the spend log (the ledger of record).

The spend log writer (:mod:`mitmroute.spend.writer`) opens ``spend_db`` only for the few ms of
a flush, so this reader opens it read-only for one query and closes it, retrying while the
writer holds it. Reads run on one worker thread of their own: the event loop never waits on
DuckDB. Rows still in the writer's memory (the last ~1 s) or in its spill file are not seen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

from mitmroute.auth.limits import usd_to_nanos

log = logging.getLogger("mitmroute.auth")

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
    """Read-only access to the spend log file at `path`."""

    def __init__(self, path: str, attempts: int = 40, delay: float = 0.025) -> None:
        self.path = Path(path).expanduser()
        self.attempts = attempts
        self.delay = delay
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mitmroute-ledger")

    async def spend_since(self, since: dict[str, float]) -> dict[str, int]:
        """Nano-dollars per token over rows started at or after `since[token]` (epoch s)."""
        if not since:
            return {}
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self.read, since)

    def read(self, since: dict[str, float]) -> dict[str, int]:
        """Blocking: the query behind :meth:`spend_since`, retried while the file is locked."""
        import duckdb

        if not self.path.exists():
            return {}
        params = {"tokens": list(since), "since": [float(s) for s in since.values()]}
        error: Exception | None = None
        for _ in range(self.attempts):
            try:
                con = duckdb.connect(str(self.path), read_only=True)
            except (duckdb.Error, OSError) as e:  # the writer holds it (or it is being made)
                error = e
                time.sleep(self.delay)
                continue
            try:
                rows = con.execute(SPEND_SINCE, params).fetchall()
            except duckdb.CatalogException:  # no spend_log table yet
                return {}
            finally:
                con.close()
            return {token: usd_to_nanos(Decimal(total)) for token, total in rows}
        raise LedgerBusy(f"{self.path}: still locked after {self.attempts} attempts: {error}")

    def close(self) -> None:
        self._thread.shutdown(wait=True)

"""The spend log: what each request cost (priced by mitmroute.money), persisted to DuckDB off
the event loop.

- :class:`SpendLog` (writer.py): ``record(exchange)`` from the loop, ``close()`` on shutdown;
  :func:`check_writable` before starting one.
- :func:`estimate_prompt_tokens` / :func:`estimate_text_tokens` (tokens.py): usage when the
  backend reports none.
- :class:`~mitmroute.spend.lake.LakeSpendLog` (lake.py): the same writer for the ledger shared
  by many proxies (``database_url``: a DuckLake on PostgreSQL); extensions.py loads its DuckDB
  extensions offline.
- schema.py: the tables and the views (``spend_daily``, ``spend_last_hour``, ``cache_savings``,
  ``fallback_rate``, ``deployment_latency``, ``routing_savings``, ...); older files gain newer
  columns by ``ALTER TABLE ... ADD COLUMN IF NOT EXISTS``.
- :class:`~mitmroute.spend.sidecar.SpendSidecar` (sidecar.py): the writer in a child process,
  as the proxy runs it; rows.py: the rows and spill files, without DuckDB.

DuckDB is imported only by the modules that use it (``SpendLog`` on first access): the proxy
process itself never loads it.
"""

from typing import Any

from mitmroute.spend.rows import SpendDbError, check_writable
from mitmroute.spend.tokens import estimate_prompt_tokens, estimate_text_tokens

__all__ = [
    "SpendDbError",
    "SpendLog",
    "check_writable",
    "estimate_prompt_tokens",
    "estimate_text_tokens",
]


def __getattr__(name: str) -> Any:
    if name == "SpendLog":  # imports DuckDB: only where the writer runs
        from mitmroute.spend.writer import SpendLog

        return SpendLog
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

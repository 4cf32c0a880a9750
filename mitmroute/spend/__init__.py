"""The spend log: what each request cost, persisted to DuckDB off the event loop.

- :class:`SpendLog` (writer.py): ``record(exchange)`` from the loop, ``close()`` on shutdown;
  :func:`check_writable` before starting one.
- :class:`PriceBook` (pricing.py): exact Decimal cost of a Usage.
- :func:`estimate_prompt_tokens` / :func:`estimate_text_tokens` (tokens.py): usage when the
  backend reports none.
- schema.py: the tables and the views (``spend_daily``, ``spend_last_hour``, ``cache_savings``,
  ``fallback_rate``, ``deployment_latency``, ...).
"""

from mitmroute.spend.pricing import PriceBook, PriceError, Rates
from mitmroute.spend.tokens import estimate_prompt_tokens, estimate_text_tokens
from mitmroute.spend.writer import SpendDbError, SpendLog, check_writable

__all__ = [
    "PriceBook",
    "PriceError",
    "Rates",
    "SpendDbError",
    "SpendLog",
    "check_writable",
    "estimate_prompt_tokens",
    "estimate_text_tokens",
]

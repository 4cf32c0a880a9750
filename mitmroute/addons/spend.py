"""Appends every exchange, with tokens and cost, to the DuckDB spend log (`spend_db`).

Rows are written by a background thread, so the event loop never waits on DuckDB; `done`
(SIGINT, SIGTERM) flushes everything before mitmdump exits.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mitmroute.addons.guard import fail_closed
from mitmroute.addons.shared import Shared
from mitmroute.config import RouterConfig
from mitmroute.exchange import Exchange
from mitmroute.spend import SpendLog as SpendWriter

log = logging.getLogger("mitmroute")


@fail_closed
class SpendLog:
    def __init__(self, shared: Shared) -> None:
        self.writer: SpendWriter | None = None
        shared.config_listeners.append(self.config_changed)
        shared.listeners.append(self.record)

    def config_changed(self, config: RouterConfig) -> None:
        path = str(Path(config.general.spend_db).expanduser())
        if self.writer is not None and str(self.writer.path) == path:
            return
        if self.writer is not None:
            self.writer.close()
        self.writer = SpendWriter(path)
        self.writer.start()
        log.info("mitmroute: spend log at %s", path)

    def record(self, exchange: Exchange) -> None:
        if self.writer is not None:
            self.writer.record(exchange)

    def done(self) -> None:
        if self.writer is None:
            return
        if not self.writer.close():
            log.warning("mitmroute: some spend rows went to the spill file (db busy at exit)")
        # The closed writer stays: rows of streams that end after this go to its spill file.

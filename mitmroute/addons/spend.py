"""Appends every exchange, with tokens and cost, to the DuckDB spend log (`spend_db`), or to
the ledger shared by every proxy when `database_url` names a PostgreSQL database
(mitmroute.spend.lake; `spend_db` then only places the spill files).

Rows are written by a child process of its own (mitmroute.spend.sidecar: DuckDB, its memory
and its flushes stay out of the proxy process), fed by a background thread, so the event loop
never waits on it; `done` (SIGINT, SIGTERM) hands it everything and waits for it before
mitmdump exits, and says where every row went. A proxy killed with SIGKILL loses only the
rows not yet handed over (those of the last ~50 ms): the child writes what it got and exits. A
`spend_db` that can never be written stops start-up like a config error. While the writer holds
`spend_buffer_rows` rows it cannot write (disk full, read-only directory), new requests to
intercepted hosts are answered 503 `ledger_unavailable` (`spend_on_buffer_full: refuse`), or
served with their rows dropped and counted (`drop`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mitmproxy import exceptions, http

from mitmroute import errors
from mitmroute.addons import flows
from mitmroute.addons.guard import fail_closed
from mitmroute.addons.shared import Shared
from mitmroute.config import RouterConfig
from mitmroute.errors import ProxyError
from mitmroute.exchange import Exchange
from mitmroute.spend import SpendDbError, check_writable
from mitmroute.spend.sidecar import SpendSidecar

if TYPE_CHECKING:
    from mitmroute.spend.lake import SharedLedger

log = logging.getLogger("mitmroute")

LEDGER_FULL = ProxyError(
    503,
    "mitmroute: the spend log cannot be written (disk full or read-only) and its buffer is "
    "full; requests are refused until it can be written again (spend_on_buffer_full: refuse)",
    "server_error",
    code="ledger_unavailable",
)


@fail_closed
class SpendLog:
    close_timeout = 10.0
    """Seconds `done` waits for a busy or unwritable file before rows go to the spill file."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.writer: SpendSidecar | None = None
        self.target: tuple[str, SharedLedger | None] | None = None
        """What the writer writes: spend_db, and the shared ledger if any."""
        self.is_running = False
        shared.config_listeners.append(self.config_changed)
        shared.listeners.append(self.record)

    def running(self) -> None:
        self.is_running = True

    def config_changed(self, config: RouterConfig) -> None:
        general = config.general
        path = str(Path(general.spend_db).expanduser())
        try:
            shared = _shared_ledger(general)
            target = (path, shared)
            if self.writer is not None and self.target == target:
                self.writer.max_buffer = general.spend_buffer_rows
                self.writer.on_full = general.spend_on_buffer_full
                return
            check_writable(path)  # the file, or the shared ledger's spill files
            if shared is not None:
                if "://" not in shared.data_path:
                    check_writable(Path(shared.data_path) / ".probe")
                from mitmroute.spend import extensions

                extensions.install_apart()  # in a process of its own: never DuckDB in here
        except _config_errors(general) as e:
            if not self.is_running:  # a proxy that cannot bill would lose every row: don't start
                print(f"mitmroute: {e}", file=sys.stderr)
                raise SystemExit(2) from None
            raise exceptions.OptionsError(f"mitmroute: {e}") from None
        if self.writer is not None:
            self._close()
        options = dict(
            max_buffer=general.spend_buffer_rows,
            on_full=general.spend_on_buffer_full,
            on_drop=self.shared.publish_spend_dropped,
        )
        self.writer = SpendSidecar(path, ledger=shared, **options)
        if shared is None:
            log.info("mitmroute: spend log at %s", path)
        else:
            log.info(
                "mitmroute: spend log shared in %s (data in %s; spill files beside %s)",
                shared.label,
                shared.data_path,
                path,
            )
        self.target = target
        self.writer.start()
        # budgets read what keys spent through the writer: the proxy never loads DuckDB
        self.shared.spend_query = self.writer.query if shared is None else None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flows.GATE_KEY not in flow.metadata:
            return
        writer = self.writer
        if writer is None or writer.on_full != "refuse" or writer.accepting():
            return
        # no spend row: there is no room for one, and that is why the request is refused
        flow.metadata[flows.RECORDED_KEY] = True
        body = errors.render(LEDGER_FULL, flows.dialect(flow))
        flow.response = http.Response.make(503, body, flows.JSON_HEADERS)
        writer.refused()

    def record(self, exchange: Exchange) -> None:
        if self.writer is not None:
            self.writer.record(exchange)

    def done(self) -> None:
        if self.writer is None:
            return
        self._close()
        # The closed writer stays: rows of streams that end after this go to its spill file.

    def _close(self) -> None:
        assert self.writer is not None
        ok = self.writer.close(self.close_timeout)
        log.log(
            logging.INFO if ok else logging.WARNING,
            "mitmroute: spend log closed: %s",
            self.writer.describe(),
        )


def _shared_ledger(general: Any) -> SharedLedger | None:
    """The shared ledger of `general_settings`, or None; lake (and DuckDB) imported only then."""
    if not general.database_url:
        return None
    from mitmroute.spend import lake

    return lake.from_settings(general)


def _config_errors(general: Any) -> tuple[type[Exception], ...]:
    """What makes a spend config unusable (the shared ledger's errors only if it has one)."""
    if not general.database_url:
        return (SpendDbError, OSError)
    from mitmroute.spend import extensions, lake

    return (SpendDbError, OSError, lake.LedgerConfigError, extensions.ExtensionError)

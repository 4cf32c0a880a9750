"""One concise terminal line per routed exchange instead of mitmproxy's raw flow dump.

`--set termlog_verbosity=debug` brings back mitmproxy's connection and flow output.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx

from mitmroute.addons.guard import fail_closed
from mitmroute.addons.shared import Shared
from mitmroute.exchange import Exchange

log = logging.getLogger("mitmroute")
CHATTY_LOGGERS = ("mitmproxy.proxy.server", "mitmproxy.proxy.layers.http")


@fail_closed
class Console:
    def __init__(self, shared: Shared) -> None:
        self.shows_info = True
        self.shows_debug = False
        shared.listeners.append(self.exchange_done)

    def configure(self, updated: set[str]) -> None:
        if "termlog_verbosity" not in updated:
            return
        debug = ctx.options.termlog_verbosity == "debug"
        self.shows_debug = debug
        self.shows_info = ctx.options.termlog_verbosity in ("info", "debug")
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.WARNING)
        if not debug and ctx.options.flow_detail:
            ctx.options.flow_detail = 0

    def exchange_done(self, exchange: Exchange) -> None:
        if not self.shows_info:
            return
        usage = exchange.usage
        tokens = f" {usage.prompt_tokens}+{usage.completion_tokens}tok" if usage else ""
        flags = "".join(
            [
                " stream" if exchange.stream else "",
                " cache" if exchange.cache_hit else "",
                " fallback" if exchange.fallback_used else "",
            ]
        )
        error = f" {exchange.error_type}" if exchange.error_type else ""
        log.info(
            "%s %s -> %s %s %.1fms%s%s%s",
            exchange.request_id[:11],
            exchange.requested_model or "-",
            exchange.deployment or "-",
            exchange.status_code,
            exchange.latency_ms or 0.0,
            tokens,
            flags,
            error,
        )
        if self.shows_debug:
            log.debug("%s attempts: %s", exchange.request_id, exchange.attempts)

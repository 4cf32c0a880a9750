"""Makes mitmproxy connect upstream only when a flow really goes there.

mitmproxy's default `connection_strategy=eager` dials the original host (api.openai.com) on
CONNECT and answers 502 when it can't be reached. Routed requests never go there, so the
router must work without that dial: air-gapped sites, local backends only.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx

from mitmroute.addons.guard import fail_closed

log = logging.getLogger(__name__)


@fail_closed
class LazyConnect:
    def configure(self, updated: set[str]) -> None:
        if "connection_strategy" not in updated or ctx.options.connection_strategy == "lazy":
            return
        log.info("mitmroute: setting connection_strategy=lazy (routed hosts are never dialled)")
        ctx.options.connection_strategy = "lazy"

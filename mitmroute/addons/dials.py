"""An intercepted host is dialled only for an HTTP request: never for a raw relay.

The router answers intercepted requests itself; only a request it passes through (an unknown
model, with `passthrough_unknown_models`) reaches the original host. Whatever else would open a
connection there is refused in `server_connect`, before any byte is sent: a relay with no flow
to refuse (a connection `ignore_hosts` or a `tls_clienthello` addon passes through raw, in a
mode TunnelGuard leaves to mitmproxy), or one a future mitmproxy layer makes. A connection to
an intercepted host is allowed only while an HTTP flow (CONNECT included) is in flight on the
same client connection.
"""

from __future__ import annotations

import logging
from collections import Counter

from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks

from mitmroute.addons.connections import address_host, peer
from mitmroute.addons.guard import fail_closed
from mitmroute.addons.shared import Shared
from mitmroute.hosts import intercepted_hosts

log = logging.getLogger(__name__)

IN_FLIGHT_KEY = "mitmroute.dials.in_flight"


@fail_closed
class DialGuard:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.in_flight: Counter[str] = Counter()
        """client.id -> its HTTP flows (CONNECT included) from request headers to answer."""

    def _intercepted(self, *names: str | None) -> str | None:
        return intercepted_hosts(self.shared.config).match(*names)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.error:
            return
        try:
            host = self._intercepted(address_host(data.server), data.server.sni)
            if host is None or self.in_flight[data.client.id] > 0:
                return
        except Exception:  # fail closed
            log.exception("mitmroute: cannot check a server connection; refusing it")
            host = "(unknown)"
        data.server.error = f"mitmroute: {host} is dialled only for an HTTP request"
        log.warning(
            "mitmroute: refused to dial intercepted host %s for %s: no HTTP request asked for it",
            host,
            peer(data.client),
        )

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._begins(flow)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._begins(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._ends(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ends(flow)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        self._ends(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._ends(flow)

    def client_disconnected(self, client: connection.Client) -> None:
        self.in_flight.pop(client.id, None)

    def _begins(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(IN_FLIGHT_KEY):
            return
        flow.metadata[IN_FLIGHT_KEY] = True
        self.in_flight[flow.client_conn.id] += 1

    def _ends(self, flow: http.HTTPFlow) -> None:
        if not flow.metadata.pop(IN_FLIGHT_KEY, None):
            return
        client_id = flow.client_conn.id
        self.in_flight[client_id] -= 1
        if self.in_flight[client_id] <= 0:
            del self.in_flight[client_id]

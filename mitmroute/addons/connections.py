"""Helpers on mitmproxy connections, and the one place mitmroute reaches past the addon API.

mitmproxy lets an addon refuse a connection only in `client_connected` (`client.error`), and
kill flows, not connections. To close a connection later we use the handler the `proxyserver`
addon keeps per client (`Proxyserver.connections`, keyed by `client.id`) and its
`close_connection`, the same call mitmproxy makes for a layer's `CloseConnection` command.
Its `timeout_watchdog.last_activity` (what `tcp_timeout` measures) tells when bytes last moved.
Both are mitmproxy internals (12.x): if they change, `hang_up` returns False and
`last_activity` None, and callers must cope.
"""

from __future__ import annotations

from mitmproxy import connection, ctx
from mitmproxy.utils import human


def address_host(server: connection.Server) -> str | None:
    """The host name (or IP) the server connection is for, if known."""
    return server.address[0] if server.address else None


def peer(client: connection.Client) -> str:
    return human.format_address(client.peername)


def _handler(client: connection.Client):
    proxyserver = ctx.master.addons.get("proxyserver")
    connections = getattr(proxyserver, "connections", None)
    return connections.get(client.id) if connections is not None else None


def hang_up(client: connection.Client) -> bool:
    """Close a client connection now; True if mitmproxy was told to."""
    try:
        handler = _handler(client)
        if handler is None:
            return False
        handler.close_connection(handler.client)
    except Exception:  # already closing, not started yet, or the internals changed
        return False
    return True


def last_activity(client: connection.Client) -> float | None:
    """`time.time()` of the connection's last event (bytes either way, hooks), if known."""
    watchdog = getattr(_handler(client), "timeout_watchdog", None)
    return getattr(watchdog, "last_activity", None)

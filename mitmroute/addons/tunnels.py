"""Traffic to an intercepted host is parsed as HTTP or refused: never relayed raw.

mitmproxy relays a connection as raw TCP when it can't tell it is HTTP: a client without ALPN
whose first TLS record holds only `PO` of `POST ...` (`rawtcp`), a host in `tcp_hosts`, or one
that `ignore_hosts`/`allow_hosts` leaves alone. For an intercepted host that relay would carry
the app's key to the original host, unrouted. So:

- next_layer: inside a tunnel (CONNECT, SOCKS, transparent) to an intercepted host, TLS is
  always intercepted and what it carries is parsed as HTTP, for the router to answer
  (`ignore_hosts`, `allow_hosts`, `tcp_hosts` and `rawtcp` do not apply to these hosts);
- tcp_start / udp_start: a raw flow to an intercepted host that still appears (a reverse
  `tcp://` mode, raw QUIC) is refused before its server is dialled, and relays no byte.

DialGuard (dials.py) backs this up for relays that have no flow to refuse.
"""

from __future__ import annotations

import contextlib
import logging

from mitmproxy import tcp, udp
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import ClientTLSLayer, HttpLayer, ServerTLSLayer, modes
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.tls import parse_client_hello

from mitmroute.addons.connections import address_host, hang_up, peer
from mitmroute.addons.guard import fail_closed
from mitmroute.addons.shared import Shared
from mitmroute.hosts import intercepted_hosts

log = logging.getLogger(__name__)

REFUSED_KEY = "mitmroute.tunnels.refused"
"""On a raw flow this guard refused: the intercepted host it was headed for."""
MODES_THAT_DECIDE = (modes.HttpProxy, modes.HttpUpstreamProxy, modes.ReverseProxy)


@fail_closed
class TunnelGuard:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def _intercepted(self, *names: str | None) -> str | None:
        return intercepted_hosts(self.shared.config).match(*names)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        if nextlayer.layer is not None or context.client.transport_protocol != "tcp":
            return
        if len(context.layers) == 1 and isinstance(context.layers[0], MODES_THAT_DECIDE):
            return  # the proxy mode says what comes first; its raw flows are refused below
        data = nextlayer.data_client()
        if not data:
            return
        try:
            if self._intercepted(*_destinations(context, data)) is None:
                return
            if starts_like_tls_record(data):
                nextlayer.layer = ServerTLSLayer(context)
                nextlayer.layer.child_layer = ClientTLSLayer(context)
            else:
                nextlayer.layer = HttpLayer(context, HTTPMode.transparent)
        except Exception:  # fail closed
            log.exception("mitmroute: cannot tell where a tunnel goes; closing it")
            hang_up(context.client)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        self._refuse_if_intercepted(flow, "TCP")

    def udp_start(self, flow: udp.UDPFlow) -> None:
        self._refuse_if_intercepted(flow, "UDP")

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        if flow.metadata.get(REFUSED_KEY):
            flow.messages[-1].content = b""

    def udp_message(self, flow: udp.UDPFlow) -> None:
        if flow.metadata.get(REFUSED_KEY):
            flow.messages[-1].content = b""

    def _refuse_if_intercepted(self, flow: tcp.TCPFlow | udp.UDPFlow, kind: str) -> None:
        try:
            server = flow.server_conn
            host = self._intercepted(address_host(server), server.sni, flow.client_conn.sni)
        except Exception:  # fail closed: a flow we cannot place is refused
            log.exception("mitmroute: cannot tell where a raw %s flow goes; refusing it", kind)
            host = "(unknown)"
        if host is None:
            return
        flow.metadata[REFUSED_KEY] = host
        flow.server_conn.error = f"mitmroute: raw {kind} to intercepted host {host} refused"
        if flow.killable:
            flow.kill()
        log.warning(
            "mitmroute: refused raw %s from %s to intercepted host %s: only HTTP is routed there",
            kind,
            peer(flow.client_conn),
            host,
        )
        if flow.server_conn.connected:  # dialled before this flow began: cut the client off
            hang_up(flow.client_conn)


def _destinations(context: Context, data: bytes) -> list[str | None]:
    """Every name the tunnel's destination goes by: address, SNI, a ClientHello on its way."""
    names = [address_host(context.server), context.client.sni, context.server.sni]
    if starts_like_tls_record(data):
        with contextlib.suppress(ValueError):
            if hello := parse_client_hello(data):
                names.append(hello.sni)
    return names

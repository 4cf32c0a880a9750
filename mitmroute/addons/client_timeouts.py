"""Closes client connections that wait too long for their next request.

mitmproxy's `tcp_timeout` (600 s) restarts on every byte, so idle pools and clients sending one
header byte every few seconds hold connections for as long as they like. Two options
(mitmroute/client_deadlines.py says exactly how they count):

  client_idle_timeout    nothing received for this long while no request is in flight
  client_header_timeout  from connect, or the end of the last exchange, to complete headers

An exchange in flight (request headers complete until the answer ends, WebSockets included) is
never cut by these, however long a stream pauses. Connections mitmproxy relays raw (ignored
hosts, `tcp_hosts`, non-HTTP) are left to `tcp_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers import DNSLayer, TCPLayer, UDPLayer

from mitmroute.addons.connections import hang_up, last_activity, peer
from mitmroute.addons.guard import fail_closed
from mitmroute.client_deadlines import DEFAULT_HEADER, DEFAULT_IDLE, Limits, Reason, overdue

log = logging.getLogger(__name__)

BUSY_KEY = "mitmroute.timeouts.busy"
OPTIONS = ("client_idle_timeout", "client_header_timeout")


@dataclass(slots=True)
class Wait:
    client: connection.Client
    since: float
    in_flight: int = 0
    raw: bool = False
    closed: bool = False
    timer: asyncio.TimerHandle | None = None

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


@fail_closed
class ClientTimeouts:
    def __init__(self) -> None:
        self.limits = Limits()
        self.waits: dict[str, Wait] = {}
        """client.id -> its wait, for every open TCP client connection."""

    def load(self, loader) -> None:
        loader.add_option(
            "client_idle_timeout",
            int,
            DEFAULT_IDLE,
            "Seconds a client connection may send nothing while no request is in flight "
            "before it is closed (0: never). A request in flight is never cut.",
        )
        loader.add_option(
            "client_header_timeout",
            int,
            DEFAULT_HEADER,
            "Seconds a client connection has, from connect or the end of its previous "
            "exchange, to complete the headers of its next request, however slowly they "
            "arrive (0: no limit). A request in flight is never cut.",
        )

    def configure(self, updated: set[str]) -> None:
        if not any(name in updated for name in OPTIONS):
            return
        for name in OPTIONS:
            if (value := getattr(ctx.options, name)) < 0:
                raise exceptions.OptionsError(
                    f"{name}: expected seconds >= 0 (0 turns it off), got {value}"
                )
        self.limits = Limits(ctx.options.client_idle_timeout, ctx.options.client_header_timeout)
        for wait in self.waits.values():
            self._check(wait)

    def client_connected(self, client: connection.Client) -> None:
        if client.transport_protocol != "tcp":
            return
        wait = self.waits[client.id] = Wait(client, time.time())
        self._check(wait)

    def client_disconnected(self, client: connection.Client) -> None:
        if wait := self.waits.pop(client.id, None):
            wait.stop_timer()

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        wait = self.waits.get(nextlayer.context.client.id)
        if wait is None or wait.raw:
            return
        try:
            if nextlayer.layer is None and (decider := ctx.master.addons.get("nextlayer")):
                # mitmproxy's NextLayer addon comes after scripts: let it decide now, to see
                # whether it relays this connection raw (it keeps what is set when its turn comes)
                decider.next_layer(nextlayer)
            if _relays_raw(nextlayer.layer):
                wait.raw = True
                wait.stop_timer()
        except Exception:
            log.exception("mitmroute: client timeouts failed; closing the connection")
            hang_up(wait.client)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._begins(flow)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._begins(flow)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        self._begins(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._ends(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ends(flow)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        self._ends(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._ends(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._ends(flow)

    def _begins(self, flow: http.HTTPFlow) -> None:
        wait = self.waits.get(flow.client_conn.id)
        if wait is None or flow.metadata.get(BUSY_KEY):
            return
        flow.metadata[BUSY_KEY] = True
        wait.in_flight += 1
        wait.stop_timer()

    def _ends(self, flow: http.HTTPFlow) -> None:
        wait = self.waits.get(flow.client_conn.id)
        if wait is None or not flow.metadata.pop(BUSY_KEY, None):
            return
        wait.in_flight -= 1
        if wait.in_flight == 0:
            wait.since = time.time()
            self._check(wait)

    def _check(self, wait: Wait) -> None:
        """Close the connection if a limit has passed, else look again when the next one will."""
        wait.stop_timer()
        if wait.raw or wait.in_flight or wait.closed:
            return
        try:
            now = time.time()
            reason, when = overdue(self.limits, wait.since, last_activity(wait.client), now)
            if reason is not None:
                self._close(wait, reason)
            elif when is not None:
                loop = asyncio.get_running_loop()
                wait.timer = loop.call_later(when - now, self._check, wait)
        except Exception:  # fail closed: a connection we cannot time is not kept
            log.exception("mitmroute: client timeouts failed; closing the connection")
            self._close(wait, "header")

    def _close(self, wait: Wait, reason: Reason) -> None:
        wait.closed = True
        limit = self.limits.of(reason)
        if hang_up(wait.client):
            log.info(
                "mitmroute: closed client %s: %s timeout (%gs)", peer(wait.client), reason, limit
            )
        else:
            log.warning(
                "mitmroute: could not close client %s at its %s timeout", peer(wait.client), reason
            )


def _relays_raw(decided: layer.Layer | None) -> bool:
    while decided is not None:
        if isinstance(decided, TCPLayer | UDPLayer | DNSLayer):
            return True
        decided = getattr(decided, "child_layer", None)
    return False

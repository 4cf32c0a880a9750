"""The first and last word on every request to an intercepted host.

`Gate` (first in the chain) decides each request's fate once (see `mitmroute.gate`): it
rewrites the path to its canonical form, refuses what is neither routed, answered nor passed
through by the explicit rule, refuses bodies over `general_settings.max_request_size_mb`
(inflating a compressed body within that limit, never further) and stores its Decision in
`flow.metadata["mitmroute.gate"]` for the addons after it.

`Seal` (last in the chain) checks the outcome: a request to an intercepted host that no addon
answered, routed or let pass is answered 500 instead of going out unrouted, and a flow that
ends without a spend row gets one.
"""

from __future__ import annotations

import logging
import sys

from mitmproxy import ctx, exceptions, http

from mitmroute import errors
from mitmroute.addons import flows
from mitmroute.addons.guard import fail_closed
from mitmroute.addons.shared import Shared
from mitmroute.bodies import decode_body
from mitmroute.config import GeneralSettings, RouterConfig
from mitmroute.errors import ProxyError
from mitmroute.gate import Decision, decide
from mitmroute.request import new_exchange, now_utc

log = logging.getLogger("mitmroute")


@fail_closed
class Gate:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.settings = GeneralSettings()
        self.is_running = False
        shared.config_listeners.append(self.configured)

    def configured(self, config: RouterConfig) -> None:
        self.settings = config.general

    def configure(self, updated: set[str]) -> None:
        if "stream_large_bodies" not in updated or not ctx.options.stream_large_bodies:
            return
        message = (
            f"stream_large_bodies={ctx.options.stream_large_bodies}: mitmroute must read a whole "
            "request before routing it (a streamed body would reach the original host first); "
            "general_settings.max_request_size_mb caps request bodies instead"
        )
        if not self.is_running:
            print(f"mitmroute: {message}", file=sys.stderr)
            raise SystemExit(2)
        raise exceptions.OptionsError(message)

    def running(self) -> None:
        self.is_running = True

    def intercepts(self, flow: http.HTTPFlow) -> bool:
        return not flows.target_hosts(flow).isdisjoint(self.settings.intercept_hosts)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not self.intercepts(flow):
            return
        request = flow.request
        decision = decide(
            request.method,
            request.path,
            flows.canonical_host(request.host),
            websocket=request.headers.get("upgrade", "").lower() == "websocket",
            passthrough_paths=self.settings.passthrough_paths,
        )
        flow.metadata[flows.GATE_KEY] = decision
        request.stream = False  # the whole body is read before anything is decided
        if decision.path != request.path:
            request.path = decision.path
        if decision.error is not None:
            self._refuse(flow, decision, decision.error)
            return
        limit = self.settings.max_request_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            self._refuse(flow, decision, errors.body_too_large(limit))

    def request(self, flow: http.HTTPFlow) -> None:
        decision: Decision | None = flow.metadata.get(flows.GATE_KEY)
        if flow.response or flow.error or not flow.live or decision is None:
            return
        request = flow.request
        raw = request.raw_content or b""
        encoding = request.headers.get("content-encoding", "")
        try:
            body = decode_body(raw, encoding, self.settings.max_request_bytes)
        except ProxyError as e:
            self._refuse(flow, decision, e)
            return
        if encoding:
            del request.headers["content-encoding"]
            request.content = body  # content-length follows

    def _refuse(self, flow: http.HTTPFlow, decision: Decision, error: ProxyError) -> None:
        log.info(
            "mitmroute: %d %s %s %s",
            error.status,
            error.code,
            flow.request.method,
            decision.path.split("?", 1)[0][:200],
        )
        flows.refuse(flow, error, self.shared)


@fail_closed
class Seal:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def request(self, flow: http.HTTPFlow) -> None:
        decision: Decision | None = flow.metadata.get(flows.GATE_KEY)
        if decision is None or flow.response or flow.error or not flow.live:
            return
        if flow.metadata.get(flows.RELAY_KEY):
            return  # a stream: routed, or passed through by the rule, from the relay
        log.error(
            "mitmroute: %s %s was left unrouted by every addon: answered 500",
            flow.request.method,
            decision.path.split("?", 1)[0][:200],
        )
        flows.refuse(
            flow, errors.internal_error("mitmroute internal error: not routed"), self.shared
        )

    def response(self, flow: http.HTTPFlow) -> None:
        self._record_if_missing(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record_if_missing(flow)

    def _record_if_missing(self, flow: http.HTTPFlow) -> None:
        """A flow to an intercepted host that ends with no spend row gets a plain one."""
        decision: Decision | None = flow.metadata.get(flows.GATE_KEY)
        if decision is None or flow.metadata.get(flows.RECORDED_KEY):
            return
        flow.metadata[flows.RECORDED_KEY] = True
        exchange = new_exchange(flows.client_request(flow), decision.endpoint)
        exchange.status_code = flow.response.status_code if flow.response else 502
        if flow.error is not None or exchange.status_code >= 400:
            exchange.error_type = "proxy_answer" if flow.error is None else "client_error"
        exchange.ended_at = now_utc()
        exchange.latency_ms = 0.0
        if flow.response is not None and flow.response.timestamp_end:
            exchange.latency_ms = (flow.response.timestamp_end - flow.request.timestamp_start) * 1e3
        self.shared.publish_exchange(exchange)

"""What the addons share about a flow: metadata keys, the engine's view of a request, and
answering a request with an error in the client's own API shape."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mitmproxy import http

from mitmroute import errors
from mitmroute.errors import ProxyError
from mitmroute.gate import Decision, canonical_host, dialect_of
from mitmroute.request import ClientRequest, refused_exchange

if TYPE_CHECKING:
    from mitmroute.addons.shared import Shared

log = logging.getLogger("mitmroute")

GATE_KEY = "mitmroute.gate"
"""The gate's Decision: present on every flow to an intercepted host."""
IDENTITY_KEY = "mitmroute.identity"
EXCHANGE_KEY = "mitmroute.exchange"
RELAY_KEY = "mitmroute.relay"
RECORDED_KEY = "mitmroute.recorded"
"""Set once the flow's spend row is on its way: every intercepted flow gets exactly one."""
JSON_HEADERS = {"content-type": "application/json"}


def target_hosts(flow: http.HTTPFlow) -> set[str]:
    """Every name the flow may be bound for: the request's host, its Host header, the SNI."""
    names = {flow.request.host, flow.request.host_header or ""}
    if flow.client_conn.sni:
        names.add(flow.client_conn.sni)
    if flow.server_conn.address:
        names.add(str(flow.server_conn.address[0]))
    return {canonical_host(n.rsplit(":", 1)[0] if n.count(":") == 1 else n) for n in names if n}


def client_request(flow: http.HTTPFlow) -> ClientRequest:
    """The engine's view of a flow. The body is read raw: the gate has already decoded it."""
    return ClientRequest(
        method=flow.request.method,
        path=flow.request.path,
        headers=header_dict(flow.request.headers),
        body=flow.request.raw_content or b"",
        identity=flow.metadata.get(IDENTITY_KEY, {}),
        scheme=flow.request.scheme,
        host=canonical_host(flow.request.host),
        port=flow.request.port,
    )


def header_dict(headers: http.Headers) -> dict[str, str]:
    """`{name.lower(): value}`, a repeated name's values folded with ", " as `Headers` does,
    in one pass over the raw fields (`Headers.items()` rescans all of them for every name)."""
    grouped: dict[bytes, tuple[bytes, list[bytes]]] = {}
    for name, value in headers.fields:
        key = name.lower()
        if key in grouped:
            grouped[key][1].append(value)
        else:
            grouped[key] = (name, [value])
    return {
        name.decode("utf-8", "surrogateescape").lower(): ", ".join(
            [v.decode("utf-8", "surrogateescape") for v in values]
        )
        for name, values in grouped.values()
    }


def dialect(flow: http.HTTPFlow) -> str:
    decision: Decision | None = flow.metadata.get(GATE_KEY)
    return decision.dialect if decision is not None else dialect_of(flow.request.host)


def refuse(flow: http.HTTPFlow, error: ProxyError, shared: Shared | None) -> None:
    """Answer the flow with `error` in its client's API shape, and log it as a spend row."""
    headers = record_refusal(flow, error, shared)
    flow.response = http.Response.make(error.status, errors.render(error, dialect(flow)), headers)


def record_refusal(
    flow: http.HTTPFlow,
    error: ProxyError,
    shared: Shared | None,
    request: ClientRequest | None = None,
) -> dict[str, str]:
    """Log `error` as the flow's spend row unless it has one; the headers of its answer.
    `request`: the engine's view of the flow when the flow itself was since rewritten."""
    headers = {**JSON_HEADERS, **error.headers}
    if shared is not None and not flow.metadata.get(RECORDED_KEY):
        try:
            exchange = refused_exchange(request or client_request(flow), error)
            headers["x-mitmroute-request-id"] = exchange.request_id
            flow.metadata[RECORDED_KEY] = True
            shared.publish_exchange(exchange)
        except Exception:  # the answer matters more than the row; say so loudly
            log.exception("mitmroute: could not record a refused request")
    return headers

"""A test-only mitmdump script, loaded after addons/router.py: it records what real clients send
and keeps every test on loopback.

`mitmdump -s addons/router.py -s tests/clients/capture.py --set capture_file=requests.jsonl`

* `capture_file`: one JSON line per event: every HTTP request (host, method, path, headers with
  credentials masked, the body's JSON keys and the body itself, the gate's decision, the status
  answered), every CONNECT and every TLS handshake a client broke off (a CA it doesn't trust).
* Loopback only: a server connection to anything but 127.0.0.0/8 or ::1 is refused in
  `server_connect`, before DNS or any byte; the client gets mitmproxy's 502 at once. Whatever a
  client sends elsewhere (telemetry, Claude Code's `/api/...` calls passed through to
  api.anthropic.com) fails fast instead of leaving the machine or hanging a test.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from pathlib import Path
from typing import Any

from mitmproxy import ctx, http, tls
from mitmproxy.proxy import server_hooks

SECRET_HEADERS = frozenset(
    {"authorization", "x-api-key", "api-key", "cookie", "proxy-authorization"}
)
BODY_LIMIT = 256 * 1024
"""Bodies larger than this are recorded by their keys only."""


def masked(name: str, value: str) -> str:
    if name.lower() not in SECRET_HEADERS:
        return value
    return value[:12] + "..." if len(value) > 12 else "..."


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower().rstrip(".") == "localhost"


class Capture:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.refused_dials = 0

    def load(self, loader: Any) -> None:
        loader.add_option("capture_file", str, "", "JSON lines file recording every request")

    def _write(self, record: dict[str, Any]) -> None:
        if not ctx.options.capture_file:
            return
        record["t"] = round(time.time(), 3)
        line = json.dumps(record, default=str) + "\n"
        with self._lock, open(ctx.options.capture_file, "a", encoding="utf-8") as f:
            f.write(line)

    def running(self) -> None:
        """Go first. Hooks run in load order, and mitmdump loads `-s` scripts in command-line
        order, after addons/router.py (tests/conftest.py's Proxy puts it first): this script
        moves itself to the head of the script loader's list, so its `request` hook sees a
        request as the client sent it, before the gate canonicalizes its path and the router
        points a streamed one at its relay. test_capture_sees_requests_before_the_router
        checks that this still holds."""
        loader = ctx.master.addons.get("scriptloader")
        here = Path(__file__).resolve()
        mine = [s for s in loader.addons if Path(s.path).resolve() == here]
        loader.addons[:] = mine + [s for s in loader.addons if s not in mine]

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.error:
            return
        host = data.server.address[0] if data.server.address else None
        if is_loopback(host):
            return
        data.server.error = f"capture.py: tests dial loopback only, not {host}"
        self.refused_dials += 1
        self._write({"event": "refused_dial", "host": host, "sni": data.server.sni})

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._write({"event": "connect", "host": flow.request.host, "port": flow.request.port})

    def tls_failed_client(self, data: tls.TlsData) -> None:
        self._write(
            {"event": "tls_failed", "sni": data.context.client.sni, "error": data.conn.error}
        )

    def request(self, flow: http.HTTPFlow) -> None:
        flow.metadata["capture.request"] = self._request_record(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._done(flow, status=flow.response.status_code if flow.response else None)

    def error(self, flow: http.HTTPFlow) -> None:
        self._done(flow, status=None, error=str(flow.error))

    def _done(self, flow: http.HTTPFlow, **outcome: Any) -> None:
        record = flow.metadata.pop("capture.request", None) or self._request_record(flow)
        record.update(outcome)
        record["fate"] = getattr(flow.metadata.get("mitmroute.gate"), "fate", None)
        answer = flow.response
        if answer is not None and answer.status_code >= 400 and not answer.stream:
            record["answer"] = (answer.get_text(strict=False) or "")[:500]
        self._write(record)

    def _request_record(self, flow: http.HTTPFlow) -> dict[str, Any]:
        req = flow.request
        body: Any = None
        raw = req.get_content(strict=False) or b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = {"_not_json": len(raw)}
        record: dict[str, Any] = {
            "event": "request",
            "method": req.method,
            "host": req.pretty_host,
            "path": req.path,
            "http_version": req.http_version,
            "headers": [[k, masked(k, v)] for k, v in req.headers.items(multi=True)],
            "body_keys": sorted(body) if isinstance(body, dict) else None,
            "body_size": len(raw),
        }
        if len(raw) <= BODY_LIMIT:
            record["body"] = body
        return record


addons = [Capture()]

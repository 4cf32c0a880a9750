"""The benchmark's floor: a bare mitmdump addon that only points api.openai.com at a backend.

No routing, no parsing, no spend log: the request goes on as the client wrote it, to
`bench_upstream` over plain HTTP, and event streams are streamed. Used by `scripts/bench.py`:

    mitmdump -s scripts/bench_rewrite_addon.py --set bench_upstream=http://127.0.0.1:8000 \
        --set connection_strategy=lazy
"""

from __future__ import annotations

from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http

INTERCEPTED = "api.openai.com"


class Rewrite:
    def __init__(self) -> None:
        self.scheme, self.host, self.port = "http", "127.0.0.1", 80

    def load(self, loader) -> None:
        loader.add_option("bench_upstream", str, "", "Where api.openai.com requests go.")

    def configure(self, updated: set[str]) -> None:
        if "bench_upstream" not in updated or not ctx.options.bench_upstream:
            return
        url = urlsplit(ctx.options.bench_upstream)
        if url.scheme not in {"http", "https"} or not url.hostname:
            raise exceptions.OptionsError(f"bench_upstream: not a URL: {url.geturl()!r}")
        self.scheme, self.host = url.scheme, url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.request.host != INTERCEPTED:
            return
        flow.request.scheme = self.scheme
        flow.request.host = self.host
        flow.request.port = self.port

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.response.headers.get("content-type", "").startswith(
            "text/event-stream"
        ):
            flow.response.stream = True


addons = [Rewrite()]

"""The passthrough rule's one road to an original host: the proxy's own pooled HTTP session.

A request the gate lets pass (a path under `passthrough_paths`, or an unlisted model with
`passthrough_unknown_models`) is sent on by mitmroute itself, not by mitmproxy, so that:
- the answer streams through unchanged (status, headers, raw body, content-encoding kept), and
  its usage, status, size and latency become the exchange's spend row;
- an original host that can't be reached answers the client in its own API shape (502
  `upstream_unreachable`, 504 `upstream_timeout`), never as mitmproxy's HTML error page.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from mitmroute import errors
from mitmroute.exchange import Usage
from mitmroute.request import ClientRequest
from mitmroute.streaming.tap import PassthroughTap

HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length",
    }
)  # fmt: skip
USAGE_BODY_LIMIT = 1024 * 1024
"""A JSON answer up to this size is also parsed for its usage; larger ones only flow through."""
CONNECT_TIMEOUT = 10.0

Finish = Callable[[int, Usage | None, bytes | None, str | None], None]
"""Called once when the answer has been relayed: (status, usage read off a stream, the whole
body when it was a small JSON answer, error type)."""


@dataclass(slots=True)
class Forwarded:
    status: int
    headers: dict[str, str]
    body: AsyncIterator[bytes]


class Passthrough:
    """One pooled session to the original hosts of intercepted traffic."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def forward(
        self, request: ClientRequest, tap: PassthroughTap, first_byte: float, finish: Finish
    ) -> Forwarded:
        """Send `request` to the host it was addressed to and open the answer.

        Raises ProxyError (502/504) when the host can't be reached or doesn't answer within
        `first_byte` seconds; `finish` is then not called (the caller logs the failure).
        """
        await self.start()
        assert self.session is not None
        default_port = (request.scheme, request.port) in (("https", 443), ("http", 80))
        port = "" if default_port else f":{request.port}"
        url = f"{request.scheme}://{request.host}{port}{request.path}"
        headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP}
        try:
            async with asyncio.timeout(first_byte):
                resp = await self.session.request(
                    request.method, URL(url, encoded=True), headers=headers,
                    data=request.body or None, allow_redirects=False,
                )  # fmt: skip
        except TimeoutError:
            raise errors.upstream_timeout(
                f"{request.host} did not answer within {first_byte:.0f}s (passed through)"
            ) from None
        except aiohttp.ClientError as e:
            raise errors.upstream_unreachable(
                f"{request.host} could not be reached (passed through): {type(e).__name__}"
            ) from None
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
        return Forwarded(resp.status, out_headers, _relay(resp, tap, finish))


async def _relay(
    resp: aiohttp.ClientResponse, tap: PassthroughTap, finish: Finish
) -> AsyncIterator[bytes]:
    content_type = resp.headers.get("content-type", "")
    sse = "event-stream" in content_type
    plain_json = "json" in content_type and not resp.headers.get("content-encoding")
    kept = bytearray() if plain_json else None
    error = None
    try:
        async for data in resp.content.iter_any():
            if sse:
                tap.observe(data)
            elif kept is not None:
                kept += data
                if len(kept) > USAGE_BODY_LIMIT:
                    kept = None
            yield data
    except (aiohttp.ClientError, TimeoutError) as e:
        error = f"passthrough_broken: {type(e).__name__}"
    except (GeneratorExit, asyncio.CancelledError):
        error = "client_closed"
        raise
    finally:
        resp.close()
        if sse:
            tap.observe(b"")
        finish(resp.status, tap.usage, bytes(kept) if kept else None, error)

"""A stand-in for the original host (api.openai.com): answers anything and records it all.

Tests point `intercept_hosts` at 127.0.0.1 and send plain-HTTP requests to this server
through the proxy: whatever reaches it went out unrouted.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Origin:
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None

    async def _any(self, request: web.Request) -> web.Response:
        self.seen.append(
            Seen(request.method, request.raw_path, dict(request.headers), await request.read())
        )
        body = {"object": "origin", "path": request.raw_path}
        return web.json_response(body, headers={"x-origin": "1"})

    def start(self) -> str:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._any)
            self._runner = web.AppRunner(app, access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            port = self._runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self.url

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @staticmethod
    def describe(seen: list[Seen]) -> str:
        return json.dumps([(s.method, s.path) for s in seen])

"""Routes intercepted OpenAI API requests to the backends `router_config` names.

Non-streamed answers are made here and set as `flow.response`, so the original host is never
contacted. A request that asks for a stream is pointed at the in-process relay at once, before
the backend answers: the relay waits for the answer the engine makes meanwhile (a stream, or a
whole body such as an error) and `responseheaders` then switches mitmproxy to streaming so
chunks flow through as they come. Any failure answers the client with an error in its own
API shape: a request is never forwarded unrouted.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys

from mitmproxy import ctx, exceptions, http

from mitmroute import errors
from mitmroute.addons import flows
from mitmroute.addons.flows import (
    EXCHANGE_KEY,
    GATE_KEY,
    IDENTITY_KEY,
    RECORDED_KEY,
    RELAY_KEY,
)
from mitmroute.addons.guard import fail_closed
from mitmroute.addons.shared import Shared
from mitmroute.config import ConfigError, default_config_path, load_config
from mitmroute.engine import Engine
from mitmroute.errors import ProxyError
from mitmroute.exchange import Usage
from mitmroute.inbound import inbound_for
from mitmroute.passthrough import Passthrough
from mitmroute.request import JSON_HEADERS, ClientRequest, Reply
from mitmroute.spend.tokens import warm_up
from mitmroute.streaming.relay import Outcome, RelayedAnswer, StreamRelay
from mitmroute.streaming.tap import PassthroughTap

log = logging.getLogger("mitmroute")

__all__ = ["EXCHANGE_KEY", "IDENTITY_KEY", "RELAY_KEY", "Router"]
RETIRE_GRACE = 120.0
"""Seconds a replaced engine keeps its upstream session for requests in flight."""
STREAM_ASKED = re.compile(rb'"stream"\s*:\s*true')
"""A body that may ask for a stream, read without parsing it (the engine parses it once). A
false positive (the words in a message) only sends a whole answer through the relay."""


@fail_closed
class Router:
    def __init__(self, shared: Shared | None = None) -> None:
        self.shared = shared or Shared()
        self.engine: Engine | None = None
        self.relay = StreamRelay()
        self.passthrough = Passthrough()
        self.is_running = False
        self.loaded_from: str | None = None
        self.retired: set[Engine] = set()
        """Engines replaced by a config reload, still serving their requests in flight."""

    def load(self, loader) -> None:
        loader.add_option(
            "router_config",
            str,
            "",
            "mitmroute config.yaml (LiteLLM schema). Default: ./config.yaml when present, "
            "else the built-in defaults.",
        )

    def configure(self, updated: set[str]) -> None:
        if self.engine is not None and "router_config" not in updated:
            return
        path = ctx.options.router_config or default_config_path()
        if self.engine is not None and path == self.loaded_from:
            return  # mitmdump announces every option once more at start-up
        try:
            config = load_config(path)
        except ConfigError as e:
            if not self.is_running:
                # A proxy without its routes would forward everything unrouted: refuse to start.
                print(f"mitmroute: config error: {e}", file=sys.stderr)
                raise SystemExit(2) from None
            raise exceptions.OptionsError(f"mitmroute: {e}") from None
        old = self.engine
        self.loaded_from = path
        self.engine = Engine(config)
        self.engine.listeners.append(self.shared.publish_exchange)
        self.engine.cooldowns.listeners.append(self.shared.publish_cooldown)
        self.shared.publish_config(config)
        log.info(
            "mitmroute: %d deployments in %d groups from %s",
            len(config.deployments),
            len(self.engine.groups),
            config.source,
        )
        if self.is_running:
            ctx.master.event_loop.create_task(self._swap(old))  # type: ignore[attr-defined]

    async def _swap(self, old: Engine | None) -> None:
        """Start the new engine; let the old one finish what it is serving, then close it."""
        assert self.engine is not None
        await self.engine.start()
        if old is None:
            return
        self.retired.add(old)
        await asyncio.sleep(RETIRE_GRACE)
        if old in self.retired:
            self.retired.discard(old)
            await old.close()

    async def running(self) -> None:
        self.is_running = True
        # the tokenizer's first load reads a file: do it now, off the event loop
        asyncio.get_running_loop().run_in_executor(None, warm_up)
        await self.relay.start()
        if self.engine is not None:
            await self.engine.start()

    async def done(self) -> None:
        await self.relay.close()
        await self.passthrough.close()
        for engine in [self.engine, *self.retired]:
            if engine is not None:
                await engine.close()
        self.retired.clear()

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or GATE_KEY not in flow.metadata:
            return
        engine = self.engine
        if engine is None:
            return  # no config: the Seal answers 500, nothing goes out unrouted
        request = flows.client_request(flow)
        dialect = flows.dialect(flow)
        if STREAM_ASKED.search(request.body) is None:
            reply = await self._reply(flow, engine, request, dialect)
            flow.metadata[EXCHANGE_KEY] = reply.exchange
            if reply.stream is None:
                flow.response = http.Response.make(reply.status, reply.body, reply.headers)
            else:
                await self._relay(flow, _relayed(reply))
            return
        # A stream, likely: point the flow at the relay now and let the relay wait for the
        # answer, so that mitmproxy's request to it overlaps the backend call.
        flow.metadata[RECORDED_KEY] = True  # the task logs the one row, whatever happens
        loop = asyncio.get_running_loop()
        task = asyncio.Task(
            self._answer(flow, engine, request, dialect), loop=loop, eager_start=True
        )
        if task.done() and (answer := task.result()).chunks is None:
            # answered without waiting (refused, a cached answer): no need for the relay
            flow.response = http.Response.make(answer.status, answer.body, answer.headers)
            return
        await self._relay(flow, task)

    async def _answer(
        self, flow: http.HTTPFlow, engine: Engine, request: ClientRequest, dialect: str
    ) -> RelayedAnswer:
        """The relay's answer to a flow pointed at it before the engine answered. Every
        failure is answered in the client's dialect; cancelled (its client went away), every
        layer below logs its exchange as `client_disconnected`."""
        try:
            reply = await self._reply(flow, engine, request, dialect)
        except Exception as e:  # fail closed, as @fail_closed does for the hook itself
            log.error("mitmroute: Router.request failed: %r", e, exc_info=e)
            error = errors.internal_error(f"mitmroute internal error in Router.request: {e!r}")
            if flow.metadata.get(EXCHANGE_KEY) is None:
                flow.metadata.pop(RECORDED_KEY, None)  # no exchange yet: this is its row
                headers = flows.record_refusal(flow, error, self.shared, request)
            else:
                headers = {**JSON_HEADERS, **error.headers}
            return RelayedAnswer(error.status, headers, body=errors.render(error, dialect))
        if reply.exchange is None:
            flow.metadata.pop(RECORDED_KEY, None)  # nothing logged it: the Seal will
        flow.metadata[EXCHANGE_KEY] = reply.exchange
        return _relayed(reply)

    async def _reply(
        self, flow: http.HTTPFlow, engine: Engine, request: ClientRequest, dialect: str
    ) -> Reply:
        """The engine's answer in the client's dialect; passed through when it says so."""
        reply = await inbound_for(request.path).handle(engine, request)
        if reply.exchange is not None:
            flow.metadata[RECORDED_KEY] = True
            flow.metadata[EXCHANGE_KEY] = reply.exchange
        if reply.passthrough:
            reply = await self._pass_through(engine, request, reply, dialect)
        return reply

    async def _pass_through(
        self, engine: Engine, request: ClientRequest, reply: Reply, dialect: str
    ) -> Reply:
        """The passthrough rule: the proxy sends the request on to its original host itself."""
        exchange = reply.exchange
        assert exchange is not None

        def finish(status: int, usage: Usage | None, body: bytes | None, error: str | None) -> None:
            exchange.error_type = error or exchange.error_type
            engine.finish_passthrough(exchange, status, body, usage)

        timeout = engine.config.router.timeout
        try:
            tap = PassthroughTap(exchange)
            forwarded = await self.passthrough.forward(request, tap, timeout, finish)
        except asyncio.CancelledError:  # the client went away: its row says so
            gone = errors.client_disconnected()
            exchange.error_type = gone.code
            engine.finish_passthrough(exchange, gone.status, None, None)
            raise
        except ProxyError as e:
            exchange.error_type = e.code
            engine.finish_passthrough(exchange, e.status, None, None)
            headers = {**JSON_HEADERS, "x-mitmroute-request-id": exchange.request_id}
            return Reply(e.status, headers, errors.render(e, dialect), exchange=exchange)
        headers = {**forwarded.headers, "x-mitmroute-request-id": exchange.request_id}
        return Reply(forwarded.status, headers, stream=forwarded.body, exchange=exchange)

    async def _relay(self, flow: http.HTTPFlow, outcome: Outcome) -> None:
        """Point the flow at the relay, which answers it with `outcome`."""
        await self.relay.start()
        path = self.relay.register(outcome)
        flow.metadata[RELAY_KEY] = path
        flow.request.scheme = "http"
        flow.request.host = "127.0.0.1"
        flow.request.port = self.relay.port
        flow.request.path = path
        flow.request.content = b""

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.metadata.get(RELAY_KEY):
            flow.response.stream = True

    async def error(self, flow: http.HTTPFlow) -> None:
        if path := flow.metadata.pop(RELAY_KEY, None):
            await self.relay.abandon(path)


def _relayed(reply: Reply) -> RelayedAnswer:
    return RelayedAnswer(reply.status, reply.headers, reply.stream, reply.body)

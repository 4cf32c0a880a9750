"""Checks who is calling before the Router calls anything upstream.

With ``general_settings.master_key`` set, every request to an intercepted host needs
``Authorization: Bearer <master key or virtual key>`` (or, as Anthropic's clients send it,
``x-api-key: <key>``); anything else is answered 401 here. The
key API (``/key/*``) is answered here too. A virtual key is then held to its ``models``, budget
and rpm/tpm limits (403 / 429 answered here), and its request carries
``flow.metadata["mitmroute.identity"]`` (api_key_hash, key_alias, team) on to the Router. The
client's Authorization and x-api-key headers are removed: a proxy key never goes upstream.
Budget reserved on admission is settled with the exchange's real cost in the ``response`` /
``error`` hook, or when the exchange finishes if that comes later (a stream). Without a master
key the proxy stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mitmproxy import http

from mitmroute.addons import flows
from mitmroute.addons.flows import GATE_KEY
from mitmroute.addons.guard import fail_closed
from mitmroute.addons.router import EXCHANGE_KEY, IDENTITY_KEY
from mitmroute.addons.shared import Shared
from mitmroute.auth import AuthBackend, KeyStoreUnavailable, RedisDown, location, open_backend
from mitmroute.auth.key_api import Caller, KeyAdmin, handle, key_route
from mitmroute.auth.keys import KeyRecord, abbreviate, keys_db_path
from mitmroute.auth.limits import (
    CostEstimator,
    Policy,
    Reservation,
    Verdict,
    nanos_to_usd,
    usd_to_nanos,
)
from mitmroute.bodies import parse_json_object
from mitmroute.config import RouterConfig
from mitmroute.errors import ProxyError
from mitmroute.exchange import Exchange
from mitmroute.request import ROUTED_ENDPOINTS, client_key, endpoint_of, hash_key

log = logging.getLogger("mitmroute.auth")

RESERVATION_KEY = "mitmroute.reservation"
JSON = {"content-type": "application/json"}
KEY_HEADERS = ("authorization", "x-api-key")
MODEL_ENDPOINTS = frozenset({*ROUTED_ENDPOINTS, "messages"})
"""Endpoints held to a key's models, budget and limits."""
COUNTING_ENDPOINTS = frozenset({"messages/count_tokens"})
"""Endpoints held to a key's models only (they cost nothing)."""


def invalid_key(message: str) -> ProxyError:
    return ProxyError(401, message, "invalid_request_error", code="invalid_api_key")


def unavailable() -> ProxyError:
    return ProxyError(503, "The proxy's key store is unavailable", "server_error",
                      code="auth_unavailable")  # fmt: skip


def no_master_key() -> ProxyError:
    return ProxyError(403, "The key API needs general_settings.master_key", "permission_error",
                      code="master_key_not_set")  # fmt: skip


def model_denied(model: str, record: KeyRecord) -> ProxyError:
    return ProxyError(403, f"This key is not allowed to use model `{model}`. It may use: "
                      f"{', '.join(record.models)}.", "invalid_request_error",
                      code="key_model_access_denied", param="model")  # fmt: skip


def rejection(verdict: Verdict, record: KeyRecord) -> ProxyError:
    """The 429 for a request the limiter turned away."""
    name = record.key_alias or record.key_name
    policy = verdict.policy
    if verdict.reason == "budget":
        assert policy.max_budget is not None
        reset = policy.reset_at(verdict.now)
        when = (f" It resets at {datetime.fromtimestamp(reset, UTC).isoformat()}."
                if reset else "")  # fmt: skip
        spent, held = nanos_to_usd(verdict.spent), nanos_to_usd(verdict.reserved)
        return ProxyError(429, f"Budget has been exceeded for key {name}: spend ${spent:.6f} "
                          f"(+${held:.6f} in flight) of max budget "
                          f"${nanos_to_usd(policy.max_budget):.6f}.{when}",
                          "budget_exceeded", code="insufficient_quota",
                          headers={"x-should-retry": "false"})  # fmt: skip
    if verdict.reason == "rpm":
        what, limit, used = "requests per min (RPM)", policy.rpm, verdict.requests
    else:
        what, limit, used = "tokens per min (TPM)", policy.tpm, verdict.tokens
    return ProxyError(429, f"Rate limit reached for key {name} on {what}: Limit {limit}, Used "
                      f"{used}. Please try again in {verdict.headers()['retry-after']}s.",
                      "requests" if verdict.reason == "rpm" else "tokens",
                      code="rate_limit_exceeded", headers=verdict.headers())  # fmt: skip


@dataclass(slots=True)
class _State:
    config: RouterConfig
    master_hash: str | None
    backend: AuthBackend | None
    admin: KeyAdmin | None
    estimator: CostEstimator | None


@fail_closed
class KeyAuth:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.state: _State | None = None
        self.pending: dict[str, tuple[float, Reservation]] = {}
        """Reservations whose exchange was still running when the flow ended."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self.is_running = False
        shared.config_listeners.append(self.configured)
        shared.listeners.append(self.exchange_done)

    # --- configuration --------------------------------------------------------------------

    def configured(self, config: RouterConfig) -> None:
        old, master = self.state, config.general.master_key
        backend = old.backend if old is not None else None
        keys_file = None
        if (
            old is not None
            and backend is not None
            and (master is None or location(old.config) != location(config))
        ):
            if master is not None:  # the keys file goes on to the next backend
                keys_file = backend.release_db(keys_db_path(config.general.spend_db))
            self._spawn(backend.close())
            backend = None
        if master is not None and backend is None:
            try:
                backend = open_backend(config, keys_file, lambda: self.shared.spend_query)
                log.info("auth: master key set; virtual keys in %s", backend.where)
            except KeyStoreUnavailable as e:
                if not self.is_running:  # the store of record is not there: don't start
                    print(f"mitmroute: cannot open the key store: {e}", file=sys.stderr)
                    raise SystemExit(2) from None
                log.error("auth: cannot open the key store: %s", e)
            except Exception as e:  # fail closed: keyed requests are answered 503
                log.error("auth: cannot open the key store: %s", e)
        if backend is not None:
            backend.set_policy(config.general)
            with contextlib.suppress(RuntimeError):  # no loop yet: `running` starts it
                backend.start()
        self.state = _State(
            config, hash_key(master) if master else None, backend,
            KeyAdmin(backend.store, backend.limiter, config.general) if backend else None,
            CostEstimator(config) if backend else None,
        )  # fmt: skip

    def running(self) -> None:
        self.is_running = True
        if self.state is not None and self.state.backend is not None:
            self.state.backend.start()

    async def done(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.state is not None and self.state.backend is not None:
            await self.state.backend.close()

    # --- requests -------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        state = self.state
        if state is None or GATE_KEY not in flow.metadata:
            return  # not an intercepted host (the Gate decides that, for every addon)
        route = key_route(flow.request.path)
        if state.master_hash is None:
            if route is not None:
                self._reply(flow, no_master_key())
            return
        try:
            await self._authenticate(flow, state, route)
        except ProxyError as e:
            log.info("auth: %d %s %s %s", e.status, e.code, flow.request.method,
                     flow.request.path.split("?", 1)[0])  # fmt: skip
            self._reply(flow, e)
        except (RedisDown, KeyStoreUnavailable) as e:  # fail closed; logged where it is seen
            log.debug("auth: %s", e)
            self._reply(flow, unavailable())
        except Exception as e:  # fail closed
            log.warning("auth: key store failed: %s: %s", type(e).__name__, e)
            self._reply(flow, unavailable())
        finally:
            if flow.response is None and IDENTITY_KEY not in flow.metadata and route is None:
                # neither answered nor authenticated: never let it go on unauthenticated
                self._reply(flow, unavailable())

    async def _authenticate(self, flow: http.HTTPFlow, state: _State, route: str | None) -> None:
        assert state.master_hash is not None
        presented = client_key({name: flow.request.headers.get(name, "") for name in KEY_HEADERS})
        if presented is None:
            raise invalid_key(
                "Missing API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`) "
                "with the proxy's master key or a virtual key."
            )
        token = hash_key(presented)
        is_master = hmac.compare_digest(token, state.master_hash)
        record = None
        if not is_master:
            if state.admin is None:
                raise unavailable()
            record = await state.admin.store.get(token)
            now = datetime.now(UTC)
            if record is None:
                raise invalid_key(f"Incorrect API key provided: {abbreviate(presented)}.")
            if record.expires is not None and record.expired(now):
                expired = record.expires.isoformat()
                raise invalid_key(f"API key {record.key_name} expired at {expired}.")
            if record.blocked:
                raise invalid_key(f"API key {record.key_name} is blocked.")
        if route is not None:
            if state.admin is None:
                raise unavailable()
            status, body = await handle(state.admin, flow.request.method, flow.request.path,
                                        flow.request.get_content(strict=False) or b"",
                                        Caller(is_master, record))  # fmt: skip
            flow.response = http.Response.make(status, json.dumps(body).encode(), JSON)
            return
        for name in KEY_HEADERS:
            flow.request.headers.pop(name, None)
        if record is None:
            flow.metadata[IDENTITY_KEY] = {"api_key_hash": token, "key_alias": None,
                                           "team": None}  # fmt: skip
            return
        flow.metadata[IDENTITY_KEY] = {"api_key_hash": token, "key_alias": record.key_alias,
                                       "team": record.team, "user_id": record.user_id}  # fmt: skip
        await self._enforce(flow, state, record)

    async def _enforce(self, flow: http.HTTPFlow, state: _State, record: KeyRecord) -> None:
        """Model access, then budget and rate limits, on the model endpoints.

        The body is parsed only when the key's `models` or budget need it; a body the Router
        will refuse (400) reserves nothing.
        """
        assert state.admin is not None and state.estimator is not None
        endpoint = endpoint_of(flow.request.path)
        if flow.request.method != "POST":
            return
        counting = endpoint in COUNTING_ENDPOINTS
        if (endpoint not in MODEL_ENDPOINTS and not counting) or (counting and not record.models):
            return
        policy = Policy.of(record, state.config.general)
        estimate = 0
        if record.models or policy.max_budget is not None:
            raw = flow.request.get_content(strict=False) or b""
            body = parse_json_object(raw)  # a body the Router would refuse is refused here
            model = body.get("model")
            if not isinstance(model, str) or not model:
                return
            if not record.allows(model, state.estimator.group_of(model)):
                raise model_denied(model, record)
            if counting:
                return
            if policy.max_budget is not None:
                embeddings = endpoint == "embeddings"
                estimate = state.estimator.estimate(model, body, len(raw), embeddings)
        verdict = await state.admin.limiter.admit(policy, estimate)
        if not verdict.ok:
            raise rejection(verdict, record)
        if policy.max_budget:  # what a complexity router's budget step-down reads
            flow.metadata[IDENTITY_KEY]["budget_share"] = verdict.spent / policy.max_budget
        assert verdict.reservation is not None
        verdict.reservation.key_alias, verdict.reservation.team = record.key_alias, record.team
        flow.metadata[RESERVATION_KEY] = verdict.reservation

    def _reply(self, flow: http.HTTPFlow, error: ProxyError) -> None:
        flows.refuse(flow, error, self.shared)

    # --- settling -------------------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        self._flow_done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._flow_done(flow)

    def _flow_done(self, flow: http.HTTPFlow) -> None:
        reservation = flow.metadata.pop(RESERVATION_KEY, None)
        if reservation is None:
            return
        exchange = flow.metadata.get(EXCHANGE_KEY)
        if isinstance(exchange, Exchange) and exchange.ended_at is None:
            now = time.monotonic()
            self.pending[exchange.request_id] = (now, reservation)
            self._expire_pending(now)
            return
        self._settle(reservation, exchange if isinstance(exchange, Exchange) else None)

    def exchange_done(self, exchange: Exchange) -> None:
        held = self.pending.pop(exchange.request_id, None)
        if held is not None:
            self._settle(held[1], exchange)

    def _expire_pending(self, now: float) -> None:
        """Drop reservations whose exchange never finished (the limiter expires them too)."""
        state = self.state
        ttl = state.config.router.timeout + 60.0 if state else 660.0
        for rid in [rid for rid, (t, _) in self.pending.items() if t < now - ttl]:
            del self.pending[rid]

    def _settle(self, reservation: Reservation, exchange: Exchange | None) -> None:
        state = self.state
        if state is None or state.admin is None or state.estimator is None:
            return
        cost = usd_to_nanos(state.estimator.cost(exchange)) if exchange is not None else 0
        usage = exchange.usage if exchange is not None else None
        tokens = usage.total_tokens if usage is not None else 0
        self._spawn(self._settle_async(state, reservation, cost, tokens))

    async def _settle_async(self, state: _State, reservation: Reservation, cost: int,
                            tokens: int) -> None:  # fmt: skip
        assert state.admin is not None
        try:
            update = await state.admin.limiter.settle(reservation, cost, tokens)
        except Exception as e:
            log.warning("auth: could not settle a budget reservation: %s: %s",
                        type(e).__name__, e)  # fmt: skip
            return
        self.shared.publish_budget(update)

    def _spawn(self, coro: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (config loaded before the proxy runs)
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

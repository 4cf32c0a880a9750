"""Calling one deployment: build the provider's request, send it on the pooled session, and turn
what comes back (an answer, an open stream or an error) into the engine's terms."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from mitmroute import errors
from mitmroute.config import Deployment, RouterConfig
from mitmroute.errors import ProxyError
from mitmroute.exchange import Attempt, Exchange
from mitmroute.providers import EMBEDDINGS, Provider, provider_for
from mitmroute.providers.base import StreamTranslator
from mitmroute.request import ClientRequest, bearer, now_utc
from mitmroute.secrets import LineRedactor, Redactor, deployment_secrets, same_origin

FORWARDED_CLIENT_HEADERS = ("openai-organization", "openai-project")


def bad_answer(deployment: Deployment, error: Exception) -> ProxyError:
    """A backend answer this proxy could not read: retryable, another deployment may do."""
    return ProxyError(
        502,
        f"{deployment.litellm_model} sent an answer that could not be read: "
        f"{type(error).__name__}: {error}",
        "server_error",
        code="bad_upstream_response",
        retryable=True,
    )


def untranslatable(deployment: Deployment, error: Exception) -> ProxyError:
    """A request whose shape the deployment's provider can't translate: the client's 400."""
    return ProxyError(
        400,
        f"The request could not be translated for {deployment.litellm_model}: a parameter has "
        f"the wrong shape ({type(error).__name__}: {str(error)[:200]})",
        "invalid_request_error",
        code="invalid_request_shape",
        kind="unsupported",
    )


@dataclass(slots=True)
class Answer:
    """A successful upstream answer, before it becomes a Reply."""

    deployment: Deployment
    body: dict[str, Any] | None = None
    raw: bytes | None = None
    """The backend's own bytes, when they already are the OpenAI answer (no re-encoding)."""
    stream: OpenStream | None = None


@dataclass(slots=True)
class OpenStream:
    response: aiohttp.ClientResponse
    translator: StreamTranslator
    first: list[dict[str, Any]]
    read_timeout: float | None
    redactor: Redactor
    """For texts made from the stream's failures (the translator reads redacted bytes)."""


class RedactedStream(StreamTranslator):
    """A provider's stream translator that only ever sees redacted bytes."""

    __slots__ = ("_inner", "_lines")

    def __init__(self, inner: StreamTranslator, redactor: Redactor) -> None:
        self._inner = inner
        self._lines = LineRedactor(redactor)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return self._inner.feed(self._lines.feed(data))

    def finish(self) -> list[dict[str, Any]]:
        self._inner.feed(self._lines.finish())  # an unfinished line: only buffered, no chunks
        return self._inner.finish()

    @property
    def done(self) -> bool:
        return self._inner.done


def call_failure(error: BaseException, deployment: Deployment, timed_out: str) -> BaseException:
    """The ProxyError a failed backend call stands for; anything else is returned unchanged."""
    if isinstance(error, TimeoutError):
        return errors.upstream_timeout(f"{deployment.litellm_model} {timed_out}")
    if isinstance(error, aiohttp.ClientError):
        return errors.upstream_unreachable(
            f"{deployment.litellm_model} unreachable: {type(error).__name__}: {error}"
        )
    if isinstance(error, ValueError | TypeError | KeyError | AttributeError):
        return bad_answer(deployment, error)
    return error


class Upstream:
    """The pooled HTTP session to every backend, and one attempt at one deployment."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.session: aiohttp.ClientSession | None = None
        self.redactor = Redactor.for_deployments(config.deployments)
        """Every backend secret of the config, scrubbed from whatever comes back."""
        self._credentialed = {d.id for d in config.deployments if any(deployment_secrets(d))}

    async def start(self) -> None:
        """Open the pooled session (idempotent)."""
        if self.session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=60
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def _client_key_goes_to(self, deployment: Deployment, client: ClientRequest) -> bool:
        """A client's key goes only to a deployment with no credentials of its own, and only
        where the client sent it: the same scheme, host and port."""
        return deployment.id not in self._credentialed and same_origin(
            deployment.api_base, client.scheme, client.host, client.port
        )

    async def attempt(
        self,
        client: ClientRequest,
        endpoint: str,
        body: dict[str, Any],
        deployment: Deployment,
        exchange: Exchange,
        remaining: float,
    ) -> Answer:
        provider = provider_for(deployment.provider)
        try:
            if endpoint not in provider.endpoints:
                raise errors.bad_request(
                    f"`{deployment.litellm_model}` does not serve /v1/{endpoint}", param="model"
                )
            call = provider.build(endpoint, body, deployment, drop_params=self.config.drop_params)
        except ProxyError as e:
            e.kind = "unsupported"  # this deployment can't take it; another one may
            raise
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise untranslatable(deployment, e) from None
        headers, redactor = call.headers, self.redactor
        if self._client_key_goes_to(deployment, client):
            # No key of our own: the client's key (and org/project) go where it meant them to,
            # and are kept out of logs like our own keys.
            if auth := client.headers.get("authorization"):
                headers = {**headers, "authorization": auth}
                redactor = redactor.adding(bearer(client.headers) or auth)
            for name in FORWARDED_CLIENT_HEADERS:
                if name in client.headers:
                    headers[name] = client.headers[name]
        stream = bool(body.get("stream")) and endpoint != EMBEDDINGS
        timeout = min(deployment.timeout or self.config.router.timeout, remaining)
        started, t0 = now_utc(), time.perf_counter()
        attempt = Attempt(
            len(exchange.attempts) + 1, deployment.litellm_model, deployment.public_base, started
        )
        exchange.attempts.append(attempt)
        try:
            if stream:
                first_byte = deployment.stream_timeout or self.config.router.stream_timeout
                opened = await self._open_stream(
                    provider,
                    endpoint,
                    deployment,
                    call.url,
                    headers,
                    call.body,
                    timeout,
                    min(first_byte or timeout, remaining),
                    redactor,
                )
                attempt.status_code = 200
                return Answer(deployment, stream=opened)
            result, raw = await self._call(
                provider, endpoint, deployment, call.url, headers, call.body, timeout, redactor
            )
            attempt.status_code = 200
            return Answer(deployment, body=result, raw=raw if provider.verbatim else None)
        except ProxyError as e:
            redactor.error(e)  # aiohttp's texts may hold a URL with credentials
            attempt.status_code, attempt.error_type = e.status, e.code or e.kind
            raise
        finally:
            attempt.latency_ms = (time.perf_counter() - t0) * 1000

    async def _call(
        self,
        provider: Provider,
        endpoint: str,
        deployment: Deployment,
        url: str,
        headers: dict[str, str],
        data: bytes,
        timeout: float,
        redactor: Redactor,
    ) -> tuple[dict[str, Any], bytes]:
        """The parsed answer and the (redacted) bytes it was parsed from."""
        assert self.session is not None
        try:
            async with self.session.post(
                url, data=data, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                raw = redactor.bytes(await resp.read())
                if resp.status >= 400:
                    raise self._upstream_error(provider, resp, raw)
                return provider.parse(endpoint, raw, deployment), raw
        except Exception as e:
            error = call_failure(e, deployment, f"did not answer within {timeout:.1f}s")
            if error is e:
                raise
            raise error from None

    async def _open_stream(
        self,
        provider: Provider,
        endpoint: str,
        deployment: Deployment,
        url: str,
        headers: dict[str, str],
        data: bytes,
        timeout: float,
        first_byte: float,
        redactor: Redactor,
    ) -> OpenStream:
        """Open the upstream stream and wait for its first chunk: failing before that point
        is still invisible to the client (the ladder moves on)."""
        assert self.session is not None
        resp = None
        try:
            async with asyncio.timeout(first_byte):  # one deadline, keep-alive comments or not
                resp = await self.session.post(url, data=data, headers=headers)
                if resp.status >= 400:
                    raise self._upstream_error(provider, resp, redactor.bytes(await resp.read()))
                translator = provider.stream(endpoint, deployment)
                if redactor:
                    translator = RedactedStream(translator, redactor)
                first: list[dict[str, Any]] = []
                while not first:
                    data_in = await resp.content.readany()
                    if not data_in:
                        first = translator.finish()
                        if not first:
                            raise ProxyError(
                                502,
                                f"{deployment.litellm_model} closed the stream before sending "
                                "anything",
                                "server_error",
                                code="upstream_stream_empty",
                                retryable=True,
                            )
                        break
                    first = translator.feed(data_in)
            read_timeout = deployment.stream_timeout or self.config.router.stream_timeout
            return OpenStream(resp, translator, first, read_timeout or timeout, redactor)
        except BaseException as e:
            if resp is not None:
                resp.close()
            error = call_failure(e, deployment, f"sent no stream data within {first_byte:.1f}s")
            if error is e:
                raise
            raise error from None

    @staticmethod
    def _upstream_error(provider: Provider, resp: aiohttp.ClientResponse, raw: bytes) -> ProxyError:
        try:
            payload: Any = json.loads(raw)
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        error = provider.error(resp.status, payload)
        if "retry-after" in resp.headers:
            error.headers["retry-after"] = resp.headers["retry-after"]
        if "retry-after-ms" in resp.headers:
            with contextlib.suppress(ValueError):
                error.headers["retry-after"] = str(float(resp.headers["retry-after-ms"]) / 1000)
        return error

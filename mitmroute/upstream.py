"""Calling one deployment: build the provider's request, send it on the pooled connections, and
turn what comes back (an answer, an open stream or an error) into the engine's terms."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from mitmroute import errors
from mitmroute.cache.replay import answer_chunks
from mitmroute.config import Deployment, RouterConfig
from mitmroute.errors import ProxyError
from mitmroute.exchange import Attempt, Exchange
from mitmroute.providers import EMBEDDINGS, Provider, provider_for
from mitmroute.providers.base import StreamTranslator, UpstreamCall
from mitmroute.request import ClientRequest, NativeRequest, bearer, now_utc
from mitmroute.secrets import LineRedactor, Redactor, deployment_secrets, same_origin
from mitmroute.upstream_http import Pool, Response

FORWARDED_CLIENT_HEADERS = ("openai-organization", "openai-project")
CLIENT_KEY_HEADERS = ("authorization", "x-api-key")
"""Where a client's own key may be (OpenAI's way, Anthropic's)."""


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


def not_native(deployment: Deployment, native: NativeRequest) -> ProxyError:
    """A request only a deployment speaking its own dialect can serve (skip this one)."""
    return ProxyError(
        400,
        f"{deployment.litellm_model} can't serve this request: "
        f"{'; '.join(native.untranslatable)} can only go to a(n) {native.dialect} deployment",
        "invalid_request_error",
        code="invalid_request_shape",
        kind="unsupported",
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


class WholeAnswer(StreamTranslator):
    """The stream of a backend that answered a streamed request with one whole JSON answer:
    its chunks are all known up front (see `_open_stream`)."""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return []

    @property
    def done(self) -> bool:
        return True


def _whole_json(resp: Response) -> bool:
    media = resp.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media == "application/json"


@dataclass(slots=True)
class Answer:
    """A successful upstream answer, before it becomes a Reply."""

    deployment: Deployment
    body: dict[str, Any] | None = None
    raw: bytes | None = None
    """The backend's own bytes, when they already are the answer the client wants: OpenAI's,
    or (`native`) the client's own dialect's."""
    stream: OpenStream | None = None
    native: bool = False
    """`raw` or the stream's bytes are in the client's own dialect (`ClientRequest.native`)."""
    headers: dict[str, str] | None = None
    """Headers of the backend's answer that go back to a native client (`request-id`, ...)."""


@dataclass(slots=True)
class OpenStream:
    response: Response
    translator: StreamTranslator
    first: list[dict[str, Any]]
    read_timeout: float | None
    redactor: Redactor
    """For texts made from the stream's failures (the translator reads redacted bytes)."""
    native: str | None = None
    """The client's dialect when the stream's bytes go to it as they are (`translator` is then
    a NativeTee that keeps them)."""


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

    @property
    def last_events(self) -> list[bytes] | None:  # type: ignore[override]
        return self._inner.last_events


class NativeTee(StreamTranslator):
    """A native stream: its (redacted) bytes are kept for the client as they are, and still
    translated into chunks for the spend log and the cache."""

    __slots__ = ("_inner", "_lines", "_raw", "failed")

    def __init__(self, inner: StreamTranslator, redactor: Redactor) -> None:
        self._inner = inner
        self._lines = LineRedactor(redactor) if redactor else None
        self._raw: list[bytes] = []
        self.failed = False
        """The translator raised: the backend's own error (or unreadable data) is in the
        bytes already, and no error of ours needs adding."""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if self._lines is not None:
            data = self._lines.feed(data)
        self._raw.append(data)
        return self._translate(self._inner.feed, data)

    def finish(self) -> list[dict[str, Any]]:
        rest = self._lines.finish() if self._lines is not None else b""
        self._raw.append(rest)
        chunks = self._translate(self._inner.feed, rest)
        return chunks + self._translate(lambda _: self._inner.finish(), b"")

    def _translate(self, step: Any, data: bytes) -> list[dict[str, Any]]:
        try:
            return step(data)
        except ProxyError:
            self.failed = True
            raise

    def take(self) -> bytes:
        """The bytes received since the last call."""
        out = b"".join(self._raw)
        self._raw.clear()
        return out

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
    """The pooled HTTP connections to every backend, and one attempt at one deployment."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.http: Pool | None = None
        self.redactor = Redactor.for_deployments(config.deployments)
        """Every backend secret of the config, scrubbed from whatever comes back."""
        self._credentialed = {d.id for d in config.deployments if any(deployment_secrets(d))}

    async def start(self) -> None:
        """Open the connection pool (idempotent)."""
        if self.http is None:
            self.http = Pool()

    async def close(self) -> None:
        """Close every pooled connection; calls still under way fail."""
        if self.http is not None:
            await self.http.close()
            self.http = None

    def _client_key_goes_to(self, deployment: Deployment, client: ClientRequest) -> bool:
        """A client's key goes only to a deployment with no credentials of its own, and only
        where the client sent it: the same scheme, host and port."""
        return deployment.id not in self._credentialed and same_origin(
            deployment.api_base, client.scheme, client.host, client.port
        )

    def _credentials(
        self, deployment: Deployment, client: ClientRequest, headers: dict[str, str]
    ) -> tuple[dict[str, str], Redactor]:
        """The call's headers and redactor, with the client's key when it may go along."""
        redactor = self.redactor
        if self._client_key_goes_to(deployment, client):
            # No key of our own: the client's key (and org/project) go where it meant them to,
            # and are kept out of logs like our own keys.
            headers = dict(headers)
            for name in CLIENT_KEY_HEADERS:
                if value := client.headers.get(name):
                    headers[name] = value
                    secret = bearer(client.headers) if name == "authorization" else None
                    redactor = redactor.adding(secret or value)
            for name in FORWARDED_CLIENT_HEADERS:
                if name in client.headers:
                    headers[name] = client.headers[name]
        return headers, redactor

    def _build(
        self,
        provider: Provider,
        client: ClientRequest,
        endpoint: str,
        body: dict[str, Any],
        deployment: Deployment,
    ) -> tuple[UpstreamCall, bool]:
        """The call for one deployment, and whether it carries the client's native request."""
        native = client.native
        try:
            if native is not None and provider.native == native.dialect:
                return provider.build_native(native, client.headers, deployment), True
            if endpoint not in provider.endpoints:
                raise errors.bad_request(
                    f"`{deployment.litellm_model}` does not serve /v1/{endpoint}", param="model"
                )
            if native is not None and native.untranslatable:
                raise not_native(deployment, native)
            call = provider.build(endpoint, body, deployment, drop_params=self.config.drop_params)
            return call, False
        except ProxyError as e:
            e.kind = "unsupported"  # this deployment can't take it; another one may
            raise
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise untranslatable(deployment, e) from None

    async def attempt(
        self,
        client: ClientRequest,
        endpoint: str,
        body: dict[str, Any],
        deployment: Deployment,
        exchange: Exchange,
        remaining: float,
    ) -> Answer:
        """One attempt at `deployment`; more when it refuses a translation's optional
        parameters (see `NativeRequest.optional`), each without those it refused."""
        while True:
            t0 = time.perf_counter()
            try:
                return await self._attempt(client, endpoint, body, deployment, exchange, remaining)
            except ProxyError as e:
                refused = _refused_optional(client, body, deployment, e)
                if not refused:
                    raise
            body = {k: v for k, v in body.items() if k not in refused}
            remaining -= time.perf_counter() - t0

    async def _attempt(
        self,
        client: ClientRequest,
        endpoint: str,
        body: dict[str, Any],
        deployment: Deployment,
        exchange: Exchange,
        remaining: float,
    ) -> Answer:
        provider = provider_for(deployment.provider)
        call, native = self._build(provider, client, endpoint, body, deployment)
        headers, redactor = self._credentials(deployment, client, call.headers)
        stream = bool(body.get("stream")) and endpoint != EMBEDDINGS
        timeout = min(deployment.timeout or self.config.router.timeout, remaining)
        started, t0 = now_utc(), time.perf_counter()
        attempt = Attempt(
            len(exchange.attempts) + 1, deployment.litellm_model, deployment.public_base, started
        )
        exchange.attempts.append(attempt)
        dialect = client.native.dialect if native and client.native else None
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
                    dialect,
                )
                attempt.status_code = 200
                return Answer(
                    deployment,
                    stream=opened,
                    native=native,
                    headers=_native_headers(provider, opened.response.headers) if native else None,
                )
            result, raw, answer_headers = await self._call(
                provider, endpoint, deployment, call.url, headers, call.body, timeout, redactor
            )
            attempt.status_code = 200
            return Answer(
                deployment,
                body=result,
                raw=raw if provider.verbatim or native else None,
                native=native,
                headers=_native_headers(provider, answer_headers) if native else None,
            )
        except ProxyError as e:
            redactor.error(e)  # an error's text may hold a URL with credentials
            attempt.status_code, attempt.error_type = e.status, e.code or e.kind
            raise
        finally:
            attempt.latency_ms = (time.perf_counter() - t0) * 1000

    async def forward(
        self,
        client: ClientRequest,
        deployment: Deployment,
        call: UpstreamCall,
        exchange: Exchange,
        timeout: float,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send a ready-made call (e.g. a native request the engine doesn't route) as one
        attempt of `exchange`: the status, the answer's native headers and its redacted bytes.
        Raises ProxyError when the backend can't be reached or doesn't answer in time."""
        assert self.http is not None
        provider = provider_for(deployment.provider)
        headers, redactor = self._credentials(deployment, client, call.headers)
        number = len(exchange.attempts) + 1
        attempt = Attempt(number, deployment.litellm_model, deployment.public_base, now_utc())
        exchange.attempts.append(attempt)
        t0 = time.perf_counter()
        try:
            async with (
                asyncio.timeout(timeout),
                await self.http.post(call.url, call.body, headers) as resp,
            ):
                raw = redactor.bytes(await resp.read())
                attempt.status_code = resp.status
                if resp.status >= 400:
                    attempt.error_type = "upstream_error"
                return resp.status, _native_headers(provider, resp.headers), raw
        except Exception as e:
            error = call_failure(e, deployment, f"did not answer within {timeout:.1f}s")
            if not isinstance(error, ProxyError):
                raise
            redactor.error(error)
            attempt.status_code, attempt.error_type = error.status, error.code
            raise error from None
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
    ) -> tuple[dict[str, Any], bytes, Mapping[str, str]]:
        """The parsed answer, the (redacted) bytes it was parsed from, and its headers."""
        assert self.http is not None
        try:
            async with (
                asyncio.timeout(timeout),
                await self.http.post(url, data, headers) as resp,
            ):
                raw = redactor.bytes(await resp.read())
                if resp.status >= 400:
                    raise self._upstream_error(provider, resp, raw)
                return provider.parse(endpoint, raw, deployment), raw, resp.headers
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
        native: str | None = None,
    ) -> OpenStream:
        """Open the upstream stream and wait for its first chunk: failing before that point
        is still invisible to the client (the ladder moves on)."""
        assert self.http is not None
        resp = None
        try:
            async with asyncio.timeout(first_byte):  # one deadline, keep-alive comments or not
                resp = await self.http.post(url, data, headers)
                if resp.status >= 400:
                    raise self._upstream_error(provider, resp, redactor.bytes(await resp.read()))
                if native is None and _whole_json(resp):
                    # asked to stream, the backend answered whole: stream that answer
                    whole = provider.parse(endpoint, redactor.bytes(await resp.read()), deployment)
                    read_timeout = timeout
                    return OpenStream(
                        resp, WholeAnswer(), answer_chunks(whole), read_timeout, redactor, native
                    )
                translator = provider.stream(endpoint, deployment)
                if native is not None:
                    translator = NativeTee(translator, redactor)
                elif redactor:
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
            return OpenStream(resp, translator, first, read_timeout or timeout, redactor, native)
        except BaseException as e:
            if resp is not None:
                resp.close()
            error = call_failure(e, deployment, f"sent no stream data within {first_byte:.1f}s")
            if error is e:
                raise
            raise error from None

    @staticmethod
    def _upstream_error(provider: Provider, resp: Response, raw: bytes) -> ProxyError:
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


def _native_headers(provider: Provider, headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of a backend's answer that go back to a client of its own dialect."""
    prefixes = provider.native_headers
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(prefixes)}


def _refused_optional(
    client: ClientRequest, body: dict[str, Any], deployment: Deployment, error: ProxyError
) -> tuple[str, ...]:
    """The optional parameters to drop after `error`, if it is a refusal (400) of a
    translated request that carried some: those the refusal names, else all of them."""
    native = client.native
    if native is None or not native.optional or error.status != 400:
        return ()
    if error.kind not in ("bad_request", "unsupported"):
        return ()  # a context-window or content-policy 400 has its own fallbacks
    if provider_for(deployment.provider).native == native.dialect:
        return ()
    present = tuple(p for p in native.optional if p in body)
    named = tuple(p for p in present if p == error.param or p in error.message)
    return named or present

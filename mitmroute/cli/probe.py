"""One deployment, checked the way the proxy would call it: reachable, key accepted, model
present, latency.

First the backend's model listing (`GET <api_base>/models`, Anthropic's `/v1/models`, Ollama's
`/api/tags`) with the deployment's own credentials; when the listing is missing or doesn't name
the model, a minimal request (one `ping` message, `max_tokens: 1`) built by the deployment's
provider decides.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mitmroute.config import Deployment
from mitmroute.providers import CHAT, provider_for
from mitmroute.secrets import Redactor, deployment_secrets

if TYPE_CHECKING:
    import aiohttp

OK, WARN, FAIL = "ok", "warn", "FAIL"
PING = {"model": "ping", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}


@dataclass(slots=True)
class Probe:
    """What the doctor learnt about one deployment."""

    deployment: Deployment
    reachable: str = "-"
    key: str = "-"
    model: str = "-"
    latency_ms: float | None = None
    status: str = OK
    detail: str = ""

    @property
    def label(self) -> str:
        return deployment_label(self.deployment)

    def row(self) -> list[str]:
        latency = "-" if self.latency_ms is None else f"{self.latency_ms:.0f} ms"
        status = f"{self.status}: {self.detail}" if self.detail else self.status
        return [
            self.deployment.model_name,
            self.label,
            self.reachable,
            self.key,
            self.model,
            latency,
            status,
        ]


def os_reason(error: OSError) -> str:
    """`connection refused`, `name or service not known`: the OS's words, lower case."""
    if isinstance(error, socket.gaierror) or not error.errno:
        return str(error.strerror or error).lower()
    return os.strerror(error.errno).lower()


def deployment_label(d: Deployment) -> str:
    """`provider/model @ host:port`, without credentials."""
    parts = urlsplit(d.api_base)
    where = parts.hostname or d.api_base
    if parts.port:
        where += f":{parts.port}"
    return f"{d.litellm_model} @ {where}"


def listing_url(d: Deployment) -> str:
    """Where the backend lists its models."""
    base = d.api_base.rstrip("/")
    if d.provider in ("ollama", "ollama_chat"):
        return f"{base}/api/tags"
    if d.provider == "anthropic":
        from mitmroute.providers.anthropic import messages_url

        return messages_url(base).removesuffix("/messages") + "/models?limit=1000"
    return f"{base}/models"


def listed(d: Deployment, body: Any) -> list[str] | None:
    """The model names a listing answer holds, or None when it isn't a listing."""
    if not isinstance(body, dict):
        return None
    entries = body.get("models") if d.provider in ("ollama", "ollama_chat") else body.get("data")
    if not isinstance(entries, list):
        return None
    names: list[str] = []
    for entry in entries:
        if isinstance(entry, dict):
            names += [str(entry[k]) for k in ("id", "name", "model") if entry.get(k)]
    return names


def has_model(d: Deployment, names: list[str]) -> bool:
    if d.provider in ("ollama", "ollama_chat") and ":" not in d.model:
        return f"{d.model}:latest" in names or d.model in names
    return d.model in names


class Prober:
    """Probes deployments on one aiohttp session (no proxy: straight to each backend)."""

    def __init__(self, deployments: tuple[Deployment, ...], timeout: float) -> None:
        self.seconds = timeout
        self.redactor = Redactor.for_deployments(deployments)

    async def probe_all(self, deployments: tuple[Deployment, ...]) -> list[Probe]:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.seconds)
        async with aiohttp.ClientSession(trust_env=False, timeout=timeout) as session:
            return list(await asyncio.gather(*(self.probe(session, d) for d in deployments)))

    async def probe(self, session: aiohttp.ClientSession, d: Deployment) -> Probe:
        probe = Probe(d)
        own_key = any(deployment_secrets(d))
        try:
            call = provider_for(d.provider).build(CHAT, PING, d, drop_params=True)
        except Exception as e:  # a provider that can't make a chat request of this deployment
            probe.status, probe.detail = FAIL, f"no chat request for it: {self._say(str(e))}"
            return probe
        headers = {k: v for k, v in call.headers.items() if k.lower() != "content-type"}
        answer = await self._send(session, probe, "GET", listing_url(d), headers)
        if answer is None:
            return probe
        status, body = answer
        probe.reachable = "yes"
        if status in (401, 403):
            return self._key_refused(probe, own_key, status, body)
        probe.key = "ok" if own_key else "none"
        names = listed(d, body) if status == 200 else None
        if names is not None and has_model(d, names):
            probe.model = "listed"
            return probe
        if d.provider in ("ollama", "ollama_chat") and names is not None:
            probe.model, probe.status = "missing", FAIL
            probe.detail = f"model missing: not pulled on this Ollama (ollama pull {d.model})"
            return probe
        if status >= 500:
            return self._failed(probe, "the model listing", status, body)
        # No listing, or one without the model (an alias?): a minimal request decides.
        answer = await self._send(session, probe, call.method, call.url, call.headers, call.body)
        if answer is None:
            return probe
        return self._judge(probe, own_key, *answer)

    def _judge(self, probe: Probe, own_key: bool, status: int, body: Any) -> Probe:
        """The verdict from a minimal request's answer."""
        if status in (401, 403):
            return self._key_refused(probe, own_key, status, body)
        if 200 <= status < 300:
            probe.model = "answers"
        elif status == 404:
            probe.model, probe.status = "missing", FAIL
            probe.detail = f"model missing (404): {self._say(body)}"
        elif status in (400, 422, 429):
            probe.model, probe.status = "?", WARN
            probe.detail = f"a 1-token chat answered {status}: {self._say(body)}"
        else:
            return self._failed(probe, "a 1-token chat", status, body)
        return probe

    def _key_refused(self, probe: Probe, own_key: bool, status: int, body: Any) -> Probe:
        if own_key:
            probe.key, probe.status = "rejected", FAIL
            probe.detail = f"key rejected ({status}): {self._say(body)}"
        else:  # the proxy sends the client's key here: nothing to check without one
            probe.key, probe.status = "needed", WARN
            probe.detail = f"{status} without a key: no api_key configured (clients' keys are sent)"
        return probe

    def _failed(self, probe: Probe, what: str, status: int, body: Any) -> Probe:
        probe.status, probe.detail = FAIL, f"{what} answered {status}: {self._say(body)}"
        return probe

    async def _send(
        self,
        session: aiohttp.ClientSession,
        probe: Probe,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None = None,
    ) -> tuple[int, Any] | None:
        """(status, parsed body); None (the probe says why) when the backend can't be reached."""
        import aiohttp

        started = time.monotonic()
        try:
            async with session.request(method, url, headers=headers, data=body) as response:
                raw = await response.read()
                status = response.status
        except TimeoutError:
            probe.reachable, probe.status = "no", FAIL
            probe.detail = f"no answer in {self.seconds:g} s"
            return None
        except aiohttp.ClientConnectorError as e:
            probe.reachable, probe.status = "no", FAIL
            probe.detail = f"cannot connect: {os_reason(e.os_error)}"
            return None
        except aiohttp.ClientError as e:
            probe.reachable, probe.status = "no", FAIL
            probe.detail = self._say(str(e) or type(e).__name__)
            return None
        finally:
            probe.latency_ms = (time.monotonic() - started) * 1000
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def _say(self, body: Any) -> str:
        """A backend's answer in a few words, credentials redacted."""
        if isinstance(body, dict):
            error = body.get("error")
            if isinstance(error, dict) and error.get("message"):
                body = error["message"]
            elif isinstance(error, str):
                body = error
            else:
                body = json.dumps(body)
        text = " ".join(self.redactor.text(str(body)).split())
        return text if len(text) <= 160 else text[:157] + "..."

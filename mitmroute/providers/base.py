"""The provider interface: how one backend kind is called and how its answers become OpenAI's.

A provider turns an OpenAI-shaped request body into an `UpstreamCall` for one deployment, and
turns the backend's answer (a whole body, or a stream of bytes) back into OpenAI's shapes.
Providers are pure: no I/O, so they are tested without a network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mitmroute.config import Deployment
from mitmroute.errors import ProxyError, upstream_error
from mitmroute.exchange import Usage

if TYPE_CHECKING:
    from mitmroute.request import NativeRequest

CHAT = "chat/completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """A ready-to-send HTTP request to a backend."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes


class StreamTranslator(ABC):
    """Turns a backend's streamed bytes into OpenAI `chat.completion.chunk` dicts, incrementally.

    `feed` may be called with any split of the byte stream (half an event, several events).
    An error the backend reports inside the stream is raised as ProxyError.
    """

    last_events: list[bytes] | None = None
    """The SSE events (`data: ...\n\n`) the chunks of the last `feed` or `finish` came in, one
    a chunk, when they can go to an OpenAI client as the backend sent them; None when the
    chunks are translated (they are encoded anew)."""

    @abstractmethod
    def feed(self, data: bytes) -> list[dict[str, Any]]: ...

    def finish(self) -> list[dict[str, Any]]:
        """Chunks still pending when the backend closed the stream."""
        return []

    @property
    def done(self) -> bool:
        """True once the backend signalled a complete, successful end of stream."""
        return False


class Provider(ABC):
    """One backend kind (OpenAI-compatible, Ollama, Anthropic)."""

    name: str = ""
    endpoints: frozenset[str] = frozenset({CHAT})
    verbatim: bool = False
    """True when the backend's non-streamed answers are already OpenAI's and go out as sent."""
    native: str | None = None
    """The inbound dialect this backend speaks itself (`anthropic`): its requests are sent as
    the client wrote them (`build_native`) and its answers go back unchanged."""
    native_headers: tuple[str, ...] = ()
    """Prefixes of the answer's header names that go back to a native client with it."""

    @abstractmethod
    def build(
        self, endpoint: str, body: dict[str, Any], deployment: Deployment, *, drop_params: bool
    ) -> UpstreamCall:
        """The upstream request for `body` (already validated, `model` still the client's).

        For streams (`body["stream"]` true) ask the backend for usage where it can. Raise
        ProxyError (400 naming the parameter) for what the backend can't do, unless
        `drop_params`, in which case drop it.
        """

    def build_native(
        self, native: NativeRequest, client_headers: Mapping[str, str], deployment: Deployment
    ) -> UpstreamCall:
        """The upstream request for a request in this provider's own dialect (`native`): the
        client's body with only the model and credentials swapped."""
        raise NotImplementedError(f"{self.name} speaks no inbound dialect")

    @abstractmethod
    def parse(self, endpoint: str, raw: bytes, deployment: Deployment) -> dict[str, Any]:
        """An OpenAI-shaped response body from the backend's successful (2xx) answer."""

    @abstractmethod
    def stream(self, endpoint: str, deployment: Deployment) -> StreamTranslator:
        """A translator for one streamed answer."""

    def error(self, status: int, payload: Any) -> ProxyError:
        """An OpenAI-shaped error from the backend's error answer (payload: parsed JSON or text)."""
        return upstream_error(status, payload, provider=self.name)


def usage_of(response: dict[str, Any]) -> Usage | None:
    """The usage of an OpenAI-shaped response body, if it has one."""
    return Usage.from_openai(response.get("usage"))

"""Connection-level guards: intercepted hosts never get raw traffic, and idle or slow clients
do not hold connections forever. End-to-end through real mitmdump processes.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import ssl
import threading
import time

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from mitmroute.addons.client_timeouts import ClientTimeouts
from mitmroute.client_deadlines import DEFAULT_HEADER, Limits, overdue
from mitmroute.hosts import HostSet
from tests.conftest import Proxy, deployment

# -- a stand-in for the intercepted host's real server, and a hand-made TLS client ------------


class LoopbackServer:
    """A loopback listener that counts dials; with `echo`, it echoes, else it hangs up.

    As the intercepted name `localhost`, it stands in for the original host's real server."""

    def __init__(self, echo: bool = False) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.echo = echo
        self.dials = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.dials += 1
            if self.echo:
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()
            else:
                conn.close()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def original_host():
    host = LoopbackServer()
    resolved = {info[4][0] for info in socket.getaddrinfo("localhost", host.port)}
    assert "127.0.0.1" in resolved, f"`localhost` must reach the stand-in: {resolved}"
    yield host
    host.close()


def router_config(backend_url: str) -> dict:
    return {
        "model_list": [
            deployment("gpt-4o", "openai/ok-model", f"{backend_url}/v1", api_key="sk-backend"),
            deployment("slow", "openai/slow-4500", f"{backend_url}/v1", api_key="sk-backend"),
        ],
        "general_settings": {"intercept_hosts": ["api.openai.com", "localhost"]},
    }


class TlsTunnel:
    """CONNECT through the proxy, then TLS by hand (no ALPN), so each write is one record."""

    def __init__(self, proxy: Proxy, host: str, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        self.sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head and (data := self.sock.recv(4096)):
            head += data
        assert head.startswith(b"HTTP/1.1 200"), head
        context = ssl.create_default_context(cafile=proxy.ca_bundle)  # offers no ALPN
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=host)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not (data := self.sock.recv(65536)):
                    raise ConnectionResetError("closed during the TLS handshake") from None
                self.incoming.write(data)
        self._flush()

    def _flush(self) -> None:
        if pending := self.outgoing.read():
            self.sock.sendall(pending)

    def send_record(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def read_until_closed(self) -> bytes:
        """Everything the other side sends until it closes (b"" if it just hangs up)."""
        received = b""
        while True:
            try:
                received += self.tls.read(65536)
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return received
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return received
            if not data:
                return received
            self.incoming.write(data)

    def close(self) -> None:
        self.sock.close()


def chat_request(host: str, content: str) -> bytes:
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": content}]})
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        "Authorization: Bearer sk-client-key\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
    ).encode()


# -- 1. raw relays to intercepted hosts ------------------------------------------------------


@pytest.mark.parametrize(
    "extra_args",
    [[], ["--set", "tcp_hosts=localhost"], ["--ignore-hosts", "localhost"]],
    ids=["default", "tcp_hosts", "ignore_hosts"],
)
def test_a_request_split_across_tls_records_is_routed_not_relayed_raw(
    start_proxy, backend, original_host, extra_args
):
    """No ALPN and a first record of just `PO` used to make mitmproxy relay raw TCP, key and
    all, to the original host; the request is now parsed as HTTP and answered by the router."""
    proxy = start_proxy(router_config(backend.url), extra_args=extra_args)
    tunnel = TlsTunnel(proxy, "localhost", original_host.port)
    try:
        request = chat_request(f"localhost:{original_host.port}", "split")
        tunnel.send_record(request[:2])
        time.sleep(0.3)  # the gap between records is the point: mitmproxy decides on `PO`
        tunnel.send_record(request[2:])
        answer = tunnel.read_until_closed()
    finally:
        tunnel.close()
    assert original_host.dials == 0, proxy.logs()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"x-mitmroute-deployment: openai/ok-model" in answer.lower()
    assert b"echo: split" in answer


@pytest.mark.parametrize(
    "extra_args", [[], ["--ignore-hosts", "."]], ids=["tcp_flow", "ignored_no_flow"]
)
def test_raw_tcp_to_an_intercepted_host_is_refused_without_dialling_it(
    start_proxy, backend, original_host, extra_args
):
    """Reverse `tcp://` mode relays raw by design: for an intercepted host it is refused."""
    proxy = start_proxy(
        router_config(backend.url),
        extra_args=["--mode", f"reverse:tcp://localhost:{original_host.port}", *extra_args],
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(chat_request("localhost", "raw"))
        received = b""
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                received += data
    assert received == b""
    assert original_host.dials == 0
    logs = proxy.logs()
    assert "refused raw TCP" in logs or "refused to dial intercepted host localhost" in logs


def test_intercepted_hosts_match_whatever_their_case_or_trailing_dot():
    hosts = HostSet(["api.openai.com", "Example.ORG."])
    assert hosts.match(None, "API.OpenAI.com.") == "api.openai.com"
    assert hosts.match("example.org") == "example.org"
    assert hosts.match("openai.com", "api.openai.com.evil", "") is None


# -- 2. client timeouts -----------------------------------------------------------------------

IDLE, HEADER = 2, 4


@pytest.fixture(scope="module")
def echo():
    server = LoopbackServer(echo=True)
    yield server
    server.close()


@pytest.fixture(scope="module")
def timed(backend, confdir, tmp_path_factory, echo):
    proxy = Proxy(
        router_config(backend.url),
        confdir,
        tmp_path_factory.mktemp("timed"),
        extra_args=[
            "--set",
            f"client_idle_timeout={IDLE}",
            "--set",
            f"client_header_timeout={HEADER}",
            "--ignore-hosts",
            rf"^127\.0\.0\.1:{echo.port}$",
        ],
    )
    yield proxy
    proxy.stop()


def open_clients(proxy: Proxy, count: int) -> dict[socket.socket, float]:
    """`count` connections to the proxy, each with the moment it was opened."""
    return {
        socket.create_connection(("127.0.0.1", proxy.port)): time.monotonic() for _ in range(count)
    }


def watch_closes(
    opened: dict[socket.socket, float], seconds: float, trickle: bytes = b"", every: float = 0.5
) -> list[float]:
    """How old each connection was when the proxy closed it (watching for `seconds`); with
    `trickle`, every open connection sends its next byte of it every `every` seconds."""
    deadline = time.monotonic() + seconds
    ages: list[float] = []
    sent = dict.fromkeys(opened, 0)
    next_byte = time.monotonic()
    with selectors.DefaultSelector() as selector:
        for sock in opened:
            selector.register(sock, selectors.EVENT_READ)
        while sent and (now := time.monotonic()) < deadline:
            if trickle and now >= next_byte:
                next_byte += every
                for sock in list(sent):
                    with contextlib.suppress(OSError):
                        sock.send(trickle[sent[sock] : sent[sock] + 1])
                        sent[sock] += 1
            for key, _ in selector.select(timeout=0.05):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if not data:
                    ages.append(time.monotonic() - opened[sock])  # type: ignore[index]
                    selector.unregister(sock)
                    del sent[sock]  # type: ignore[arg-type]
    return ages


def test_idle_connections_are_closed_after_client_idle_timeout(timed):
    socks = open_clients(timed, 50)
    try:
        closed = watch_closes(socks, IDLE + 3)
    finally:
        for sock in socks:
            sock.close()
    assert len(closed) == 50
    assert min(closed) >= IDLE - 0.2 and max(closed) <= IDLE + 2, closed


def test_slow_headers_are_cut_at_client_header_timeout_though_bytes_keep_coming(timed):
    """One header byte every 0.5 s resets mitmproxy's tcp_timeout and our idle clock; the
    header clock still ends it."""
    head = b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\nX-Pad: "
    socks = open_clients(timed, 20)
    try:
        closed = watch_closes(socks, HEADER + 3, trickle=head + b"a" * 200, every=0.5)
    finally:
        for sock in socks:
            sock.close()
    assert len(closed) == 20
    assert min(closed) >= HEADER - 0.2 and max(closed) <= HEADER + 2, closed


def test_a_kept_alive_connection_is_closed_when_idle_after_its_answer(timed):
    with socket.create_connection(("127.0.0.1", timed.port), timeout=10) as sock:
        sock.sendall(
            b"GET http://api.openai.com/v1/models HTTP/1.1\r\nHost: api.openai.com\r\n"
            b"Authorization: Bearer sk-client-key\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        sock.settimeout(None)
        closed = watch_closes({sock: time.monotonic()}, HEADER + 3)
    assert len(closed) == 1 and IDLE - 0.2 <= closed[0] <= IDLE + 2, closed


def test_a_stream_pausing_longer_than_both_timeouts_is_never_cut(timed):
    """4.5 s between chunks, with a 2 s idle and a 4 s header timeout: the stream completes."""
    with timed.client() as client:
        stream = client.chat.completions.create(
            model="slow", stream=True, messages=[{"role": "user", "content": "x"}]
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "echo: x"


def test_an_ignored_tunnel_is_left_to_tcp_timeout(timed, echo):
    """mitmproxy relays ignored hosts raw (`--allow-hosts` ignores all others): no request
    will ever be seen on them, so the request clocks must not apply."""
    with socket.create_connection(("127.0.0.1", timed.port), timeout=10) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"first")
        assert sock.recv(4096) == b"first"
        time.sleep(HEADER + 1)
        sock.sendall(b"still there")
        assert sock.recv(4096) == b"still there"


def test_timeouts_count_from_the_end_of_the_last_exchange():
    limits = Limits(idle=2, header=4)
    assert overdue(limits, waiting_since=100, last_activity=None, now=101) == (None, 102)
    assert overdue(limits, 100, None, 102) == ("idle", None)
    # bytes keep arriving: idle never fires, the header clock does
    assert overdue(limits, 100, last_activity=103.5, now=103.9) == (None, 104)
    assert overdue(limits, 100, last_activity=103.9, now=104) == ("header", None)
    # activity before the exchange ended does not count against the new wait
    assert overdue(limits, 100, last_activity=50, now=101) == (None, 102)
    assert overdue(Limits(idle=0, header=0), 100, None, 10_000) == (None, None)


def test_a_negative_timeout_is_refused_naming_the_value():
    addon = ClientTimeouts()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match=r"client_header_timeout.*-5"):
            tctx.configure(addon, client_header_timeout=-5)
        tctx.configure(addon, client_idle_timeout=0)
        assert addon.limits == Limits(idle=0, header=DEFAULT_HEADER)
